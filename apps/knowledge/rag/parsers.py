"""Turn uploaded bytes into a structured document (blocks with headings and pages).

Contract: :func:`parse` either returns a non-empty :class:`ParsedDocument` or raises
:class:`~apps.knowledge.rag.errors.IngestError` with a stable code. Every other exception raised by
a third-party parser (pypdf, python-docx, lxml, csv) is converted to ``corrupt_file``, because
uploads are untrusted input and bad input must never surface as a server error.

The type is detected from the content; the filename extension only breaks ties between text
formats (``.md`` vs ``.txt``, ``.csv``), so a renamed file is still parsed by what it really is.

Encrypted PDFs: a PDF that opens with the empty user password (owner-password-only protection,
i.e. permission flags such as "no printing") is read, as every PDF viewer does; a PDF that needs
a user password raises ``encrypted_file``.
"""
from __future__ import annotations

import csv
import io
import re
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import ClassVar

from . import errors
from .errors import IngestError

DOCUMENT_TYPES = ("pdf", "docx", "html", "markdown", "csv", "text")
BLOCK_KINDS = ("heading", "paragraph", "table", "list", "code")


@dataclass(frozen=True)
class ParseLimits:
    """Resource limits applied before and during parsing (defaults suit a 2-core worker)."""

    max_bytes: int = 50 * 1024 * 1024
    max_pages: int = 2000
    max_uncompressed_bytes: int = 200 * 1024 * 1024
    max_compression_ratio: float = 100.0
    max_csv_rows: int = 200_000


@dataclass
class Block:
    """One structural unit of a document; ``heading_path`` of a heading block includes itself."""

    text: str
    kind: str
    level: int = 0
    page: int | None = None
    heading_path: tuple[str, ...] = ()


@dataclass
class ParsedDocument:
    """Parser output. ``text`` is the canonical text that chunk character spans refer to."""

    type: str
    title: str
    blocks: list[Block]
    page_count: int | None = None
    warnings: list[str] = field(default_factory=list)

    SEPARATOR: ClassVar[str] = "\n\n"

    @property
    def text(self) -> str:
        return self.SEPARATOR.join(block.text for block in self.blocks)

    def block_spans(self) -> list[tuple[int, int]]:
        """(char_start, char_end) of each block inside :attr:`text`, in block order."""
        spans: list[tuple[int, int]] = []
        offset = 0
        for block in self.blocks:
            spans.append((offset, offset + len(block.text)))
            offset += len(block.text) + len(self.SEPARATOR)
        return spans


# --------------------------------------------------------------------------------------------
# Type detection
# --------------------------------------------------------------------------------------------

_MARKDOWN_EXTS = {"md", "markdown", "mdown", "mkd"}
_CSV_EXTS = {"csv", "tsv"}
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_ENCRYPTED_OOXML_MARKER = "EncryptedPackage".encode("utf-16-le")
_BINARY_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"RIFF", "riff"),
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"(\xb5/\xfd", "zstd"),
    (b"7z\xbc\xaf\x27\x1c", "7z"),
    (b"Rar!\x1a\x07", "rar"),
    (b"\x7fELF", "elf"),
    (b"OggS", "ogg"),
    (b"ID3", "mp3"),
    (b"fLaC", "flac"),
    (b"wOFF", "woff"),
    (b"wOF2", "woff2"),
    (b"%!PS", "postscript"),
)
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")
_MAX_CONTROL_RATIO = 0.01
_HTML_TAG = re.compile(
    r"<(/?)(html|head|body|div|p|span|a|h[1-6]|ul|ol|li|table|tr|td|th|br|img|section|article|main|"
    r"nav|header|footer|script|style|meta|link|title|em|strong|pre|code|blockquote|form)\b[^<>]*>",
    re.IGNORECASE,
)
_MD_ATX = re.compile(r"^ {0,3}#{1,6}[ \t]+\S", re.MULTILINE)
_MD_FENCE = re.compile(r"^ {0,3}(```|~~~)", re.MULTILINE)
_MD_SETEXT = re.compile(r"^[^\s].*\n {0,3}(=+|-{2,})[ \t]*$", re.MULTILINE)
_MD_LINK = re.compile(r"!?\[[^\]\n]+\]\([^)\s]+[^)\n]*\)")
_MD_LIST = re.compile(r"^ {0,3}([-*+]|\d{1,3}[.)])[ \t]+\S", re.MULTILINE)
_MD_EMPHASIS = re.compile(r"(\*\*|__)[^\s*_][^*_\n]*\1|`[^`\n]+`")
_MD_TABLE_SEP = re.compile(r"^ {0,3}\|?[ \t]*:?-{3,}:?[ \t]*\|", re.MULTILINE)


def detect_type(data: bytes, filename: str | None = None) -> str:
    """Return one of :data:`DOCUMENT_TYPES` for ``data``.

    Raises ``IngestError(unsupported_type)`` for binary formats we cannot read (images, archives
    that are not DOCX, legacy Office files), ``encrypted_file`` for password-protected Office files
    and ``corrupt_file`` for a ZIP container that cannot be opened.
    """
    ext = _extension(filename)
    if not data.strip():
        return "markdown" if ext in _MARKDOWN_EXTS else "text"
    if b"%PDF-" in data[:1024]:
        return "pdf"
    if data.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _detect_zip(data)
    if data.startswith(_OLE_MAGIC):
        _raise_ole(data)
    for magic, name in _BINARY_MAGICS:
        if data.startswith(magic):
            raise IngestError(errors.UNSUPPORTED_TYPE, f"{name} files are not supported", {"detected": name})
    return _detect_text_type(_decode_text(data), ext)


