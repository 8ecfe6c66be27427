"""Helpers for tests that run real processes (servers, workers)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {port} after {timeout}s")


def clear_cache() -> None:
    """Empty this run's cache. On Redis only this run's keys go (its prefix): a FLUSHDB would also wipe
    servers, workers and other test runs sharing the database."""
    from django.core.cache import cache

    if hasattr(cache, "delete_pattern"):
        cache.delete_pattern("*")
    else:
        cache.clear()


def server_env(**extra: str) -> dict[str, str]:
    """Environment for a subprocess serving the same database the test sees."""
    from django.conf import settings

    db = settings.DATABASES["default"]
    env = dict(os.environ)
    env.pop("KOTAEMON_TESTING", None)
    if db["ENGINE"].endswith("postgresql"):
        env["DATABASE_URL"] = f"postgres://{db.get('USER') or 'postgres'}@{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/{db['NAME']}"
    else:
        env["DATABASE_URL"] = f"sqlite:///{db['NAME']}"
    env.update({"KOTAEMON_TESTING": "1", "SECRET_KEY": "test-" + "x" * 60, "ALLOWED_HOSTS": "127.0.0.1,localhost",
                "SECURE_SSL_REDIRECT": "0", "PYTHONUNBUFFERED": "1", "CACHE_KEY_PREFIX": settings.CACHE_KEY_PREFIX,
                "INDEX_ROOT": str(settings.INDEX_ROOT), "MEDIA_ROOT": str(settings.MEDIA_ROOT)})
    env.update(extra)
    return env


@contextmanager
def asgi_server(env: dict[str, str] | None = None, port: int | None = None):
    """A real uvicorn process serving kotaemon_site.asgi on 127.0.0.1:port."""
    port = port or free_port()
    # Output goes to a file, not a pipe nobody reads (a full pipe would block the server).
    log = tempfile.NamedTemporaryFile(prefix=f"asgi-{port}-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [str(VENV_BIN / "uvicorn"), "kotaemon_site.asgi:application", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning"],
        cwd=ROOT, env=env or server_env(), stdout=log, stderr=subprocess.STDOUT,
    )
    proc.log_path = Path(log.name)
    try:
        try:
            wait_for_port(port, timeout=60, proc=proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}; server output:\n{Path(log.name).read_text(errors='replace')[-4000:]}") from exc
        yield f"127.0.0.1:{port}", proc
    finally:
        stop_process(proc)
        log.close()
        os.unlink(log.name)


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
