"""Chunker properties, checked on randomized documents and with the model's real tokenizer."""
from __future__ import annotations

import hashlib
import random
import string

import pytest

from apps.knowledge.rag.chunker import ChunkSpec, chunk_document, content_hash, indexed_text
from apps.knowledge.rag.parsers import Block, ParsedDocument


def count_words(text: str) -> int:
    return len(text.split())


def _sentence(rng: random.Random) -> str:
    words = [
        "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 9)))
        for _ in range(rng.randint(1, 30))
    ]
    return " ".join(words).capitalize() + rng.choice([".", "!", "?", ".", "", ";"])


def _random_block_text(rng: random.Random) -> str:
    shape = rng.random()
    if shape < 0.15:
        return "\n".join(f"- {_sentence(rng)}" for _ in range(rng.randint(1, 12)))
    if shape < 0.2:
        return "x" * rng.randint(1, 400)
    return " ".join(_sentence(rng) for _ in range(rng.randint(1, 25)))


def random_document(seed: int) -> ParsedDocument:
    rng = random.Random(seed)
    blocks: list[Block] = []
    page = 1 if rng.random() < 0.5 else None
    path: tuple[str, ...] = ()
    for _ in range(rng.randint(1, 30)):
        roll = rng.random()
        if roll < 0.15:
            level = rng.randint(1, 3)
            title = _sentence(rng)[:40] or "Heading"
            path = path[: level - 1] + (title,)
            blocks.append(Block(title, "heading", level, page=page, heading_path=path))
        elif roll < 0.25 and page is not None:
            page += 1
        else:
            blocks.append(Block(_random_block_text(rng), "paragraph", page=page, heading_path=path))
    if not blocks:
        blocks.append(Block("lonely", "paragraph"))
    return ParsedDocument(type="text", title="random", blocks=blocks)


def assert_chunk_invariants(doc: ParsedDocument, chunks: list[ChunkSpec], count_tokens, chunk_tokens: int, max_tokens: int):
    text = doc.text
    assert [c.position for c in chunks] == list(range(len(chunks)))
    for chunk in chunks:
        assert text[chunk.char_start : chunk.char_end] == chunk.text
        assert chunk.text and chunk.text == chunk.text.strip()
        assert chunk.content_hash == hashlib.sha256(indexed_text(chunk.text, chunk.context).encode()).hexdigest()
        assert chunk.token_count == count_tokens(chunk.text)
        assert chunk.token_count <= max_tokens
        covered = [
            (block.page, block.heading_path)
            for block, (start, end) in zip(doc.blocks, doc.block_spans())
            if start < chunk.char_end and end > chunk.char_start
        ]
        assert set(covered) == {(chunk.page, chunk.heading_path)}, "a chunk mixes pages or sections"
    starts = [c.char_start for c in chunks]
    assert starts == sorted(starts)


def assert_content_covered(doc: ParsedDocument, chunks: list[ChunkSpec]):
    covered = bytearray(len(doc.text))
    for chunk in chunks:
        covered[chunk.char_start : chunk.char_end] = b"\1" * (chunk.char_end - chunk.char_start)
    for block, (start, end) in zip(doc.blocks, doc.block_spans()):
        if block.kind == "heading":
            continue
        missing = [i for i in range(start, end) if not covered[i] and not doc.text[i].isspace()]
        assert not missing, f"text of block {block.text[:30]!r} is not in any chunk"


@pytest.mark.parametrize("seed", range(60))
def test_random_documents_satisfy_chunk_invariants(seed):
    doc = random_document(seed)
    chunk_tokens = random.Random(seed).choice([5, 12, 40, 120])
    overlap = chunk_tokens // 4
    chunks = chunk_document(doc, count_tokens=count_words, chunk_tokens=chunk_tokens, overlap_tokens=overlap)
    assert chunks
    assert_chunk_invariants(doc, chunks, count_words, chunk_tokens, max_tokens=254)
    tiny = chunk_tokens // 8
    for chunk in chunks:
        assert chunk.token_count <= chunk_tokens + tiny
    assert_content_covered(doc, chunks)


