"""Real processes for the cluster tests: uvicorn instances, a Celery worker, nginx, and an
OpenAI-compatible language-model server that reports the conversation it was given.

Every cluster gets its own Redis key prefix (registry, journal, channel layer, session store), Celery
queue and data directory, so concurrent test runs sharing one Redis never hear each other.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import ROOT, VENV_BIN, free_port, server_env


def wait_until(predicate, timeout: float = 30.0, every: float = 0.05, message: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"{message} not met within {timeout}s (last value: {last!r})")


# --- a language model that tells what it saw ---------------------------------------------------
class _LLMHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        messages = body.get("messages") or []
        self.server.requests.append(messages)
        system = messages[0]["content"] if messages else ""
        sources = sorted({int(n) for n in re.findall(r"^\[(\d+)\]", system, re.M)})
        dialogue = [{"role": m["role"], "content": m["content"]} for m in messages[1:-1]]
        question = messages[-1]["content"] if messages else ""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        if question.startswith("SLOW"):
            # A deliberately slow model: one word every SLOW_DELAY seconds, the same words every time.
            pieces = slow_answer_pieces(question)
        else:
            # Cite every source, so the response shows all that retrieval returned.
            text = "".join(f"[{n}]" for n in sources) + " SEEN " + json.dumps(dialogue)
            pieces = [text[: len(text) // 2], text[len(text) // 2:]]
        for piece in pieces:
            if question.startswith("SLOW"):
                time.sleep(SLOW_DELAY)
            chunk = {"choices": [{"delta": {"content": piece}}]}
            try:
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                return  # the instance asking was killed mid-answer
        usage = {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        self.wfile.flush()
        self.close_connection = True


SLOW_DELAY = 0.1
SLOW_WORDS = 40


def slow_answer_pieces(question: str) -> list[str]:
    """The slow model's answer to `question`: SLOW_WORDS words, citing source [1]."""
    return ["Slowly [1]:"] + [f" w{i}" for i in range(SLOW_WORDS - 2)] + [" done."]


class FakeLLM:
    """An OpenAI-compatible chat-completions server (streamed) whose answer is the dialogue it received;
    a question starting with SLOW gets a fixed answer, one word every SLOW_DELAY seconds."""

    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _LLMHandler)
        self.server.daemon_threads = True
        self.server.requests = []
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def seen_dialogue(answer: str) -> list[dict]:
    """The dialogue the language model was given, from its answer."""
    return json.loads(answer.split(" SEEN ", 1)[1])


# --- processes ------------------------------------------------------------------------------------
@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self, tail: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-tail:]
        except OSError:
            return ""


