"""Chunking policies and the splitters, property-based over hostile bodies and all-MiniLM-L6-v2's real tokenizer."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from segue.embedding.chunking import ChunkingPolicy, chunked_profile, split
from segue.embedding.providers.base import OptionsError
from segue.spec import ModelProfile

WORDS = ["cells", "divide", "Proteins", "fold", "naïve", "CRISPR-Cas9", "p<0.05", "日本語", "🙂", "x", "the",
         "mitochondria", "α-helix"]
HEADING = re.compile(r"^#{1,6}[ \t]")

sentence = st.lists(st.sampled_from(WORDS), min_size=1, max_size=30).map(lambda ws: " ".join(ws) + ".")
paragraph = st.lists(sentence, min_size=1, max_size=6).map(" ".join)
block = st.one_of(paragraph, paragraph.map(lambda p: "## " + p[:30]), st.sampled_from(["", "   ", "\t", "#"]))
bodies = st.lists(block, min_size=0, max_size=10).map("\n\n".join) | st.text(max_size=300)
policies = st.builds(
    lambda splitter, size, overlap, title: ChunkingPolicy(splitter=splitter, size=size, overlap=min(overlap, size - 1),
                                                          title=title),
    st.sampled_from(["tokens", "sentences", "markdown"]), st.integers(1, 40), st.integers(0, 39),
    st.sampled_from(["none", "first_line"]))


def spans_of(tokenizer, body: str) -> list[tuple[int, int]]:
    return list(tokenizer.encode(body, add_special_tokens=False).offsets)


def excluded_lines(policy: ChunkingPolicy, body: str) -> list[tuple[int, int]]:
    """The characters a policy carries into chunks rather than chunks: the title line, markdown heading lines."""
    out = []
    lead = len(body) - len(body.lstrip())
    line_end = body.find("\n", lead)
    if policy.title == "first_line" and line_end >= 0 and body[line_end:].strip():
        out.append((lead, line_end))
    if policy.splitter == "markdown":
        at = 0
        for line in body.split("\n"):
            if HEADING.match(line):
                out.append((at, at + len(line)))
            at += len(line) + 1
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(policy=policies, body=bodies)
@example(policy=ChunkingPolicy(splitter="markdown", size=1), body="## cells.")  # headings only: windows of them
@example(policy=ChunkingPolicy(splitter="markdown", size=2, title="first_line"), body="A title\n## cells divide.")
def test_chunks_fit_the_size_cover_the_body_and_say_where_they_are(tokenizer, policy, body):
    spans = spans_of(tokenizer, body)
    chunks = split(policy, body, spans)

    assert chunks, "every document has at least one chunk"
    assert split(policy, body, spans) == chunks  # deterministic
    for chunk in chunks:
        assert 0 <= chunk.start <= chunk.end <= len(body)
        assert chunk.text.endswith(body[chunk.start:chunk.end])
        assert chunk.tokens <= policy.size
        inside = [s for s in spans if chunk.start <= s[0] and s[1] <= chunk.end]
        assert len(inside) >= chunk.tokens
    assert [c.start for c in chunks] == sorted(c.start for c in chunks)
    carried = excluded_lines(policy, body)
    for start, end in spans:
        if any(a <= start < b for a, b in carried):
            continue
        assert any(c.start <= start and end <= c.end for c in chunks), f"token {body[start:end]!r} in no chunk"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=st.integers(2, 30), overlap=st.integers(0, 29), words=st.integers(1, 200))
def test_token_windows_repeat_exactly_the_overlap(tokenizer, size, overlap, words):
    overlap = min(overlap, size - 1)
    body = " ".join(WORDS[n % len(WORDS)] for n in range(words))
    spans = spans_of(tokenizer, body)
    chunks = split(ChunkingPolicy(size=size, overlap=overlap), body, spans)
    starts = [s for s, _ in spans]
    firsts = [starts.index(c.start) for c in chunks]
    assert firsts[0] == 0 and all(b - a == size - overlap for a, b in zip(firsts, firsts[1:]))
    assert chunks[-1].end == spans[-1][1]
    assert all(c.tokens == size for c in chunks[:-1])


def test_sentences_stay_whole_and_paragraphs_apart(tokenizer):
    body = "Title line\n\nOne two three. Four five six. Seven eight nine.\n\nA second paragraph here."
    chunks = split(ChunkingPolicy(splitter="sentences", size=8, title="first_line"), body, spans_of(tokenizer, body))
    assert [body[c.start:c.end] for c in chunks] == [
        "One two three. Four five six.", "Seven eight nine.", "A second paragraph here."]
    assert all(c.text.startswith("Title line\n") for c in chunks)


def test_markdown_chunks_carry_their_heading(tokenizer):
    body = "# Intro\n\nFirst words.\n\n## Methods\n\nWe measured it.\n\nThen again."
    chunks = split(ChunkingPolicy(splitter="markdown", size=64), body, spans_of(tokenizer, body))
    assert [c.text for c in chunks] == ["# Intro\nFirst words.", "## Methods\nWe measured it.\n\nThen again."]


@pytest.mark.parametrize(("values", "refusal"), [
    ({"size": 8, "overlap": 8}, "chunking: the overlap (8) must be smaller than the chunk size (8)"),
    ({"size": 0}, "chunking size: must be a positive number of tokens, not 0"),
    ({"size": True}, "chunking size: must be a positive number of tokens, not True"),
    ({"size": "256"}, "chunking size: must be a positive number of tokens, not '256'"),
    ({"splitter": "paragraphs"}, "chunking splitter: must be one of tokens, sentences, markdown, not 'paragraphs'"),
    ({"sizes": 3}, "chunking has no setting 'sizes' (settings: splitter, size, overlap, title)"),
])
def test_a_wrong_policy_is_refused_in_one_line(values, refusal):
    with pytest.raises(OptionsError) as caught:
        ChunkingPolicy.parse(values)
    assert str(caught.value).startswith(refusal) and "\n" not in str(caught.value)


def test_the_policy_changes_the_fingerprint_not_the_weights_one():
    profile = ModelProfile(provider="static", dim=8, max_tokens=128, config={"pooling": "mean"}, fingerprint="f" * 64)
    a = chunked_profile(profile, ChunkingPolicy(size=64))
    b = chunked_profile(profile, ChunkingPolicy(size=64, overlap=8))
    assert len({profile.fingerprint, a.fingerprint, b.fingerprint}) == 3
    assert a.config["embedder_fingerprint"] == b.config["embedder_fingerprint"] == profile.fingerprint
    assert chunked_profile(profile, ChunkingPolicy(size=64)) == a
    with pytest.raises(OptionsError, match="exceeds the model's input limit of 128 tokens"):
        chunked_profile(profile, ChunkingPolicy(size=129))
