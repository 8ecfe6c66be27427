"""The automatic embedding model (issue 11): a base created without a model gets one by the language of its
documents, before their first vectors; later uploads may switch it once (background re-embed, zero downtime);
an editor's model is never overridden; two models never share an index version. Real text, real encoders."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from django.contrib.auth.models import Permission
from django.core.files.uploadedfile import SimpleUploadedFile

from apps.knowledge import selectors, services
from apps.knowledge.embeddings import MODEL_E5, MODEL_MINILM, embedder
from apps.knowledge.model_choice import embedding_choice_reason, knowledge_base_language
from apps.knowledge.models import Chunk, Document, IndexVersion, KnowledgeBase
from apps.knowledge.rag.chunker import indexed_text
from apps.knowledge.rag.index import IndexBundle

from . import kb_files

DEMO = Path(__file__).resolve().parents[2] / "apps" / "knowledge" / "demo_data"

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("kb_env")]

LEAVE_ZH = """# 员工休假制度

## 年假

员工入职满一年后，每年享有十五天带薪年假。年假须在当年十二月三十一日前休完，未休完的天数最多可顺延五天至次年第一季度。

## 请假流程

请假须提前三个工作日在人事系统中提交申请，并经直属主管批准。连续请假超过五天的，还须部门负责人审批。

## 病假

员工因病不能上班的，应在当天上午十点前通知直属主管。病假超过两天须提供医院出具的诊断证明。
""".encode()

REFUND_ZH = """# 退换货政策

## 退货期限

自签收之日起七天内，商品未经使用且包装完好的，可申请无理由退货。定制商品和已拆封的食品不支持退货。

## 退款方式

退货商品验收合格后，退款将在三至五个工作日内原路退回。使用优惠券的订单，退款金额按实际支付金额计算。

## 运费

因质量问题退货的，运费由本公司承担；其他原因退货的，运费由顾客承担。
""".encode()

SHIPPING_ZH = """# 配送说明

