"""Parsers against real files of every supported type, built here with the same libraries users' tools use."""
from __future__ import annotations

import io
import random
import zipfile

import pytest

from apps.knowledge.rag import errors
from apps.knowledge.rag.errors import IngestError
from apps.knowledge.rag.parsers import Block, ParsedDocument, ParseLimits, detect_type, parse

# ---------------------------------------------------------------------------------------------
# File builders
# ---------------------------------------------------------------------------------------------


def make_pdf(pages: list[list[str]], title: str | None = None) -> bytes:
    from reportlab.pdfgen import canvas

    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer)
    if title:
        pdf.setTitle(title)
    for lines in pages:
        y = 800
        for line in lines:
            pdf.drawString(72, y, line)
            y -= 14
        pdf.showPage()
    pdf.save()
    return buffer.getvalue()


def encrypt_pdf(data: bytes, *, user_password: str, owner_password: str = "owner-secret") -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter()
    for page in PdfReader(io.BytesIO(data)).pages:
        writer.add_page(page)
    writer.encrypt(user_password=user_password, owner_password=owner_password, algorithm="AES-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def make_docx() -> bytes:
    import docx

    document = docx.Document()
    document.add_heading("Employee Handbook", level=0)
    document.add_paragraph("Welcome to the company. This handbook explains our policies.")
    document.add_heading("Leave", level=1)
    document.add_paragraph("Employees accrue two days of paid leave per month.")
    document.add_heading("Sick leave", level=2)
    document.add_paragraph("Sick leave requires a doctor's note after three days.")
    document.add_paragraph("First bullet item", style="List Bullet")
    document.add_paragraph("Second bullet item", style="List Bullet")
    document.add_heading("Expenses", level=1)
    table = document.add_table(rows=3, cols=2)
    for row, (item, limit) in enumerate([("Item", "Limit"), ("Hotel", "150 EUR"), ("Meals", "40 EUR")]):
        table.cell(row, 0).text = item
        table.cell(row, 1).text = limit
    document.add_paragraph("Receipts are mandatory for every claim.")
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def make_zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return out.getvalue()


HTML_PAGE = b"""<!DOCTYPE html>
<html><head><title>Refund policy</title><style>body{color:red}</style>
<script>var tracking = "SECRET_SCRIPT";</script></head>
<body>
<nav><a href="/">Home</a> <a href="/shop">NAVIGATION_LINK</a></nav>
<header>SITE_HEADER banner</header>
<main>
  <h1>Refunds</h1>
  <p>You can return any item within <b>30 days</b> of delivery.<br>Keep the receipt.</p>
  <h2>Exceptions</h2>
  <ul><li>Gift cards</li><li>Opened software<ul><li>unless defective</li></ul></li></ul>
  <table><tr><th>Item</th><th>Window</th></tr><tr><td>Shoes</td><td>60 days</td></tr></table>
  <div>Loose text in a div <span>with a span</span></div>
  <h2>Contact</h2>
  <p>Email support.</p>
</main>
<aside>ASIDE_PROMO</aside>
<footer>FOOTER_COPYRIGHT</footer>
<noscript>NOSCRIPT_TEXT</noscript>
</body></html>"""

MARKDOWN_DOC = b"""Getting started
===============

Install the package with pip.

## Configuration

Set the `DATABASE_URL` variable. See [the docs](https://example.com/docs).

- first option
- second option
  - nested option

### Advanced

```python
print("hello")
```

| key | value |
|-----|-------|
| a   | 1     |

# Appendix

Final words.
"""


# ---------------------------------------------------------------------------------------------
# PDF
# ---------------------------------------------------------------------------------------------


def test_pdf_blocks_carry_one_based_page_numbers():
    pdf = make_pdf(
        [
            ["Alpha page introduction text."],
            ["Bravo page discusses the second topic in detail."],
            ["Charlie page closes the document."],
        ],
        title="Quarterly report",
    )
    doc = parse(pdf, filename="report.pdf")
    assert doc.type == "pdf"
    assert doc.page_count == 3
    assert doc.title == "Quarterly report"
    pages = {block.page for block in doc.blocks}
    assert pages == {1, 2, 3}
    by_page = {block.page: block.text for block in doc.blocks}
    assert "Alpha" in by_page[1] and "Bravo" in by_page[2] and "Charlie" in by_page[3]


def test_pdf_wrapped_lines_are_joined_into_one_paragraph():
    pdf = make_pdf([["The quick brown fox jumps over the lazy dog and keeps", "running until the end of the line."]])
    doc = parse(pdf)
    assert [b.text for b in doc.blocks] == [
        "The quick brown fox jumps over the lazy dog and keeps running until the end of the line."
    ]


def test_pdf_placeholder_title_falls_back_to_filename():
    doc = parse(make_pdf([["Some text."]]), filename="minutes-2024.pdf")
    assert doc.title == "minutes-2024"


def test_pdf_with_user_password_is_rejected_as_encrypted():
    locked = encrypt_pdf(make_pdf([["Confidential salary data."]]), user_password="secret")
    with pytest.raises(IngestError) as info:
        parse(locked, filename="salaries.pdf")
    assert info.value.code == errors.ENCRYPTED_FILE


def test_pdf_with_owner_password_only_is_read():
    restricted = encrypt_pdf(make_pdf([["Public but print-restricted text."]]), user_password="")
    doc = parse(restricted)
    assert "print-restricted" in doc.text


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.9])
def test_truncated_pdf_is_corrupt(fraction):
    pdf = make_pdf([["Page one text."], ["Page two text."]])
    with pytest.raises(IngestError) as info:
        parse(pdf[: int(len(pdf) * fraction)], filename="x.pdf")
    assert info.value.code == errors.CORRUPT_FILE