@dataclass
class Cluster:
    redis_url: str
    workdir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    prefix: str = field(default_factory=lambda: f"kc{uuid.uuid4().hex[:10]}")
    instances: dict[str, Proc] = field(default_factory=dict)
    workers: dict[str, Proc] = field(default_factory=dict)
    nginx: Proc | None = None

    @property
    def queue(self) -> str:
        return f"{self.prefix}-tasks"

    def env(self, instance_id: str) -> dict[str, str]:
        data = self.workdir / "data"
        values = dict(
            REDIS_URL=self.redis_url, CELERY_BROKER_URL=self.redis_url, CELERY_RESULT_BACKEND=self.redis_url,
            CELERY_TASK_ALWAYS_EAGER="0", CELERY_TASK_DEFAULT_QUEUE=self.queue, CACHE_KEY_PREFIX=self.prefix,
            INSTANCE_ID=instance_id, KOTAEMON_DATA_DIR=str(data), INDEX_ROOT=str(data / "indexes"),
            MEDIA_ROOT=str(data / "media"), LOG_LEVEL="INFO", TORCH_NUM_THREADS="1", OMP_NUM_THREADS="1",
            CLUSTER_HEARTBEAT_SECONDS="0.5", CLUSTER_INSTANCE_TTL_SECONDS="3", CLUSTER_RECONCILE_SECONDS="1",
            CHAT_RATE_LIMIT="100000/min", API_RATE_LIMIT="100000/min",
            OUTBOUND_ALLOWED_HOSTS="127.0.0.1",  # the tests' fake services listen on loopback
        )
        return server_env(**{**values, **self.extra_env})

    def _popen(self, name: str, args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
        log = self.workdir / f"{name}.log"
        handle = open(log, "ab")
        # Its own process group: a kill -9 of the instance takes nothing else with it.
        popen = subprocess.Popen(args, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        handle.close()
        return popen, log

    def start_instance(self, name: str, port: int | None = None) -> Proc:
        port = port or free_port()
        # DB_CONN_MAX_AGE=0 as in deploy/k8s: under ASGI each request runs in a new thread, so a persistent
        # connection is never reused and piles up until garbage collection (Django's docs advise 0).
        env = dict(self.env(f"{name}-{self.prefix}"), DB_CONN_MAX_AGE="0")
        popen, log = self._popen(name, [str(VENV_BIN / "uvicorn"), "kotaemon_site.asgi:application", "--host",
                                        "127.0.0.1", "--port", str(port), "--log-level", "warning"], env)
        proc = Proc(name, popen, log, port)
        self.instances[name] = proc
        return proc

    def start_worker(self, name: str = "worker") -> Proc:
        popen, log = self._popen(name, [str(VENV_BIN / "celery"), "-A", "kotaemon_site", "worker", "--pool=solo",
                                        "-Q", self.queue, "-n", f"{name}-{self.prefix}@%h", "-l", "warning",
                                        "--without-heartbeat", "--without-gossip", "--without-mingle"],
                                 self.env(f"{name}-{self.prefix}"))
        proc = Proc(name, popen, log)
        self.workers[name] = proc
        return proc

    def instance_id(self, name: str) -> str:
        return f"{name}-{self.prefix}"

    def wait_ready(self, names: list[str] | None = None, timeout: float = 120.0) -> None:
        names = names or list(self.instances)

        def ready() -> bool:
            for name in names:
                proc = self.instances[name]
                if not proc.alive():
                    raise AssertionError(f"{name} exited:\n{proc.output()}")
                try:
                    if httpx.get(f"{proc.url}/readyz", timeout=5).status_code != 200:
                        return False
                except httpx.HTTPError:
                    return False
            records = {r["id"]: r for r in self.records()}
            return all(records.get(self.instance_id(n), {}).get("subscribed") for n in names)

        wait_until(ready, timeout=timeout, every=0.25, message=f"instances {names} ready and subscribed")

    def kill9(self, name: str) -> None:
        proc = self.instances[name]
        os.kill(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait(timeout=10)

    def stop(self) -> None:
        procs = list(self.instances.values()) + list(self.workers.values()) + ([self.nginx] if self.nginx else [])
        for proc in procs:
            if proc.alive():
                proc.popen.terminate()
        for proc in procs:
            try:
                proc.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(timeout=5)

    # Redis views -----------------------------------------------------------------------------
    def redis(self):
        import redis

        return redis.Redis.from_url(self.redis_url)

    def records(self) -> list[dict[str, Any]]:
        client = self.redis()
        ids = [i.decode() for i in client.zrange(f"{self.prefix}:cluster:instances", 0, -1)]
        raw = client.mget([f"{self.prefix}:cluster:instance:{i}" for i in ids]) if ids else []
        return [json.loads(value) for value in raw if value]

    def record(self, name: str) -> dict[str, Any] | None:
        return next((r for r in self.records() if r["id"] == self.instance_id(name)), None)

    def journal(self) -> list[dict[str, Any]]:
        return [json.loads(v) for v in self.redis().hgetall(f"{self.prefix}:cluster:journal").values()]

    def broadcast(self, *events: dict[str, Any]) -> None:
        """Send raw envelopes to every instance, as another (possibly misbehaving) instance would."""
        from channels_redis.core import RedisChannelLayer

        async def send():
            layer = RedisChannelLayer(hosts=[self.redis_url], prefix=f"{self.prefix}:asgi", capacity=1000)
            for event in events:
                await layer.group_send("kotaemon.cluster", {"type": "cluster.event", "event": event})
            await layer.close_pools()

        asyncio.run(send())

    def cleanup_redis(self) -> None:
        client = self.redis()
        keys = list(client.scan_iter(match=f"{self.prefix}*", count=1000))
        keys += [self.queue.encode()] + list(client.scan_iter(match=f"*{self.queue}*", count=1000))
        if keys:
            client.delete(*keys)

    # nginx -------------------------------------------------------------------------------------
    def start_nginx(self, names: list[str]) -> Proc:
        """deploy/nginx.conf with its upstream servers and listen port replaced; unprivileged, foreground."""
        source = (ROOT / "deploy" / "nginx.conf").read_text()
        servers = "".join(f"        server 127.0.0.1:{self.instances[n].port} max_fails=1 fail_timeout=5s;\n"
                          for n in names)
        config, count = re.subn(r"(upstream kotaemon_web \{\n(?:\s*#.*\n|\s*hash .*\n)*)(?:\s*server .*\n)+",
                                lambda m: m.group(1) + servers, source)
        assert count == 1, "deploy/nginx.conf: upstream kotaemon_web not found"
        port = free_port()
        config, count = re.subn(r"listen \d+;", f"listen 127.0.0.1:{port};", config)
        assert count == 1
        prefix = self.workdir / "nginx"
        prefix.mkdir(exist_ok=True)
        (prefix / "nginx.conf").write_text(config)
        popen, log = self._popen("nginx", [shutil.which("nginx"), "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                                           "-g", "daemon off;"], dict(os.environ))
        self.nginx = Proc("nginx", popen, log, port)
        from tests.helpers import wait_for_port

        wait_for_port(port, timeout=20, proc=popen)
        return self.nginx


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from a Prometheus text page (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --- the admin console, as an editor's browser uses it --------------------------------------------
class AdminSession:
    """Logs in through /admin/login/ and submits admin forms and actions like a browser (CSRF included)."""

    def __init__(self, base_url: str, username: str, password: str):
        self.http = httpx.Client(base_url=base_url, timeout=60, follow_redirects=False)
        self.http.get("/admin/login/")
        response = self.http.post("/admin/login/", data={
            "username": username, "password": password, "next": "/admin/",
            "csrfmiddlewaretoken": self.http.cookies["csrftoken"]})
        assert response.status_code == 302, f"admin login failed: {response.status_code}"

    def use(self, base_url: str) -> "AdminSession":
        """The same browser session against another instance (sessions live in the shared cache/database)."""
        self.http.base_url = base_url
        return self

    @staticmethod
    def form_fields(html: str) -> dict[str, list[str]]:
        from bs4 import BeautifulSoup

        soup = BeautifulSoup(html, "html.parser")
        form = soup.find("form", id=re.compile(r"_form$")) or soup.find("form", attrs={"method": re.compile("post", re.I)})
        fields: dict[str, list[str]] = {}
        for tag in form.find_all(["input", "select", "textarea"]):
            name = tag.get("name")
            if not name:
                continue
            kind = (tag.get("type") or "text").lower()
            if tag.name == "input":
                if kind in ("file", "submit", "button", "image", "reset"):
                    continue
                if kind in ("checkbox", "radio") and not tag.has_attr("checked"):
                    continue
                fields.setdefault(name, []).append(tag.get("value", "on" if kind == "checkbox" else ""))
            elif tag.name == "select":
                chosen = [o.get("value", o.text) for o in tag.find_all("option") if o.has_attr("selected")]
                fields.setdefault(name, []).extend(chosen)
            else:
                fields.setdefault(name, []).append(tag.text)
        return fields

    def change(self, path: str, *, files: dict | None = None, **overrides) -> httpx.Response:
        """Open a change form, keep every value it shows, override some, upload files, save."""
        page = self.http.get(path)
        assert page.status_code == 200, page.status_code
        fields = self.form_fields(page.text)
        for key, value in overrides.items():
            fields[key] = value if isinstance(value, list) else [value]
        fields["csrfmiddlewaretoken"] = [self.http.cookies["csrftoken"]]
        fields["_save"] = ["Save"]
        response = self.http.post(path, data=fields, files=files or {})
        assert response.status_code == 302, f"admin save failed ({response.status_code}):\n{response.text[-3000:]}"
        return response

    def action(self, changelist: str, action: str, ids: list[int]) -> httpx.Response:
        response = self.http.post(changelist, data={"action": action, "_selected_action": [str(i) for i in ids],
                                                    "csrfmiddlewaretoken": self.http.cookies["csrftoken"]})
        assert response.status_code == 302, f"admin action {action} failed ({response.status_code})"
        return response
