"""Fetch the documents of the retrieval development sets from Debian packages.

    .venv/bin/python benchmarks/devsets/fetch.py [--set en --set zh] [--cache var/devsets] [--no-update]

Every document of a set comes from a Debian documentation package named with its version in
``sources.json``. The packages are fetched with ``apt-get download`` (after ``apt-get update``), unpacked
with ``dpkg-deb -x`` into ``<cache>/pkgs/<package>_<version>/`` and never installed. The files of a set
are then copied (or, for manual pages, converted from troff to Markdown in pure Python, so the text does
not depend on groff's line breaking or hyphenation) into ``<cache>/<set>/`` under the names the question
files use, ready for ``manage.py evaluate --questions <set>.jsonl --documents <cache>/<set>``.

If the exact version is no longer on the mirror (Debian replaces security updates), the current candidate
is fetched instead and a warning is printed: the questions may then refer to slightly changed text.
Running it again with everything cached does nothing but check.
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "sources.json"


def load_sources() -> dict:
    return json.loads(SOURCES.read_text(encoding="utf-8"))


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, **kwargs)


def apt_update() -> None:
    result = _run(["apt-get", "update"])
    if result.returncode != 0:
        print(f"warning: apt-get update failed ({result.stderr.strip()[-300:]}); using the package lists as they are",
              file=sys.stderr)


def package_unpacked(cache: Path, package: str, version: str) -> Path:
    """The unpacked tree of package=version (fetched and unpacked once)."""
    target = cache / "pkgs" / f"{package}_{_safe(version)}"
    if (target / ".complete").is_file():
        return target
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    before = set(debs.glob(f"{package}_*.deb"))
    result = _run(["apt-get", "download", f"{package}={version}"], cwd=debs)
    if result.returncode != 0:
        print(f"warning: {package}={version} is not available ({result.stderr.strip()[-200:]}); "
              f"fetching the current candidate instead", file=sys.stderr)
        result = _run(["apt-get", "download", package], cwd=debs)
        if result.returncode != 0:
            raise SystemExit(f"apt-get download {package} failed: {result.stderr.strip()}")
    candidates = sorted(set(debs.glob(f"{package}_*.deb")) - before) or sorted(debs.glob(f"{package}_*.deb"))
    deb = next((d for d in candidates if f"_{_safe(version)}_" in d.name.replace("%3a", ":")), candidates[-1])
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    result = _run(["dpkg-deb", "-x", str(deb), str(target)])
    if result.returncode != 0:
        raise SystemExit(f"dpkg-deb -x {deb} failed: {result.stderr.strip()}")
    (target / ".complete").write_text(deb.name + "\n")
    return target


def _safe(version: str) -> str:
    return version.replace(":", "%3a")


def build_set(name: str, cache: Path, spec: dict) -> Path:
    out = cache / name
    out.mkdir(parents=True, exist_ok=True)
    wanted = set()
    for source in spec["packages"]:
        root = package_unpacked(cache, source["package"], source["version"])
        for item in source["files"]:
            src = root / item["path"]
            dest = out / item["as"]
            wanted.add(dest)
            if not src.exists():
                raise SystemExit(f"{source['package']}: no {item['path']} in the package")
            dest.parent.mkdir(parents=True, exist_ok=True)
            data = gzip.decompress(src.read_bytes()) if src.suffix == ".gz" else src.read_bytes()
            if item.get("convert") == "troff-markdown":
                data = troff_to_markdown(data.decode("utf-8", errors="replace")).encode("utf-8")
            if not dest.exists() or dest.read_bytes() != data:
                dest.write_bytes(data)
    for stale in [p for p in out.rglob("*") if p.is_file() and p not in wanted]:
        stale.unlink()  # a file dropped from sources.json must not stay in the set
    return out


# ------------------------------------------------------------------------------------------
# troff (man macros) -> Markdown
# ------------------------------------------------------------------------------------------

_NAMED = {"aq": "'", "dq": '"', "em": "—", "en": "–", "bu": "•", "co": "©", "rg": "®", "lq": "“", "rq": "”",
          "oq": "‘", "cq": "’", "rs": "\\", "ti": "~", "ha": "^", "mi": "-", "pl": "+", "mu": "×", "de": "°",
          "<=": "≤", ">=": "≥", "->": "→", "<-": "←", "ba": "|", "or": "|", "lh": "☜", "rh": "☞", "hy": "-"}
_STRINGS = {"lq": "“", "rq": "”", "R": "®", "Tm": "™"}
_FONT_MACROS = {"B", "I", "BR", "RB", "BI", "IB", "IR", "RI", "SM", "SB"}


def _unescape(text: str) -> str:
    text = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", text)          # font changes
    text = re.sub(r"\\\*(\[([^\]]*)\]|\((..)|(.))",
                  lambda m: _STRINGS.get(m.group(2) or m.group(3) or m.group(4), ""), text)
    text = re.sub(r"\\\[([^\]]*)\]", lambda m: _NAMED.get(m.group(1), ""), text)
    text = re.sub(r"\\\((..)", lambda m: _NAMED.get(m.group(1), ""), text)
    text = re.sub(r"\\s[+-]?\d", "", text)                        # size changes
    text = re.sub(r"\\[kmnz]\(?.?.?", "", text) if "\\n" in text or "\\k" in text else text
    text = text.replace("\\-", "-").replace("\\~", " ").replace("\\ ", " ").replace("\\0", " ")
    text = text.replace("\\&", "").replace("\\|", "").replace("\\^", "").replace("\\c", "").replace("\\:", "")
    text = text.replace("\\e", "\\").replace("\\\\", "\\").replace("\\%", "").replace("\\/", "").replace("\\,", "")
    return text


def _macro_args(rest: str) -> list[str]:
    args, current, quoted = [], "", False
    i = 0
    while i < len(rest):
        ch = rest[i]
        if ch == '"':
            if quoted and i + 1 < len(rest) and rest[i + 1] == '"':
                current += '"'
                i += 2
                continue
            quoted = not quoted
        elif ch in " \t" and not quoted:
            if current:
                args.append(current)
                current = ""
        else:
            current += ch
        i += 1
    if current:
        args.append(current)
    return args


def troff_to_markdown(source: str) -> str:
    """A man(7) page as Markdown: headings from .TH/.SH/.SS, paragraphs, tagged paragraphs, code blocks.

    Covers the macros Linux man-pages and Debian's pages use; unknown requests are dropped, their text kept.
    """
    out: list[str] = []
    para: list[str] = []
    code = False
    table = False

    def flush() -> None:
        if para:
            out.append(" ".join(part.strip() for part in para if part.strip()))
            out.append("")
            para.clear()

    lines = source.replace("\r\n", "\n").split("\n")
    pending_tag = False
    for raw in lines:
        if raw.startswith(('.\\"', "'\\\"", '\\"')) or raw.strip() in (".", "'"):
            continue
        if table:
            if raw.startswith(".TE"):
                table = False
                flush()
            elif not re.fullmatch(r"[^\t]*[.;]\s*", raw) or "\t" in raw:
                cells = [_unescape(cell).strip() for cell in raw.split("\t")]
                if any(cells) and not raw.startswith("."):
                    out.append(" | ".join(cells))
            continue
        if raw.startswith((".", "'")) and len(raw) > 1:
            match = re.match(r"[.'](\S+)\s*(.*)", raw)
            if not match:
                continue
            macro, rest = match.group(1), match.group(2)
            args = [_unescape(a) for a in _macro_args(rest)]
            if macro == "TH":
                flush()
                title = args[0] if args else "manual"
                section = args[1] if len(args) > 1 else ""
                out.append(f"# {title}({section})" if section else f"# {title}")
                out.append("")
            elif macro in ("SH", "SS"):
                flush()
                if code:
                    out.append("```")
                    out.append("")
                    code = False
                heading = " ".join(args).strip()
                if heading:
                    out.append(("## " if macro == "SH" else "### ") + heading.capitalize()
                               if heading.isupper() else ("## " if macro == "SH" else "### ") + heading)
                    out.append("")
                else:
                    pending_tag = True  # heading text on the next line
            elif macro in ("PP", "P", "LP", "sp", "br", "HP"):
                if code:
                    para.append("")
                else:
                    flush()
            elif macro == "TP":
                flush()
                pending_tag = True
            elif macro == "IP":
                flush()
                if args and args[0] not in ("", "\\(bu", "•"):
                    para.append(args[0])
                    flush()
            elif macro in ("nf", "EX"):
                flush()
                if not code:
                    out.append("```")
                    code = True
            elif macro in ("fi", "EE"):
                if code:
                    out.append("```")
                    out.append("")
                    code = False
            elif macro == "TS":
                flush()
                table = True
            elif macro in _FONT_MACROS:
                joiner = "" if macro not in ("B", "I", "SM", "SB") else " "
                text = joiner.join(args)
                if pending_tag:
                    para.append(text)
                    flush()
                    pending_tag = False
                elif code:
                    out.append(text)
                else:
                    para.append(text)
            elif macro in ("UR", "MT"):
                if args:
                    para.append(args[0])
            elif macro in ("UE", "ME"):
                if args:
                    para.append(args[0])
            # other requests (.RS, .RE, .in, .ad, .na, .ne, .ft, .UC, .PD, .ll, .so, ...) carry no text
            continue
        text = _unescape(raw)
        if code:
            out.append(text)
        elif pending_tag:
            para.append(text)
            flush()
            pending_tag = False
        else:
            para.append(text)
    flush()
    if code:
        out.append("```")
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", dest="sets", help="Repeatable; default: every set")
    parser.add_argument("--cache", default="var/devsets", help="Cache folder (default: var/devsets)")
    parser.add_argument("--no-update", action="store_true", help="Skip apt-get update")
    args = parser.parse_args(argv)
    sources = load_sources()
    names = args.sets or list(sources["sets"])
    cache = Path(args.cache).resolve()
    if not args.no_update:
        apt_update()
    for name in names:
        if name not in sources["sets"]:
            raise SystemExit(f"no set {name!r} in {SOURCES}")
        out = build_set(name, cache, sources["sets"][name])
        count = sum(1 for p in out.rglob("*") if p.is_file())
        print(f"{name}: {count} documents in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
