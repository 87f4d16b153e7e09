"""Predictions into one array in memory (``.npy`` outputs, small inputs): the block engine of
OUT.zarr (:func:`econv_convert.run.blocks.in_memory`) run in this process, with any model
kind and any input kind (a batch from an N,C,H,W ``.npy``)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from econv_convert.errors import InvalidInputError
from econv_convert.files import atomic_write


@dataclass
class ArrayPrediction:
    """What :func:`predict_array` wrote: the array (``output``), a picture of it beside it
    for an image input (``heat_map``), and the geometry of the blocks."""

    output: str
    heat_map: str | None
    shape: list[int]
    blocks: int
    block: list[int]
    halo: list[int]
    halo_after: list[int]
    step: list[int]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def predict_array(dense: Any, meta: Any, model: Path, save: Callable[[Path], Any] | None,
                  image: Path, output: Path, *, level: int = 0, layout: str = "auto",
                  mean: list[float] | None = None, std: list[float] | None = None,
                  block: int | None = None, max_memory: int | None = None,
                  channel: int | None = None,
                  progress: Callable[[int, int], None] | None = None) -> ArrayPrediction:
    """Run the dense model (a module ``dense``, or the dense ONNX file ``model``, or the one
    ``save`` writes) over ``image`` and write the whole result to ``output`` (``.npy``)."""
    from econv_convert.run import blocks, runner, scene
    from econv_convert.run import predict as tiled
    from econv_convert.run.sources import InMemorySource, SourceSpec, kind_of, open_source

    geo = scene.geometry(meta)
    channels = meta.canonical(meta.example_shape)[1]
    nd = len(geo.step)
    lead: list[int] = []
    image_input = kind_of(image) != "npy"  # a picture of the result beside it
    with tempfile.TemporaryDirectory() as tmp:
        if dense is not None:
            run = runner.module_runner(dense, nd, lead=lead)
        else:
            path = model
            if save is not None:  # an ONNX baseline densified here: run from a file
                path = Path(tmp) / "dense.onnx"
                save(path)
            onnx_run = runner.runner(runner.ModelSpec(str(path)))

            def full(a):
                y = onnx_run(a)
                lead[:] = y.shape[1:-nd]
                return y

            run = runner.Run(full)
        batch = np.load(image, mmap_mode="r") if not image_input else None
        if batch is not None and batch.ndim == 4 and batch.shape[0] > 1:  # N,C,H,W
            if batch.shape[1] != channels:
                raise InvalidInputError(f"{image}: a batch of shape {tuple(batch.shape)}; "
                                        f"expected N,{channels},H,W")
            items = [InMemorySource(np.asarray(batch[n])) for n in range(batch.shape[0])]
        else:  # one image, read as OUT.zarr reads it
            items = [open_source(SourceSpec(str(image), channels, level, layout))]
        size = scene.block_size(meta, geo, items[0].shape, block, max_memory, 1)
        ys, count = [], 0
        for src in items:
            shape = scene.output_size(run, src, geo, mean, std)
            job = blocks.Job(None, None, "", shape, (size,) * nd, geo.step, geo.unit,
                             geo.halo, mean, std, halo_after=geo.halo_after)
            count += len(job.blocks())
            ys.append(blocks.in_memory(job, src, run, progress=progress))
    data = np.stack(ys)
    data = data.reshape(data.shape[0], *lead, *data.shape[2:])
    if channel is not None and not 0 <= channel < data.shape[1]:
        raise InvalidInputError(f"channel={channel}: the output has {data.shape[1]} channels")
    atomic_write(output, lambda f: np.save(f, data))
    picture = None
    if image_input and data.ndim == 4:
        import torch
        from PIL import Image

        picture = output.with_suffix(".png")
        rgb = tiled.heat_map(torch.from_numpy(np.nan_to_num(data)), channel).numpy()
        atomic_write(picture, lambda f: Image.fromarray(rgb).save(f, format="PNG"))
    return ArrayPrediction(str(output), str(picture) if picture else None, list(data.shape),
                           count, [size] * nd, list(geo.halo), list(geo.halo_after),
                           list(geo.step))