def _extension(filename: str | None) -> str | None:
    if not filename:
        return None
    suffix = PurePath(filename).suffix.lower().lstrip(".")
    return suffix or None


def _detect_zip(data: bytes) -> str:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = set(archive.namelist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as exc:
        raise IngestError(errors.CORRUPT_FILE, "the ZIP container is damaged", {"error": str(exc)}) from exc
    if "word/document.xml" in names:
        return "docx"
    raise IngestError(errors.UNSUPPORTED_TYPE, "ZIP archives other than DOCX are not supported", {"detected": "zip"})


def _raise_ole(data: bytes) -> None:
    if _ENCRYPTED_OOXML_MARKER in data:
        raise IngestError(errors.ENCRYPTED_FILE, "the Office document is password-protected")
    raise IngestError(
        errors.UNSUPPORTED_TYPE, "legacy Office files (.doc/.xls/.ppt) are not supported", {"detected": "ole"}
    )


def _decode_text(data: bytes) -> str:
    """Decode bytes that should be text; binary content raises ``unsupported_type``."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = _decode_utf16(data)
    elif b"\x00" in data:
        raise IngestError(errors.UNSUPPORTED_TYPE, "binary content is not supported", {"detected": "binary"})
    else:
        text = _decode_8bit(data)
    sample = text[:65536]
    if sample and len(_CONTROL_CHARS.findall(sample)) / len(sample) > _MAX_CONTROL_RATIO:
        raise IngestError(errors.UNSUPPORTED_TYPE, "binary content is not supported", {"detected": "binary"})
    text = text[1:] if text.startswith("\ufeff") else text
    return _CONTROL_CHARS.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


def _decode_utf16(data: bytes) -> str:
    try:
        return data.decode("utf-16")
    except UnicodeDecodeError as exc:
        raise IngestError(errors.UNSUPPORTED_TYPE, "undecodable UTF-16 content", {"detected": "binary"}) from exc


def _decode_8bit(data: bytes) -> str:
    """UTF-8, else the legacy encoding whose decoding looks most like real text.

    Candidates are scored on what the decoded characters are, because byte statistics alone mislead
    on short texts (charset-normalizer reads a short Big5 text as Shift_JIS and cp1252 as cp1257):
    GB18030 (which covers GBK and GB2312) and Big5 score the share of characters among the common
    ones of each (GB2312 level 1; Big5 frequent characters) plus CJK punctuation; cp1252 scores
    isolated accented letters (runs of three or more non-ASCII characters are mis-decoded CJK).
    charset-normalizer decides only when none of these is convincing (Shift_JIS, EUC-KR, KOI8-R...).
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    best: tuple[float, str] | None = None
    for encoding, scorer in (("gb18030", _score_gb), ("big5", _score_big5), ("cp1252", _score_latin)):
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        score = scorer(text[:20000])
        if best is None or score > best[0]:
            best = (score, text)
    if best is not None and best[0] >= 0.6:
        return best[1]
    from charset_normalizer import from_bytes

    guess = from_bytes(data[:262144]).best()
    if guess is not None:
        try:
            return data.decode(guess.encoding)
        except (UnicodeDecodeError, LookupError):
            pass
    return best[1] if best is not None else data.decode("latin-1")


def _non_ascii(text: str) -> list[str]:
    return [c for c in text if ord(c) > 127]


def _is_cjk_punctuation(c: str) -> bool:
    return "\u3000" <= c <= "\u303f" or "\uff00" <= c <= "\uffef" or c in "\u2014\u2018\u2019\u201c\u201d\u2026\u00b7"


def _score_common_han(text: str, encoding: str, first_byte_range: tuple[int, int]) -> float:
    """Share of non-ASCII characters that are CJK punctuation or common Han characters of `encoding`
    (the lead-byte range of its most frequent characters): high when the bytes were decoded right."""
    chars = _non_ascii(text)
    if not chars:
        return 0.0
    low, high = first_byte_range
    good = 0
    for c in chars:
        if _is_cjk_punctuation(c):
            good += 1
            continue
        try:
            encoded = c.encode(encoding)
        except UnicodeEncodeError:
            continue
        good += len(encoded) == 2 and low <= encoded[0] <= high
    return good / len(chars)


def _score_gb(text: str) -> float:
    return _score_common_han(text, "gb2312", (0xB0, 0xD7))


def _score_big5(text: str) -> float:
    return _score_common_han(text, "big5", (0xA4, 0xC6))


_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")


def _score_latin(text: str) -> float:
    chars = _non_ascii(text)
    if not chars:
        return 0.0
    good = 0
    for run in _NON_ASCII_RUN.findall(text):
        if len(run) <= 2:
            good += sum(c.isalpha() or c in "\u2018\u2019\u201c\u201d\u2013\u2014\u2026\u20ac\u2022\u00b0\u00a0\u00a9\u00ae\u00b1\u00a7" for c in run)
    return good / len(chars)


def _detect_text_type(text: str, ext: str | None) -> str:
    sample = text[:65536]
    if _looks_like_html(sample):
        return "html"
    if ext in _CSV_EXTS and _sniff_delimiter(sample, min_rows=2, agreement=0.8) is not None:
        return "csv"
    score = _markdown_score(sample)
    if score >= 3:
        return "markdown"
    if _sniff_delimiter(sample, min_rows=3) is not None:
        return "csv"
    if ext in _MARKDOWN_EXTS or (score > 0 and ext is None):
        return "markdown"
    return "text"


def _looks_like_html(sample: str) -> bool:
    head = sample.lstrip()[:2048].lower()
    if head.startswith(("<!doctype html", "<html")):
        return True
    if head.startswith("<?xml") and "<html" in head:
        return True
    tags = _HTML_TAG.findall(sample)
    if head.startswith("<") and len(tags) >= 2:
        return True
    tag_chars = sum(len(m.group(0)) for m in _HTML_TAG.finditer(sample))
    return len(tags) >= 5 and tag_chars / max(len(sample), 1) >= 0.1


def _markdown_score(sample: str) -> int:
    """Cue score: >= 3 is unambiguous Markdown; 1-2 needs the extension to decide."""
    score = 2 * min(len(_MD_ATX.findall(sample)), 2)
    score += 3 * min(len(_MD_FENCE.findall(sample)), 1)
    score += 2 * min(len(_MD_SETEXT.findall(sample)), 1)
    score += 2 * min(len(_MD_TABLE_SEP.findall(sample)), 1)
    score += min(len(_MD_LINK.findall(sample)), 2)
    score += min(len(_MD_LIST.findall(sample)), 1)
    score += min(len(_MD_EMPHASIS.findall(sample)), 1)
    return score


def _sniff_delimiter(sample: str, *, min_rows: int, agreement: float = 1.0) -> str | None:
    """Return the delimiter if the sample is a table with >= 2 columns where at least
    ``agreement`` of the rows have the most common width (1.0 without a .csv extension)."""
    lines = [line for line in sample.split("\n")[:51] if line.strip()]
    if len(sample) == 65536 and len(lines) > 1:
        lines = lines[:-1]
    if len(lines) < min_rows or any(line.lstrip().startswith("|") for line in lines):
        return None
    for delimiter in (",", "\t", ";", "|"):
        if _consistent_rows(lines, delimiter, agreement):
            return delimiter
    return None


def _consistent_rows(lines: list[str], delimiter: str, agreement: float) -> bool:
    try:
        rows = list(csv.reader(lines, delimiter=delimiter))
    except csv.Error:
        return False
    widths = Counter(len(row) for row in rows)
    width, count = widths.most_common(1)[0]
    if width < 2 or count < agreement * len(rows) or len(rows[0]) != width:
        return False
    return all(len(cell.strip()) <= 64 for cell in rows[0])


# --------------------------------------------------------------------------------------------
# Parsing entry point
# --------------------------------------------------------------------------------------------


def parse(data: bytes, *, filename: str | None = None, limits: ParseLimits = ParseLimits()) -> ParsedDocument:
    """Parse untrusted bytes; raises only :class:`IngestError` (see module docstring)."""
    data = bytes(data)
    if len(data) > limits.max_bytes:
        raise IngestError(
            errors.TOO_LARGE,
            f"the file is {len(data)} bytes; the limit is {limits.max_bytes}",
            {"size": len(data), "limit": limits.max_bytes},
        )
    try:
        doc_type = detect_type(data, filename)
        doc = _PARSERS[doc_type](data, filename, limits)
    except IngestError:
        raise
    except Exception as exc:
        raise IngestError(
            errors.CORRUPT_FILE, "the file could not be read", {"error": f"{type(exc).__name__}: {exc}"[:500]}
        ) from exc
    return _finalize(doc, filename)


def _finalize(doc: ParsedDocument, filename: str | None) -> ParsedDocument:
    doc.blocks = [block for block in doc.blocks if block.text.strip()]
    if not doc.blocks:
        raise IngestError(errors.EMPTY_DOCUMENT, "no text could be extracted", {"type": doc.type})
    if not doc.title:
        doc.title = _default_title(doc, filename)
    return doc


def _default_title(doc: ParsedDocument, filename: str | None) -> str:
    if filename and PurePath(filename).stem:
        return PurePath(filename).stem
    first_line = doc.blocks[0].text.split("\n", 1)[0]
    return _truncate(first_line, 120)


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


_WHITESPACE = re.compile(r"\s+")


def _inline(text: str) -> str:
    """Collapse all whitespace: prose blocks are one logical line."""
    return _WHITESPACE.sub(" ", _CONTROL_CHARS.sub("", text)).strip()


def _lines(text: str) -> str:
    """Keep line structure (lists, tables, code) but drop blank lines: "\\n\\n" separates blocks."""
    lines = (line.rstrip() for line in _CONTROL_CHARS.sub("", text).replace("\t", "    ").split("\n"))
    return "\n".join(line for line in lines if line.strip())


class _HeadingStack:
    """Tracks the heading path; a heading of level L closes every open heading of level >= L."""

    def __init__(self) -> None:
        self._stack: list[tuple[int, str]] = []

    def enter(self, level: int, text: str) -> tuple[str, ...]:
        while self._stack and self._stack[-1][0] >= level:
            self._stack.pop()
        self._stack.append((level, text))
        return self.path

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(text for _, text in self._stack)


# --------------------------------------------------------------------------------------------
# Plain text
# --------------------------------------------------------------------------------------------

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\f\v]*\n|\f")
_LIST_LINE = re.compile(r"^\s*([-*+•]|\d{1,3}[.)])\s+\S")


