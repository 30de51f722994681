"""Embedding providers: one module per kind of model, behind one interface (see ``base``).

``PROVIDERS`` names them (one per options model); a module is imported only when a model of its kind is
inspected or loaded, so importing this package loads no model code (no torch). A
model's options are validated by its provider's pydantic model (``options``) before
the provider sees them. To add a provider, write one module here with ``inspect`` and
``load`` (see ``base``) and add its options model, whose ``provider`` field names it,
to ``options.AnyOptions``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from segue.embedding.chunking import ChunkingPolicy, chunked_profile
from segue.embedding.providers.base import Embedder, OptionsError, resolve_source
from segue.embedding.providers.options import BY_PROVIDER
from segue.embedding.providers.options import parse as parse_options
from segue.spec import ModelProfile, ModelSpec

PROVIDERS = tuple(BY_PROVIDER)  # ("transformer", "static", "openai")
ADOPTED = "adopted"  # vectors adopted from an existing table (segue import): stored, never computed here

__all__ = ["ADOPTED", "PROVIDERS", "Embedder", "OptionsError", "detect", "embeds", "inspect", "load", "shown_config"]


def embeds(spec: ModelSpec) -> bool:
    """Whether Segue can compute ``spec``'s vectors (an adopted model cannot until it is bound to a provider)."""
    return spec.provider != ADOPTED


def shown_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A registration's settings for listings: without recorded vectors (an API model's canaries)."""
    return {key: value for key, value in config.items() if key != "canary_vectors"}


def _known(name: str) -> str:
    if name not in PROVIDERS:
        raise OptionsError(f"no provider named {name!r} (providers: {', '.join(PROVIDERS)})")
    return name


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"segue.embedding.providers.{_known(name)}")


def detect(source: str) -> str:
    """The provider of a local model folder: ``static`` for a model2vec folder, else ``transformer``."""
    from segue.embedding.providers.static import is_static_folder

    return "static" if is_static_folder(resolve_source(source)) else "transformer"


def inspect(source: str, *, provider: str | None = None, options: Mapping[str, Any] | None = None,
            chunking: Mapping[str, Any] | None = None) -> ModelProfile:
    """Profile the model at ``source`` with ``provider`` (default: :func:`detect`) and its ``options``; with
    ``chunking`` (a :class:`~segue.embedding.chunking.ChunkingPolicy`'s settings), a chunked model.

    The options and the policy are validated first: a wrong one is an :class:`OptionsError` naming it and what
    it takes.
    """
    name = _known(provider or detect(source))
    checked = parse_options(name, options or {})  # before the provider's module (and torch) is imported
    policy = None if chunking is None else ChunkingPolicy.parse(chunking)
    profile = _module(name).inspect(source, checked)
    return profile if policy is None else chunked_profile(profile, policy)


def load(spec: ModelSpec, device: str | None) -> Embedder:
    """The registered model ``spec``, loaded by its provider on ``device`` (None: the provider's choice)."""
    if not embeds(spec):
        raise OptionsError(f"model {spec.name!r} holds adopted vectors and cannot embed: bind it to a provider "
                           "first (segue models bind)")
    return _module(spec.provider).load(spec, device)
