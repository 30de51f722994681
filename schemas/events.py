"""Event records on Segue's topics and their decoding.

Producers in any language validate against the JSON Schema files beside this module;
the worker decodes with :func:`decode_change` and :func:`decode_read_miss`, which raise
:class:`InvalidEvent` carrying a machine-readable reason for the dead-letter topic.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from functools import cache
from importlib import resources
from typing import Any

import jsonschema_rs
import orjson

MAX_DOC_ID_CHARS = 512  # documents.doc_id's CHECK; keeps every doc_id inside a btree index row
MAX_VERSION = 2**63 - 1  # documents.version is a bigint
MAX_NESTING = 128  # arrays and objects in an event nest at most this deep (the schema validator stops at 255)
DEAD_LETTER_MAX_BYTES = 900_000  # a dead letter (key + value) stays under Kafka's default 1 MB message limit
DEAD_LETTER_KEY_MAX_BYTES = 4096
DEAD_LETTER_ERROR_MAX_CHARS = 2000
DEAD_LETTER_REPLAY_OF_MAX_CHARS = 512  # a replay_of names topic/partition/offset; a topic name has at most 249
REPLAY_HEADER = "segue-replay-of"  # on a replayed record: the dead letter it replays, "topic/partition/offset"


class DeadLetterReason(str, Enum):
    """Why an event went to the dead-letter topic (mirrors dead_letter.schema.json)."""

    BAD_JSON = "bad_json"
    SCHEMA_VIOLATION = "schema_violation"
    TEXT_TOO_LARGE = "text_too_large"
    INVALID_KEY = "invalid_key"
    KEY_MISMATCH = "key_mismatch"
    UNKNOWN_MODEL = "unknown_model"
    UNKNOWN_DOCUMENT = "unknown_document"
    INPUT_REJECTED = "input_rejected"
    PROCESSING_FAILED = "processing_failed"


class InvalidEvent(ValueError):
    """An event that can never be processed; it belongs on the dead-letter topic."""

    def __init__(self, reason: DeadLetterReason, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SourcePosition:
    """Where an event was read from."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class DocumentChange:
    """An upsert or delete of one document, as published by an upstream service.

    ``version`` is None only for a Kafka tombstone, which deletes whatever is stored.
    """

    doc_id: str
    op: str
    version: int | None
    text: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    event_id: str | None = None

    @property
    def is_delete(self) -> bool:
        return self.op == "delete"


@dataclass(frozen=True)
class ReadMiss:
    """A reader found no current vector for ``doc_id`` under model ``model``."""

    doc_id: str
    model: str
    event_id: str | None = None


@cache
def load_schema(name: str) -> dict[str, Any]:
    """Load one of the shipped JSON Schemas by file stem, e.g. ``"document_change"``."""
    text = resources.files(__package__).joinpath(f"{name}.schema.json").read_text()
    return json.loads(text)


@cache
def _validator(name: str) -> jsonschema_rs.Validator:
    """The compiled validator of a shipped schema (its draft from ``$schema``; the schema itself is checked)."""
    return jsonschema_rs.validator_for(load_schema(name), validate_formats=True)