订单在付款后二十四小时内发货。偏远地区的配送时间为五到七天，其他地区一般为两到三天。
如果包裹在预计送达日期后五个工作日仍未收到，请联系客服查询物流信息。
""".encode()


@pytest.fixture
def editor(user):
    user.user_permissions.add(Permission.objects.get(codename="add_knowledgebase"))
    return type(user).objects.get(pk=user.pk)


def _auto_kb(editor, slug="kb", **fields):
    kb = services.knowledge_base_create(user=editor, slug=slug, name=slug.title(), **fields)
    return KnowledgeBase.objects.get(pk=kb.pk)


def _upload(kb, user, files: dict[str, bytes]):
    """The REST/admin upload path: one request, one ingest task per document (inline here, in file order)."""
    from django.test import TestCase

    uploads = [SimpleUploadedFile(name, data) for name, data in files.items()]
    with TestCase.captureOnCommitCallbacks(execute=True):  # the tasks run after commit
        return services.documents_upload(knowledge_base=kb, user=user, files=uploads)


def _live_chunks(kb):
    return list(Chunk.objects.filter(document__knowledge_base=kb, superseded_at__isnull=True))


def _assert_every_version_has_one_models_vectors(kb):
    """Each index version ever built holds only its own model's vectors: every dense vector in it equals that
    model's encoding of the chunk's text (so a chunk embedded with another model would show)."""
    versions = list(IndexVersion.objects.filter(knowledge_base=kb).exclude(status="failed").order_by("version"))
    assert versions
    texts = {pk: indexed_text(text, context) for pk, text, context in  # what the encoder embeds for a chunk
             Chunk.objects.filter(document__knowledge_base=kb).values_list("pk", "text", "search_context")}
    for version in versions:
        bundle = IndexBundle.load(version.artifact_path)
        assert bundle.embedding["model_id"] == version.embedding_model
        ids = [int(i) for part in bundle.parts for i in part.segment.ids if i not in set(part.tombstones.tolist())]
        model = embedder(version.embedding_key)
        assert model.model_id == version.embedding_model
        stored = bundle.vectors(ids)
        fresh = model.encode_passages([texts[i] for i in ids])
        assert np.allclose(stored, fresh, atol=1e-4), f"v{version.version} ({version.embedding_key}) mixes models"
    return versions


def test_a_new_base_is_automatic_until_its_documents_speak(editor, client):
    kb = _auto_kb(editor)
    assert kb.embedding_model_auto and kb.embedding_choice == {} and kb.embedding_model == MODEL_MINILM
    client.force_login(editor)
    payload = client.get(f"/api/v1/knowledge-bases/{kb.pk}/").json()
    assert payload["embedding_model"] == MODEL_MINILM and payload["embedding_model_auto"] is True
    assert "not decided yet" in payload["embedding_model_reason"]


def test_an_evaluation_ranks_with_the_fusion_of_the_model_its_documents_chose(editor, tmp_path):
    from apps.knowledge import evaluation
    from apps.knowledge.embeddings import AUTO_FUSION_OTHERS, served_fusion

    kb = _auto_kb(editor)
    assert served_fusion(kb) == ("zscore", 60, 0.6)  # undecided: the English model's default
    (tmp_path / "leave.md").write_bytes(LEAVE_ZH)
    (tmp_path / "refund.md").write_bytes(REFUND_ZH)
    evaluation.labelled_documents_load(knowledge_base=kb, root=tmp_path)
    # the caller's instance is the stored row: the command scores what a search of the base serves
    assert kb.embedding_model == MODEL_E5 and served_fusion(kb) == AUTO_FUSION_OTHERS
    params = evaluation.current_ranking_params(kb)
    assert (params.fusion, params.dense_weight) == ("zscore", 0.5)


def test_a_chinese_upload_chooses_the_multilingual_model_before_anything_is_embedded(editor, encode_counter):
    kb = _auto_kb(editor)
    _upload(kb, editor, {"leave.md": LEAVE_ZH, "refund.md": REFUND_ZH})
    kb.refresh_from_db()
    e5 = embedder(MODEL_E5)
    assert kb.embedding_model == MODEL_E5 and kb.embedding_model_auto
    assert kb.embedding_choice["by"] == "language" and kb.embedding_choice["cjk_share"] > 0.9
    assert "switched_from" not in kb.embedding_choice
    assert encode_counter["texts"] == 0  # all-MiniLM-L6-v2 never encoded a chunk: no re-embed was needed
    chunks = _live_chunks(kb)
    assert chunks and {c.embedding_model for c in chunks} == {e5.model_id}
    # chunks sized in e5's own tokens
    assert all(c.token_count == e5.count_tokens(c.text) for c in chunks)
    versions = _assert_every_version_has_one_models_vectors(kb)
    assert [v.embedding_key for v in versions] == [MODEL_E5] and versions[0].encode_total == 0
    hits = selectors.chunks_retrieve(user=editor, query="生病了要交什么证明", knowledge_bases=[kb.pk], mode="dense")
    assert "诊断证明" in hits[0].text
    assert Document.objects.get(source_name="leave.md").lang_cjk_tokens > 100


def test_an_english_upload_keeps_the_english_model(editor):
    kb = _auto_kb(editor)
    _upload(kb, editor, {"expenses.md": kb_files.MARKDOWN, "fire.txt": kb_files.TEXT})
    kb.refresh_from_db()
    assert kb.embedding_model == MODEL_MINILM and kb.embedding_choice["by"] == "language"
    assert kb.embedding_choice["cjk_share"] == 0 and kb.embedding_choice["documents"] >= 1
    assert {c.embedding_model for c in _live_chunks(kb)} == {embedder(MODEL_MINILM).model_id}
    assert "English model" in embedding_choice_reason(kb)


def test_a_mixed_bulk_upload_with_chinese_first_is_multilingual_from_the_start(editor):
    kb = _auto_kb(editor)
    _upload(kb, editor, {"leave.md": LEAVE_ZH, "expenses.md": kb_files.MARKDOWN, "refund.md": REFUND_ZH,
                         "fire.txt": kb_files.TEXT})
    kb.refresh_from_db()
    assert kb.embedding_model == MODEL_E5
    assert {c.embedding_model for c in _live_chunks(kb)} == {embedder(MODEL_E5).model_id}
    assert {v.embedding_key for v in _assert_every_version_has_one_models_vectors(kb)} == {MODEL_E5}


def test_a_mixed_bulk_upload_with_english_first_switches_and_never_mixes(editor):
    """The English file decides first (English model); the Chinese ones that follow in the same request make
    the base clearly Chinese: it switches once, the chunks already embedded are re-embedded, and every version
    holds one model's vectors."""
    kb = _auto_kb(editor)
    _upload(kb, editor, {"fire.txt": kb_files.TEXT, "leave.md": LEAVE_ZH, "refund.md": REFUND_ZH,
                         "shipping.md": SHIPPING_ZH})
    kb.refresh_from_db()
    assert kb.embedding_model == MODEL_E5 and kb.embedding_choice["switched_from"] == MODEL_MINILM
    assert {c.embedding_model for c in _live_chunks(kb)} == {embedder(MODEL_E5).model_id}
    versions = _assert_every_version_has_one_models_vectors(kb)
    active = [v for v in versions if v.status == "active"]
    assert len(active) == 1 and active[0].embedding_key == MODEL_E5
    assert Document.objects.filter(knowledge_base=kb, status="ready").count() == 4