def _parse_text(data: bytes, filename: str | None, limits: ParseLimits) -> ParsedDocument:
    """Paragraphs at blank lines; a short standalone line that reads as a heading (``Article 5
    Termination``, ``第三章 劳动合同``, ``2.1 Scope``, ``一、总则``, ``TERMS AND CONDITIONS``) becomes a
    heading, and so does such a first line of a paragraph, so the heading path of plain-text legal
    and reference documents is known and a heading is never cut from its clause."""
    text = _decode_text(data)
    headings = _HeadingStack()
    blocks: list[Block] = []
    parts = [part for part in _PARAGRAPH_BREAK.split(text) if part.strip()]
    for number, part in enumerate(parts):
        lines = [line for line in part.split("\n") if line.strip()]
        level = _text_heading_level(lines[0]) if number + 1 < len(parts) or len(lines) > 1 else None
        if level is not None and (len(lines) == 1 or not (_LIST_LINE.match(lines[0]) and _LIST_LINE.match(lines[1]))):
            heading = _inline(lines[0])
            blocks.append(Block(heading, "heading", level, heading_path=headings.enter(level, heading)))
            if len(lines) == 1:
                continue
            part = "\n".join(lines[1:])
        block = _text_block(part)
        block.heading_path = headings.path
        blocks.append(block)
    title = blocks[0].text if blocks and blocks[0].kind == "heading" and blocks[0].level == 1 else ""
    return ParsedDocument(type="text", title=title, blocks=blocks)


