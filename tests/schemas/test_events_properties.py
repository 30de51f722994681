"""Properties of event decoding and dead-letter encoding, for any record a producer can send (Hypothesis).

Decoding a record either returns exactly what the record says, as PostgreSQL would store
it, or raises :class:`InvalidEvent` with a :class:`DeadLetterReason`: never any other
exception, which would stall the partition. A dead letter always fits a Kafka message,
is valid against its schema, and keeps the original whole or says it was cut, with the
whole original's length and sha256. Pure functions: no services.
"""

from __future__ import annotations

import base64
import hashlib
import json

import jsonschema_rs
import orjson
from hypothesis import example, given, settings
from hypothesis import strategies as st

from segue.control.dlq import decode_letter
from segue.schemas.events import (
    DEAD_LETTER_ERROR_MAX_CHARS,
    DEAD_LETTER_KEY_MAX_BYTES,
    DEAD_LETTER_MAX_BYTES,
    DEAD_LETTER_REPLAY_OF_MAX_CHARS,
    MAX_DOC_ID_CHARS,
    MAX_VERSION,
    DeadLetterReason,
    DocumentChange,
    InvalidEvent,
    ReadMiss,
    SourcePosition,
    dead_letter_key,
    decode_change,
    decode_read_miss,
    encode_change,
    encode_dead_letter,
    load_schema,
)

PROPERTY = settings(max_examples=300, deadline=None, database=None)

# -- strategies ---------------------------------------------------------------------------------

# Strings as producers send them: any code point but lone surrogates (JSON text is UTF-8), NUL among them.
strings = st.text(max_size=12)
doc_ids = st.text(min_size=1, max_size=12) | st.text(alphabet="dé", min_size=MAX_DOC_ID_CHARS - 2,
                                                      max_size=MAX_DOC_ID_CHARS + 2)
numbers = (st.integers() | st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1])
           | st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(st.none() | st.booleans() | numbers | strings,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(strings, inner, max_size=3),
                           max_leaves=8)
# JSON literals that JSON Schema and Python read differently, or that do not fit a bigint.
number_literals = st.sampled_from(["5.0", "1e3", "1E3", "-0", "0.0", "1.5", "-1", "9223372036854775808",
                                   "18446744073709551616", "-9223372036854775809", "1e400", "true", "null", '"7"'])


def json_texts(values: st.SearchStrategy) -> st.SearchStrategy[str]:
    """``values`` as JSON text, with \\u escapes or raw UTF-8, as producers write either."""
    return st.builds(lambda value, escaped: json.dumps(value, ensure_ascii=escaped), values, st.booleans())


any_json = json_texts(json_values) | number_literals


@st.composite
def records(draw, fields: dict[str, tuple[st.SearchStrategy[str], st.SearchStrategy[str]]]) -> tuple:
    """(key, value): a JSON object near a schema, each field right, absent or wrong (``fields``: name → right and
    wrong JSON texts), in any order, maybe with an unknown or repeated field; keyed by its doc_id mostly, else
    by none, other text, or bytes that are not UTF-8."""
    doc_id = draw(doc_ids)
    pairs = []
    for name, (right, wrong) in fields.items():
        choice = draw(st.sampled_from(["right"] * 14 + ["absent", "wrong"]))
        if choice == "right":
            pairs.append((name, json.dumps(doc_id) if name == "doc_id" else draw(right)))
        elif choice == "wrong":
            pairs.append((name, draw(wrong | any_json)))
    if draw(st.integers(0, 3)) == 0:
        pairs.append((draw(st.sampled_from([*fields, "extra", "\x00"])), draw(any_json)))
    value = "{" + ",".join(f"{json.dumps(name)}:{text}" for name, text in draw(st.permutations(pairs))) + "}"
    keys = {"doc_id": st.just(doc_id.encode()), "none": st.none(), "text": strings.map(str.encode),
            "bytes": st.binary(max_size=6)}
    key = draw(keys[draw(st.sampled_from(["doc_id"] * 6 + list(keys)))])
    return key, value.encode()


