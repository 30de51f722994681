"""Event records on Segue's topics and their decoding.

Producers in any language validate against the JSON Schema files beside this module;
the worker decodes with :func:`decode_change` and :func:`decode_read_miss`, which raise
:class:`InvalidEvent` carrying a machine-readable reason for the dead-letter topic.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from functools import cache
from importlib import resources
from typing import Any

import jsonschema
import orjson


class DeadLetterReason(str, Enum):
    """Why an event went to the dead-letter topic (mirrors dead_letter.schema.json)."""

    BAD_JSON = "bad_json"
    SCHEMA_VIOLATION = "schema_violation"
    TEXT_TOO_LARGE = "text_too_large"
    UNKNOWN_MODEL = "unknown_model"
    UNKNOWN_DOCUMENT = "unknown_document"
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
def _validator(name: str) -> jsonschema.protocols.Validator:
    schema = load_schema(name)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _parse(name: str, value: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent(DeadLetterReason.BAD_JSON, f"value is not valid JSON: {exc}") from None
    error = jsonschema.exceptions.best_match(_validator(name).iter_errors(obj))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        raise InvalidEvent(DeadLetterReason.SCHEMA_VIOLATION, f"{name} schema: {where}: {error.message}")
    return obj


def decode_change(key: bytes | None, value: bytes | None, *, max_text_bytes: int) -> DocumentChange:
    """Decode a document-changes record; a null value is a tombstone for ``key``."""
    if value is None:
        if not key:
            raise InvalidEvent(DeadLetterReason.SCHEMA_VIOLATION, "tombstone without a key")
        try:
            doc_id = key.decode()
        except UnicodeDecodeError:
            raise InvalidEvent(DeadLetterReason.SCHEMA_VIOLATION, "tombstone key is not UTF-8") from None
        return DocumentChange(doc_id=doc_id, op="delete", version=None)
    obj = _parse("document_change", value)
    text = obj.get("text")
    if text is not None and len(text.encode()) > max_text_bytes:
        raise InvalidEvent(
            DeadLetterReason.TEXT_TOO_LARGE,
            f"text is {len(text.encode())} bytes, over the limit of {max_text_bytes}",
        )
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


def read_miss_value(doc_id: str, model: str, event_id: str | None = None) -> bytes:
    """A read-misses (or backfill) record value asking to re-embed ``doc_id`` with ``model``."""
    value = {"doc_id": doc_id, "model": model}
    if event_id is not None:
        value["event_id"] = event_id
    return orjson.dumps(value)


def encode_dead_letter(
    *, reason: DeadLetterReason, error: str, source: SourcePosition, key: bytes | None, payload: bytes | None
) -> bytes:
    """Build a dead-letter record value (dead_letter.schema.json) keeping the original payload."""

    def text(raw: bytes | None) -> tuple[str | None, str]:
        if raw is None:
            return None, "utf-8"
        try:
            return raw.decode(), "utf-8"
        except UnicodeDecodeError:
            return base64.b64encode(raw).decode(), "base64"

    payload_text, encoding = text(payload)
    key_text, _ = text(key)
    return orjson.dumps(
        {
            "reason": reason.value,
            "error": error,
            "source": {"topic": source.topic, "partition": source.partition, "offset": source.offset},
            "key": key_text,
            "payload": payload_text,
            "payload_encoding": encoding,
            "failed_at": datetime.now(timezone.utc).isoformat(),
        }
    )
