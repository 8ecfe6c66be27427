"""manage.py evaluate --questions: a labelled question set over the real demo documents."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from apps.knowledge.models import KnowledgeBase
from apps.knowledge.rag.evaluation import hit_metrics

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("kb_env")]

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = ROOT / "tests" / "knowledge" / "devsets" / "handbook.jsonl"
DOCUMENTS = ROOT / "apps" / "knowledge" / "demo_data"


def evaluate(*args) -> str:
    out = io.StringIO()
    call_command("evaluate", "--questions", str(QUESTIONS), *args, "--no-progress", stdout=out, stderr=io.StringIO())
    return out.getvalue()


def test_labelled_set_is_ingested_once_and_scored_per_mode_and_subset(encode_counter):
    report = json.loads(evaluate("--documents", str(DOCUMENTS), "--json"))
    assert report["knowledge_base"] == "eval-handbook" and report["corpus"]["ingested"] == 6
    assert report["missing_documents"] == [] and report["corpus"]["failures"] == []
    assert [r["mode"] for r in report["results"]] == ["dense", "bm25", "hybrid"]
    for result in report["results"]:
        ranks = [(q["rank"], q["doc_rank"]) for q in result["questions"]]
        assert len(ranks) == 6
        # The reported figures are exactly the hit rule applied to the per-question ranks.
        assert result["metrics"] == hit_metrics(ranks)
        by_id = {q["id"]: q for q in result["questions"]}
        # A passage that no document contains is never a hit, whatever is retrieved.
        assert by_id["hb-6"]["rank"] is None
        assert set(result["subsets"]) == {"lang:en", "lang:zh", "tag:cross-lingual", "tag:paraphrase",
                                          "tag:unanswerable"}
        assert result["subsets"]["lang:zh"]["queries"] == 1
        values = [result["metrics"][f"hit@{k}"] for k in (1, 3, 5, 10)]
        assert values == sorted(values) and 0 <= result["metrics"]["mrr@10"] <= values[-1]
    kb = KnowledgeBase.objects.get(slug="eval-handbook")
    assert not kb.is_public and kb.owner is None
    encoded = encode_counter["texts"]

    # A second run over an existing base by slug: nothing ingested, nothing encoded, tables on stdout.
    text = evaluate("--kb", "eval-handbook", "--mode", "bm25")
    assert "| bm25 " in text and "hit@3" in text and "tag:cross-lingual" in text
    assert encode_counter["texts"] == encoded  # BM25 needs no query vector either

    # Calibration on the set: the chosen settings are stored on the base and used by the evaluation after it.
    calibrated = json.loads(evaluate("--kb", "eval-handbook", "--mode", "hybrid", "--calibrate", "--save", "--json"))
    cal = calibrated["calibration"]
    kb.refresh_from_db()
    assert cal["saved"] and cal["queries"] == 6 and cal["cross_validation"]["folds"] == 2
    assert [kb.fusion, kb.rrf_k, kb.dense_weight, kb.mmr_lambda] == [cal["chosen"][k] for k in
                                                                     ("fusion", "rrf_k", "dense_weight", "mmr_lambda")]
    assert kb.retrieval_calibration["source"].endswith("handbook.jsonl")
    assert cal["chosen_score"] >= cal["current_score"]
    assert calibrated["results"][0]["metrics"]["mrr@10"] == pytest.approx(cal["chosen_score"])


def test_bad_inputs_are_command_errors(tmp_path):
    with pytest.raises(CommandError, match="--kb"):
        evaluate()
    with pytest.raises(CommandError, match="No knowledge base"):
        evaluate("--kb", "absent")
    with pytest.raises(CommandError, match="--save goes with --calibrate"):
        evaluate("--kb", "absent", "--save")
    with pytest.raises(CommandError, match="No documents folder"):
        evaluate("--documents", str(tmp_path / "absent"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q"}\n')
    with pytest.raises(CommandError, match="line 1"):
        call_command("evaluate", "--questions", str(broken), "--kb", "x", stdout=io.StringIO())
