"""Retrieval quality on the development sets (real Debian documentation, colloquial questions).

    .venv/bin/python benchmarks/retrieval_devsets.py [--set en --set zh] [--mode hybrid ...] [--out FILE] [--no-update]

1. `benchmarks/devsets/fetch.py` downloads the packages named in `benchmarks/devsets/sources.json` with
   `apt-get download` (after `apt-get update`), unpacks them with `dpkg-deb -x` under var/devsets/ and
   builds one documents folder per set (never installs anything).
2. `manage.py evaluate --questions benchmarks/devsets/<set>.jsonl --documents var/devsets/<set> --json`
   ingests the folder into the scratch knowledge base `eval-devset-<set>` (later runs reuse the stored
   embeddings) and scores every mode: hit@1/3/5/10, MRR@10, doc hit@3, overall and per subset
   (`lang:*`, `tag:cross-lingual`, `tag:html-reference`, ...).

Prints one table per set; `--out` writes the full JSON reports (per-question ranks included).
Runs on the embedded default (`KOTAEMON_DEMO=1`) unless the environment says otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEVSETS = ROOT / "benchmarks" / "devsets"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", dest="sets", help="en, en2, zh, zh2 (default: every set)")
    parser.add_argument("--mode", action="append", help="Repeatable; default: every mode of `evaluate`")
    parser.add_argument("--cache", default=str(ROOT / "var" / "devsets"))
    parser.add_argument("--out", help="Write the JSON reports here")
    parser.add_argument("--no-update", action="store_true", help="Skip apt-get update")
    args = parser.parse_args(argv)
    sets = args.sets or list(json.loads((DEVSETS / "sources.json").read_text(encoding="utf-8"))["sets"])
    env = {**os.environ}
    env.setdefault("KOTAEMON_DEMO", "1")
    python = sys.executable
    fetch = [python, str(DEVSETS / "fetch.py"), "--cache", args.cache] + sum((["--set", s] for s in sets), [])
    subprocess.run(fetch + (["--no-update"] if args.no_update else []), check=True, cwd=ROOT, env=env)
    reports = {}
    for name in sets:
        cmd = [python, "manage.py", "evaluate", "--questions", str(DEVSETS / f"{name}.jsonl"),
               "--documents", str(Path(args.cache) / name), "--kb", f"eval-devset-{name}", "--json"]
        cmd += sum((["--mode", m] for m in args.mode or []), [])
        result = subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        report = json.loads(result.stdout)
        reports[name] = report
        print(_summary(name, report))
    if args.out:
        Path(args.out).write_text(json.dumps(reports, ensure_ascii=False, indent=1), encoding="utf-8")
    return 0


def _summary(name: str, report: dict) -> str:
    corpus = report.get("corpus") or {}
    lines = [f"## set {name}: {len(report['results'][0]['questions'])} questions, {corpus.get('documents')} documents, "
             f"{corpus.get('chunks')} chunks, ingest {corpus.get('seconds')} s ({corpus.get('encoded')} encoded)"]
    lines.append("| mode | subset | n | hit@1 | hit@3 | hit@5 | hit@10 | MRR@10 | doc hit@3 | ms/query |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for result in report["results"]:
        rows = [("all", result["metrics"])] + sorted(result["subsets"].items())
        for subset, m in rows:
            ms = f"{result['ms_per_query']:.1f}" if subset == "all" else ""
            lines.append(f"| {result['mode']} | {subset} | {int(m['queries'])} | {m['hit@1']:.3f} | {m['hit@3']:.3f} | "
                         f"{m['hit@5']:.3f} | {m['hit@10']:.3f} | {m['mrr@10']:.3f} | {m['doc_hit@3']:.3f} | {ms} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