@pytest.mark.parametrize("seed", range(8))
def test_real_tokenizer_counts_are_exact_and_within_model_limit(seed, count_tokens):
    doc = random_document(1000 + seed)
    chunks = chunk_document(doc, count_tokens=count_tokens, chunk_tokens=64, overlap_tokens=16)
    assert_chunk_invariants(doc, chunks, count_tokens, chunk_tokens=64, max_tokens=254)
    assert all(c.token_count <= 64 + 8 for c in chunks)
    assert_content_covered(doc, chunks)


def test_consecutive_paragraphs_are_packed_until_the_budget():
    blocks = [Block(f"para{i} " + "w " * 9, "paragraph") for i in range(6)]
    doc = ParsedDocument("text", "t", [Block(b.text.strip(), b.kind) for b in blocks])
    chunks = chunk_document(doc, count_tokens=count_words, chunk_tokens=30, overlap_tokens=5)
    assert [c.token_count for c in chunks] == [30, 30]
    assert chunks[0].text.count("\n\n") == 2


def test_heading_change_and_page_break_always_start_a_new_chunk():
    doc = ParsedDocument(
        "pdf",
        "t",
        [
            Block("Intro", "heading", 1, page=1, heading_path=("Intro",)),
            Block("one two three", "paragraph", page=1, heading_path=("Intro",)),
            Block("four five", "paragraph", page=2, heading_path=("Intro",)),
            Block("Usage", "heading", 1, page=2, heading_path=("Usage",)),
            Block("six seven", "paragraph", page=2, heading_path=("Usage",)),
        ],
    )
    chunks = chunk_document(doc, count_tokens=count_words, chunk_tokens=100, overlap_tokens=0)
    assert [(c.text, c.page, c.heading_path) for c in chunks] == [
        ("Intro\n\none two three", 1, ("Intro",)),
        ("four five", 2, ("Intro",)),
        ("Usage\n\nsix seven", 2, ("Usage",)),
    ]


def test_long_paragraph_splits_at_sentences_with_overlap():
    sentences = [f"Sentence number {i} has exactly seven words." for i in range(20)]
    doc = ParsedDocument("text", "t", [Block(" ".join(sentences), "paragraph")])
    chunks = chunk_document(doc, count_tokens=count_words, chunk_tokens=30, overlap_tokens=10)
    assert len(chunks) > 3
    for chunk in chunks:
        assert chunk.text.startswith("Sentence number") and chunk.text.endswith("words.")
    for before, after in zip(chunks, chunks[1:]):
        shared = before.text[after.char_start - before.char_start :] if after.char_start < before.char_end else ""
        assert 7 <= count_words(shared) <= 14, "consecutive pieces should overlap by about overlap_tokens"
        assert after.char_end > before.char_end


def test_overlap_never_crosses_paragraph_boundaries():
    doc = ParsedDocument("text", "t", [Block("a " * 19 + "a", "paragraph"), Block("b " * 19 + "b", "paragraph")])
    chunks = chunk_document(doc, count_tokens=count_words, chunk_tokens=20, overlap_tokens=5)
    assert [c.text.split()[0] for c in chunks] == ["a", "b"]
    assert chunks[0].char_end < chunks[1].char_start


def test_sentence_longer_than_budget_falls_back_to_words():
    doc = ParsedDocument("text", "t", [Block(" ".join(f"w{i}" for i in range(95)), "paragraph")])
    chunks = chunk_document(doc, count_tokens=count_words, chunk_tokens=20, overlap_tokens=4)
    assert all(c.token_count <= 20 for c in chunks)
    assert chunks[0].text.split()[0] == "w0" and chunks[-1].text.split()[-1] == "w94"


def test_unbreakable_run_is_split_by_characters(count_tokens):
    blob = "q" * 3000
    doc = ParsedDocument("text", "t", [Block(blob, "paragraph")])
    chunks = chunk_document(doc, count_tokens=count_tokens, chunk_tokens=50, overlap_tokens=0)
    assert "".join(c.text for c in chunks) == blob
    assert all(c.token_count <= 50 for c in chunks)


