"""The labelled question-set metrics: the hit rule, document matching, the loader's validation."""
from __future__ import annotations

import json

import pytest

from apps.knowledge.rag.evaluation import (LabelledQuestion, document_matches, first_hit_rank, hit_metrics,
                                           load_questions, match_tokens, passage_coverage, question_subsets)

PASSAGE = "VACUUM reclaims storage occupied by dead tuples."


def test_tokens_fold_width_case_and_split_cjk_per_character():
    assert match_tokens("ＶＡＣＵＵＭ reclaims 存储空间, dead_tuples!") == ["vacuum", "reclaims", "存", "储", "空", "间",
                                                                      "dead", "tuples"]


def test_coverage_ignores_markup_and_spacing_but_not_word_order():
    assert passage_coverage(PASSAGE, "Intro. **VACUUM**  reclaims\nstorage occupied by *dead* tuples; more") == 1.0
    # The same words, scattered through the chunk, share no bigram: not the passage.
    assert passage_coverage(PASSAGE, "dead storage; tuples by VACUUM occupied reclaims") == 0.0
    half = passage_coverage(PASSAGE, "... and then it reclaims storage occupied by something else")
    assert 0.3 < half < 0.6
    assert passage_coverage("回收空间", "VACUUM 命令可以回收空间。") == 1.0


def test_document_matching_by_name_trailing_path_or_title():
    assert document_matches("postgresql/sql-vacuum.html", "postgresql/sql-vacuum.html")
    assert document_matches("postgresql/sql-vacuum.html", "sql-vacuum.html")
    assert document_matches("sql-vacuum.html", "docs/postgresql/sql-vacuum.html")
    assert document_matches("VACUUM", "x.html", title="VACUUM")
    assert not document_matches("postgresql/sql-vacuum.html", "postgresql/vacuum.html")
    assert not document_matches("vacuum.html", "sql-vacuum.html")


def test_first_hit_needs_the_right_document_and_the_passage():
    q = LabelledQuestion("1", "how do I free disk space", "pg/vacuum.html", PASSAGE)
    ranked = [("other.html", "", PASSAGE),                      # the passage, wrong document
              ("pg/vacuum.html", "", "Options of the command."),  # right document, wrong section
              ("pg/vacuum.html", "", "Notes. " + PASSAGE)]
    assert first_hit_rank(q, ranked) == (3, 2)
    assert first_hit_rank(q, ranked[:2]) == (None, 2)
    assert first_hit_rank(q, []) == (None, None)


def test_hit_metrics_and_subsets():
    m = hit_metrics([(1, 1), (2, 1), (None, 4), (7, 7)])
    assert m["hit@1"] == 0.25 and m["hit@3"] == 0.5 and m["hit@5"] == 0.5 and m["hit@10"] == 0.75
    assert m["mrr@10"] == pytest.approx((1 + 0.5 + 1 / 7) / 4)
    assert m["doc_hit@3"] == 0.5 and m["queries"] == 4
    qs = [LabelledQuestion("a", "q", "d", "p", "zh", ("cross-lingual",)), LabelledQuestion("b", "q", "d", "p", "en")]
    assert question_subsets(qs) == {"lang:en": [1], "lang:zh": [0], "tag:cross-lingual": [0]}


def test_loader_validates_each_line(tmp_path):
    path = tmp_path / "set.jsonl"
    good = {"question": "q?", "document": "d.md", "passage": "some words", "tags": ["t"], "lang": "en"}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "id": "x"}) + "\n", encoding="utf-8")
    loaded = load_questions(path)
    assert [q.id for q in loaded] == ["1", "x"] and loaded[0].tags == ("t",)
    for bad, message in [({**good, "passage": ""}, "passage"), ({**good, "tags": "t"}, "tags"),
                         ({**good, "passage": "!!"}, "no words"), ([1], "object")]:
        path.write_text(json.dumps(bad) + "\n", encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            load_questions(path)
    path.write_text(json.dumps({**good, "id": "x"}) + "\n" + json.dumps({**good, "id": "x"}) + "\n")
    with pytest.raises(ValueError, match="line 2: duplicate"):
        load_questions(path)
    path.write_text("{nope\n")
    with pytest.raises(ValueError, match="line 1: not JSON"):
        load_questions(path)