change_records = records({
    "doc_id": (st.nothing(), st.just('""')),
    "op": (st.sampled_from(['"upsert"', '"delete"']), st.sampled_from(['"Delete"', '"merge"', '""'])),
    "version": (st.integers(min_value=0, max_value=MAX_VERSION).map(str),
                st.integers(min_value=-2, max_value=2**64 + 2).map(str) | number_literals),
    "text": (json_texts(strings), st.nothing()),
    "metadata": (json_texts(st.dictionaries(strings, json_values, max_size=3)), st.nothing()),
    "event_id": (json_texts(strings), json_texts(st.text(alphabet="e", min_size=511, max_size=514))),
})
read_miss_records = records({
    "doc_id": (st.nothing(), st.just('""')),
    "model": (json_texts(st.text(min_size=1, max_size=12)), st.just('""')),
    "event_id": (json_texts(strings), json_texts(st.text(alphabet="e", min_size=511, max_size=514))),
})
raw_records = st.tuples(st.none() | st.binary(max_size=20) | doc_ids.map(str.encode),
                        st.none() | st.binary(max_size=200))

DEEP = b"[" * 1000 + b"]" * 1000  # nested as deep as a parser allows, and deeper than Python recurses
WIDE = str(2**64).encode()  # an integer no 64-bit integer holds: a parser reading it as a double rounds it


def strings_of(value) -> list[str]:
    """Every string and object key in a decoded JSON value."""
    found, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, dict):
            found += item
            stack += item.values()
        elif isinstance(item, list):
            stack += item
    return found


def stored(value) -> str:
    """A JSON value as PostgreSQL stores it in a jsonb column (the store dumps it with the json module)."""
    return json.dumps(value, sort_keys=True)


# -- decoding -----------------------------------------------------------------------------------

@PROPERTY
@given(change_records | raw_records, st.sampled_from([8, 4000, 4000]))
@example((b"a", b'{"doc_id":"a","version":1,"text":"x","metadata":{"deep":' + DEEP + b'}}'), 4000)
@example((b"a", b'{"doc_id":"a","version":1,"text":"x","metadata":{"wide":' + WIDE + b'}}'), 4000)
@example((b"a", b'{"doc_id":"a","version":1,"text":"x","metadata":{"wide":[-' + WIDE + b']}}'), 4000)
def test_decode_change_returns_what_the_record_says_or_a_reason(record, max_text_bytes):
    key, value = record
    try:
        change = decode_change(key, value, max_text_bytes=max_text_bytes)
    except InvalidEvent as error:
        assert isinstance(error.reason, DeadLetterReason) and str(error)
        return
    if value is None:  # a tombstone deletes the document its key names
        assert change == DocumentChange(doc_id=key.decode(), op="delete", version=None)
        assert 0 < len(change.doc_id) <= MAX_DOC_ID_CHARS and "\x00" not in change.doc_id
        return
    said = json.loads(value)
    assert isinstance(said, dict) and set(said) <= {"doc_id", "op", "text", "version", "metadata", "event_id"}
    assert key == said["doc_id"].encode() and change.doc_id == said["doc_id"]
    assert 0 < len(change.doc_id) <= MAX_DOC_ID_CHARS
    assert type(said["version"]) is int and type(change.version) is int and change.version == said["version"]
    assert 0 <= change.version <= MAX_VERSION
    assert change.op == said.get("op", "upsert") and change.op in ("upsert", "delete")
    assert change.text == said.get("text") and (change.op == "delete" or isinstance(change.text, str))
    assert change.text is None or len(change.text.encode()) <= max_text_bytes
    assert isinstance(said.get("metadata", {}), dict) and stored(change.metadata) == stored(said.get("metadata", {}))
    assert change.event_id == said.get("event_id") and len(change.event_id or "") <= 512
    assert not any("\x00" in text for text in strings_of(said))  # PostgreSQL text and jsonb cannot store U+0000


clean_characters = st.characters(codec="utf-8", exclude_characters="\x00")
clean = st.text(clean_characters, max_size=12)
clean_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | clean, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(clean, inner, max_size=3), max_leaves=8)


@PROPERTY
@given(doc_id=st.text(clean_characters, min_size=1, max_size=MAX_DOC_ID_CHARS),
       version=st.integers(0, MAX_VERSION), op=st.sampled_from(["upsert", "delete"]), text=clean,
       metadata=st.none() | st.dictionaries(clean, clean_values, max_size=3), event_id=st.none() | clean)
def test_every_change_a_producer_encodes_right_is_decoded_as_sent(doc_id, version, op, text, metadata, event_id):
    value = encode_change(doc_id, version=version, text=text, op=op, metadata=metadata, event_id=event_id)
    change = decode_change(doc_id.encode(), value, max_text_bytes=4000)
    assert change == DocumentChange(doc_id=doc_id, op=op, version=version, text=text, metadata=metadata or {},
                                    event_id=event_id)
    assert stored(change.metadata) == stored(metadata or {})


