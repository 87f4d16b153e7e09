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

        return Run(lambda x: run(session, None, {name: np.ascontiguousarray(x)})[0])
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


class Run:
    """A dense model as ``f(x) -> y`` on ``(1, C, ...)`` float32 numpy arrays, and where its
    graph allows it (:mod:`econv_convert.run.trim`) ``interior(x, axes) -> (y, shift)``: the
    same pass with every layer's padding along ``axes`` dropped, for an input window inside
    the image along them (``shift``: where the trimmed output's first position is in
    ``f(x)``'s)."""

    def __init__(self, full: Callable[[np.ndarray], np.ndarray],
                 interior: Callable[..., tuple[np.ndarray, list[int]]] | None = None):
        self._full, self._interior = full, interior
        self.seconds = 0.0  # the passes' time, added up
        self.checked: set = set()  # the axes a trimmed block was checked along
        self.trimmed = 0  # blocks run trimmed

    @property
    def can_trim(self) -> bool:
        return self._interior is not None

    def no_trim(self) -> None:
        """Run every block padded from now on."""
        self._interior = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        try:
            return self._full(x)
        finally:
            self.seconds += time.perf_counter() - start

    def interior(self, x: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, list[int]]:
        start = time.perf_counter()
        try:
            return self._interior(x, axes)
        finally:
            self.seconds += time.perf_counter() - start


def module_runner(model, nd: int, device: Any = "cpu", lead: list | None = None,
                  trimmed: bool = True) -> Run:
    """The dense module of ``nd`` spatial axes ``model`` as a :class:`Run` (channels-last
    for 2-D and 3-D maps, the output as float32 on the CPU); ``lead``, when given, receives
    the output's dims before the spatial ones; ``trimmed=False``: every block padded."""
    import torch

    from econv_convert.run import trim
    from econv_convert.run.bench import memory_format

    fmt = memory_format(nd + 2, True)

    def prepared(x: np.ndarray):
        t = torch.from_numpy(x)
        if t.shape[0] == 1:
            # numpy gives a new axis of one stride 0, which sends channels-last convolutions
            # down a path 2x slower: the stride of one whole image, as torch would give it
            t = t.as_strided(t.shape, (t[0].numel(), *t.stride()[1:]))
        return t.to(device).contiguous(memory_format=fmt)

    def out(y) -> np.ndarray:
        y = y if isinstance(y, torch.Tensor) else _only_tensor(y)
        if lead is not None:
            lead[:] = y.shape[1:-nd]
        return y.float().cpu().numpy()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return out(model(prepared(x)))

    def interior(x: np.ndarray, axes) -> tuple[np.ndarray, list[int]]:
        with torch.no_grad():
            y, shift = trim.run(model, prepared(x), nd, axes)
        if not isinstance(y, torch.Tensor):
            raise trim.Untrimmable("the output is not one tensor")
        return out(y), shift

    return Run(run, interior if trimmed and trim.trimmable(model) else None)


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