_TEXT_HEADING_MARKERS: tuple[tuple[re.Pattern[str], int | None], ...] = (
    (re.compile(r"^(?:part|book|title)\s+[\dIVXLC]+\b|^第[一二三四五六七八九十百千零〇\d]+[编部]", re.I), 1),
    (re.compile(r"^chapter\s+[\dIVXLC]+\b|^第[一二三四五六七八九十百千零〇\d]+章", re.I), 1),
    (re.compile(r"^(?:section|§)\s*[\dIVXLC]+\b|^第[一二三四五六七八九十百千零〇\d]+节", re.I), 2),
    (re.compile(r"^(?:article|clause)\s+[\dIVXLC]+\b|^第[一二三四五六七八九十百千零〇\d]+条", re.I), 3),
    (re.compile(r"^[一二三四五六七八九十]+、"), 2),
    (re.compile(r"^[（(][一二三四五六七八九十]+[）)]"), 3),
    (re.compile(r"^\d{1,2}(?:\.\d{1,2}){0,3}\.?\s+\S"), None),  # 1 / 1.2 / 1.2.3: level by depth
    (re.compile(r"^[IVXLC]+\.\s+\S"), 2),
)
_TEXT_HEADING_END = re.compile(r"[.。!?！？;；:：,，]$")


def _text_heading_level(line: str) -> int | None:
    line = line.strip()
    if not line or len(line) > 80 or len(line.split()) > 12 or _TEXT_HEADING_END.search(line):
        return None
    for pattern, level in _TEXT_HEADING_MARKERS:
        if pattern.match(line):
            if level is None:
                level = 2 + line.split()[0].rstrip(".").count(".")
            return level
    letters = [c for c in line if c.isalpha()]
    if len(letters) >= 4 and all(c.isupper() for c in letters if c.isascii()) and all(c.isascii() for c in letters):
        return 1
    return None


def _text_block(part: str) -> Block:
    lines = [line for line in part.split("\n") if line.strip()]
    if len(lines) > 1 and all(_LIST_LINE.match(line) for line in lines):
        return Block(_lines(part), "list")
    return Block(_inline(part), "paragraph")


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _parse_markdown(data: bytes, filename: str | None, limits: ParseLimits) -> ParsedDocument:
    from markdown_it import MarkdownIt

    tokens = MarkdownIt("commonmark", {"html": True}).enable("table").parse(_decode_text(data))
    headings = _HeadingStack()
    blocks: list[Block] = []
    title = ""
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.type == "heading_open":
            text = _md_inline_text(tokens[i + 1])
            level = int(token.tag[1])
            if text:
                blocks.append(Block(text, "heading", level, heading_path=headings.enter(level, text)))
                title = title or (text if level == 1 else "")
            i += 3
            continue
        end = _md_block_end(tokens, i)
        block = _md_block(tokens, i, end)
        if block is not None:
            block.heading_path = headings.path
            blocks.append(block)
            i = end + 1
        else:
            i += 1
    if not title:
        title = next((b.text for b in blocks if b.kind == "heading"), "")
    return ParsedDocument(type="markdown", title=title, blocks=blocks)


def _md_block(tokens: list, start: int, end: int) -> Block | None:
    token = tokens[start]
    if token.type == "paragraph_open":
        return Block(_md_inline_text(tokens[start + 1]), "paragraph")
    if token.type in ("bullet_list_open", "ordered_list_open"):
        return Block(_md_list_text(tokens[start : end + 1]), "list")
    if token.type == "table_open":
        return Block(_md_table_text(tokens[start : end + 1]), "table")
    if token.type in ("fence", "code_block"):
        return Block(_lines(token.content), "code")
    if token.type == "html_block":
        return Block(_inline(_html_fragment_text(token.content)), "paragraph")
    return None


def _md_block_end(tokens: list, start: int) -> int:
    """Index of the last token of the block opened at ``start`` (only lists and tables are
    consumed whole; other containers such as blockquotes are walked into)."""
    token = tokens[start]
    if token.type in ("bullet_list_open", "ordered_list_open", "table_open"):
        return _md_matching_close(tokens, start)
    if token.type == "paragraph_open":
        return start + 2
    return start