def test_tiny_trailing_fragment_is_merged_into_previous_chunk():
    doc = ParsedDocument(
        "text", "t", [Block(" ".join(["word"] * 20), "paragraph"), Block("tail", "paragraph")]
    )
    chunks = chunk_document(doc, count_tokens=count_words, chunk_tokens=20, overlap_tokens=0, min_tokens=3)
    assert len(chunks) == 1
    assert chunks[0].text.endswith("\n\ntail") and chunks[0].token_count == 21


def test_trailing_fragment_is_not_merged_beyond_max_tokens():
    doc = ParsedDocument(
        "text", "t", [Block(" ".join(["word"] * 20), "paragraph"), Block("tail", "paragraph")]
    )
    chunks = chunk_document(
        doc, count_tokens=count_words, chunk_tokens=20, overlap_tokens=0, min_tokens=3, max_tokens=20
    )
    assert [c.text for c in chunks][-1] == "tail"


def test_heading_only_sections_are_dropped_unless_nothing_else_exists():
    doc = ParsedDocument(
        "markdown",
        "t",
        [
            Block("Part", "heading", 1, heading_path=("Part",)),
            Block("Chapter", "heading", 2, heading_path=("Part", "Chapter")),
            Block("Body.", "paragraph", heading_path=("Part", "Chapter")),
        ],
    )
    chunks = chunk_document(doc, count_tokens=count_words)
    assert [(c.text, c.heading_path) for c in chunks] == [("Chapter\n\nBody.", ("Part", "Chapter"))]
    only_headings = ParsedDocument("markdown", "t", [Block("Lonely", "heading", 1, heading_path=("Lonely",))])
    assert [c.text for c in chunk_document(only_headings, count_tokens=count_words)] == ["Lonely"]


def test_identical_text_has_identical_hash_across_documents():
    """The key of the embedding cache: the same text under the same title and headings is embedded once."""
    first = chunk_document(ParsedDocument("text", "a", [Block("same text", "paragraph")]), count_tokens=count_words)
    second = chunk_document(
        ParsedDocument("text", "a", [Block("other", "paragraph", page=1), Block("same text", "paragraph", page=2)]),
        count_tokens=count_words,
    )
    assert first[0].content_hash == second[1].content_hash != second[0].content_hash


@pytest.mark.parametrize(
    "kwargs",
    [
        {"chunk_tokens": 0},
        {"chunk_tokens": 300},
        {"chunk_tokens": 50, "overlap_tokens": 50},
        {"chunk_tokens": 50, "overlap_tokens": -1},
    ],
)
def test_inconsistent_sizes_are_rejected(kwargs):
    doc = ParsedDocument("text", "t", [Block("x", "paragraph")])
    with pytest.raises(ValueError):
        chunk_document(doc, count_tokens=count_words, **kwargs)


def test_the_hash_covers_what_is_embedded_the_title_and_the_text():
    """The same sentence in two documents is embedded as two texts (each with its own title first), so
    the two must not share an embedding-cache key; the plain packing (no context) hashes the text alone."""
    same = "Refunds are paid to the original payment method within 14 days."
    handbook, gift_cards = (chunk_document(ParsedDocument("text", title, [Block(same, "paragraph")]),
                                           count_tokens=count_words)[0] for title in ("Handbook", "Gift cards"))
    assert handbook.text == gift_cards.text == same
    assert handbook.context == "Handbook" and gift_cards.context == "Gift cards"
    assert indexed_text(handbook.text, handbook.context) == "Handbook\n" + same
    assert handbook.content_hash == content_hash("Handbook\n" + same) != gift_cards.content_hash
    plain = [chunk_document(ParsedDocument("text", title, [Block(same, "paragraph")]), count_tokens=count_words,
                            structure=False)[0] for title in ("Handbook", "Gift cards")]
    assert plain[0].context == "" and plain[0].content_hash == content_hash(same) == plain[1].content_hash
