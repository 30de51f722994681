"""What the registry records about a model, without any model code: importing this loads no torch.

A provider inspects a model into a :class:`ModelProfile`; registering it as a name and
version makes a :class:`ModelSpec`, one row of ``embedding_models``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelProfile:
    """What a provider reports about a model: enough to embed with it and to recognise it again."""

    provider: str  # the provider module that runs it: "transformer", "static", …
    dim: int
    max_tokens: int  # input limit in tokens; 0 = none
    config: dict[str, Any]  # the provider's settings that shape the vectors (pooling, dtype, prefix, …)
    fingerprint: str  # hex sha256 of everything that shapes the vector space


@dataclass(frozen=True)
class ModelSpec:
    """One row of the registry table ``embedding_models``."""

    version: int
    name: str
    provider: str
    source: str  # where the provider finds the model: a folder, a cached hub id
    dim: int
    max_tokens: int
    config: dict[str, Any] = field(hash=False)
    fingerprint: str

    @property
    def embedder_fingerprint(self) -> str:
        """The fingerprint the loaded model must have: its own, without the chunking policy a chunked model's
        ``fingerprint`` also covers (see :mod:`segue.embedding.chunking`)."""
        return self.config.get("embedder_fingerprint", self.fingerprint)

    @property
    def chunked(self) -> bool:
        """Whether the model embeds chunks of documents (into its chunk table) rather than whole documents."""
        return "chunking" in self.config

    @classmethod
    def from_profile(cls, version: int, name: str, source: str, profile: ModelProfile) -> ModelSpec:
        """The spec of an inspected model (version 0 for one that is not registered)."""
        return cls(version=version, name=name, provider=profile.provider, source=source, dim=profile.dim,
                   max_tokens=profile.max_tokens, config=dict(profile.config), fingerprint=profile.fingerprint)
