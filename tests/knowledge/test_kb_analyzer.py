"""The BM25 analyzer through the Django layer: Chinese keyword search, the per-base user dictionary
(admin/API edit -> rebuild -> documents and queries), and versions built by another analyzer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from apps.knowledge import services
from apps.knowledge.index_registry import registry
from apps.knowledge.models import IndexVersion
from apps.knowledge.rag.analyzer import ANALYZER_VERSION
from apps.knowledge.selectors import chunks_retrieve

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("kb_env")]

RETURNS = "# 退货政策\n\n商品签收后七天内可以申请无理由退货，退款会在三个工作日内原路返回。\n".encode()
SHIPPING = "# 配送说明\n\n订单一般在两个工作日内发货，偏远地区需要五天。\n".encode()
CARE = "# 服务\n\n安心保障计划包括免费上门维修和一年延保。\n".encode("gb18030")


def _top_title(user, query, kb):
    results = chunks_retrieve(user=user, query=query, knowledge_bases=[kb.slug], mode="bm25", top_k=3)
    return results[0].document_title if results else None


def test_chinese_questions_find_chinese_passages_by_keyword(make_kb, load_docs, user):
    kb = make_kb("zh")
    load_docs(kb, {"returns.md": RETURNS, "shipping.md": SHIPPING, "care.txt": CARE})
    assert _top_title(user, "签收以后多久可以退貨？", kb) == "退货政策"
    assert _top_title(user, "请问什么时候发货", kb) == "配送说明"
    assert _top_title(user, "安心保障包括什么", kb) == "care"  # the GB18030 text file decoded


def test_the_user_dictionary_applies_at_the_next_rebuild_to_documents_and_queries(make_kb, load_docs, user,
                                                                                    django_capture_on_commit_callbacks):
    kb = make_kb("dict")
    load_docs(kb, {"care.txt": CARE, "returns.md": RETURNS})
    before = IndexVersion.objects.get(knowledge_base=kb, status="active")
    manifest = json.loads((Path(before.artifact_path) / "manifest.json").read_text())
    assert manifest["analyzer"]["version"] == ANALYZER_VERSION
    plain_hash = manifest["user_dictionary_sha256"]

    with django_capture_on_commit_callbacks(execute=True):
        services.knowledge_base_update(user=user, knowledge_base=kb, user_dictionary="# 产品\n安心保障计划\n")
    after = IndexVersion.objects.get(knowledge_base=kb, status="active")
    assert after.version > before.version  # the dictionary change alone rebuilt the index
    manifest = json.loads((Path(after.artifact_path) / "manifest.json").read_text())
    assert manifest["user_dictionary_sha256"] != plain_hash
    bundle = registry.bundle(kb.pk)
    assert "安心保障计划" in bundle.bm25.analyzer.tokenize("安心保障计划")  # queries use the base's dictionary
    assert _top_title(user, "安心保障计划", kb) == "care"
    assert services.index_rebuild(knowledge_base_id=kb.pk).status == "unchanged"


def test_a_version_built_by_another_analyzer_is_rebuilt_not_searched(make_kb, load_docs, user, settings,
                                                                    django_capture_on_commit_callbacks):
    kb = make_kb("old")
    load_docs(kb, {"returns.md": RETURNS})
    active = IndexVersion.objects.get(knowledge_base=kb, status="active")
    manifest = json.loads((Path(active.artifact_path) / "manifest.json").read_text())
    meta_path = settings.INDEX_ROOT / f"kb-{kb.pk}" / "segments" / manifest["segments"][0]["name"] / "bm25.json"
    meta = json.loads(meta_path.read_text())
    meta["analyzer"]["version"] = ANALYZER_VERSION - 1  # as if written by the previous release
    meta_path.write_text(json.dumps(meta))
    manifest_path = Path(active.artifact_path) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["analyzer"]["version"] = ANALYZER_VERSION - 1
    manifest_path.write_text(json.dumps(manifest))
    registry.clear()

    with django_capture_on_commit_callbacks(execute=True):
        bundle = registry.bundle(kb.pk)
    assert bundle.version == active.version and not bundle.analyzer_current
    assert bundle.bm25_search("退货", 3) == []  # never searched with a mismatched tokenizer
    rebuilt = IndexVersion.objects.get(knowledge_base=kb, status="active")
    assert rebuilt.version > active.version
    assert _top_title(user, "退货", kb) == "退货政策"
