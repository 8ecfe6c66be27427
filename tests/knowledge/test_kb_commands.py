"""manage.py ingest / rebuild_index / search / evaluate, and the demo knowledge base."""
from __future__ import annotations

import gzip
import io
import json

import pytest
from django.core.management import CommandError, call_command

from apps.knowledge.models import Document, IndexVersion, KnowledgeBase
from tests.knowledge import kb_files

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("kb_env")]


def run(*args) -> str:
    out = io.StringIO()
    extra = ["--no-progress"] if args[0] in ("ingest", "rebuild_index", "evaluate") else []
    call_command(*args, *extra, stdout=out)
    return out.getvalue()


def row(output: str, key: str) -> list[str]:
    """The cells after `key` in the first table row that starts with it."""
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("|") and cells[0] == key:
            return cells[1:]
    raise AssertionError(f"no row {key!r} in:\n{output}")


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "docs"
    (root / "policies").mkdir(parents=True)
    (root / "expenses.md").write_bytes(kb_files.MARKDOWN)
    (root / "policies" / "fire.txt").write_bytes(kb_files.TEXT)
    (root / "policies" / "travel.docx").write_bytes(kb_files.docx([("Flights", ["Economy class below six hours."])]))
    (root / "policies" / "locked.pdf").write_bytes(kb_files.encrypted_pdf(kb_files.pdf([["Secret."]])))
    (root / ".hidden.md").write_bytes(b"# Hidden\n\nNever imported.\n")
    return root


def test_ingest_lists_failures_without_aborting_and_reruns_are_free(tree, make_kb, encode_counter):
    make_kb("policies")
    first = run("ingest", str(tree), str(tree / "missing.pdf"), "--kb", "policies", "--recursive")
    assert (row(first, "ready"), row(first, "failed"), row(first, "not found")) == (["3"], ["1"], ["1"])
    assert row(first, "policies/locked.pdf")[0] == "encrypted_file"
    assert row(first, str(tree / "missing.pdf"))[0] == "not_found"
    assert set(Document.objects.values_list("source_name", flat=True)) == {
        "expenses.md", "policies/fire.txt", "policies/travel.docx", "policies/locked.pdf"}
    encoded = encode_counter["texts"]

    again = run("ingest", str(tree), "--kb", "policies", "--recursive")
    assert row(again, "unchanged") == ["3"] and row(again, "chunks encoded") == ["0"]
    assert encode_counter["texts"] == encoded and Document.objects.count() == 4
    assert IndexVersion.objects.filter(status="active").get().version == 1  # nothing changed: no new version

    flat = run("ingest", str(tree), "--kb", "policies")  # not recursive: only the top-level file
    assert row(flat, "unchanged") == ["1"] and row(flat, "ready") == ["0"]


def test_ingest_needs_an_existing_knowledge_base_unless_asked_to_create(tree):
    with pytest.raises(CommandError, match="--create"):
        run("ingest", str(tree), "--kb", "nope")
    run("ingest", str(tree / "expenses.md"), "--kb", "fresh", "--create")
    assert KnowledgeBase.objects.get(slug="fresh").documents.get().status == "ready"


def test_rebuild_index_and_search_commands(tree, make_kb, load_docs):
    load_docs(make_kb("a"), {"expenses.md": kb_files.MARKDOWN})
    load_docs(make_kb("b"), {"fire.txt": kb_files.TEXT})
    output = run("rebuild_index", "--all")
    assert row(output, "a")[:2] == ["built", "v2"] and row(output, "b")[:2] == ["built", "v2"]
    assert row(run("rebuild_index", "--kb", "a", "--if-changed"), "a")[:2] == ["unchanged", "v2"]
    with pytest.raises(CommandError, match="zzz"):
        run("rebuild_index", "--kb", "zzz")

    found = run("search", "hotel per night", "--kb", "a", "--top-k", "2")
    assert row(found, "1")[0] == "a/Expense Policy" and row(found, "1")[-1] == "v2" and "150 EUR" in found
    assert "No results." in run("search", "qqqq", "--mode", "bm25")
    with pytest.raises(CommandError, match="invalid_mode|invalid choice"):
        call_command("search", "x", "--mode", "fuzzy")


