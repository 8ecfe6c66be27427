"""A deliberately slow OpenAI-compatible chat-completions server (streamed), for resumable-answer tests
and benchmarks. Its answer is deterministic (the same question gives the same tokens), cites source
[1], and comes one word every `delay` seconds, so a test can kill whatever is streaming it mid-answer.

    python -m tests.conversations.slow_llm --port 8089 --delay 0.05 --words 40
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def answer_words(question: str, words: int) -> list[str]:
    base = [w.strip("?.!,") for w in question.split()] or ["answer"]
    out = ["Answer:"] + [f"{base[i % len(base)]}-{i}" for i in range(words - 2)] + ["[1]."]
    return [w + " " for w in out[:-1]] + [out[-1]]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        messages = body.get("messages") or []
        question = messages[-1]["content"] if messages else ""
        self.server.requests.append(question)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        pieces = answer_words(question, self.server.words)
        try:
            for piece in pieces:
                time.sleep(self.server.delay)
                chunk = {"choices": [{"index": 0, "delta": {"content": piece}}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            usage = {"choices": [], "usage": {"prompt_tokens": 50, "completion_tokens": len(pieces)}}
            self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the caller died mid-answer: that is what the tests do
        self.close_connection = True


class SlowLLM:
    def __init__(self, *, delay: float = 0.05, words: int = 40, port: int = 0) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self.server.daemon_threads = True
        self.server.delay = delay
        self.server.words = words
        self.server.requests = []
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @property
    def requests(self) -> list[str]:
        return self.server.requests

    def expected(self, question: str) -> str:
        return "".join(answer_words(question, self.server.words)).strip()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--words", type=int, default=40)
    args = parser.parse_args()
    llm = SlowLLM(delay=args.delay, words=args.words, port=args.port)
    print(llm.base_url, flush=True)
    llm.thread.join()