@PROPERTY
@given(read_miss_records | raw_records)
@example((b"a", b'{"doc_id":"a","model":"m","event_id":' + DEEP + b'}'))
def test_decode_read_miss_returns_what_the_record_says_or_a_reason(record):
    _, value = record
    try:
        miss = decode_read_miss(value)
    except InvalidEvent as error:
        assert isinstance(error.reason, DeadLetterReason) and str(error)
        return
    said = json.loads(value)
    assert isinstance(said, dict) and set(said) <= {"doc_id", "model", "event_id"}
    assert miss == ReadMiss(doc_id=said["doc_id"], model=said["model"], event_id=said.get("event_id"))
    assert all(isinstance(text, str) for text in (miss.doc_id, miss.model, miss.event_id or ""))
    assert 0 < len(miss.doc_id) <= MAX_DOC_ID_CHARS and miss.model and len(miss.event_id or "") <= 512
    assert not any("\x00" in text for text in strings_of(said))


# -- dead letters -------------------------------------------------------------------------------

# Any Python string, lone surrogates included: errors and headers are not always decoded strictly.
any_text = st.text(st.characters(exclude_categories=()), max_size=40) | st.builds(
    lambda piece, times: piece * times, st.text(st.characters(exclude_categories=()), min_size=1, max_size=3),
    st.integers(1, 2_000_000))
blobs = st.binary(max_size=300) | strings.map(str.encode) | st.builds(
    lambda piece, times: piece * times, st.binary(min_size=1, max_size=4) | st.sampled_from([b'"', b"\x01", b"\\"]),
    st.integers(1, 1_000_000))


LETTERS = jsonschema_rs.validator_for(load_schema("dead_letter"), validate_formats=True)


def as_utf8(text: str) -> str:
    """``text`` as a dead letter keeps it: lone surrogates, which UTF-8 cannot encode, replaced."""
    return text.encode(errors="replace").decode()


def kept_bytes(letter: dict, name: str) -> bytes | None:
    """The bytes a dead letter kept of the original key or payload."""
    text = letter[name]
    if text is None:
        return None
    return base64.b64decode(text, validate=True) if letter[f"{name}_encoding"] == "base64" else text.encode()


@settings(max_examples=150, deadline=None, database=None)
@given(key=st.none() | blobs, payload=st.none() | blobs, error=any_text, replay_of=st.none() | any_text,
       reason=st.sampled_from(DeadLetterReason))
@example(key=None, payload=b"\x00" * 150_000, error="", replay_of=None,  # 900 kB escaped, 200 kB in base64: whole
         reason=DeadLetterReason.BAD_JSON)
@example(key=b"k", payload=b"{}", error="\udcff", replay_of="\x1f" * 1_000_000,  # a header of 1 MB
         reason=DeadLetterReason.PROCESSING_FAILED)
def test_a_dead_letter_fits_a_message_and_keeps_the_original(key, payload, error, replay_of, reason):
    source = SourcePosition("document-changes", 1, 42)
    encoded = encode_dead_letter(reason=reason, error=error, source=source, key=key, payload=payload,
                                 replay_of=replay_of)
    assert len(encoded) + len(dead_letter_key(key) or b"") <= DEAD_LETTER_MAX_BYTES
    letter = orjson.loads(encoded)
    LETTERS.validate(letter)
    assert letter["reason"] == reason.value and letter["error"] == as_utf8(error[:DEAD_LETTER_ERROR_MAX_CHARS])
    assert letter.get("replay_of") == (as_utf8(replay_of[:DEAD_LETTER_REPLAY_OF_MAX_CHARS]) if replay_of else None)
    assert letter["source"] == {"topic": "document-changes", "partition": 1, "offset": 42}
    for name, original, room in (("key", key, DEAD_LETTER_KEY_MAX_BYTES), ("payload", payload, None)):
        kept = kept_bytes(letter, name)
        if original is None:
            assert kept is None
            continue
        assert letter[f"{name}_bytes"] == len(original)
        assert letter[f"{name}_sha256"] == hashlib.sha256(original).hexdigest()
        if letter[f"{name}_truncated"]:
            assert original.startswith(kept) and len(kept) < len(original)
        else:
            assert kept == original
        if room is not None:
            assert kept == original[:room]
    read_back = decode_letter(0, 7, encoded)  # as segue dlq reads it to replay
    assert read_back.truncated == any(letter.get(f"{name}_truncated") for name in ("key", "payload"))
    assert read_back.truncated or (read_back.key, read_back.payload) == (key, payload)
