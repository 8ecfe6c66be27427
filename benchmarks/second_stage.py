"""Ranking variants over cached vectors: one chunking, vectors of two models, many ways to rank.

Chunks each set the way a fresh base does (structure-aware, sized in the primary model's tokens, context
+ text embedded), encodes them once per model (cached under --cache by text hash, so reruns cost
nothing), then scores ranking variants side by side with rag/evaluation.py's hit rule: each model's
dense ranking, BM25, RRF and z-score fusions of two or three rankings, document-score boosting, the
language-bias correction of rag/index.py at several strengths ("centre"), and with --window-tokens the
chunk's vector mixed with its best sentence window (small-to-big). "served ..." variants are what a base
serves: rag/fusion.py's `fuse` over the top-100 dense (corrected as rag/index.py does) and BM25 lists,
for each fusion setting a base can have; --correction S and --neighbour A add served z-score rows with
another language-bias correction strength or with neighbour smoothing. --misses [VARIANT] lists the
misses of a variant (default: rrf primary+bm25).

Usage: .venv/bin/python -W ignore benchmarks/second_stage.py --primary all-minilm-l6-v2 \
           --questions benchmarks/devsets/en.jsonl --documents var/devsets/en --cache var/vector-cache
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from apps.knowledge.rag.analyzer import get_analyzer  # noqa: E402
from apps.knowledge.rag.chunker import indexed_text  # noqa: E402
from apps.knowledge.rag.evaluation import first_hit_rank, hit_metrics, load_questions  # noqa: E402
from benchmarks.chunking_variants import _bm25, _scores  # noqa: E402
from benchmarks.dense_context_variants import chunked_folder, encoder_for, rrf  # noqa: E402

MODELS = ("all-minilm-l6-v2", "multilingual-e5-small")


def cached_vectors(encoder, key: str, texts: list[str], cache: Path, kind: str) -> np.ndarray:
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:20]
    path = cache / f"{key}-{kind}-{digest}.npy"
    if path.is_file():
        return np.load(path)
    vectors = encoder.encode_passages(texts) if kind == "p" else encoder.encode_queries(texts)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, np.asarray(vectors, dtype=np.float32))
    return np.asarray(vectors, dtype=np.float32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--primary", default="all-minilm-l6-v2")
    parser.add_argument("--questions", required=True)
    parser.add_argument("--documents", required=True)
    parser.add_argument("--cache", default="var/vector-cache")
    parser.add_argument("--chunk-tokens", type=int, default=200)
    parser.add_argument("--chunk-overlap", type=int, default=40)
    parser.add_argument("--misses", nargs="?", const="rrf primary+bm25", default=None, metavar="VARIANT",
                        help="list the misses of this variant (default: rrf primary+bm25)")
    parser.add_argument("--window-tokens", type=int, default=0, help="also score sentence windows of this size")
    parser.add_argument("--neighbour", type=float, action="append", default=[],
                        help="also serve dense scores smoothed with this share of a better neighbour's (repeatable)")
    parser.add_argument("--correction", type=float, action="append", default=[],
                        help="also serve z-score fusion with this language-bias correction (repeatable)")
    args = parser.parse_args()
    cache = Path(args.cache)
    encoders = {key: encoder_for(key) for key in MODELS}
    tokenize = get_analyzer().tokenize
    questions = load_questions(args.questions)
    rows = [(source, title, chunk.text, indexed_text(chunk.text, chunk.context), chunk.context)
            for source, title, chunk in chunked_folder(args.documents, encoders[args.primary].count_tokens,
                                                       args.chunk_tokens, args.chunk_overlap)]
    print(f"## {args.questions}: {len(questions)} questions, {len(rows)} chunks, primary {args.primary}")
    texts = [r[3] for r in rows]
    qtexts = [q.question for q in questions]
    dense_scores = {}
    for key, encoder in encoders.items():
        p = cached_vectors(encoder, key, texts, cache, "p")
        q = cached_vectors(encoder, key, qtexts, cache, "q")
        dense_scores[key] = q @ p.T
    bm25 = _bm25(texts, tokenize)
    bm25_scores = np.stack([_scores(bm25, question, tokenize) for question in qtexts])
    doc_of = np.array([hash(r[0]) for r in rows])

    def ranking(scores: np.ndarray, positive_only: bool = False) -> list[list[int]]:
        out = []
        for row in scores:
            order = np.argsort(-row, kind="stable")[:100]
            out.append([int(i) for i in order if not positive_only or row[i] > 0])
        return out

    def zscore(scores: np.ndarray) -> np.ndarray:
        mu = scores.mean(axis=1, keepdims=True)
        sd = scores.std(axis=1, keepdims=True) + 1e-9
        return (scores - mu) / sd

    def doc_boost(scores: np.ndarray, beta: float) -> np.ndarray:
        out = scores.copy()
        for qi, row in enumerate(scores):
            best: dict[int, float] = defaultdict(lambda: -1e9)
            for i, s in enumerate(row):
                best[doc_of[i]] = max(best[doc_of[i]], s)
            out[qi] = row + beta * np.array([best[d] for d in doc_of])
        return out

    windows, owner = [], []
    if args.window_tokens:
        from apps.knowledge.rag.chunker import _SENTENCE_GAP

        count = encoders[args.primary].count_tokens
        for ci, r in enumerate(rows):
            sentences = [s for line in r[2].split("\n") for s in _SENTENCE_GAP.split(line) if s and s.strip()]
            current = ""
            for sentence in sentences:
                if current and count(current + " " + sentence) > args.window_tokens:
                    windows.append(indexed_text(current, r[4])); owner.append(ci)
                    current = sentence
                else:
                    current = f"{current} {sentence}".strip()
            if current:
                windows.append(indexed_text(current, r[4])); owner.append(ci)
        owner = np.array(owner)
        print(f"{len(windows)} windows")
        enc = encoders[args.primary]
        wp = cached_vectors(enc, args.primary, windows, cache, "p")
        wq = cached_vectors(enc, args.primary, qtexts, cache, "q")
        ws = wq @ wp.T
        win_max = np.full((len(qtexts), len(rows)), -1.0, dtype=np.float32)
        for wi, ci in enumerate(owner):
            win_max[:, ci] = np.maximum(win_max[:, ci], ws[:, wi])
    A, B = dense_scores[MODELS[0]], dense_scores[MODELS[1]]
    prim = dense_scores[args.primary]
    r_bm25 = ranking(bm25_scores, positive_only=True)
    r_prim = ranking(prim)
    r_a, r_b = ranking(A), ranking(B)
    variants: dict[str, list[list[int]]] = {
        "dense primary": r_prim,
        "dense minilm": r_a,
        "dense e5": r_b,
        "bm25": r_bm25,
        "rrf primary+bm25": [rrf(d, b) for d, b in zip(r_prim, r_bm25)],
        "rrf k=20 primary+bm25": [rrf(d, b, k=20) for d, b in zip(r_prim, r_bm25)],
        "rrf minilm+e5": [rrf(a, b) for a, b in zip(r_a, r_b)],
        "rrf minilm+e5+bm25": [rrf(a, b, c) for a, b, c in zip(r_a, r_b, r_bm25)],
        "rrf k=20 minilm+e5+bm25": [rrf(a, b, c, k=20) for a, b, c in zip(r_a, r_b, r_bm25)],
    }
    zb = zscore(bm25_scores)
    for w in (0.5, 0.6, 0.7, 0.8):
        variants[f"z primary {w}"] = ranking(w * zscore(prim) + (1 - w) * zb)
    for w in (0.5, 0.6, 0.7):
        variants[f"z (minilm+e5)/2 {w}"] = ranking(w * zscore((A + B) / 2) + (1 - w) * zb)
        variants[f"z minilm,e5 {w}"] = ranking(w / 2 * zscore(A) + w / 2 * zscore(B) + (1 - w) * zb)
    for beta in (0.2, 0.5):
        variants[f"z primary 0.7 docboost {beta}"] = ranking(doc_boost(0.7 * zscore(prim) + 0.3 * zb, beta))
    if args.window_tokens:
        prim = dense_scores[args.primary]
        for a in (0.0, 0.3, 0.5, 0.7):
            mix = a * prim + (1 - a) * win_max
            r_mix = ranking(mix)
            variants[f"dense win mix {a}"] = r_mix
            variants[f"rrf win mix {a}+bm25"] = [rrf(d, b) for d, b in zip(r_mix, r_bm25)]
            variants[f"z win mix {a} 0.7"] = ranking(0.7 * zscore(mix) + 0.3 * zb)
    from apps.knowledge.rag.language import script_group

    group = np.array([script_group(r[3]) == 1 for r in rows])  # of the indexed text, as rag/index.py does

    def centred(scores: np.ndarray, lam: float, top: int = 0) -> np.ndarray:
        out = scores.copy()
        for g in (True, False):
            cols = group == g
            if cols.any():
                sub = scores[:, cols]
                if top:
                    ref = -np.sort(-sub, axis=1)[:, :top].mean(axis=1, keepdims=True)
                else:
                    ref = sub.mean(axis=1, keepdims=True)
                out[:, cols] = scores[:, cols] - lam * ref
        return out

    for lam in (0.5, 1.0):
        for top in (0, 10):
            c = centred(prim, lam, top)
            rc = ranking(c)
            variants[f"centre {lam} top{top} dense"] = rc
            variants[f"centre {lam} top{top} rrf+bm25"] = [rrf(d, b) for d, b in zip(rc, r_bm25)]
    # The platform's own fusion (rag/fusion.py `fuse`) over the top-100 lists a base searches, the dense
    # list with the language-bias correction where the platform applies it (>= 50 chunks of each script).
    from apps.knowledge.rag.fusion import fuse
    from apps.knowledge.rag.index import LANGUAGE_BIAS_CORRECTION, LANGUAGE_GROUP_MIN_CHUNKS

    bilingual = min(int(group.sum()), int((~group).sum())) >= LANGUAGE_GROUP_MIN_CHUNKS

    def top_list(row: np.ndarray, positive_only: bool = False) -> list[tuple[int, float]]:
        order = np.argsort(-row, kind="stable")[:100]
        return [(int(i), float(row[i])) for i in order if not positive_only or row[i] > 0]

    bm25_lists = [top_list(b, positive_only=True) for b in bm25_scores]
    served = centred(prim, LANGUAGE_BIAS_CORRECTION) if bilingual else prim
    lists = [(top_list(d), b) for d, b in zip(served, bm25_lists)]
    settings = [("rrf", 60, 0.5), ("rrf", 20, 0.5)] + [("zscore", 60, w) for w in (0.5, 0.6, 0.7, 0.8)] + \
        [("weighted", 60, w) for w in (0.3, 0.4, 0.5, 0.6, 0.7)]
    for kind, k, w in settings:
        label = f"served {kind} k={k}" if kind == "rrf" else f"served {kind} {w}"
        variants[label] = [[i for i, _ in fuse(kind, d, b, rrf_k=k, dense_weight=w)] for d, b in lists]
    # Neighbour smoothing: a chunk also gets part of the better score of the chunks beside it in its document.
    same_prev = np.array([i > 0 and rows[i - 1][0] == rows[i][0] for i in range(len(rows))])
    same_next = np.array([i + 1 < len(rows) and rows[i + 1][0] == rows[i][0] for i in range(len(rows))])
    for alpha in args.neighbour:
        prev = np.where(same_prev, np.roll(served, 1, axis=1), -1.0)
        nxt = np.where(same_next, np.roll(served, -1, axis=1), -1.0)
        smoothed = served + alpha * np.maximum(np.maximum(prev, nxt) - served, 0.0)
        lists_n = [(top_list(d), b) for d, b in zip(smoothed, bm25_lists)]
        for w in (0.5, 0.6):
            variants[f"served zscore {w} neighbour {alpha}"] = [
                [i for i, _ in fuse("zscore", d, b, dense_weight=w)] for d, b in lists_n]
    for strength in (args.correction if bilingual else []):
        corrected = [(top_list(d), b) for d, b in zip(centred(prim, strength), bm25_lists)]
        for w in (0.5, 0.6):
            variants[f"served zscore {w} correction {strength}"] = [
                [i for i, _ in fuse("zscore", d, b, dense_weight=w)] for d, b in corrected]
    for name, ranked in variants.items():
        ranks = [first_hit_rank(q, [(rows[i][0], rows[i][1], rows[i][2]) for i in r[:10]])
                 for q, r in zip(questions, ranked)]
        m = hit_metrics(ranks)
        subsets = defaultdict(list)
        for q, rank in zip(questions, ranks):
            for tag in q.tags:
                subsets[tag].append(rank)
        sub = "  ".join(f"{t} {hit_metrics(v)['hit@3']:.2f}" for t, v in sorted(subsets.items()))
        cross = [rk for q, rk in zip(questions, ranks) if "cross-lingual" in q.tags]
        same = [rk for q, rk in zip(questions, ranks) if "cross-lingual" not in q.tags]
        sub = f"same {hit_metrics(same)['hit@3']:.3f} cross {hit_metrics(cross)['hit@3']:.3f} " + sub
        print(f"{name:28s} hit@3 {m['hit@3']:.3f}  hit@10 {m['hit@10']:.3f}  MRR@10 {m['mrr@10']:.3f}"
              f"  doc@3 {m['doc_hit@3']:.3f} | {sub}")
        if args.misses == name:
            for q, rank, r in zip(questions, ranks, ranked):
                if rank[0] is None or rank[0] > 3:
                    top = [f"{rows[i][0].split('/')[-1]}:{rows[i][2][:50]!r}" for i in r[:3]]
                    print(f"  MISS {q.id} rank={rank} {q.question!r}\n     want {q.document}: {q.passage[:80]!r}\n     got {top}")


if __name__ == "__main__":
    main()
