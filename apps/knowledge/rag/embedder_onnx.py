"""ONNX Runtime int8 encoders: exported from PyTorch offline, dynamically quantised, cached by model hash.

``torch.onnx.export`` (the TorchScript exporter: no network, no onnxscript) writes the float graph
of a pooled encoder (transformer + mean pooling + L2 normalisation, so a run returns sentence
vectors); ``onnxruntime.quantization.quantize_dynamic`` turns the weights of its MatMuls into int8
(per output channel) with activations quantised on the fly. The result is cached at
``cache_dir/<name>-<model hash>-<recipe>/model.onnx``: any process (web, worker) that finds it loads
it; the first one to need it exports it (about 10-40 s) under a temporary name and renames it into
place, so concurrent first uses never see a half-written file.
"""
from __future__ import annotations

import os
import secrets
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# Part of the cache key: a change of export or quantisation settings makes new files.
RECIPE = "int8-dyn-pc-v1"
_EXPORT_LOCK = threading.Lock()


def cached_model_path(cache_dir: str | os.PathLike[str], name: str, model_hash: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]
    return Path(cache_dir) / f"{safe}-{model_hash[:16]}-{RECIPE}" / "model.onnx"


def ensure_int8_model(target: Path, build_module: Callable[[], tuple[Any, tuple, list[str], dict]]) -> Path:
    """Return ``target``, exporting and quantising it first if it does not exist yet.

    ``build_module`` returns (torch module, example inputs, input names, dynamic axes); it is only
    called when an export is needed (it loads the float model).
    """
    if target.is_file():
        return target
    with _EXPORT_LOCK:
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        work = target.parent.with_name(f"{target.parent.name}.tmp-{secrets.token_hex(6)}")
        work.mkdir(parents=True)
        try:
            module, example, names, axes = build_module()
            float_path = work / "float.onnx"
            _export(module, example, names, axes, float_path)
            int8_path = work / "model.onnx"
            _quantise(float_path, int8_path)
            os.replace(int8_path, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def _export(module: Any, example: tuple, names: list[str], axes: dict, path: Path) -> None:
    import torch

    module.eval()
    with torch.no_grad():
        torch.onnx.export(module, example, str(path), input_names=names, output_names=["embedding"],
                          dynamic_axes={**axes, "embedding": {0: "batch"}}, opset_version=17, dynamo=False,
                          do_constant_folding=True)


def _quantise(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Only MatMuls (the weights); per-channel keeps each output row's own scale, which is what keeps
    # retrieval quality within noise. Gather (embeddings) stays float.
    import onnx

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Attention"],
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


class OrtEncoder:
    """One ONNX Runtime session; ``run`` is thread-safe (ORT sessions are)."""

    def __init__(self, path: str | os.PathLike[str], *, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(threads))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning threads that lose their core to another process cost more than they save on a
        # shared box (the same reason OMP_WAIT_POLICY=PASSIVE is the default for torch).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self._session.get_inputs()]

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        (out,) = self._session.run(["embedding"], {k: v for k, v in feed.items() if k in self.input_names})
        return np.ascontiguousarray(out, dtype=np.float32)


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import onnxruntime.quantization  # noqa: F401
    except ImportError:
        return False
    return True
