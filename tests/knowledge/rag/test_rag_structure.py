"""Structure-aware chunking of real-looking documents: headings with their text, numbered clauses
kept whole, title and heading path and abbreviations in the search context."""
from __future__ import annotations

import pytest

from apps.knowledge.rag.abbreviations import Abbreviation, expansions_for, find_abbreviations, title_acronyms
from apps.knowledge.rag.analyzer import get_analyzer
from apps.knowledge.rag.chunker import chunk_document, indexed_text
from apps.knowledge.rag.index import BM25Index
from apps.knowledge.rag.parsers import parse

LEASE = """TENANCY AGREEMENT

Article 1 Definitions
In this Agreement the Service Level Agreement (the "SLA") means the schedule of response times for repairs.

Article 2 Rent
1. The tenant shall pay the rent monthly in advance. Payment is due on the
   first day of each calendar month by bank transfer.
2. Late payment incurs a fee of five percent of the monthly rent. The fee is
   charged for every week of delay after the due date.
3. The landlord may adjust the rent once a year. The change needs two months
   of written notice and is at most the inflation rate.
4. Rent does not include heating, water and electricity. The tenant pays
   these directly to the providers.

Article 3 Termination
Either party may terminate this Agreement with three months of notice. The SLA survives termination.
"""

LAW_ZH = """第一章 总则

第一条 为了规范用人单位与劳动者之间的关系，制定本法。本法所称个人所得税（个税）由用人单位代扣代缴。

第二条 用人单位应当按月足额支付劳动报酬，不得克扣或者无故拖欠劳动者的工资。

第二章 劳动合同的订立

第三条 建立劳动关系，应当订立书面劳动合同。已建立劳动关系，未同时订立书面劳动合同的，应当自用工之日起一个月内订立。
"""


def test_plain_text_headings_are_found_and_every_chunk_has_its_heading(count_tokens):
    doc = parse(LEASE.encode(), filename="lease.txt")
    assert doc.title == "TENANCY AGREEMENT"
    headings = [(b.level, b.text) for b in doc.blocks if b.kind == "heading"]
    assert headings == [(1, "TENANCY AGREEMENT"), (3, "Article 1 Definitions"), (3, "Article 2 Rent"),
                        (3, "Article 3 Termination")]
    chunks = chunk_document(doc, count_tokens=count_tokens, chunk_tokens=60, overlap_tokens=10)
    for chunk in chunks:
        assert not chunk.text.rstrip().endswith(("Rent", "Termination", "Definitions"))  # no bare heading at the end
        assert chunk.context.startswith("TENANCY AGREEMENT › Article")
        assert doc.text[chunk.char_start:chunk.char_end] == chunk.text


def test_numbered_clauses_that_fit_are_never_cut(count_tokens):
    doc = parse(LEASE.encode(), filename="lease.txt")
    flat = " ".join(LEASE.split())
    clauses = [f"{n}. " + flat.split(f" {n}. ", 1)[1].split(f" {n + 1}. ", 1)[0].split(" Article 3")[0]
               for n in (1, 2, 3, 4)]

    def made_of_whole_clauses(chunk) -> bool:
        body = chunk.text.removeprefix("Article 2 Rent").strip()
        return body == " ".join(clause for clause in clauses if clause in body)

    def rent_chunks(chunks):
        return [c for c in chunks if c.heading_path[-1:] == ("Article 2 Rent",)]

    plain = chunk_document(doc, count_tokens=count_tokens, chunk_tokens=60, overlap_tokens=10, structure=False)
    structured = chunk_document(doc, count_tokens=count_tokens, chunk_tokens=60, overlap_tokens=10)
    assert not all(made_of_whole_clauses(c) for c in rent_chunks(plain))  # plain packing cuts clauses
    assert all(made_of_whole_clauses(c) for c in rent_chunks(structured))
    assert all(any(clause in c.text for c in structured) for clause in clauses)


def test_chinese_articles_are_headings_or_clauses_kept_whole(count_tokens):
    doc = parse(LAW_ZH.encode("gb18030"), filename="劳动法.txt")
    assert [b.text for b in doc.blocks if b.kind == "heading"] == ["第一章 总则", "第二章 劳动合同的订立"]
    chunks = chunk_document(doc, count_tokens=count_tokens, chunk_tokens=60, overlap_tokens=10)
    article_two = "第二条 用人单位应当按月足额支付劳动报酬，不得克扣或者无故拖欠劳动者的工资。"
    assert any(article_two in chunk.text for chunk in chunks)
    third = next(chunk for chunk in chunks if "第三条" in chunk.text)
    assert third.context.startswith("第二章 劳动合同的订立") or "第二章 劳动合同的订立" in third.context