def _md_matching_close(tokens: list, start: int) -> int:
    closing = tokens[start].type.replace("_open", "_close")
    level = tokens[start].level
    for j in range(start + 1, len(tokens)):
        if tokens[j].type == closing and tokens[j].level == level:
            return j
    return len(tokens) - 1


def _md_inline_text(token) -> str:
    """Inline text without markup, except emphasis that is not really emphasis (see below)."""
    parts: list[str] = []
    opened: list[tuple[int, str]] = []  # (index in parts, markup) of open em/strong
    for child in token.children or []:
        if child.type in ("text", "code_inline"):
            parts.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            parts.append(" ")
        elif child.type == "image":
            parts.append(child.content)
        elif child.type in ("em_open", "strong_open"):
            opened.append((len(parts), child.markup))
            parts.append("")
        elif child.type in ("em_close", "strong_close") and opened:
            start, markup = opened.pop()
            parts.append("")
            if _md_literal_emphasis(parts, start, markup):
                parts[start] = markup + parts[start]
                parts[-1] = markup
    return _inline("".join(parts))


def _md_literal_emphasis(parts: list[str], start: int, markup: str) -> bool:
    """CommonMark reads ``__init__`` as strong "init" and ``2*3*4`` as "2", em "3", "4": in
    documentation (and plain text saved as .md) those are identifiers and arithmetic. Emphasis is
    kept as emphasis only when it is really emphasis: not glued to a letter or digit on the outside,
    and not an underscore pair around one word (``_private_``, ``__main__``)."""
    before = "".join(parts[:start])
    inner = "".join(parts[start + 1:-1])
    if before and before[-1].isalnum():
        return True
    if markup.startswith("_") and inner and not any(c.isspace() for c in inner):
        return True
    return False


def _md_list_text(tokens: list) -> str:
    lines: list[str] = []
    depth = -1
    markers: list[str] = []
    first_in_item = False
    for token in tokens:
        if token.type in ("bullet_list_open", "ordered_list_open"):
            depth += 1
        elif token.type in ("bullet_list_close", "ordered_list_close"):
            depth -= 1
        elif token.type == "list_item_open":
            markers.append(f"{token.info}." if token.info else "-")
            first_in_item = True
        elif token.type == "list_item_close":
            markers.pop()
        elif token.type in ("inline", "fence", "code_block"):
            text = _md_inline_text(token) if token.type == "inline" else _lines(token.content)
            if not text:
                continue
            indent = "  " * max(depth, 0)
            prefix = f"{markers[-1]} " if first_in_item and markers else "  "
            lines.extend(f"{indent}{prefix if n == 0 else '  '}{line}" for n, line in enumerate(text.split("\n")))
            first_in_item = False
    return "\n".join(lines)


def _md_table_text(tokens: list) -> str:
    rows: list[list[str]] = []
    for token in tokens:
        if token.type == "tr_open":
            rows.append([])
        elif token.type == "inline" and rows:
            rows[-1].append(_md_inline_text(token))
    return _table_text(rows)


def _table_text(rows: list[list[str]], *, header: bool = True) -> str:
    """One line per data row, each carrying its column names (``Plan: Pro; Price: 300``), so a chunk
    cut between rows, or one row alone, is still retrievable and readable. Tables of one row or one
    column, or without a header row, stay as ``a | b`` lines."""
    rows = [row for row in rows if any(cell for cell in row)]
    names = rows[0] if rows else []
    if header and len(rows) >= 2 and sum(1 for name in names if name) >= 2:
        lines = [_csv_row_text(names, row) for row in rows[1:]]
        return "\n".join(line for line in lines if line)
    return "\n".join(" | ".join(row) for row in rows)


def _html_fragment_text(fragment: str) -> str:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(fragment, "lxml")
    for tag in soup.find_all(list(_HTML_DROP)):
        tag.decompose()
    return soup.get_text(" ")


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_HTML_DROP = frozenset(
    {"script", "style", "nav", "header", "footer", "aside", "form", "noscript", "template", "svg",
     "iframe", "canvas", "button", "select", "textarea", "object", "embed", "dialog", "head"}
)
_HTML_HEADINGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})
_HTML_PARAGRAPHS = frozenset({"p", "dd", "dt", "figcaption", "caption", "address", "summary"})
_HTML_CONTAINERS = frozenset(
    {"html", "body", "main", "article", "section", "div", "blockquote", "figure", "details", "center",
     "fieldset", "dl", "hgroup", "search", "li"}
)
_HTML_BLOCK_LEVEL = sorted(_HTML_HEADINGS | _HTML_PARAGRAPHS | _HTML_CONTAINERS | {"ul", "ol", "table", "pre"})


def _parse_html(data: bytes, filename: str | None, limits: ParseLimits) -> ParsedDocument:
    text = _decode_html(data)
    soup, title = _html_soup(text)
    walker = _walk_html(soup, drop_navigation=True)
    if not walker.blocks:  # a page that is nothing but links (a site map) is indexed as it is
        walker = _walk_html(_html_soup(text)[0], drop_navigation=False)
    if not title:
        title = next((b.text for b in walker.blocks if b.kind == "heading" and b.level == 1), "")
    return ParsedDocument(type="html", title=title, blocks=walker.blocks)