@pytest.mark.django_db(transaction=True)
def test_concurrent_workers_of_one_bulk_upload_agree_on_one_model(editor):
    """Four workers ingest the four documents of one upload at the same time (as Celery workers do): the first
    to finish parsing decides under the base's row lock, the others read its decision."""
    kb = _auto_kb(editor)
    documents = [services.document_import(knowledge_base=kb, user=editor, name=name, data=data).document
                 for name, data in {"leave.md": LEAVE_ZH, "refund.md": REFUND_ZH, "shipping.md": SHIPPING_ZH,
                                    "expenses.md": kb_files.MARKDOWN}.items()]
    errors: list[Exception] = []
    start = threading.Barrier(len(documents))

    def worker(document_id):
        from django.db import connection

        try:
            start.wait(timeout=30)
            services.document_ingest(document_id=document_id)
        except Exception as exc:  # surfaced below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker, args=(d.pk,)) for d in documents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors
    services.index_rebuild(knowledge_base_id=kb.pk)
    kb.refresh_from_db()
    assert kb.embedding_model == MODEL_E5
    assert Document.objects.filter(knowledge_base=kb, status="ready").count() == 4
    assert {c.embedding_model for c in _live_chunks(kb)} == {embedder(MODEL_E5).model_id}
    assert IndexVersion.objects.get(knowledge_base=kb, status="active").embedding_key == MODEL_E5
    _assert_every_version_has_one_models_vectors(kb)


def test_an_explicit_model_is_never_overridden(editor, user):
    kb = _auto_kb(editor, embedding_model=MODEL_MINILM)
    assert not kb.embedding_model_auto and kb.embedding_choice["by"] == "editor"
    _upload(kb, editor, {"leave.md": LEAVE_ZH, "refund.md": REFUND_ZH})
    kb.refresh_from_db()
    assert kb.embedding_model == MODEL_MINILM and kb.embedding_choice["by"] == "editor"
    assert {c.embedding_model for c in _live_chunks(kb)} == {embedder(MODEL_MINILM).model_id}

    # An editor picking a model on an automatic base turns the automatic choice off for good.
    auto = _auto_kb(editor, slug="auto")
    services.knowledge_base_update(user=editor, knowledge_base=auto, embedding_model=MODEL_MINILM)
    _upload(auto, editor, {"leave.md": LEAVE_ZH})
    auto.refresh_from_db()
    assert not auto.embedding_model_auto and auto.embedding_model == MODEL_MINILM
    assert embedding_choice_reason(auto) == "Chosen by an editor."


def test_a_base_that_becomes_chinese_switches_once_by_background_reembed(editor, django_capture_on_commit_callbacks):
    kb = _auto_kb(editor)
    _upload(kb, editor, {"expenses.md": kb_files.MARKDOWN, "fire.txt": kb_files.TEXT})
    kb.refresh_from_db()
    v1 = IndexVersion.objects.get(knowledge_base=kb, status="active")
    assert kb.embedding_model == MODEL_MINILM and v1.embedding_key == MODEL_MINILM

    # Mostly Chinese documents arrive. The ingest switches the model; the re-embed waits for commit.
    imported = [services.document_import(knowledge_base=kb, user=editor, name=name, data=data).document
                for name, data in {"leave.md": LEAVE_ZH, "refund.md": REFUND_ZH}.items()]
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        services.documents_ingest(document_ids=[d.pk for d in imported], rebuild=False)
    kb.refresh_from_db()
    assert kb.embedding_model == MODEL_E5 and kb.embedding_choice["switched_from"] == MODEL_MINILM
    # Zero downtime: the English version, and its model for queries, serve until the new one is active.
    hits = selectors.chunks_retrieve(user=editor, query="where do we meet during a fire drill", mode="dense")
    assert hits and {h.index_version for h in hits} == {v1.version} and "north parking lot" in hits[0].text
    for callback in callbacks:  # the background full build (Celery, inline here)
        callback()
    v2 = IndexVersion.objects.get(knowledge_base=kb, status="active")
    assert v2.version > v1.version and v2.embedding_key == MODEL_E5 and v2.build_kind == "full"
    assert v2.encoded_count > 0  # the English chunks were re-encoded with the new model
    assert {c.embedding_model for c in _live_chunks(kb)} == {embedder(MODEL_E5).model_id}
    _assert_every_version_has_one_models_vectors(kb)
    hits = selectors.chunks_retrieve(user=editor, query="退款多久能到账", knowledge_bases=[kb.pk], mode="dense")
    assert {h.index_version for h in hits} == {v2.version} and "原路退回" in hits[0].text

    # Never back: deleting the Chinese documents and adding English ones leaves the base multilingual.
    for document in imported:
        services.document_delete(document=document, user=editor)
    _upload(kb, editor, {"parking.html": kb_files.HTML})
    kb.refresh_from_db()
    assert kb.embedding_model == MODEL_E5


