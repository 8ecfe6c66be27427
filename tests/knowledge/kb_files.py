"""Real files of every supported type, built in the tests (reportlab PDF, python-docx DOCX), and broken ones."""
from __future__ import annotations

import io
import zipfile


def pdf(pages: list[list[str]], title: str | None = None) -> bytes:
    from reportlab.pdfgen import canvas

    buffer = io.BytesIO()
    canvas_ = canvas.Canvas(buffer)
    if title:
        canvas_.setTitle(title)
    for lines in pages:
        y = 800
        for line in lines:
            canvas_.drawString(72, y, line)
            y -= 14
        canvas_.showPage()
    canvas_.save()
    return buffer.getvalue()


def encrypted_pdf(data: bytes, password: str = "s3cret") -> bytes:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter()
    for page in PdfReader(io.BytesIO(data)).pages:
        writer.add_page(page)
    writer.encrypt(user_password=password, owner_password="owner-" + password, algorithm="AES-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def docx(sections: list[tuple[str, list[str]]], title: str = "Travel Policy") -> bytes:
    import docx as python_docx

    document = python_docx.Document()
    document.add_heading(title, level=0)
    for heading, paragraphs in sections:
        document.add_heading(heading, level=1)
        for paragraph in paragraphs:
            document.add_paragraph(paragraph)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def zip_bomb_docx() -> bytes:
    """A tiny DOCX-shaped ZIP whose member inflates to 30 MB (compression ratio ~1000)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("[Content_Types].xml", b"<Types/>")
        archive.writestr("word/document.xml", b"<w:document/>")
        archive.writestr("word/media/padding.bin", b"\0" * (30 * 1024 * 1024))
    return out.getvalue()


PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(range(64))

MARKDOWN = b"""# Expense Policy

## Hotels

Hotel costs are reimbursed up to 150 EUR per night in major cities and 110 EUR elsewhere.
Book through the travel portal so that the corporate rate applies.

## Meals

Meals are reimbursed up to 40 EUR per day with receipts. Alcohol is never reimbursed.
"""

HTML = b"""<!doctype html><html><head><title>Parking Rules</title>
<script>var tracking = "do not index this script";</script></head>
<body><nav><a href="/">Home</a> | <a href="/menu">Navigation menu entry</a></nav>
<main><h1>Parking Rules</h1><p>Visitors park on level minus two of the garage.</p>
<h2>Electric cars</h2><p>Charging stations are on level minus one and are free for employees.</p></main>
<footer>Footer text</footer></body></html>"""

CSV = b"""city,office,phone
Berlin,Headquarters,+49 30 1111
Lisbon,Support centre,+351 21 2222
Austin,Sales office,+1 512 3333
"""

TEXT = (b"Fire safety.\n\nThe assembly point is the north parking lot. Fire drills happen twice a year.\n\n"
        b"Fire wardens wear yellow vests and coordinate the evacuation of each floor.\n")
