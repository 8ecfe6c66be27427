"""The retrieval development sets run end to end: Debian packages fetched with apt-get download, unpacked,
ingested, every question scored. A benchmark (the figures are in docs/benchmarks.md), so this only checks
that it runs and produces metrics; it needs apt-get and a reachable Debian mirror and skips without them."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from apps.knowledge.rag.evaluation import load_questions

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DEVSETS = ROOT / "benchmarks" / "devsets"


def test_question_files_name_documents_of_their_set():
    sources = json.loads((DEVSETS / "sources.json").read_text(encoding="utf-8"))
    for name, spec in sources["sets"].items():
        documents = {item["as"] for package in spec["packages"] for item in package["files"]}
        questions = load_questions(DEVSETS / f"{name}.jsonl")
        assert len(questions) >= 60
        assert {q.document for q in questions} <= documents


@pytest.mark.skipif(shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None, reason="needs apt-get")
def test_the_english_set_fetches_ingests_and_scores(tmp_path):
    # The embedded default in a scratch data directory. CI's DATABASE_URL/REDIS_URL must not leak in: with
    # them the command ran on CI's shared, persistent `test` database and sent its ingestion tasks to a
    # Redis broker no worker reads, so every document "failed" (timed out) whenever a base of that name
    # was left over from an earlier run.
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL")}
    env.update(KOTAEMON_DEMO="1", KOTAEMON_DATA_DIR=str(tmp_path / "data"))
    fetch = subprocess.run([sys.executable, str(DEVSETS / "fetch.py"), "--set", "en", "--cache", str(tmp_path / "dev")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if fetch.returncode != 0 and "apt-get download" in fetch.stdout + fetch.stderr:
        pytest.skip(f"no Debian mirror: {fetch.stderr[-300:]}")
    assert fetch.returncode == 0, fetch.stderr
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True, timeout=300)
    result = subprocess.run([sys.executable, "manage.py", "evaluate", "--questions", str(DEVSETS / "en.jsonl"),
                             "--documents", str(tmp_path / "dev" / "en"), "--mode", "bm25", "--mode", "hybrid",
                             "--json", "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["corpus"]["failed"] == 0 and report["missing_documents"] == [], report["corpus"]["failures"][:3]
    for mode in report["results"]:
        assert mode["metrics"]["queries"] == 89
        assert 0.0 <= mode["metrics"]["hit@3"] <= mode["metrics"]["hit@10"] <= 1.0
