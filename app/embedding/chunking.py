"""Chunking policies: how a chunked model cuts a document into the pieces it embeds (no model code here).

A policy is part of a model's identity: registering weights with a policy gives a
fingerprint of both (:func:`chunked_profile`), so the same weights with another policy
are another model, migrated like any other. The registry keeps the policy in the
model's ``config["chunking"]`` and the weights' own fingerprint, which a loaded model
is checked against, in ``config["embedder_fingerprint"]``.

:func:`split` is pure: it takes a document's body and the character span of each of its
tokens under the model's own tokenizer, and returns chunks that never hold more than
``size`` of those tokens. Splitters:

* ``tokens``: windows of ``size`` tokens, each starting ``size - overlap`` tokens after
  the previous one;
* ``sentences``: whole sentences packed up to ``size`` tokens, a paragraph (text between
  blank lines) at a time, so an edit changes only its paragraph's chunks; ``overlap``
  repeats the previous chunk's last sentences up to that many tokens;
* ``markdown``: paragraphs packed a section (a heading and what follows, up to the next
  heading) at a time, each chunk carrying its section's heading line.

A unit longer than ``size`` is cut into token windows. ``title: first_line`` carries the
document's first line into every chunk that does not already start with it.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from segue.embedding.providers.base import OptionsError
from segue.spec import ModelProfile, ModelSpec

ADOPTED_CHUNKS = "adopted"  # config["chunking"] of a model whose chunks and vectors ``segue import`` adopted
Spans = Sequence[tuple[int, int]]  # the (start, end) characters of each token of a text, in order
TokenSpans = Callable[[Sequence[str]], list[Spans]]  # a model's tokenizer, as :func:`split` needs it

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_HEADING = re.compile(r"^#{1,6}[ \t]", re.MULTILINE)


class ChunkingPolicy(BaseModel):
    """How a model's documents are cut: splitter, chunk size and overlap in the model's tokens, the title carried."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    splitter: Annotated[Literal["tokens", "sentences", "markdown"],
                        Field(description="one of tokens, sentences, markdown")] = "tokens"
    size: Annotated[int, Field(gt=0, strict=True, description="a positive number of tokens")] = 256
    overlap: Annotated[int, Field(ge=0, strict=True, description="a number of tokens, 0 or more")] = 0
    title: Annotated[Literal["none", "first_line"], Field(description="one of none, first_line")] = "none"

    @model_validator(mode="after")
    def _overlap_below_size(self) -> ChunkingPolicy:
        if self.overlap >= self.size:
            raise ValueError(f"the overlap ({self.overlap}) must be smaller than the chunk size ({self.size})")
        return self

    @classmethod
    def parse(cls, values: Mapping[str, Any]) -> ChunkingPolicy:
        """``values`` validated; a refusal is one :class:`OptionsError` line naming the setting."""
        try:
            return cls.model_validate(dict(values))
        except ValidationError as error:
            first = error.errors()[0]
            if not first["loc"]:
                raise OptionsError(f"chunking: {first['ctx']['error']}") from None
            name = first["loc"][0]
            if first["type"] == "extra_forbidden":
                raise OptionsError(f"chunking has no setting {name!r} (settings: {', '.join(cls.model_fields)})") \
                    from None
            raise OptionsError(f"chunking {name}: must be {cls.model_fields[name].description}, "
                               f"not {first['input']!r}") from None


@dataclass(frozen=True)
class Chunk:
    """One piece of a document: its characters ``[start, end)`` in the body and the text the model embeds."""

    start: int
    end: int
    text: str  # the carried title or heading lines, then body[start:end]
    tokens: int  # the body's tokens in it

    @cached_property
    def sha256(self) -> bytes:
        """The hash a chunk vector is tied to: sha256 of the UTF-8 text embedded."""
        return hashlib.sha256(self.text.encode()).digest()


def policy_of(spec: ModelSpec) -> ChunkingPolicy | None:
    """The chunking policy of a registered model; None for a model that embeds whole documents, or one whose
    chunks were adopted from a table (:data:`ADOPTED_CHUNKS`: cut by a policy Segue does not know)."""
    chunking = spec.config.get("chunking")
    return None if chunking in (None, ADOPTED_CHUNKS) else ChunkingPolicy.model_validate(chunking)


def chunked_profile(profile: ModelProfile, policy: ChunkingPolicy) -> ModelProfile:
    """``profile`` with ``policy`` as part of its identity: the policy in its config and in its fingerprint."""
    if profile.max_tokens and policy.size > profile.max_tokens:
        raise OptionsError(f"chunking size {policy.size} exceeds the model's input limit of {profile.max_tokens} "
                           f"tokens: give --chunk-size {profile.max_tokens} or less")
    settings = policy.model_dump()
    digest = hashlib.sha256(f"{profile.fingerprint}\0chunking\0{json.dumps(settings, sort_keys=True)}".encode())
    config = {**profile.config, "chunking": settings, "embedder_fingerprint": profile.fingerprint}
    return replace(profile, config=config, fingerprint=digest.hexdigest())