def _beir(tmp_path):
    root = tmp_path / "tiny"
    (root / "qrels").mkdir(parents=True)
    corpus = [
        {"_id": "d1", "title": "Aspirin and heart attacks", "text": "Daily aspirin lowers the risk of heart attack."},
        {"_id": "d2", "title": "Vitamin D", "text": "Vitamin D deficiency is linked to weaker bones."},
        {"_id": "d3", "title": "Sleep", "text": "Adults who sleep less than six hours have more infections."},
    ]
    with gzip.open(root / "corpus.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps(doc) + "\n" for doc in corpus)
    queries = [{"_id": "q1", "text": "aspirin prevents heart attack", "metadata": {"d1": "leak"}},
               {"_id": "q2", "text": "bone strength and vitamin D", "metadata": {}}]
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\r\nq1\td1\t1\r\nq2\td2\t1\r\n")
    return root


def test_evaluate_ingests_a_beir_dataset_once_and_prints_metrics(tmp_path, encode_counter):
    dataset = _beir(tmp_path)
    first = run("evaluate", "--dataset", str(dataset), "--mode", "dense", "--mode", "hybrid")
    assert row(first, "imported") == ["3"] and row(first, "mode") == ["nDCG@10", "reference nDCG@10", "Recall@100",
                                                                      "MRR@10", "queries", "ms/query"]
    # This tiny dataset has no published figures: none are shown (SciFact's used to be, for any dataset).
    assert row(first, "dense")[:5] == ["1.0000", "-", "1.0000", "1.0000", "2"]
    assert row(first, "hybrid")[:2] == ["1.0000", "-"]
    assert "references (tiny): none published for this dataset" in first
    (dataset / "references.json").write_text(json.dumps({"ndcg@10": {"dense": 0.5}, "note": "tiny paper"}))
    own = run("evaluate", "--dataset", str(dataset), "--mode", "dense")
    assert row(own, "dense")[1] == "0.500" and "references (tiny): tiny paper" in own
    kb = KnowledgeBase.objects.get(slug="eval-tiny")
    assert kb.documents.count() == 3 and not kb.is_public and kb.owner is None
    encoded = encode_counter["texts"]
    second = run("evaluate", "--dataset", str(dataset), "--mode", "bm25")
    assert row(second, "unchanged") == ["3"] and row(second, "chunks encoded") == ["0"]
    assert row(second, "bm25")[:2] == ["1.0000", "-"]
    assert encode_counter["texts"] == encoded  # nothing re-encoded, and BM25 needs no query vector
    with pytest.raises(CommandError):
        run("evaluate", "--dataset", str(tmp_path / "absent"))


def test_demo_knowledge_base_loads_once(user):
    from apps.knowledge.selectors import chunks_retrieve
    from apps.knowledge.services import demo_knowledge_load

    out = io.StringIO()
    first = demo_knowledge_load(owner=user, stdout=out)
    assert first["created"] == 6 and first["failed"] == 0 and first["encoded"] > 0 and first["index_version"] == 1
    second = demo_knowledge_load(owner=user)
    assert second["unchanged"] == 6 and second["encoded"] == 0 and second["index_version"] == 1
    kb = KnowledgeBase.objects.get(slug="handbook")
    assert kb.is_public and kb.documents.count() == 6
    answer = chunks_retrieve(user=user, query="How long do refunds take?", knowledge_bases=["handbook"], top_k=3)
    assert any("5 business days" in r.text for r in answer)
    hours = chunks_retrieve(user=user, query="support opening hours on Saturday", top_k=1)
    assert "Saturday" in hours[0].text


def test_after_make_demo_commands_find_the_demo_settings_but_never_with_production_variables(tmp_path):
    """demo_setup leaves var/demo-mode naming the checkout; a bare `manage.py` then runs as the demo, while any
    production variable (SECRET_KEY, DATABASE_URL, ...) ignores the marker (and so refuses to start unset)."""
    import os
    import subprocess
    import sys

    from django.conf import settings

    marker, created = settings.DEMO_MARKER, not settings.DEMO_MARKER.exists()
    marker.parent.mkdir(parents=True, exist_ok=True)
    if created:
        marker.write_text(str(settings.BASE_DIR), encoding="utf-8")
    probe = "import kotaemon_site.settings as s; print(s.DEMO, s.DEBUG)"
    bare = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    try:
        demo = subprocess.run([sys.executable, "-c", probe], cwd=settings.BASE_DIR, env=bare, capture_output=True,
                              text=True, timeout=60)
        assert demo.stdout.split() == ["True", "True"], demo.stderr
        prod = subprocess.run([sys.executable, "-c", probe], cwd=settings.BASE_DIR, capture_output=True, text=True,
                              env={**bare, "DATABASE_URL": "postgres://db/x"}, timeout=60)
        assert prod.returncode != 0 and "SECRET_KEY is not set" in prod.stderr
    finally:
        if created:
            marker.unlink()
