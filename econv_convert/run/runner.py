"""The dense model as each block process runs it: loaded once per process and file, with
prediction's own inference rewrites (:mod:`econv_convert.run.fuse`), as ``f(x) -> y`` on numpy
arrays.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from econv_convert.errors import InvalidInputError


@dataclass(frozen=True)
class ModelSpec:
    """A dense model file (``.pt`` from ``save_dense`` or a dense ``.onnx``) and how to run it."""

    path: str
    device: str = "cpu"
    threads: int = 0  # torch / onnxruntime threads per worker; 0: the cores shared out


_MODELS: dict[tuple[str, str], Any] = {}


def runner(spec: ModelSpec) -> Callable[[np.ndarray], np.ndarray]:
    """``f(x) -> y`` for ``(1, C, h, w)`` float32 arrays; loaded once per process and file
    (the first load's thread count stays: the output-size probe and the blocks run in this
    process share one model)."""
    key = (spec.path, spec.device)
    if key not in _MODELS:
        _MODELS[key] = _load_runner(spec)
    return _MODELS[key]


def _load_runner(spec: ModelSpec):
    if spec.path.lower().endswith(".onnx"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = spec.threads
        options.inter_op_num_threads = 1
        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"]
                     if spec.device.startswith("cuda") else ["CPUExecutionProvider"])
        session = ort.InferenceSession(spec.path, options, providers=providers)
        name = session.get_inputs()[0].name
        from econv_convert.onnx.model import run

        return lambda x: run(session, None, {name: np.ascontiguousarray(x)})[0]
    import torch

    from econv_convert.run.fuse import prepare
    from econv_convert.run.resources import keep_freed_memory
    from econv_convert.torch.storage import load_dense

    keep_freed_memory()
    torch.set_num_threads(spec.threads or torch.get_num_threads())
    device = _device(spec.device)
    model = load_dense(spec.path).eval()
    prepare(model)  # this process's own copy, for inference only
    return module_runner(model.to(device), len(model.econv.example_shape) - 2, device)


def module_runner(model, nd: int, device: Any = "cpu", lead: list | None = None):
    """``f(x) -> y`` on numpy arrays for a dense module of ``nd`` spatial axes (channels-last
    for 2-D and 3-D maps, the output as float32 on the CPU); ``lead``, when given, receives
    the output's dims before the spatial ones."""
    import torch

    from econv_convert.run.bench import memory_format

    fmt = memory_format(nd + 2, True)

    def run(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x)
        if t.shape[0] == 1:
            # numpy gives a new axis of one stride 0, which sends channels-last convolutions
            # down a path 2x slower: the stride of one whole image, as torch would give it
            t = t.as_strided(t.shape, (t[0].numel(), *t.stride()[1:]))
        with torch.no_grad():
            y = model(t.to(device).contiguous(memory_format=fmt))
        y = y if isinstance(y, torch.Tensor) else _only_tensor(y)
        if lead is not None:
            lead[:] = y.shape[1:-nd]
        return y.float().cpu().numpy()

    return run


def _device(name: str) -> str:
    """``cuda``: each Dask worker on its own GPU (worker k on GPU k modulo their number)."""
    if name != "cuda":
        return name
    import torch

    if not torch.cuda.is_available():
        raise InvalidInputError("device=cuda: no CUDA device is available here")
    try:
        from distributed import get_worker

        index = int(get_worker().name)
    except (ImportError, ValueError, TypeError):
        index = 0
    return f"cuda:{index % torch.cuda.device_count()}"


def _only_tensor(y):
    from econv_convert.torch.outputs import flatten

    leaves = flatten(y)
    if len(leaves) != 1:
        raise InvalidInputError("prediction needs a model with one output map")
    return leaves[0]


def timed(run: Callable[[np.ndarray], np.ndarray]):
    """``run`` and a list whose one number adds up the seconds its calls take."""
    seconds = [0.0]

    def timed_run(x: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        try:
            return run(x)
        finally:
            seconds[0] += time.perf_counter() - start

    return timed_run, seconds