def _parse(name: str, value: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent(DeadLetterReason.BAD_JSON, f"value is not valid JSON: {exc}") from None
    wide = _scan(name, obj)  # before the validator, which gives up on values nested 255 deep
    validator = _validator(name)
    if not validator.is_valid(obj):
        error = next(validator.iter_errors(obj))
        where = "/".join(str(p) for p in error.instance_path) or "(root)"
        raise InvalidEvent(DeadLetterReason.SCHEMA_VIOLATION, f"{name} schema: {where}: {error.message}")
    if "version" in obj and type(obj["version"]) is not int:  # JSON Schema counts 5.0 and 1e3 as integers
        raise InvalidEvent(DeadLetterReason.SCHEMA_VIOLATION,
                           f"{name} schema: version: {obj['version']!r} is not an integer literal")
    if wide:
        _refuse_wide_integers(name, value, wide)
    return obj


_Path = tuple["_Path", "str | int"] | None  # a JSON path as (parent, key or index) links; None is the root


def _parts(path: _Path) -> list[str | int]:
    parts = []
    while path is not None:
        path, part = path
        parts.append(part)
    return parts[::-1]


def _where(path: _Path) -> str:
    return "/".join(map(str, _parts(path))) or "(root)"


def _scan(name: str, obj: Any) -> list[_Path]:
    """Raise ``schema_violation`` for arrays and objects nested deeper than ``MAX_NESTING`` or a string (or
    object key) holding U+0000, which PostgreSQL text cannot store; return the paths of doubles so large
    that they may have been integers beyond 64 bits. Walks without recursion (orjson nests 1,024 deep)."""
    wide = []
    stack: list[tuple[int, _Path, Any]] = [(0, None, obj)]
    while stack:
        depth, path, item = stack.pop()
        if isinstance(item, str) and "\x00" in item:
            raise InvalidEvent(DeadLetterReason.SCHEMA_VIOLATION, f"{name}: {_where(path)} contains a NUL character,"
                               " which PostgreSQL text cannot store")
        if isinstance(item, float) and abs(item) >= 2**63:
            wide.append(path)
        if isinstance(item, (dict, list)) and depth >= MAX_NESTING:
            raise InvalidEvent(DeadLetterReason.SCHEMA_VIOLATION,
                               f"{name}: {_where(path)} nests arrays and objects deeper than {MAX_NESTING} levels")
        if isinstance(item, dict):
            stack += [(depth + 1, (path, key), inner) for key, inner in item.items()]
            stack += [(depth + 1, (path, key), key) for key in item]
        elif isinstance(item, list):
            stack += [(depth + 1, (path, index), inner) for index, inner in enumerate(item)]
    return wide


def _refuse_wide_integers(name: str, value: bytes, paths: list[_Path]) -> None:
    """Raise ``schema_violation`` if one of these doubles was an integer beyond 64 bits, which orjson reads
    rounded (Python's parser, slower, keeps every integer whole)."""
    exact = json.loads(value)
    for path in paths:
        number = functools.reduce(lambda node, part: node[part], _parts(path), exact)
        if isinstance(number, int):
            raise InvalidEvent(DeadLetterReason.SCHEMA_VIOLATION, f"{name}: {_where(path)}: the integer {number}"
                               " does not fit 64 bits and would be stored rounded (send it as a string)")


def _key_doc_id(key: bytes | None) -> str:
    """The doc_id a record key names; raises ``invalid_key`` unless it could be a doc_id."""
    if not key:
        raise InvalidEvent(DeadLetterReason.INVALID_KEY, "the record has no key; records are keyed by doc_id")
    try:
        doc_id = key.decode()
    except UnicodeDecodeError:
        raise InvalidEvent(DeadLetterReason.INVALID_KEY, "the record key is not UTF-8") from None
    if len(doc_id) > MAX_DOC_ID_CHARS:
        raise InvalidEvent(DeadLetterReason.INVALID_KEY,
                           f"the record key is {len(doc_id)} characters; a doc_id has at most {MAX_DOC_ID_CHARS}")
    if "\x00" in doc_id:
        raise InvalidEvent(DeadLetterReason.INVALID_KEY, "the record key contains a NUL character")
    return doc_id


def decode_change(key: bytes | None, value: bytes | None, *, max_text_bytes: int) -> DocumentChange:
    """Decode a document-changes record; a null value is a tombstone for ``key``.

    The record key must be the document's ``doc_id`` (UTF-8): per-document ordering
    rests on it, so a record keyed otherwise is dead-lettered as ``key_mismatch``.
    """
    if value is None:
        return DocumentChange(doc_id=_key_doc_id(key), op="delete", version=None)
    obj = _parse("document_change", value)
    text = obj.get("text")
    if text is not None and len(text.encode()) > max_text_bytes:
        raise InvalidEvent(
            DeadLetterReason.TEXT_TOO_LARGE,
            f"text is {len(text.encode())} bytes, over the limit of {max_text_bytes}",
        )
    if key != obj["doc_id"].encode():
        shown = "none" if key is None else repr(key[:80].decode(errors="replace"))
        raise InvalidEvent(DeadLetterReason.KEY_MISMATCH,
                           f"the record key ({shown}) is not the doc_id {obj['doc_id'][:80]!r}: "
                           "document changes must be keyed by doc_id to keep their order")
    return DocumentChange(
        doc_id=obj["doc_id"],
        op=obj.get("op", "upsert"),
        version=obj["version"],
        text=text,
        metadata=obj.get("metadata", {}),
        event_id=obj.get("event_id"),
    )


def decode_read_miss(value: bytes | None) -> ReadMiss:
    """Decode a read-misses record."""
    if value is None:
        raise InvalidEvent(DeadLetterReason.SCHEMA_VIOLATION, "read miss with a null value")
    obj = _parse("read_miss", value)
    return ReadMiss(doc_id=obj["doc_id"], model=obj["model"], event_id=obj.get("event_id"))


def encode_change(doc_id: str, *, version: int, text: str | None = None, op: str = "upsert",
                  metadata: dict[str, Any] | None = None, event_id: str | None = None) -> bytes:
    """A document-changes record value (document_change.schema.json); publish it keyed by ``doc_id``."""
    if op == "upsert" and text is None:
        raise ValueError("an upsert needs a text")
    value: dict[str, Any] = {"doc_id": doc_id, "op": op, "version": version}
    if text is not None:
        value["text"] = text
    if metadata is not None:
        value["metadata"] = metadata
    if event_id is not None:
        value["event_id"] = event_id
    return orjson.dumps(value)


def encode_read_miss(doc_id: str, model: str, event_id: str | None = None) -> bytes:
    """A read-misses (or backfill) record value asking to re-embed ``doc_id`` with ``model``."""
    value = {"doc_id": doc_id, "model": model}
    if event_id is not None:
        value["event_id"] = event_id
    return orjson.dumps(value)


def _bytes_field(name: str, raw: bytes | None, keep: int) -> dict[str, Any]:
    """``raw`` as JSON fields: text (UTF-8, else base64), its encoding, length and sha256; cut to ``keep`` bytes."""
    if raw is None:
        return {name: None, f"{name}_encoding": "utf-8"}
    kept = raw[:keep]
    try:
        text, encoding = kept.decode(), "utf-8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(kept).decode(), "base64"
    return {name: text, f"{name}_encoding": encoding, f"{name}_bytes": len(raw),
            f"{name}_sha256": hashlib.sha256(raw).hexdigest(), f"{name}_truncated": len(kept) < len(raw)}


def _utf8(text: str) -> str:
    """``text`` with lone surrogates (which UTF-8 cannot encode, e.g. from a lenient decode) replaced."""
    return text.encode(errors="replace").decode()


def decode_dead_letter(value: bytes | None) -> dict[str, Any]:
    """A dead-letters record's value, checked against ``dead_letter.schema.json``; raises :class:`InvalidEvent`.

    Only the schema is checked: a letter's payload may hold what its original was refused for (NUL characters).
    """
    if value is None:
        raise InvalidEvent(DeadLetterReason.SCHEMA_VIOLATION, "a null value is no dead letter")
    try:
        letter = orjson.loads(value)
        error = next(_validator("dead_letter").iter_errors(letter), None)
    except (orjson.JSONDecodeError, ValueError) as exc:  # not JSON, or nested past what the validator walks
        raise InvalidEvent(DeadLetterReason.BAD_JSON, f"not a dead letter: {exc}") from None
    if error is not None:
        where = "/".join(str(p) for p in error.instance_path) or "(root)"
        raise InvalidEvent(DeadLetterReason.SCHEMA_VIOLATION, f"dead_letter schema: {where}: {error.message}")
    return letter


def dead_letter_key(key: bytes | None) -> bytes | None:
    """The Kafka key of a dead letter: the original key, cut to what a dead letter keeps."""
    return None if key is None else key[:DEAD_LETTER_KEY_MAX_BYTES]


def encode_dead_letter(
    *, reason: DeadLetterReason, error: str, source: SourcePosition, key: bytes | None, payload: bytes | None,
    replay_of: str | None = None,
) -> bytes:
    """Build a dead-letter record value (dead_letter.schema.json) keeping the original payload.

    ``replay_of`` names the dead letter a failed replay came from; it and ``error`` are cut to a bound.
    The record always fits a Kafka message: with its key it stays under ``DEAD_LETTER_MAX_BYTES``. A payload
    that would not fit as text is kept in base64, whole if it fits so, else a prefix with ``payload_truncated``
    set; ``payload_bytes`` and ``payload_sha256`` describe the whole original either way.
    """
    letter = {
        "reason": reason.value,
        "error": _utf8(error[:DEAD_LETTER_ERROR_MAX_CHARS]),
        "source": {"topic": source.topic, "partition": source.partition, "offset": source.offset},
        **_bytes_field("key", key, DEAD_LETTER_KEY_MAX_BYTES),
        **_bytes_field("payload", payload, len(payload or b"")),
        "failed_at": datetime.now(timezone.utc).isoformat(),
        **({"replay_of": _utf8(replay_of[:DEAD_LETTER_REPLAY_OF_MAX_CHARS])} if replay_of else {}),
    }
    budget = DEAD_LETTER_MAX_BYTES - len(dead_letter_key(key) or b"")
    encoded = orjson.dumps(letter)
    if len(encoded) <= budget:
        return encoded
    letter.update(payload="", payload_encoding="base64", payload_truncated=False)  # false: longer than true
    room = budget - len(orjson.dumps(letter))  # base64 needs no JSON escaping: 4 characters per 3 bytes
    kept = payload[: max(room, 0) // 4 * 3]
    letter.update(payload=base64.b64encode(kept).decode(), payload_truncated=len(kept) < len(payload))
    return orjson.dumps(letter)