def _html_soup(text: str):
    """The page without chrome, and its ``<title>``."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(text, "lxml")
    title = _inline(soup.title.get_text()) if soup.title else ""
    for tag in soup.find_all(list(_HTML_DROP)):
        if not _is_content_header(tag):
            tag.decompose()
    for tag in soup.find_all(hidden=True):
        tag.decompose()
    for br in soup.find_all("br"):
        br.replace_with("\n")
    return soup, title


def _walk_html(soup, *, drop_navigation: bool):
    walker = _HtmlWalker(skip=_navigation_blocks(soup) if drop_navigation else frozenset())
    for root in _html_roots(soup):
        walker.walk(root)
    walker.flush()
    return walker


# A table of contents, a "Prev | Up | Next" bar or a list of related pages: a list, table or block
# whose text is (nearly) all link text. It names every section of a document or site, so it matches
# any question about any of them and crowds the real passages out of the top results (on the Debian
# FAQ set, chapter and index tables of contents were the top hit of many Chinese misses).
_NAVIGATION_CANDIDATES = frozenset({"ul", "ol", "dl", "table", "div", "p", "section"})
_NAVIGATION_MIN_LINKS = 3
_NAVIGATION_LINK_SHARE = 0.9


def _navigation_blocks(soup) -> set[int]:
    """ids of the candidate elements (nested ones too) that are link lists, in one bottom-up pass
    (linear in the page: hostile nesting costs no more than flat markup)."""
    from bs4 import NavigableString, Tag

    # Per element: [visible characters, characters inside <a href>, links, holds a heading].
    stats: dict[int, list] = {}
    found: set[int] = set()
    for node in reversed(list(soup.descendants)):  # children before their parents
        if not isinstance(node, Tag):
            continue
        total = linked = links = 0
        heading = node.name in _HTML_HEADINGS
        for child in node.children:
            if isinstance(child, Tag):
                t, k, n, h = stats.pop(id(child), (0, 0, 0, False))
                total, linked, links, heading = total + t, linked + k, links + n, heading or h
            elif type(child) is NavigableString:
                total += sum(1 for c in str(child) if c.isalnum())  # "Prev | Up | Next": the bars are not text
        if node.name == "a" and node.get("href") is not None:
            linked, links = total, links + 1
        stats[id(node)] = [total, linked, links, heading]
        if (node.name in _NAVIGATION_CANDIDATES and links >= _NAVIGATION_MIN_LINKS and total > 0
                and linked >= _NAVIGATION_LINK_SHARE * total and not heading):
            found.add(id(node))
    return found


_HTML_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)|<\?xml[^>]+encoding\s*=\s*["']([A-Za-z0-9_.:-]+)""",
                           re.IGNORECASE)
# Pages labelled GB2312/GBK routinely use characters only GB18030 (a superset of both) has.
_CHARSET_ALIASES = {"gb2312": "gb18030", "gbk": "gb18030", "x-gbk": "gb18030", "big5": "big5hkscs"}