def split(policy: ChunkingPolicy, body: str, spans: Spans) -> list[Chunk]:
    """``body`` cut by ``policy``, given each token's character span; at least one chunk, in order."""
    starts = [start for start, _ in spans]
    title, after_title = _title(policy, body)
    chunks: list[Chunk] = []
    for section, heading in _sections(policy, body, after_title):
        first, last = bisect.bisect_left(starts, section[0]), bisect.bisect_left(starts, section[1])
        units = [(bisect.bisect_left(starts, a), bisect.bisect_left(starts, b))
                 for a, b in _units(policy, body, section)]
        carried = [line for line in (title, heading) if line]
        chunks += [_chunk(body, spans, a, b, carried)
                   for a, b in _pack(policy, [(a, b) for a, b in units if a < b] or [(first, last)]) if a < b]
    if chunks:
        return chunks
    if not spans:  # no tokens at all (an empty or blank body): one empty chunk, as a model that does not chunk
        return [Chunk(0, len(body), body, 0)]
    # Every token is in the title or a heading: the body's own token windows, carrying nothing.
    return [_chunk(body, spans, a, b, []) for a, b in _windows(policy, 0, len(spans))]


def _chunk(body: str, spans: Spans, a: int, b: int, carried: list[str]) -> Chunk:
    """The chunk of tokens ``[a, b)`` of ``body``, after the ``carried`` lines (title, heading)."""
    start, end = spans[a][0], max(e for _, e in spans[a:b])
    return Chunk(start, end, "\n".join(carried + [body[start:end]]), b - a)


def _title(policy: ChunkingPolicy, body: str) -> tuple[str, int]:
    """The title every chunk carries and where the text after it starts: ("", 0) when none is carried."""
    lead = len(body) - len(body.lstrip())
    line_end = body.find("\n", lead)
    if policy.title == "none" or line_end < 0 or not body[line_end:].strip():
        return "", 0
    return body[lead:line_end].strip(), line_end + 1


def _sections(policy: ChunkingPolicy, body: str, start: int) -> list[tuple[tuple[int, int], str]]:
    """The (start, end) character ranges chunks never cross, from ``start``, each with the heading line its
    chunks carry (a markdown section's heading line is carried, not chunked)."""
    if policy.splitter == "tokens":
        return [((start, len(body)), "")]
    if policy.splitter == "sentences":
        return [(paragraph, "") for paragraph in _split_at(_PARAGRAPH_BREAK, body, (start, len(body)))]
    cuts = sorted({start, *(m.start() for m in _HEADING.finditer(body, start)), len(body)})
    sections = []
    for a, b in zip(cuts, cuts[1:]):
        if _HEADING.match(body, a):
            line_end = body.find("\n", a, b)
            line_end = b if line_end < 0 else line_end
            sections.append(((line_end, b), body[a:line_end].strip()))
        else:
            sections.append(((a, b), ""))
    return sections


def _units(policy: ChunkingPolicy, body: str, section: tuple[int, int]) -> list[tuple[int, int]]:
    """The character ranges packed whole into chunks within ``section``: tokens, sentences or paragraphs."""
    if policy.splitter == "tokens":
        return []  # every token is a unit: _pack cuts token windows
    pattern = _SENTENCE_END if policy.splitter == "sentences" else _PARAGRAPH_BREAK
    return _split_at(pattern, body, section)


def _split_at(pattern: re.Pattern, body: str, within: tuple[int, int]) -> list[tuple[int, int]]:
    """``within`` cut after each match of ``pattern`` (each piece keeps the separator that ends it)."""
    cuts = [within[0]] + [m.end() for m in pattern.finditer(body, within[0], within[1])] + [within[1]]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if a < b]


def _pack(policy: ChunkingPolicy, units: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token ranges of the chunks: consecutive units while they fit ``size`` tokens, a unit over it cut into
    token windows; a chunk after a packed one starts with the last units that fit in ``overlap`` tokens."""
    if policy.splitter == "tokens":
        return _windows(policy, units[0][0], units[-1][1])
    chunks: list[tuple[int, int]] = []
    i = 0
    while i < len(units):
        a, b = units[i]
        if b - a > policy.size:
            chunks += _windows(policy, a, b)
            i += 1
            continue
        j = i + 1
        while j < len(units) and units[j][1] - a <= policy.size:
            j += 1
        chunks.append((a, units[j - 1][1]))
        if j >= len(units):
            break
        back = j
        while back - 1 > i and units[j - 1][1] - units[back - 1][0] <= policy.overlap \
                and units[j][1] - units[back - 1][0] <= policy.size:
            back -= 1
        i = back
    return chunks


def _windows(policy: ChunkingPolicy, a: int, b: int) -> list[tuple[int, int]]:
    """Token windows of ``size`` over ``[a, b)``, each ``size - overlap`` after the last; the last one ends at ``b``."""
    step = policy.size - policy.overlap
    windows = []
    start = a
    while True:
        windows.append((start, min(start + policy.size, b)))
        if start + policy.size >= b:
            return windows
        start += step
