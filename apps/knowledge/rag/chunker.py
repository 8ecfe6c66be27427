"""Structure-aware chunking of a :class:`ParsedDocument` into embedding-sized chunks.

Rules (each chunk is something a user can be shown as a citation):

- a chunk never crosses a heading change or a page break: it has exactly one ``page`` and one
  ``heading_path``;
- consecutive blocks of a section are packed up to ``chunk_tokens``, measured with the embedding
  model's own tokenizer (``count_tokens``), because the model silently truncates longer input;
- a block longer than ``chunk_tokens`` is split at line breaks, then sentence ends, then words (then
  characters, for a pathological "word"); consecutive pieces of one block overlap by about
  ``overlap_tokens`` so that a fact straddling a cut is still seen whole by one chunk;
- a tiny trailing piece is merged into the previous chunk of the same section when the result stays
  within ``max_tokens``;
- sections made only of headings are dropped (a bare heading is a useless citation) unless the
  document has nothing else;
- ``doc.text[chunk.char_start:chunk.char_end] == chunk.text`` always holds: the heading path is
  metadata and is not prepended to the text.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from .parsers import Block, ParsedDocument

MODEL_MAX_TOKENS = 254
"""all-MiniLM-L6-v2 reads 256 word pieces including [CLS] and [SEP]; ``count_tokens`` excludes them."""


@dataclass
class ChunkSpec:
    """A chunk to store and embed; ``content_hash`` (sha256 of ``indexed_text(text, context)``, what is
    embedded) keys the embedding cache."""

    position: int
    text: str
    page: int | None
    heading_path: tuple[str, ...]
    char_start: int
    char_end: int
    token_count: int
    content_hash: str
    context: str = ""
    """Search context, not part of ``text``: the title and heading path, then the other form of each
    abbreviation the document defines that this chunk uses in one form only (see ``_add_context``)."""


@dataclass(frozen=True)
class _Segment:
    start: int
    end: int
    tokens: int
    block: int
    unit: int = 0  # a block, or a numbered clause / list item inside one: kept whole where it fits


_LINE_GAP = re.compile(r"(\s*\n\s*)")
# Latin sentence ends need the following space ("3.11" and "e.g." stay whole) and are not a clause
# number ("2. The tenant", "b. Late"); Chinese ones
# (。！？；… and their full-width forms) end a sentence with or without one.
_SENTENCE_GAP = re.compile(r"(?:(?<!\b\d)(?<!\b\d\d)(?<!\b[a-z])[.!?…]+[\"'”’)\]]*(?=\s)|[。！？；!?;…]*[。！？；][”’」』）)\]]*|…{2,})(\s*)")
# Inside an over-long sentence: Chinese clause punctuation, then Latin commas and semicolons.
_CLAUSE_GAP = re.compile(r"(?:[，、：]|[,;:](?=\s))(\s*)")
_WORD_GAP = re.compile(r"(\s+)")
_SPLIT_LEVELS = (_LINE_GAP, _SENTENCE_GAP, _CLAUSE_GAP, _WORD_GAP)


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def indexed_text(text: str, context: str) -> str:
    """What BM25 indexes and the encoder embeds for a chunk: its search context (title, heading path,
    abbreviation forms), then its text. ``ChunkSpec.content_hash`` is the sha256 of this text.

    Measured on the Debian development sets: for BM25 one field beat the chunk alone and a separate
    context field (benchmarks/chunking_variants.py); for the embeddings it raised English dense hit@3
    0.708 -> 0.820 (MiniLM) and 0.697 -> 0.798 (e5), Chinese hybrid hit@3 unchanged (e5 0.648), see
    benchmarks/dense_context_variants.py and docs/benchmarks.md.
    """
    return f"{context}\n{text}" if context else text


def chunk_document(
    doc: ParsedDocument,
    *,
    count_tokens: Callable[[str], int],
    chunk_tokens: int = 200,
    overlap_tokens: int = 40,
    min_tokens: int | None = None,
    max_tokens: int = MODEL_MAX_TOKENS,
    structure: bool = True,
    title: str | None = None,
) -> list[ChunkSpec]:
    """Split ``doc`` into chunks (see module docstring).

    ``structure`` (default) keeps numbered clauses and list items whole where they fit and fills
    :attr:`ChunkSpec.context` (title, heading path, abbreviations); False is the plain packing.
    ``title`` overrides the parsed title in the context.

    ``min_tokens`` (default ``chunk_tokens // 8``) is the size under which a trailing piece counts as
    tiny. Raises ``ValueError`` for inconsistent sizes.
    """
    _validate_sizes(chunk_tokens, overlap_tokens, max_tokens)
    min_tokens = chunk_tokens // 8 if min_tokens is None else min_tokens
    text = doc.text
    spans = [_trimmed(text, start, end) for start, end in doc.block_spans()]
    chunks: list[ChunkSpec] = []
    for section in _content_sections(doc.blocks):
        segments = [
            segment
            for index in section
            if spans[index][1] > spans[index][0]
            for segment in _segments(text, spans[index][0], spans[index][1], index, count_tokens, chunk_tokens)
        ]
        if not segments:
            continue
        if structure:
            segments = _with_units(text, segments)
        pieces = _pack(segments, chunk_tokens, overlap_tokens, whole_units=structure)
        pieces = _merge_tail(pieces, segments, min_tokens, max_tokens)
        block = doc.blocks[section[0]]
        for first, last in pieces:
            chunks.append(_make_chunk(len(chunks), text, segments[first : last + 1], block, count_tokens))
    if structure:
        _add_context(chunks, doc, title=doc.title if title is None else title)
    return chunks


# A numbered clause or list item starts here: 1. / 1.2 / 1) / (a) / a) / (iv) / Article 5 / Section 3 /
# § 4 / 第五条 / 第三章 / 一、 / （二） / - / • . Such a clause is a unit the packer keeps whole.
_CLAUSE_START = re.compile(
    r"\s*(?:\(?\d{1,3}(?:\.\d{1,3})*[.)、]\s|\d{1,3}(?:\.\d{1,3})+\s|\([a-z]{1,2}\)\s|[a-z]\)\s|\((?:[ivxlc]+)\)\s"
    r"|(?:article|section|clause|rule|part|chapter)\s+[\dIVXLC]+\b|§\s*\d"
    r"|第[一二三四五六七八九十百千零〇\d]+[条章节款项编部]|[一二三四五六七八九十]+[、.]|[（(][一二三四五六七八九十]+[）)]"
    r"|[-*•·]\s)",
    re.IGNORECASE,
)


def _with_units(text: str, segments: list[_Segment]) -> list[_Segment]:
    """Number the units: every block starts one, and so does every segment that starts a clause."""
    out: list[_Segment] = []
    unit = -1
    for index, segment in enumerate(segments):
        if index == 0 or segment.block != segments[index - 1].block or _CLAUSE_START.match(text, segment.start):
            unit += 1
        out.append(replace(segment, unit=unit))
    return out


def _trimmed(text: str, start: int, end: int) -> tuple[int, int]:
    """The span without surrounding whitespace, so chunks never start or end with blanks."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _validate_sizes(chunk_tokens: int, overlap_tokens: int, max_tokens: int) -> None:
    if chunk_tokens <= 0:
        raise ValueError("chunk_tokens must be positive")
    if chunk_tokens > max_tokens:
        raise ValueError(f"chunk_tokens={chunk_tokens} exceeds the model limit max_tokens={max_tokens}")
    if not 0 <= overlap_tokens < chunk_tokens:
        raise ValueError("overlap_tokens must be >= 0 and smaller than chunk_tokens")


def _make_chunk(
    position: int, text: str, segments: list[_Segment], block: Block, count_tokens: Callable[[str], int]
) -> ChunkSpec:
    start, end = segments[0].start, segments[-1].end
    chunk_text = text[start:end]
    return ChunkSpec(
        position=position,
        text=chunk_text,
        page=block.page,
        heading_path=tuple(block.heading_path),
        char_start=start,
        char_end=end,
        token_count=_token_count(segments, chunk_text, count_tokens),
        content_hash=content_hash(chunk_text),
    )


def _token_count(segments: list[_Segment], chunk_text: str, count_tokens: Callable[[str], int]) -> int:
    """Sum of the segments' counts when every cut is at whitespace (exact for tokenizers that
    pre-split on whitespace, as WordPiece and byte-level BPE do); recounted otherwise."""
    if all(after.start > before.end for before, after in zip(segments, segments[1:])):
        return sum(segment.tokens for segment in segments)
    return count_tokens(chunk_text)


def _sections(blocks: list[Block]) -> list[list[int]]:
    """Runs of consecutive blocks sharing (page, heading_path)."""
    sections: list[list[int]] = []
    previous_key: tuple | None = None
    for index, block in enumerate(blocks):
        key = (block.page, tuple(block.heading_path))
        if sections and key == previous_key:
            sections[-1].append(index)
        else:
            sections.append([index])
        previous_key = key
    return sections


def _content_sections(blocks: list[Block]) -> list[list[int]]:
    sections = _sections(blocks)
    with_content = [s for s in sections if any(blocks[i].kind != "heading" for i in s)]
    return with_content or sections


def _segments(
    text: str, start: int, end: int, block: int, count_tokens: Callable[[str], int], limit: int, level: int = 0
) -> list[_Segment]:
    """Cut ``text[start:end]`` into the coarsest pieces that each fit in ``limit`` tokens."""
    tokens = count_tokens(text[start:end])
    if tokens <= limit:
        return [_Segment(start, end, tokens, block)]
    if level >= len(_SPLIT_LEVELS):
        return _char_segments(text, start, end, block, count_tokens, limit)
    pieces = _split(text, start, end, _SPLIT_LEVELS[level])
    if len(pieces) == 1:
        return _segments(text, start, end, block, count_tokens, limit, level + 1)
    return [
        segment
        for piece_start, piece_end in pieces
        for segment in _segments(text, piece_start, piece_end, block, count_tokens, limit, level + 1)
    ]


def _split(text: str, start: int, end: int, gap: re.Pattern[str]) -> list[tuple[int, int]]:
    """Spans of ``text[start:end]`` between matches of ``gap``'s first group (never empty)."""
    pieces: list[tuple[int, int]] = []
    cursor = start
    for match in gap.finditer(text, start, end):
        gap_start, gap_end = match.span(1)
        if gap_start > cursor and gap_end < end:
            pieces.append((cursor, gap_start))
            cursor = gap_end
    pieces.append((cursor, end))
    return pieces


def _char_segments(
    text: str, start: int, end: int, block: int, count_tokens: Callable[[str], int], limit: int
) -> list[_Segment]:
    """Last resort for a single unbreakable run: the longest prefixes that fit, by bisection."""
    segments: list[_Segment] = []
    cursor = start
    while cursor < end:
        low, high = cursor + 1, end
        while low < high:
            middle = (low + high + 1) // 2
            if count_tokens(text[cursor:middle]) <= limit:
                low = middle
            else:
                high = middle - 1
        segments.append(_Segment(cursor, low, count_tokens(text[cursor:low]), block))
        cursor = low
    return segments


def _pack(segments: list[_Segment], limit: int, overlap: int, *, whole_units: bool = False
          ) -> list[tuple[int, int]]:
    """Greedy packing into (first, last) segment ranges; overlap only inside one block.

    With ``whole_units``, a unit (block, clause, list item) that fits in one chunk but not in what is
    left of the current one starts the next chunk instead of being cut; a cut at a unit boundary
    needs no overlap. A unit larger than a chunk is packed greedily, with overlap, as before.
    """
    unit_tokens: dict[int, int] = {}
    for segment in segments:
        unit_tokens[segment.unit] = unit_tokens.get(segment.unit, 0) + segment.tokens
    pieces: list[tuple[int, int]] = []
    first = 0
    while first < len(segments):
        last, total = first, segments[first].tokens
        while last + 1 < len(segments) and total + segments[last + 1].tokens <= limit:
            following = segments[last + 1]
            if (whole_units and following.unit != segments[last].unit
                    and total + unit_tokens[following.unit] > limit >= unit_tokens[following.unit]):
                break
            last += 1
            total += segments[last].tokens
        pieces.append((first, last))
        following = last + 1
        if following >= len(segments):
            break
        first = following
        at_boundary = whole_units and segments[last].unit != segments[following].unit
        if overlap and not at_boundary and segments[last].block == segments[following].block:
            first = _overlap_start(segments, pieces[-1][0], following, overlap, limit)
    return pieces


def _overlap_start(segments: list[_Segment], floor: int, following: int, overlap: int, limit: int) -> int:
    """First segment of the next piece: step back over the previous piece's tail while the tail stays
    within ``overlap`` tokens (one longer sentence up to twice that is accepted rather than none)."""
    budget = limit - segments[following].tokens
    start, carried = following, 0
    block = segments[following].block
    while start - 1 > floor and segments[start - 1].block == block:
        size = segments[start - 1].tokens
        within = carried + size <= overlap or (carried == 0 and size <= min(2 * overlap, limit // 2))
        if not within or carried + size > budget:
            break
        start -= 1
        carried += size
    return start


def _merge_tail(
    pieces: list[tuple[int, int]], segments: list[_Segment], min_tokens: int, max_tokens: int
) -> list[tuple[int, int]]:
    if len(pieces) < 2:
        return pieces
    (prev_first, prev_last), (_, last_last) = pieces[-2], pieces[-1]
    fresh = sum(s.tokens for s in segments[prev_last + 1 : last_last + 1])
    merged = sum(s.tokens for s in segments[prev_first : last_last + 1])
    if fresh < min_tokens and merged <= max_tokens:
        return pieces[:-2] + [(prev_first, last_last)]
    return pieces


def _add_context(chunks: list[ChunkSpec], doc: ParsedDocument, *, title: str) -> None:
    from .abbreviations import expansions_for, find_abbreviations, title_acronyms

    abbreviations = find_abbreviations(doc.text)
    title = " ".join(title.split())
    # A question about "the MPL" finds every chunk of "Mozilla Public License Version 2.0".
    short = ", ".join(form for form in title_acronyms(title) if not re.search(rf"\b{form}\b", title))
    for chunk in chunks:
        path = [part for part in chunk.heading_path if part]
        if title and (not path or path[0] != title):
            path = [title] + path
        if short and path and path[0] == title:
            path[0] = f"{title} ({short})"
        lines = [" › ".join(path)]
        lines.extend(expansions_for(chunk.text, abbreviations))
        chunk.context = "\n".join(line for line in lines if line)
        chunk.content_hash = content_hash(indexed_text(chunk.text, chunk.context))