def test_pdf_header_followed_by_garbage_is_corrupt():
    garbage = b"%PDF-1.7\n" + random.Random(3).randbytes(4000)
    with pytest.raises(IngestError) as info:
        parse(garbage)
    assert info.value.code == errors.CORRUPT_FILE


def test_pdf_over_page_limit_is_too_large():
    pdf = make_pdf([["one"], ["two"], ["three"]])
    with pytest.raises(IngestError) as info:
        parse(pdf, limits=ParseLimits(max_pages=2))
    assert info.value.code == errors.TOO_LARGE
    assert info.value.details["pages"] == 3


def test_pdf_without_text_layer_is_empty():
    with pytest.raises(IngestError) as info:
        parse(make_pdf([[], []]))
    assert info.value.code == errors.EMPTY_DOCUMENT


# ---------------------------------------------------------------------------------------------
# DOCX
# ---------------------------------------------------------------------------------------------


def test_docx_headings_build_heading_paths_and_tables_become_rows():
    doc = parse(make_docx(), filename="handbook.docx")
    assert doc.type == "docx"
    assert doc.title == "Employee Handbook"
    by_text = {block.text: block for block in doc.blocks}
    assert by_text["Leave"].kind == "heading" and by_text["Leave"].level == 1
    sick = by_text["Sick leave requires a doctor's note after three days."]
    assert sick.heading_path == ("Leave", "Sick leave")
    assert by_text["Employees accrue two days of paid leave per month."].heading_path == ("Leave",)
    lists = [b for b in doc.blocks if b.kind == "list"]
    assert [b.text for b in lists] == ["- First bullet item\n- Second bullet item"]
    tables = [b for b in doc.blocks if b.kind == "table"]
    assert tables[0].text == "Item: Hotel; Limit: 150 EUR\nItem: Meals; Limit: 40 EUR"
    assert tables[0].heading_path == ("Expenses",)
    receipts = by_text["Receipts are mandatory for every claim."]
    assert receipts.heading_path == ("Expenses",)
    order = [b.text for b in doc.blocks]
    assert order.index("Expenses") < order.index(tables[0].text) < order.index(receipts.text)


def test_docx_zip_bomb_is_rejected_before_inflating():
    bomb = make_zip(
        {
            "[Content_Types].xml": b"<Types/>",
            "word/document.xml": b"<w:document/>",
            "word/media/padding.bin": b"\0" * (30 * 1024 * 1024),
        }
    )
    assert len(bomb) < 100_000
    with pytest.raises(IngestError) as info:
        parse(bomb, filename="innocent.docx")
    assert info.value.code == errors.DECOMPRESSION_BOMB
    assert info.value.details["ratio"] > 100


def test_docx_over_uncompressed_limit_is_a_bomb():
    data = make_docx()
    with pytest.raises(IngestError) as info:
        parse(data, limits=ParseLimits(max_uncompressed_bytes=10_000))
    assert info.value.code == errors.DECOMPRESSION_BOMB