def test_a_little_chinese_in_an_english_base_does_not_switch_it(editor):
    """Hysteresis: the switch of a base already embedded with the English model needs twice the share that
    decides an undecided base. The same two documents in one batch would have chosen the multilingual model."""
    from apps.knowledge.rag.language import MULTILINGUAL_SHARE, SWITCH_SHARE

    english = (DEMO / "returns-and-refunds.md").read_bytes()
    kb = _auto_kb(editor)
    _upload(kb, editor, {"returns.md": english})
    _upload(kb, editor, {"shipping.md": SHIPPING_ZH})
    kb.refresh_from_db()
    mix, documents = knowledge_base_language(knowledge_base=kb)
    assert documents == 2 and MULTILINGUAL_SHARE <= mix.cjk_share < SWITCH_SHARE, mix
    assert kb.embedding_model == MODEL_MINILM and kb.embedding_choice["cjk_share"] == 0

    together = _auto_kb(editor, slug="together")
    imported = [services.document_import(knowledge_base=together, user=editor, name=name, data=data).document
                for name, data in {"returns.md": english, "shipping.md": SHIPPING_ZH}.items()]
    services.documents_ingest(document_ids=[d.pk for d in imported])  # one batch: both decide together
    together.refresh_from_db()
    assert together.embedding_model == MODEL_E5 and "switched_from" not in together.embedding_choice


def test_rest_create_auto_or_explicit_and_the_payload_says_why(editor, client):
    client.force_login(editor)
    created = client.post("/api/v1/knowledge-bases/", {"slug": "zh", "name": "中文"}, content_type="application/json")
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["embedding_model_auto"] is True and body["embedding_model"] == MODEL_MINILM
    explicit = client.post("/api/v1/knowledge-bases/", {"slug": "en", "name": "English",
                                                         "embedding_model": MODEL_MINILM},
                           content_type="application/json").json()
    assert explicit["embedding_model_auto"] is False and explicit["embedding_choice"]["by"] == "editor"
    again = client.patch(f"/api/v1/knowledge-bases/{explicit['id']}/", {"embedding_model": "auto"},
                         content_type="application/json").json()
    assert again["embedding_model_auto"] is True and again["embedding_model"] == MODEL_MINILM

    kb = KnowledgeBase.objects.get(pk=body["id"])
    _upload(kb, editor, {"leave.md": LEAVE_ZH})
    payload = client.get(f"/api/v1/knowledge-bases/{kb.pk}/", HTTP_ACCEPT_LANGUAGE="zh-hans").json()
    assert payload["embedding_model"] == MODEL_E5 and payload["embedding_choice"]["model"] == MODEL_E5
    assert "多语言" in payload["embedding_model_reason"]
    assert "multilingual model" in client.get(f"/api/v1/knowledge-bases/{kb.pk}/",
                                              HTTP_ACCEPT_LANGUAGE="en").json()["embedding_model_reason"]


def test_the_admin_shows_the_choice_and_offers_automatic(editor, admin_client):
    kb = _auto_kb(editor)
    _upload(kb, editor, {"leave.md": LEAVE_ZH})
    page = admin_client.get(f"/admin/knowledge/knowledgebase/{kb.pk}/change/").content.decode()
    assert 'value="auto" selected' in page and "so the multilingual model" in page
    listing = admin_client.get("/admin/knowledge/knowledgebase/").content.decode()
    assert MODEL_E5 in listing and "automatic" in listing


