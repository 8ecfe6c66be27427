"""Chinese documents of every type, built here as real files (reportlab CID font STSong-Light,
python-docx), legacy encodings (GB18030/GBK, Big5), Chinese sentence boundaries, table rows, and
Markdown that must not eat identifiers."""
from __future__ import annotations

import io

import pytest

from apps.knowledge.rag.chunker import chunk_document
from apps.knowledge.rag.parsers import parse

RETURNS_ZH = "商品签收后七天内可以申请无理由退货。退款会在三个工作日内原路返回。"


def _chinese_pdf(lines: list[str]) -> bytes:
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.cidfonts import UnicodeCIDFont
    from reportlab.pdfgen import canvas

    pdfmetrics.registerFont(UnicodeCIDFont("STSong-Light"))
    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer)
    pdf.setFont("STSong-Light", 12)
    y = 800
    for line in lines:
        pdf.drawString(72, y, line)
        y -= 18
    pdf.showPage()
    pdf.save()
    return buffer.getvalue()


def test_a_chinese_pdf_with_a_cid_font_parses():
    doc = parse(_chinese_pdf(["退货政策", "", RETURNS_ZH]), filename="政策.pdf")
    assert doc.type == "pdf"
    assert "无理由退货" in doc.text and "原路返回" in doc.text


def test_a_chinese_docx_keeps_headings_and_table_rows():
    import docx

    document = docx.Document()
    document.add_heading("员工手册", level=1)
    document.add_paragraph("员工每月累积两天带薪年假。")
    table = document.add_table(rows=3, cols=2)
    for row, (plan, price) in enumerate([("套餐", "价格"), ("标准版", "100元"), ("专业版", "300元")]):
        table.cell(row, 0).text, table.cell(row, 1).text = plan, price
    buffer = io.BytesIO()
    document.save(buffer)
    doc = parse(buffer.getvalue(), filename="手册.docx")
    assert doc.title == "员工手册"
    table_block = next(b for b in doc.blocks if b.kind == "table")
    assert table_block.text == "套餐: 标准版; 价格: 100元\n套餐: 专业版; 价格: 300元"
    assert table_block.heading_path == ("员工手册",)


@pytest.mark.parametrize("encoding", ["gb18030", "gbk", "gb2312", "big5", "utf-8", "utf-16"])
def test_text_in_legacy_chinese_encodings_decodes(encoding):
    text = "退货政策\n\n商品签收后七天内可以申请退货。" if encoding != "big5" else "退貨政策\n\n商品簽收後七天內可以申請退貨。"
    doc = parse(text.encode(encoding), filename="policy.txt")
    assert doc.text == text


def test_a_gbk_csv_becomes_rows_with_their_headers():
    data = "套餐,价格,说明\n标准版,100元,基础功能\n专业版,300元,包含高级报表\n".encode("gbk")
    doc = parse(data, filename="价格.csv")
    assert doc.type == "csv"
    assert doc.text == "套餐: 标准版; 价格: 100元; 说明: 基础功能\n套餐: 专业版; 价格: 300元; 说明: 包含高级报表"


def test_html_declared_gb2312_and_undeclared_gbk_both_decode():
    body = "<html><head>{meta}<title>配送说明</title></head><body><nav>首页 | 菜单</nav><main><h1>配送</h1>" \
           "<p>订单一般在两个工作日内发货。</p></main><footer>版权所有</footer></body></html>"
    declared = parse(body.format(meta='<meta charset="gb2312">').encode("gb18030"), filename="a.html")
    undeclared = parse(body.format(meta="").encode("gbk"), filename="b.html")
    for doc in (declared, undeclared):
        assert doc.title == "配送说明" and "两个工作日内发货" in doc.text
        assert "首页" not in doc.text and "版权所有" not in doc.text  # page noise removed


def test_latin1_text_is_not_mistaken_for_chinese():
    text = "Café résumé naïve — “quoted”, déjà vu."
    assert parse(text.encode("cp1252"), filename="fr.txt").text == text


def test_markdown_keeps_identifiers_and_real_emphasis_is_emphasis():
    md = (b"# The __init__ module\n\nCall __init__ first; compute 2*3*4 or a*b*c. "
          b"This is **important** and *really* so; _private_ and __main__ stay, as does __init__.py.\n")
    doc = parse(md, filename="notes.md")
    assert doc.blocks[0].text == "The __init__ module"
    text = doc.blocks[1].text
    assert "__init__ first" in text and "2*3*4" in text and "a*b*c" in text
    assert "_private_" in text and "__main__" in text and "__init__.py" in text
    assert "This is important and really so" in text


def test_markdown_and_html_tables_become_rows_with_headers():
    md = "| 套餐 | 价格 |\n|---|---|\n| 标准版 | 100元 |\n| 专业版 | 300元 |\n".encode()
    assert parse(md, filename="t.md").text == "套餐: 标准版; 价格: 100元\n套餐: 专业版; 价格: 300元"
    html = (b"<html><body><main><table><tr><th>Plan</th><th>Price</th></tr><tr><td>Pro</td><td>300</td></tr>"
            b"</table><table><tr><th>Support</th><td>9 to 5</td></tr><tr><th>Phone</th><td>555</td></tr>"
            b"</table></main></body></html>")
    tables = [b.text for b in parse(html, filename="t.html").blocks if b.kind == "table"]
    assert tables == ["Plan: Pro; Price: 300", "Support: 9 to 5\nPhone: 555"]


def test_chinese_text_is_cut_at_chinese_sentence_ends(count_tokens):
    sentences = [f"第{i}句说明退货的规则和退款的时间，还有运费由谁承担的问题。" for i in range(1, 41)]
    doc = parse("".join(sentences).encode(), filename="rules.txt")
    chunks = chunk_document(doc, count_tokens=count_tokens, chunk_tokens=120, overlap_tokens=20)
    assert len(chunks) > 2
    for chunk in chunks:
        assert chunk.text.endswith("。")  # never cut inside a sentence
        assert doc.text[chunk.char_start:chunk.char_end] == chunk.text
        assert count_tokens(chunk.text) <= 120
