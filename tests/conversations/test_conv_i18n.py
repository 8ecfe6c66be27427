"""Answers in Chinese: the extractive answerer splits, selects and joins Chinese sentences and places its
citations inside them; "nothing found" and every message come in the user's language; the LLM prompt
asks for the answer in the language of the question."""
from __future__ import annotations

import json

import pytest
from django.utils import translation

from apps.conversations.generators.base import Source
from apps.conversations.generators.extractive import (NOT_FOUND, ExtractiveGenerator, join_sentences, split_sentences,
                                                      stream_pieces)
from apps.conversations.prompt import build_messages, language_rule
from apps.core.i18n import question_language, reply_language
from tests.conversations.conv_support import build_knowledge_base

REFUNDS_ZH = """# 退款政策

申请退款后，我们会在收到退货的3个工作日内完成审核。审核通过后，退款将在7个工作日内
原路退回到您的支付账户！会员每月可以免费退换两次……超出后每次收取10元手续费。

## 联系我们

如果超过15天仍未到账，请联系客服；客服热线是400-800-1234。
"""
NOT_FOUND_ZH = "我在你可以检索的知识库中没有找到相关内容。请换一种问法，或者说明具体的文档或主题。"


def zh_source(n=1):
    return Source(n=n, type="chunk", title="售后服务", text=REFUNDS_ZH)


def test_chinese_sentences_split_at_their_own_punctuation_without_spaces():
    sentences = split_sentences(REFUNDS_ZH)
    assert "申请退款后，我们会在收到退货的3个工作日内完成审核。" in sentences
    # A line break inside a Chinese sentence is layout: the sentence is whole and gains no space.
    assert "审核通过后，退款将在7个工作日内原路退回到您的支付账户！" in sentences
    assert "会员每月可以免费退换两次……" in sentences and "超出后每次收取10元手续费。" in sentences
    assert "如果超过15天仍未到账，请联系客服；" in sentences and "客服热线是400-800-1234。" in sentences
    assert not any(" " in s for s in sentences if not s.startswith("#"))
    # English keeps its rules: no split inside "3.11" or "e.g.", one after a full stop and a space.
    assert split_sentences("Use Python 3.11, e.g. for tests. Then deploy.") == ["Use Python 3.11, e.g. for tests.",
                                                                                  "Then deploy."]


def test_a_chinese_question_gets_chinese_sentences_with_citations_inside_them():
    text, snippets = ExtractiveGenerator().answer(question="请问退款多长时间能到账？", query="请问退款多长时间能到账？",
                                                   sources=[zh_source()])
    assert "退款将在7个工作日内原路退回到您的支付账户[1]！" in text
    assert " " not in text and "[1] " not in text and " [1]" not in text
    assert text.endswith(("。", "！", "；"))
    assert "7个工作日" in snippets[1] and " " not in snippets[1]


def test_chinese_answers_for_price_and_contact_questions():
    generator = ExtractiveGenerator()
    text, _ = generator.answer(question="客服热线是多少？", query="客服热线是多少？", sources=[zh_source()])
    assert "客服热线是400-800-1234[1]。" in text
    text, _ = generator.answer(question="超出次数后手续费多少钱？", query="超出次数后手续费多少钱？", sources=[zh_source()])
    assert "超出后每次收取10元手续费[1]。" in text


def test_chinese_and_english_sentences_join_with_the_right_spacing():
    assert join_sentences(["审核通过[1]。", "退款到账[2]！"]) == "审核通过[1]。退款到账[2]！"
    assert join_sentences(["Refunds take 5 days [1].", "Call us [2]."]) == "Refunds take 5 days [1]. Call us [2]."
    assert join_sentences(["Refunds take 5 days [1].", "退款七天到账[2]。"]) == "Refunds take 5 days [1].退款七天到账[2]。"
    assert join_sentences(["退款七天到账[2]。", "Call us [1]."]) == "退款七天到账[2]。Call us [1]."


def test_streamed_pieces_rebuild_the_answer_exactly():
    text = "退款将在7个工作日内原路退回到您的支付账户[1]！Refunds take 5 to 7 business days [2]."
    pieces = stream_pieces(text)
    assert "".join(pieces) == text and len(pieces) > 8 and max(len(p) for p in pieces) <= 12