def _decode_html(data: bytes) -> str:
    """The declared charset when a BOM-less page declares one that decodes, else detection."""
    if not data.startswith((b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")):
        match = _HTML_CHARSET.search(data[:4096])
        if match:
            declared = (match.group(1) or match.group(2)).decode("ascii").lower()
            try:
                text = data.decode(_CHARSET_ALIASES.get(declared, declared))
            except (LookupError, UnicodeDecodeError):
                pass
            else:
                return _CONTROL_CHARS.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    return _decode_text(data)


def _is_content_header(tag) -> bool:
    """``<header>`` inside ``<article>``/``<main>`` holds the article's own title, not site chrome."""
    return tag.name == "header" and tag.find_parent(["article", "main"]) is not None


def _html_roots(soup) -> list:
    main = soup.find("main")
    if main is not None:
        return [main]
    articles = [a for a in soup.find_all("article") if a.find_parent("article") is None]
    if articles:
        return articles
    return [soup.body or soup]


class _HtmlWalker:
    """Walks the DOM in document order, emitting blocks; loose inline text becomes paragraphs."""

    def __init__(self, *, skip: frozenset[int] | set[int] = frozenset()) -> None:
        self.blocks: list[Block] = []
        self._headings = _HeadingStack()
        self._buffer: list[str] = []
        self._skip = skip  # ids of elements left out (navigation)

    def walk(self, node) -> None:
        from bs4 import NavigableString, Tag

        for child in node.children:
            if isinstance(child, Tag):
                self._visit(child)
            elif type(child) is NavigableString:
                self._buffer.append(str(child))

    def flush(self) -> None:
        self._emit(_inline("".join(self._buffer)), "paragraph")
        self._buffer = []

    def _visit(self, tag) -> None:
        name = tag.name
        if id(tag) in self._skip:
            return
        if name in _HTML_HEADINGS:
            self.flush()
            self._heading(int(name[1]), _inline(tag.get_text()))
        elif name in ("ul", "ol"):
            self.flush()
            self._emit(_lines("\n".join(_html_list_lines(tag, 0))), "list")
        elif name == "table":
            self.flush()
            self._emit(_lines(_html_table_text(tag)), "table")
        elif name == "pre":
            self.flush()
            self._emit(_lines(tag.get_text()), "code")
        elif name in _HTML_PARAGRAPHS and tag.find(_HTML_BLOCK_LEVEL) is None:
            self.flush()
            self._emit(_inline(tag.get_text()), "paragraph")
        elif name in _HTML_CONTAINERS or name in _HTML_PARAGRAPHS or tag.find(_HTML_BLOCK_LEVEL) is not None:
            self.flush()
            self.walk(tag)
            self.flush()
        else:
            self._buffer.append(tag.get_text())

    def _heading(self, level: int, text: str) -> None:
        if text:
            self.blocks.append(Block(text, "heading", level, heading_path=self._headings.enter(level, text)))

    def _emit(self, text: str, kind: str) -> None:
        if text:
            self.blocks.append(Block(text, kind, heading_path=self._headings.path))


def _html_list_lines(list_tag, depth: int) -> Iterator[str]:
    ordered = list_tag.name == "ol"
    for number, item in enumerate(list_tag.find_all("li", recursive=False), start=1):
        nested = item.find_all(["ul", "ol"], recursive=False)
        for sub in nested:
            sub.extract()
        marker = f"{number}." if ordered else "-"
        text = _inline(item.get_text())
        if text:
            yield f"{'  ' * depth}{marker} {text}"
        for sub in nested:
            yield from _html_list_lines(sub, depth + 1)


def _html_table_text(table) -> str:
    """Header + row lines (see :func:`_table_text`). A table whose rows each start with a ``th``
    under a header-less first row is a key/value table: ``key: value`` lines."""
    rows: list[list[str]] = []
    kinds: list[list[str]] = []
    for row in table.find_all("tr"):
        if row.find_parent("table") is not table:
            continue
        cells = row.find_all(["th", "td"], recursive=False)
        rows.append([_inline(cell.get_text()) for cell in cells])
        kinds.append([cell.name for cell in cells])
    if not rows:
        return ""
    first_is_header = bool(kinds[0]) and all(kind == "th" for kind in kinds[0])
    if not first_is_header and all(k and k[0] == "th" and "td" in k for k in kinds):
        return "\n".join(f"{row[0]}: {'; '.join(v for v in row[1:] if v)}" for row in rows if any(row))
    return _table_text(rows)


# --------------------------------------------------------------------------------------------
# PDF
# --------------------------------------------------------------------------------------------

_PLACEHOLDER_TITLES = {"untitled", "untitled document", "microsoft word", "document", "title"}
_SENTENCE_END = re.compile(r"[.!?:;\"”’)]$")


def _parse_pdf(data: bytes, filename: str | None, limits: ParseLimits) -> ParsedDocument:
    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(data), strict=False)
    _pdf_unlock(reader)
    page_count = len(reader.pages)
    if page_count > limits.max_pages:
        raise IngestError(
            errors.TOO_LARGE,
            f"the PDF has {page_count} pages; the limit is {limits.max_pages}",
            {"pages": page_count, "limit": limits.max_pages},
        )
    blocks: list[Block] = []
    warnings: list[str] = []
    failed = 0
    for number, page in enumerate(reader.pages, start=1):
        try:
            text = page.extract_text() or ""
        except Exception as exc:
            failed += 1
            warnings.append(f"page {number}: text extraction failed ({type(exc).__name__})")
            continue
        blocks.extend(Block(p, "paragraph", page=number) for p in _pdf_paragraphs(text))
    if page_count and failed == page_count:
        raise IngestError(errors.CORRUPT_FILE, "no page of the PDF could be read", {"pages": page_count})
    return ParsedDocument(
        type="pdf", title=_pdf_title(reader), blocks=blocks, page_count=page_count, warnings=warnings
    )


def _pdf_unlock(reader) -> None:
    if not reader.is_encrypted:
        return
    try:
        unlocked = reader.decrypt("")
    except Exception as exc:
        raise IngestError(errors.ENCRYPTED_FILE, "the PDF is encrypted and cannot be opened", {"error": str(exc)}) from exc
    if not unlocked:
        raise IngestError(errors.ENCRYPTED_FILE, "the PDF is password-protected")


def _pdf_title(reader) -> str:
    try:
        metadata = reader.metadata
        title = _inline(str(metadata.title)) if metadata and metadata.title else ""
    except Exception:
        return ""
    return "" if title.lower() in _PLACEHOLDER_TITLES else title


def _pdf_paragraphs(page_text: str) -> list[str]:
    """Rebuild paragraphs from extracted lines: a blank line, or a short line that ends a
    sentence, closes a paragraph; hyphenated line breaks are rejoined."""
    lines = [line.strip() for line in page_text.replace("\r", "\n").split("\n")]
    widest = max((len(line) for line in lines), default=0)
    paragraphs: list[str] = []
    current = ""
    for line in lines:
        if not line:
            paragraphs.append(current)
            current = ""
            continue
        current = _join_pdf_line(current, line)
        if _SENTENCE_END.search(line) and len(line) < 0.7 * widest:
            paragraphs.append(current)
            current = ""
    paragraphs.append(current)
    return [p for p in (_inline(p) for p in paragraphs) if p]


def _join_pdf_line(current: str, line: str) -> str:
    if not current:
        return line
    if current.endswith("-") and len(current) > 1 and current[-2].isalpha() and line[:1].islower():
        return current[:-1] + line
    return f"{current} {line}"


# --------------------------------------------------------------------------------------------
# DOCX
# --------------------------------------------------------------------------------------------

_HEADING_STYLE = re.compile(r"^heading\s*([1-9])$", re.IGNORECASE)


def _parse_docx(data: bytes, filename: str | None, limits: ParseLimits) -> ParsedDocument:
    _check_zip_limits(data, limits)
    import docx
    from docx.table import Table

    document = docx.Document(io.BytesIO(data))
    builder = _DocxBuilder()
    for item in document.iter_inner_content():
        if isinstance(item, Table):
            builder.table(item)
        else:
            builder.paragraph(item)
    builder.flush_list()
    title = _inline(document.core_properties.title or "") or builder.title
    return ParsedDocument(type="docx", title=title, blocks=builder.blocks)


def _check_zip_limits(data: bytes, limits: ParseLimits) -> None:
    """Reject decompression bombs from the central directory, before anything is inflated.

    zipfile stops inflating a member at its declared size, so the declared sizes bound the work.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as exc:
        raise IngestError(errors.CORRUPT_FILE, "the ZIP container is damaged", {"error": str(exc)}) from exc
    total = sum(info.file_size for info in infos)
    ratio = total / max(len(data), 1)
    details = {"uncompressed_bytes": total, "compressed_bytes": len(data), "ratio": round(ratio, 1)}
    if total > limits.max_uncompressed_bytes:
        raise IngestError(errors.DECOMPRESSION_BOMB, "the archive expands beyond the size limit", details)
    if ratio > limits.max_compression_ratio:
        raise IngestError(errors.DECOMPRESSION_BOMB, "the archive's compression ratio is suspicious", details)


class _DocxBuilder:
    """Accumulates DOCX paragraphs/tables into blocks; consecutive list paragraphs form one list."""

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self.title = ""
        self._headings = _HeadingStack()
        self._list_lines: list[str] = []

    def paragraph(self, paragraph) -> None:
        text = _inline(paragraph.text)
        if not text:
            return
        style_name = _docx_style_name(paragraph)
        level = _docx_heading_level(paragraph)
        if level is not None:
            self.flush_list()
            self.blocks.append(Block(text, "heading", level, heading_path=self._headings.enter(level, text)))
            if style_name.lower() == "title" or (level == 1 and not self.title):
                self.title = text
        elif _docx_is_list(paragraph, style_name):
            self._list_lines.append(f"- {text}")
        else:
            self.flush_list()
            self.blocks.append(Block(text, "paragraph", heading_path=self._headings.path))

    def table(self, table) -> None:
        self.flush_list()
        rows: list[list[str]] = []
        for row in table.rows:
            cells = _dedupe_merged_cells(row.cells)
            rows.append([_inline(cell.text) for cell in cells])
        text = _table_text(rows)
        if text:
            self.blocks.append(Block(text, "table", heading_path=self._headings.path))

    def flush_list(self) -> None:
        if self._list_lines:
            self.blocks.append(Block("\n".join(self._list_lines), "list", heading_path=self._headings.path))
            self._list_lines = []


def _docx_style_name(paragraph) -> str:
    style = paragraph.style
    return (style.name or "") if style is not None else ""


def _docx_heading_level(paragraph) -> int | None:
    """Heading level from the style or any style it is based on; ``Title`` counts as level 1."""
    style = paragraph.style
    for _ in range(10):
        if style is None:
            return None
        name = style.name or ""
        if name.lower() == "title":
            return 1
        match = _HEADING_STYLE.match(name)
        if match:
            return int(match.group(1))
        style = style.base_style
    return None


def _docx_is_list(paragraph, style_name: str) -> bool:
    if style_name.lower().startswith("list"):
        return True
    properties = paragraph._p.pPr
    return properties is not None and properties.numPr is not None


def _dedupe_merged_cells(cells) -> list:
    unique = []
    seen: set[int] = set()
    for cell in cells:
        key = id(cell._tc)
        if key not in seen:
            seen.add(key)
            unique.append(cell)
    return unique


# --------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------

_CSV_BLOCK_CHARS = 800


def _parse_csv(data: bytes, filename: str | None, limits: ParseLimits) -> ParsedDocument:
    text = _decode_text(data)
    delimiter = "\t" if _extension(filename) == "tsv" else (_sniff_delimiter(text[:65536], min_rows=1, agreement=0.8) or ",")
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    header = [_inline(name) for name in next(reader, [])]
    blocks: list[Block] = []
    pending: list[str] = []
    size = 0
    for count, row in enumerate(reader, start=1):
        if count > limits.max_csv_rows:
            raise IngestError(
                errors.TOO_LARGE,
                f"the CSV has more than {limits.max_csv_rows} rows",
                {"limit": limits.max_csv_rows},
            )
        line = _csv_row_text(header, row)
        if not line:
            continue
        if pending and size + len(line) > _CSV_BLOCK_CHARS:
            blocks.append(Block("\n".join(pending), "table"))
            pending, size = [], 0
        pending.append(line)
        size += len(line) + 1
    if pending:
        blocks.append(Block("\n".join(pending), "table"))
    return ParsedDocument(type="csv", title="", blocks=blocks)


def _csv_row_text(header: list[str], row: list[str]) -> str:
    parts = []
    for index, value in enumerate(row):
        value = _inline(value)
        if not value:
            continue
        name = header[index] if index < len(header) and header[index] else f"column {index + 1}"
        parts.append(f"{name}: {value}")
    return "; ".join(parts)


_PARSERS: dict[str, Callable[[bytes, str | None, ParseLimits], ParsedDocument]] = {
    "pdf": _parse_pdf,
    "docx": _parse_docx,
    "html": _parse_html,
    "markdown": _parse_markdown,
    "csv": _parse_csv,
    "text": _parse_text,
}