def test_turning_automatic_on_measures_documents_from_before_and_switches(editor, make_kb, load_docs,
                                                                           django_capture_on_commit_callbacks):
    """A base from before the automatic choice (explicit MiniLM, documents never measured) that an editor sets
    to automatic: its stored text is measured, the Chinese base switches and is re-embedded."""
    kb = make_kb("legacy", owner=editor, embedding_model=MODEL_MINILM)
    load_docs(kb, {"leave.md": LEAVE_ZH, "refund.md": REFUND_ZH})
    Document.objects.filter(knowledge_base=kb).update(lang_tokens=None, lang_cjk_tokens=0)  # as migrated
    v1 = IndexVersion.objects.get(knowledge_base=kb, status="active")
    assert v1.embedding_key == MODEL_MINILM
    with django_capture_on_commit_callbacks(execute=True):
        services.knowledge_base_update(user=editor, knowledge_base=kb, embedding_model="auto")
    kb.refresh_from_db()
    assert kb.embedding_model_auto and kb.embedding_model == MODEL_E5
    assert kb.embedding_choice["switched_from"] == MODEL_MINILM and kb.embedding_choice["documents"] == 2
    assert all(d.lang_tokens and d.lang_cjk_tokens for d in Document.objects.filter(knowledge_base=kb))
    v2 = IndexVersion.objects.get(knowledge_base=kb, status="active")
    assert v2.version > v1.version and v2.embedding_key == MODEL_E5
    assert {c.embedding_model for c in _live_chunks(kb)} == {embedder(MODEL_E5).model_id}
    _assert_every_version_has_one_models_vectors(kb)


def test_a_concrete_default_model_setting_gives_every_new_base_that_model(editor, settings):
    settings.EMBEDDING_DEFAULT_MODEL = MODEL_E5
    kb = _auto_kb(editor)
    scratch = KnowledgeBase.objects.create(slug="scratch", name="Scratch")  # as `evaluate` makes its bases
    for base in (kb, scratch):
        assert base.embedding_model == MODEL_E5 and not base.embedding_model_auto
        assert base.embedding_choice["by"] == "setting"
        assert embedding_choice_reason(base) == "Set by EMBEDDING_DEFAULT_MODEL when the base was created."
    _upload(kb, editor, {"expenses.md": kb_files.MARKDOWN})
    kb.refresh_from_db()
    assert kb.embedding_model == MODEL_E5  # English documents do not move it


def test_the_admin_form_turns_the_automatic_choice_off_and_on(editor, admin_client, django_capture_on_commit_callbacks):
    kb = _auto_kb(editor)
    _upload(kb, editor, {"leave.md": LEAVE_ZH})
    kb.refresh_from_db()

    def post(model):
        page = admin_client.get(f"/admin/knowledge/knowledgebase/{kb.pk}/change/")
        form = page.context["adminform"].form
        data = {name: form.initial.get(name, field.initial) for name, field in form.fields.items()}
        data = {k: ("" if v is None else ([g.pk for g in v] if k.endswith("groups") else v)) for k, v in data.items()}
        data["owner"] = editor.pk
        for formset in page.context["inline_admin_formsets"]:
            management = formset.formset.management_form
            data.update({f"{management.prefix}-{k}": v for k, v in management.initial.items()})
            for inline in formset.formset.forms:  # the index versions listed (read-only): their ids
                data[inline.add_prefix("id")] = inline.instance.pk
                data[inline.add_prefix("knowledge_base")] = kb.pk
        data.update(embedding_model=model, use_reranker="on")
        with django_capture_on_commit_callbacks(execute=True):
            response = admin_client.post(f"/admin/knowledge/knowledgebase/{kb.pk}/change/", data)
        assert response.status_code == 302, (response.context["adminform"].form.errors, response.context["errors"],
                                             [f.formset.non_form_errors() for f in response.context["inline_admin_formsets"]])
        kb.refresh_from_db()

    assert kb.embedding_model == MODEL_E5 and kb.embedding_model_auto
    post(MODEL_E5)  # the same model, picked explicitly: no re-embed, but the automatic choice is off
    assert kb.embedding_model == MODEL_E5 and not kb.embedding_model_auto and kb.embedding_choice["by"] == "editor"
    assert IndexVersion.objects.filter(knowledge_base=kb).count() == 1
    post(MODEL_MINILM)  # another model: re-embedded in the background
    assert kb.embedding_model == MODEL_MINILM and not kb.embedding_model_auto
    assert IndexVersion.objects.get(knowledge_base=kb, status="active").embedding_key == MODEL_MINILM
    post("auto")  # automatic again: the Chinese document decides at once, and the base switches back to e5
    assert kb.embedding_model_auto and kb.embedding_model == MODEL_E5
    assert kb.embedding_choice["switched_from"] == MODEL_MINILM
    assert IndexVersion.objects.get(knowledge_base=kb, status="active").embedding_key == MODEL_E5