@pytest.mark.parametrize("text, short, long", [
    ("Data is written to the Write-Ahead Log (WAL) first.", "WAL", "Write-Ahead Log"),
    ('governed by the General Data Protection Regulation ("GDPR").', "GDPR", "General Data Protection Regulation"),
    ('the Service Level Agreement (the "SLA") applies', "SLA", "Service Level Agreement"),
    ("uses Multi-Version Concurrency Control (MVCC) for reads", "MVCC", "Multi-Version Concurrency Control"),
    ("用人单位依法缴纳个人所得税（个税）。", "个税", "个人所得税"),
    ("根据中华人民共和国劳动合同法（以下简称“劳动合同法”）的规定", "劳动合同法", "中华人民共和国劳动合同法"),
])
def test_defined_abbreviations_are_found(text, short, long):
    assert Abbreviation(short, long) in find_abbreviations(text)


@pytest.mark.parametrize("text", ["In 2020 (COVID) things.", "the report (PDF) is attached.", "he said (OK)."])
def test_parentheses_that_define_nothing_are_ignored(text):
    assert find_abbreviations(text) == []


def test_a_chunk_using_one_form_gets_the_other_in_its_context():
    abbreviations = [Abbreviation("WAL", "Write-Ahead Log")]
    assert expansions_for("Set wal_level before archiving the WAL.", abbreviations) == ["Write-Ahead Log"]
    assert expansions_for("The write-ahead log is flushed.", abbreviations) == ["WAL"]
    assert expansions_for("The Write-Ahead Log (WAL) is flushed.", abbreviations) == []


def test_a_question_with_the_short_form_finds_the_chunk_that_spells_it_out(count_tokens):
    text = ("# Durability\n\nPostgreSQL writes every change to the Write-Ahead Log (WAL) before the data files.\n\n"
            "# Archiving\n\nThe write-ahead log segments are copied by archive_command to safe storage.\n\n"
            "# Vacuum\n\nVacuum reclaims storage occupied by dead tuples and updates statistics.\n")
    doc = parse(text.encode(), filename="wal.md")
    chunks = chunk_document(doc, count_tokens=count_tokens)
    archiving = next(c for c in chunks if "archive_command" in c.text)
    assert "WAL" in archiving.context
    bm25 = BM25Index(list(range(len(chunks))), [indexed_text(c.text, c.context) for c in chunks])
    hits = bm25.search("how is WAL archived", 3)
    assert chunks[hits[0][0]] is archiving


@pytest.mark.parametrize("title, forms", [
    ("Mozilla Public License Version 2.0", ["MPL"]),
    ("GNU GENERAL PUBLIC LICENSE", ["GGPL", "GPL"]),
    ("General Data Protection Regulation", ["GDPR"]),
    ("Family and Medical Leave Act of 1993", ["FMLA"]),
    ("Service Level Agreement", ["SLA"]),
    # Not names of documents people abbreviate: a paper title, two-word names, a title with prose after it.
    ("The DNA Methylome of Human Peripheral Blood Mononuclear Cells", []),
    ("Privacy Policy", []),
    ("Apache License", []),
    ("Service Level Agreement for hosted databases", []),
    ("26.1. SQL Dump", []),
    ("劳动合同法", []),
])
def test_title_acronyms(title, forms):
    assert title_acronyms(title) == forms


def test_a_question_naming_a_licence_by_its_acronym_finds_that_licence(count_tokens):
    """Every chunk of "Mozilla Public License Version 2.0" carries "(MPL)" in its context; a clause of
    another licence that shares the question's words does not win."""
    mpl = parse(b"# Mozilla Public License Version 2.0\n\n## 3.3. Distribution of a Larger Work\n\n"
                b"You may create and distribute a Larger Work under terms of Your choice.\n", filename="MPL-2.0.md")
    gpl = parse(b"                    GNU GENERAL PUBLIC LICENSE\n                       Version 3, 29 June 2007\n\n5. Conveying Modified Source Versions.\n\n"
                b"You may convey a work based on the Program, or the modifications to produce it.\n",
                filename="GPL-3.txt")
    chunks = [c for doc in (mpl, gpl) for c in chunk_document(doc, count_tokens=count_tokens)]
    assert all("(MPL)" in c.context for c in chunks[:1]) and any("GPL" in c.context for c in chunks[1:])
    bm25 = BM25Index(list(range(len(chunks))), [indexed_text(c.text, c.context) for c in chunks])
    best = chunks[bm25.search("may I distribute MPL code in a larger work", 1)[0][0]]
    assert "Larger Work" in best.text


def test_the_heading_path_makes_a_section_findable_by_its_heading(count_tokens):
    body = " ".join(f"Sentence {i} explains one more detail of the procedure." for i in range(60))
    doc = parse(f"# Refund procedure\n\n{body}\n".encode(), filename="guide.md")
    chunks = chunk_document(doc, count_tokens=count_tokens, chunk_tokens=100, overlap_tokens=10)
    assert len(chunks) > 2 and "Refund procedure" not in chunks[-1].text
    assert chunks[-1].context == "guide › Refund procedure" or chunks[-1].context.endswith("Refund procedure")
    assert "refund" in get_analyzer().tokenize(indexed_text(chunks[-1].text, chunks[-1].context))
