"""Ingest throughput: parse + chunk + embed of real files vs raw model.encode of the same chunks.

A document set is built from SciFact abstracts in five formats (PDF via reportlab, DOCX via
python-docx, HTML, Markdown, plain text); each document holds several abstracts as titled sections.
The pipeline handles one document at a time, as the indexing worker does (parse, chunk with the
model tokenizer, one encode call per document). The baseline encodes exactly the same chunk texts
with the raw SentenceTransformer in one call. Both run in the same process with the same threads.

    .venv/bin/python benchmarks/rag_ingest_throughput.py --docs 40 --threads 2
"""
from __future__ import annotations

import argparse
import html
import io
import os
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from apps.knowledge.rag.chunker import chunk_document  # noqa: E402
from apps.knowledge.rag.embedder import configure_threads, get_embedder  # noqa: E402
from apps.knowledge.rag.evaluation import load_beir  # noqa: E402
from apps.knowledge.rag.parsers import parse  # noqa: E402

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "scifact"
FORMATS = ("pdf", "docx", "html", "md", "txt")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--docs", type=int, default=40, help="documents in the set (formats round-robin)")
    parser.add_argument("--sections", type=int, default=6, help="abstracts per document")
    parser.add_argument("--threads", type=int, default=2, help="torch/FAISS/BLAS threads (workers use 2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk-tokens", type=int, default=200)
    parser.add_argument("--overlap-tokens", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def make_pdf(sections: list[tuple[str, str]]) -> bytes:
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    buffer = io.BytesIO()
    pdf = canvas.Canvas(buffer, pagesize=A4)
    y = 800
    for title, body in sections:
        lines = [title, ""] + textwrap.wrap(body, 95) + [""]
        for line in lines:
            if y < 60:
                pdf.showPage()
                y = 800
            pdf.drawString(50, y, line)
            y -= 13
    pdf.save()
    return buffer.getvalue()


def make_docx(sections: list[tuple[str, str]]) -> bytes:
    import docx

    document = docx.Document()
    for title, body in sections:
        document.add_heading(title, level=1)
        document.add_paragraph(body)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def make_html(sections: list[tuple[str, str]]) -> bytes:
    parts = "".join(f"<h2>{html.escape(t)}</h2><p>{html.escape(b)}</p>" for t, b in sections)
    return f"<!doctype html><html><head><title>Set</title></head><body><nav>menu</nav><main>{parts}</main></body></html>".encode()


def make_markdown(sections: list[tuple[str, str]]) -> bytes:
    return "\n\n".join(f"## {t}\n\n{textwrap.fill(b, 100)}" for t, b in sections).encode()


def make_text(sections: list[tuple[str, str]]) -> bytes:
    return "\n\n".join(f"{t}\n\n{b}" for t, b in sections).encode()


BUILDERS = {"pdf": make_pdf, "docx": make_docx, "html": make_html, "md": make_markdown, "txt": make_text}


def build_documents(args) -> list[tuple[str, bytes]]:
    corpus, _, _ = load_beir(args.dataset, "test")
    rng = np.random.default_rng(args.seed)
    docs = [d for d in corpus.values() if d["title"] and len(d["text"]) > 400]
    documents = []
    for number in range(args.docs):
        picks = rng.choice(len(docs), size=args.sections, replace=False)
        sections = [(docs[i]["title"], docs[i]["text"]) for i in picks]
        fmt = FORMATS[number % len(FORMATS)]
        documents.append((f"doc{number}.{fmt}", BUILDERS[fmt](sections)))
    return documents


def run_pipeline(documents, embedder, args) -> dict:
    parse_s = chunk_s = encode_s = 0.0
    texts: list[str] = []
    tokens = 0
    for filename, data in documents:
        t0 = time.perf_counter()
        doc = parse(data, filename=filename)
        t1 = time.perf_counter()
        chunks = chunk_document(
            doc, count_tokens=embedder.count_tokens, chunk_tokens=args.chunk_tokens, overlap_tokens=args.overlap_tokens
        )
        t2 = time.perf_counter()
        embedder.encode([c.text for c in chunks])
        t3 = time.perf_counter()
        parse_s, chunk_s, encode_s = parse_s + t1 - t0, chunk_s + t2 - t1, encode_s + t3 - t2
        texts.extend(c.text for c in chunks)
        tokens += sum(c.token_count for c in chunks)
    return {"texts": texts, "tokens": tokens, "parse": parse_s, "chunk": chunk_s, "encode": encode_s,
            "total": parse_s + chunk_s + encode_s}


def run_raw(texts: list[str], model, batch_size: int) -> float:
    started = time.perf_counter()
    model.encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)
    return time.perf_counter() - started


def main() -> None:
    args = parse_args()
    threads = configure_threads(args.threads)
    documents = build_documents(args)
    embedder = get_embedder(batch_size=args.batch_size)
    embedder.batch_size = args.batch_size
    embedder.warm_up()
    raw_model = embedder.model

    first = run_pipeline(documents, embedder, args)
    raw_s = run_raw(first["texts"], raw_model, args.batch_size)
    second = run_pipeline(documents, embedder, args)
    raw_s = min(raw_s, run_raw(first["texts"], raw_model, args.batch_size))
    pipeline = min((first, second), key=lambda r: r["total"])

    n_chunks = len(pipeline["texts"])
    size_mb = sum(len(d) for _, d in documents) / 1e6
    ratio = raw_s / pipeline["total"]
    print(f"\nIngest throughput: {len(documents)} documents ({', '.join(FORMATS)}; {size_mb:.1f} MB), "
          f"{n_chunks} chunks, {pipeline['tokens']:,} tokens; chunk_tokens={args.chunk_tokens}, "
          f"overlap={args.overlap_tokens}; batch {args.batch_size}; {threads} thread(s); {os.cpu_count()} CPUs; "
          "best of 2 runs each\n")
    print("| run | parse s | chunk s | encode s | total s | chunks/s | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| pipeline (parse + chunk + embed, per document) | {pipeline['parse']:.2f} | {pipeline['chunk']:.2f} | "
          f"{pipeline['encode']:.2f} | {pipeline['total']:.2f} | {n_chunks / pipeline['total']:.1f} | "
          f"{pipeline['tokens'] / pipeline['total']:.0f} |")
    print(f"| raw model.encode of the same chunk texts (one call) | – | – | {raw_s:.2f} | {raw_s:.2f} | "
          f"{n_chunks / raw_s:.1f} | {pipeline['tokens'] / raw_s:.0f} |")
    print(f"\npipeline throughput = {ratio:.1%} of raw encoding (target >= 85%)")


if __name__ == "__main__":
    main()