def test_nothing_found_in_the_language_of_the_question_else_the_interface():
    generator = ExtractiveGenerator()
    ask = lambda q: generator.answer(question=q, query=q, sources=[zh_source()])[0]  # noqa: E731
    with translation.override("en"):
        assert ask("火星上有液态水吗？") == NOT_FOUND_ZH
        assert ask("Is there liquid water on Mars?") == str(NOT_FOUND)
        assert ask("42?") == str(NOT_FOUND)  # neither language: the interface's
    with translation.override("zh-hans"):
        assert ask("Is there liquid water on Mars?").startswith("I could not find anything")
        assert ask("42?") == NOT_FOUND_ZH
        assert ask("VPN?") == NOT_FOUND_ZH


def test_question_language_detection():
    assert question_language("退款多久到账？") == "zh-hans"
    assert question_language("VPN 怎么连接？") == "zh-hans"  # Chinese with an English term
    assert question_language("How do I connect to the VPN?") == "en"
    assert question_language("what is 安心保障计划 and who can buy it") == "en"
    assert question_language("12345") is None and question_language("VPN?") is None
    with translation.override("zh-hans"):
        assert reply_language("12345") == "zh-hans" and reply_language("How long?") == "en"


def test_the_prompt_asks_for_the_language_of_the_question():
    sources = [Source(n=1, type="chunk", title="Refunds", text="Refunds take 5 to 7 business days.")]
    system = build_messages(question="退款要多久？", history=[], sources=sources)[0]["content"]
    assert "Simplified Chinese" in system and "[n]" in system and "<source" in system
    system = build_messages(question="How long do refunds take?", history=[], sources=[zh_source()])[0]["content"]
    assert "Write the answer in English" in system
    with translation.override("zh-hans"):
        assert "Simplified Chinese" in build_messages(question="VPN?", history=[], sources=sources)[0]["content"]
    assert language_rule("42") == "Write the answer in the language of the user's question."


@pytest.mark.django_db
def test_a_chinese_chat_turn_end_to_end(auth_client, user):
    """Real ingestion of a Chinese document (jieba BM25), the REST chat in Chinese, errors in Chinese."""
    build_knowledge_base(user, slug="shouhou", docs={"售后服务.md": REFUNDS_ZH})
    resp = auth_client.post("/api/v1/chat/", {"message": "客服热线是多少？", "knowledge_bases": ["shouhou"]},
                            format="json")
    body = resp.json()
    assert resp.status_code == 200, body
    assert "400-800-1234[1]。" in body["answer"] and body["citations"][0]["n"] == 1
    assert body["citations"][0]["snippet"].startswith("如果超过15天仍未到账") or "400-800-1234" in \
        body["citations"][0]["snippet"]
    # Nothing relevant: said in Chinese for a Chinese question, whatever the interface language.
    resp = auth_client.post("/api/v1/chat/", {"message": "火星上有液态水吗？", "knowledge_bases": ["shouhou"],
                                              "session_id": body["session_id"]}, format="json",
                            HTTP_ACCEPT_LANGUAGE="en")
    assert resp.json()["answer"] == NOT_FOUND_ZH and resp.json()["citations"] == []


@pytest.mark.django_db(transaction=True)
async def test_a_background_turn_speaks_the_language_of_the_request_that_opened_it(user):
    """Websocket turns are generated in a background thread (or by another instance after a takeover):
    the interface language travels with the turn."""
    import asyncio

    from channels.testing import WebsocketCommunicator

    from apps.core.services import api_key_create
    from kotaemon_site.asgi import application

    await asyncio.to_thread(build_knowledge_base, user, slug="shouhou", docs={"售后服务.md": REFUNDS_ZH})
    issued = await asyncio.to_thread(api_key_create, user=user)
    comm = WebsocketCommunicator(application, "/ws/chat/zh-session-0001/", headers=[
        (b"origin", b"http://127.0.0.1"), (b"host", b"127.0.0.1"), (b"accept-language", b"zh-CN,zh;q=0.9"),
        (b"authorization", f"Bearer {issued.raw_key}".encode())])
    connected, _ = await comm.connect()
    assert connected
    await comm.send_to(text_data=json.dumps({"type": "message", "message": "42?", "knowledge_bases": ["shouhou"]}))
    while True:
        frame = json.loads(await comm.receive_from(timeout=60))
        if frame["type"] in ("answer", "error"):
            break
    await comm.disconnect()
    assert frame["type"] == "answer" and frame["answer"] == NOT_FOUND_ZH