def test_zip_that_is_not_docx_is_unsupported():
    archive = make_zip({"readme.txt": b"hello", "data.csv": b"a,b\n1,2\n"})
    with pytest.raises(IngestError) as info:
        parse(archive, filename="report.docx")
    assert info.value.code == errors.UNSUPPORTED_TYPE


def test_truncated_docx_is_corrupt():
    data = make_docx()
    with pytest.raises(IngestError) as info:
        parse(data[: len(data) // 2], filename="handbook.docx")
    assert info.value.code == errors.CORRUPT_FILE


def test_docx_with_broken_xml_is_corrupt():
    broken = make_zip({"[Content_Types].xml": b"<Types", "word/document.xml": b"<w:document><unclosed"})
    with pytest.raises(IngestError) as info:
        parse(broken, filename="broken.docx")
    assert info.value.code == errors.CORRUPT_FILE


def test_legacy_encrypted_office_container_is_reported_as_encrypted():
    ole = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 64 + "EncryptedPackage".encode("utf-16-le") + b"\0" * 64
    with pytest.raises(IngestError) as info:
        parse(ole, filename="secret.docx")
    assert info.value.code == errors.ENCRYPTED_FILE


# ---------------------------------------------------------------------------------------------
# HTML, Markdown, CSV, text
# ---------------------------------------------------------------------------------------------


def test_html_drops_chrome_and_keeps_main_content_structure():
    doc = parse(HTML_PAGE, filename="refunds.html")
    assert doc.type == "html"
    assert doc.title == "Refund policy"
    text = doc.text
    for noise in ("SECRET_SCRIPT", "NAVIGATION_LINK", "SITE_HEADER", "ASIDE_PROMO", "FOOTER_COPYRIGHT", "NOSCRIPT_TEXT", "color:red"):
        assert noise not in text
    blocks = {b.text: b for b in doc.blocks}
    assert blocks["You can return any item within 30 days of delivery. Keep the receipt."].heading_path == ("Refunds",)
    assert blocks["- Gift cards\n- Opened software\n  - unless defective"].kind == "list"
    assert blocks["Item: Shoes; Window: 60 days"].kind == "table"
    assert blocks["Loose text in a div with a span"].heading_path == ("Refunds", "Exceptions")
    assert blocks["Email support."].heading_path == ("Refunds", "Contact")


def test_html_article_header_is_content_but_page_header_is_chrome():
    page = b"""<html><body><header><h1>Site name</h1></header>
    <article><header><h1>Article title</h1><p>By Ann</p></header><p>Article body.</p></article></body></html>"""
    doc = parse(page)
    assert [b.text for b in doc.blocks] == ["Article title", "By Ann", "Article body."]
    assert doc.title == "Article title"


def test_html_without_title_uses_first_h1_and_falls_back_to_body_without_main():
    doc = parse(b"<html><body><h1>Welcome</h1><p>Body text.</p><footer>F</footer></body></html>")
    assert doc.title == "Welcome"
    assert [b.text for b in doc.blocks] == ["Welcome", "Body text."]


def test_html_tables_of_contents_and_link_bars_are_left_out_but_content_links_stay():
    page = """<html><head><title>第 3 章 选择版本</title></head><body>
    <div class="navheader"><a href="ch2.html">上一页</a> | <a href="index.html">起始页</a> | <a href="ch4.html">下一页</a></div>
    <h1>第 3 章 选择版本</h1>
    <div class="toc"><p><strong>目录</strong></p><dl class="toc">
      <dt><a href="#s3.1">3.1. 哪一个发布版本更适合我？</a></dt>
      <dd><dl><dt><a href="#s3.1.1">3.1.1. 硬件不能被检测到怎么办？</a></dt></dl></dd>
      <dt><a href="#s3.2">3.2. Knoppix 和 Ubuntu 是 Debian 吗？</a></dt></dl></div>
    <h2 id="s3.1">3.1. 哪一个发布版本更适合我？</h2>
    <p>答案取决于您打算做什么，参见 <a href="a.html">发布说明</a>、<a href="b.html">安装手册</a> 和 <a href="c.html">FAQ</a>。</p>
    <ul><li><a href="x.html">pg_dump</a> writes a script; see <a href="y.html">pg_restore</a> and <a href="z.html">psql</a> to load it back.</li></ul>
    </body></html>""".encode()
    doc = parse(page, filename="choosing.html")
    texts = [b.text for b in doc.blocks]
    assert "目录" not in doc.text and "上一页" not in doc.text and "硬件不能被检测到" not in doc.text
    assert texts[:2] == ["第 3 章 选择版本", "3.1. 哪一个发布版本更适合我？"]
    assert "答案取决于您打算做什么，参见 发布说明 、 安装手册 和 FAQ 。".replace(" ", "") == texts[2].replace(" ", "")
    assert "pg_dump writes a script" in doc.text  # a list whose items are mostly prose is content
    assert doc.blocks[2].heading_path == ("第 3 章 选择版本", "3.1. 哪一个发布版本更适合我？")


def test_an_html_page_that_is_only_links_is_still_indexed():
    page = b"""<html><body><ul><li><a href="a.html">Installing the server</a></li>
    <li><a href="b.html">Upgrading a cluster</a></li><li><a href="c.html">Backup and restore</a></li></ul></body></html>"""
    doc = parse(page, filename="index.html")
    assert doc.text == "- Installing the server\n- Upgrading a cluster\n- Backup and restore"


def test_html_navigation_detection_handles_nested_markup():
    depth = 300
    page = ("<html><body>" + "<div>" * depth + "<p>Deep text.</p>" + "</div>" * depth + "</body></html>").encode()
    assert "Deep text." in parse(page, filename="deep.html").text


def test_markdown_headings_lists_code_and_tables():
    doc = parse(MARKDOWN_DOC, filename="README.md")
    assert doc.type == "markdown"
    assert doc.title == "Getting started"
    by_text = {b.text: b for b in doc.blocks}
    assert by_text["Install the package with pip."].heading_path == ("Getting started",)
    assert by_text["Set the DATABASE_URL variable. See the docs."].heading_path == ("Getting started", "Configuration")
    assert by_text["- first option\n- second option\n  - nested option"].kind == "list"
    code = by_text['print("hello")']
    assert code.kind == "code" and code.heading_path == ("Getting started", "Configuration", "Advanced")
    assert by_text["key: a; value: 1"].kind == "table"
    assert by_text["Final words."].heading_path == ("Appendix",)


def test_csv_rows_render_as_column_value_pairs():
    data = b"name,role,office\nAlice,Engineer,Paris\nBob,,Berlin\n,,\nCarol,Manager,Rome,extra\n"
    doc = parse(data, filename="staff.csv")
    assert doc.type == "csv"
    assert doc.text == (
        "name: Alice; role: Engineer; office: Paris\n"
        "name: Bob; office: Berlin\n"
        "name: Carol; role: Manager; office: Rome; column 4: extra"
    )


def test_csv_rows_are_grouped_into_bounded_blocks():
    rows = "\n".join(f"{i},product number {i},{i * 3} EUR" for i in range(200))
    doc = parse(("id,name,price\n" + rows).encode(), filename="prices.csv")
    assert len(doc.blocks) > 1
    assert all(len(b.text) <= 900 for b in doc.blocks)
    assert sum(b.text.count("\n") + 1 for b in doc.blocks) == 200


def test_csv_over_row_limit_is_too_large():
    rows = "\n".join(f"{i},x" for i in range(50))
    with pytest.raises(IngestError) as info:
        parse(("a,b\n" + rows).encode(), filename="big.csv", limits=ParseLimits(max_csv_rows=10))
    assert info.value.code == errors.TOO_LARGE


def test_plain_text_paragraphs_are_split_on_blank_lines_and_unwrapped():
    data = b"First paragraph line one\nline two.\n\n\nSecond paragraph.\r\n\r\n- a\n- b\n"
    doc = parse(data, filename="notes.txt")
    assert doc.type == "text"
    assert [(b.text, b.kind) for b in doc.blocks] == [
        ("First paragraph line one line two.", "paragraph"),
        ("Second paragraph.", "paragraph"),
        ("- a\n- b", "list"),
    ]
    assert doc.title == "notes"


def test_cp1252_text_is_decoded():
    doc = parse("Caf\u00e9 \u201cquoted\u201d \u2013 na\u00efve".encode("cp1252"))
    assert doc.text == "Caf\u00e9 \u201cquoted\u201d \u2013 na\u00efve"


def test_utf16_text_with_bom_is_decoded():
    doc = parse("Hello UTF-16 world".encode("utf-16"))
    assert doc.text == "Hello UTF-16 world"


# ---------------------------------------------------------------------------------------------
# Rejections and limits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"   \n\n\t  ", b"<html><body><script>x()</script></body></html>"])
def test_documents_without_text_are_empty(data):
    with pytest.raises(IngestError) as info:
        parse(data, filename="empty.txt")
    assert info.value.code == errors.EMPTY_DOCUMENT


def test_binary_garbage_is_unsupported():
    garbage = random.Random(7).randbytes(5000)
    with pytest.raises(IngestError) as info:
        parse(garbage, filename="notes.txt")
    assert info.value.code == errors.UNSUPPORTED_TYPE


def test_binary_without_nul_bytes_is_unsupported():
    noisy = random.Random(11).randbytes(5000).replace(b"\0", b"")
    with pytest.raises(IngestError) as info:
        parse(noisy)
    assert info.value.code == errors.UNSUPPORTED_TYPE


def test_png_image_is_unsupported():
    with pytest.raises(IngestError) as info:
        parse(b"\x89PNG\r\n\x1a\n" + b"\0" * 100, filename="photo.png")
    assert info.value.code == errors.UNSUPPORTED_TYPE


def test_size_limit_is_checked_before_anything_else():
    garbage = random.Random(5).randbytes(2000)
    with pytest.raises(IngestError) as info:
        parse(garbage, limits=ParseLimits(max_bytes=1000))
    assert info.value.code == errors.TOO_LARGE
    assert info.value.details == {"size": 2000, "limit": 1000}


def _mutations(data: bytes, seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 20)):
            position = rng.randrange(len(mutated))
            mutated[position] = rng.getrandbits(8)
        if rng.random() < 0.3:
            mutated = mutated[: rng.randrange(1, len(mutated))]
        out.append(bytes(mutated))
    return out


@pytest.mark.parametrize(
    "name,factory",
    [
        ("pdf", lambda: make_pdf([["Page one."], ["Page two."]])),
        ("docx", make_docx),
        ("html", lambda: HTML_PAGE),
        ("csv", lambda: b"a,b,c\n1,2,3\n4,5,6\n7,8,9\n"),
    ],
)
def test_damaged_inputs_only_ever_raise_ingest_errors(name, factory):
    for mutated in _mutations(factory(), seed=sum(name.encode()), count=25):
        try:
            doc = parse(mutated, filename=f"file.{name}")
        except IngestError as exc:
            assert exc.code in errors.INGEST_ERROR_CODES
        else:
            assert doc.blocks and all(block.text.strip() for block in doc.blocks)


# ---------------------------------------------------------------------------------------------
# Detection and the document model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data,filename,expected",
    [
        (b"Just some plain words in a file.", "fake.pdf", "text"),
        (b"Just some plain words.", "notes.md", "markdown"),
        (b"# Title\n\nBody.", "notes.txt", "text"),
        (b"# Title\n\nBody.", None, "markdown"),
        (b"# Title\n\nSee [link](http://x).\n\n## Part\n", "notes.txt", "markdown"),
        (b"```\ncode\n```\n", "snippet.txt", "markdown"),
        (b"<p>Hello</p><p>World</p>", "page.txt", "html"),
        (b"<!doctype html><title>x</title>", None, "html"),
        (b"a,b,c\n1,2,3\n4,5,6\n", None, "csv"),
        (b"a\tb\n1\t2\n", "data.tsv", "csv"),
        (b"Hello, world.\nThis line, has two, commas.\nAnd this one none.\n", None, "text"),
        (b"| a | b |\n|---|---|\n| 1 | 2 |\n", None, "markdown"),
    ],
)
def test_detect_type_prefers_content_over_extension(data, filename, expected):
    assert detect_type(data, filename) == expected


def test_detect_type_recognises_binary_formats():
    assert detect_type(make_pdf([["x"]]), "renamed.txt") == "pdf"
    assert detect_type(make_docx(), "renamed.bin") == "docx"


def test_block_spans_index_into_document_text():
    doc = ParsedDocument(
        type="text", title="t", blocks=[Block("alpha", "paragraph"), Block("beta gamma", "paragraph"), Block("d", "list")]
    )
    assert doc.text == "alpha\n\nbeta gamma\n\nd"
    for block, (start, end) in zip(doc.blocks, doc.block_spans()):
        assert doc.text[start:end] == block.text


def test_ingest_error_rejects_unknown_codes():
    with pytest.raises(ValueError):
        IngestError("nope", "message")
