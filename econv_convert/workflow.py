"""Workflows over model files, for either backend: what the ``densify``, ``verify``,
``inverse``, ``inspect``, ``bench`` and ``predict`` (into OME-Zarr) commands do, as functions
that return results instead of printing.

A file's suffix picks the backend (``.onnx``: ONNX graphs in onnxruntime; anything else: a
PyTorch checkpoint), the options are plain data (:class:`LoadOptions`, :class:`CheckOptions`),
and the policy is the CLI's: a dense model is written only if it verified (unless
``allow_mismatch``), inverse transfer writes the baseline's weights only if the baseline with
them reproduces the dense model, and nothing half-written is ever left behind.

>>> result = densify_file("model.pt", "dense.pt")        # doctest: +SKIP
>>> result.written, result.verification.ok               # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from econv_convert.errors import InvalidInputError
from econv_convert.results import (  # noqa: F401  (the result types, read from here too)
    Benched,
    Densified,
    Inspected,
    Inverted,
    Verified,
    info_dict,
)

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "fixtures" / "patch_classifier.pt"
DEFAULT_SHAPE = [1, 3, 224, 224]

Progress = Callable[[int, int, str], None]  # (done, total, what is being checked)


def _plain(v: Any) -> Any:
    return getattr(v, "value", v)  # an Enum's value (the CLI's choices), else v


@dataclass(frozen=True)
class LoadOptions:
    """How a model file is loaded and densified (what densify, verify, inspect and bench
    share). ``arch_kwargs``: a JSON object's text; ``input_shape``: ``"N,C,H,W"`` text."""

    arch: str | None = None
    arch_kwargs: str | None = None
    trust_pickle: bool = False
    input_shape: str | None = None
    global_pool: str = "phase"
    until: str | None = None
    output_stride: int | None = None
    input_name: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "global_pool", _plain(self.global_pool))

    def torch_only(self) -> None:
        """Refuse the options an ONNX graph has no use for."""
        given = {"arch": self.arch, "arch_kwargs": self.arch_kwargs,
                 "trust_pickle": self.trust_pickle, "input_name": self.input_name}
        used = [k for k, v in given.items() if v]
        if used:
            raise InvalidInputError(f"{used[0]}=... is for PyTorch models; an ONNX graph carries "
                                    "its own structure and weights")


@dataclass(frozen=True)
class CheckOptions:
    """How a dense model is checked (the verification options)."""

    trials: int = 1
    seed: int = 0
    atol: float | None = None
    rtol: float | None = None
    near: bool = False  # check around the example size only
    precision: str = "float64"
    outputs: tuple[str, ...] = ()  # compare only these outputs

    def __post_init__(self) -> None:
        object.__setattr__(self, "precision", _plain(self.precision))


# -- files and models ---------------------------------------------------------------------------


def is_onnx(path: Path | str | None) -> bool:
    return path is not None and Path(path).suffix.lower() == ".onnx"


def model_path(model: Path | str | None) -> Path:
    """``model``, or the bundled patch classifier when none is given."""
    if model is not None:
        return Path(model)
    if not DEFAULT_MODEL.exists():
        raise InvalidInputError("no MODEL given and the bundled fixture is not installed here; "
                                "name a model file")
    return DEFAULT_MODEL


def check_output(output: Path, inputs: list[Path]) -> None:
    """Refuse an output that is a folder, in a folder that does not exist, or an input."""
    if output.exists() and output.is_dir():
        raise InvalidInputError(f"{output}: is a directory; give a file name")
    folder = output.parent
    if not folder.is_dir():
        raise InvalidInputError(f"{output}: the folder {folder} does not exist")
    for i in inputs:
        if i.exists() and output.exists() and output.resolve() == i.resolve():
            raise InvalidInputError(f"{output}: the output would overwrite the input")


def example_shape(text: str | None, recorded: list[int] | None) -> list[int]:
    """The example input: given, else what the checkpoint records, else 1x3x224x224."""
    from econv_convert.torch.loading import parse_shape

    if text:
        return parse_shape(text)
    return list(recorded) if recorded else list(DEFAULT_SHAPE)


def load(model: Path | str | None, how: LoadOptions):
    """``(path, Loaded)``: a PyTorch model file, loaded safely."""
    from econv_convert.torch.loading import load_model, parse_kwargs

    path = model_path(model)
    return path, load_model(path, arch=how.arch, arch_kwargs=parse_kwargs(how.arch_kwargs),
                            trust_pickle=how.trust_pickle)


def densified(model: Path | str | None, how: LoadOptions):
    """``(path, Loaded, dense)``: a PyTorch model file loaded and densified at its example
    input (what densify, verify, inspect and bench all start with)."""
    from econv_convert.torch import api

    path, loaded = load(model, how)
    shape = example_shape(how.input_shape, loaded.input_shape)
    dense = api.densify(loaded.model, shape, global_pool=how.global_pool, until=how.until,
                        output_stride=how.output_stride, input_name=how.input_name)
    dense.econv.arch = loaded.arch
    dense.econv.arch_kwargs = dict(loaded.arch_kwargs or {})
    return path, loaded, dense


def load_onnx(path: Path):
    from econv_convert import onnx_api
    from econv_convert.torch.loading import check_file

    check_file(path)
    return onnx_api.load(path)


def onnx_densified(model: Path, how: LoadOptions):
    """``(baseline, dense, info)`` of an ONNX graph file. ``densify`` and ``verify`` cut the
    baseline where ``until`` says themselves, so the baseline is returned whole."""
    from econv_convert import onnx_api
    from econv_convert.torch.loading import parse_shape

    baseline = load_onnx(model)
    if onnx_api.is_dense(baseline):
        raise InvalidInputError(f"{model}: is already a dense model made by econv-convert")
    shape = parse_shape(how.input_shape) if how.input_shape else None
    dense = onnx_api.densify(baseline, shape, global_pool=how.global_pool,
                             output_stride=how.output_stride, until=how.until)
    return baseline, dense, onnx_api.info(dense)


def guard_memory(dense, force: bool, *, verifying: bool = True, exporting: bool = False,
                 near: bool = False) -> None:
    """Refuse before running the dense model at sizes that would not fit in memory: the
    sizes a workflow will run it at (verification, an export's trace and check)."""
    from econv_convert.check import default_shapes
    from econv_convert.run.resources import check_memory

    meta = getattr(dense, "econv", dense)
    runs: list[tuple[tuple[int, ...], str]] = []
    if verifying:
        runs += [(tuple(s), "the largest input the equivalence check runs")
                 for s in default_shapes(meta, near)[0]]
    if exporting:
        from econv_convert.torch.exports import export_shapes

        runs += [(tuple(s), "the input the export is traced and re-checked at")
                 for s in export_shapes(dense)]
    if not runs:
        return
    shape, why = max(runs, key=lambda r: math.prod(r[0][:1]) * math.prod(r[0][2:]))
    check_memory(meta, shape, force=force, why=why)


def run_checks(baseline, dense, how: CheckOptions, progress: Progress | None = None):
    """The equivalence checks of either backend's models (ONNX graphs in onnxruntime)."""
    from econv_convert.equivalence import verify

    return verify(baseline, dense, trials=how.trials, seed=how.seed, atol=how.atol,
                  rtol=how.rtol, near_example=how.near, precision=how.precision,
                  outputs=list(how.outputs) or None, progress=progress)


# -- workflows ----------------------------------------------------------------------------------


def inspect_file(model: Path | str | None, *,
                 load_options: LoadOptions = LoadOptions()) -> Inspected:
    """The plan of densifying the model file ``model`` (the bundled one if None), per layer,
    without running the dense model: quick for any model size."""
    from econv_convert.core import costs

    if is_onnx(model):
        load_options.torch_only()
        _, _, meta = onnx_densified(Path(model), load_options)
        path = Path(model)
    else:
        path, _, dense = densified(model, load_options)
        meta = dense.econv
    return Inspected(path, meta, costs.plan(meta))


def bench_file(model: Path | str | None, *, load_options: LoadOptions = LoadOptions(),
               input_shape: list[int] | None = None, device: str = "cpu", runs: int = 5,
               warmup: int = 1, channels_last: bool = True, force: bool = False,
               progress: Callable[[str], None] | None = None) -> Benched:
    """Time the baseline, the dense model, shift-and-stitch and (patch classifiers) the sliding
    window on one input (``input_shape``; default: the example, or 512 pixels a side for a
    patch classifier), median of ``runs`` after ``warmup``, on ``device`` (``cpu``/``cuda``).
    PyTorch models only. ``progress(case)`` is called as each case starts."""
    from econv_convert.run import bench as timing
    from econv_convert.run.resources import check_memory

    if device not in ("cpu", "cuda"):
        raise InvalidInputError(f"device={device}: expected cpu or cuda")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InvalidInputError("device=cuda: no CUDA device is available here")
    path, loaded, dense = densified(model, load_options)
    example = dense.econv.example_shape
    if input_shape:
        shape = list(input_shape)
    elif timing._patch_size(dense) is not None:
        shape = [1, example[1]] + [512] * (len(example) - 2)
    else:
        shape = list(example)
    check_memory(dense.econv, shape, force=force, why="the input to time at")
    result = timing.bench(loaded.model, dense, shape, device=device, runs=runs, warmup=warmup,
                          channels_last=channels_last, progress=progress)
    return Benched(path, shape, result)


def densify_file(model: Path | str | None, output: Path | str | None = None, *,
                 load_options: LoadOptions = LoadOptions(),
                 check: CheckOptions | None = CheckOptions(), allow_mismatch: bool = False,
                 force: bool = False, freeze_batchnorm: bool = False,
                 progress: Progress | None = None) -> Densified:
    """Densify the model file ``model`` (the bundled one if None), verify it (unless ``check``
    is None) and write it to ``output`` (``.pt``, ``.pt2`` or ``.onnx``; an ONNX baseline:
    ``.onnx``) if it is equivalent or ``allow_mismatch``."""
    how = load_options
    output = Path(output) if output is not None else None
    if is_onnx(model):
        return _densify_onnx(Path(model), output, how, check, allow_mismatch, force,
                             freeze_batchnorm, progress)
    from econv_convert.torch import exports

    if output is not None:
        exports.check_suffix(output)
        check_output(output, [model_path(model)])
    path, loaded, dense = densified(model, how)
    if freeze_batchnorm:
        from econv_convert.torch.module import freeze_batchnorm as freeze

        freeze(dense)
    guard_memory(dense, force, verifying=check is not None,
                 exporting=output is not None and output.suffix != ".pt",
                 near=check is not None and check.near)
    result = run_checks(loaded.model, dense, check, progress) if check is not None else None
    written = output is not None and (result is None or result.ok or allow_mismatch)
    export_check = exports.write(dense, output) if written else None
    return Densified(path, output, written, dense.econv, result, export_check, dense)


def _densify_onnx(model: Path, output: Path | None, how: LoadOptions,
                  check: CheckOptions | None, allow_mismatch: bool, force: bool,
                  freeze_batchnorm: bool, progress: Progress | None) -> Densified:
    from econv_convert import onnx_api

    how.torch_only()
    if freeze_batchnorm:
        raise InvalidInputError("freeze_batchnorm=True is for PyTorch models: an ONNX dense graph "
                                "is for inference only")
    if output is not None:
        if output.suffix.lower() != ".onnx":
            raise InvalidInputError(f"{output}: an ONNX model densifies to an ONNX model: the "
                                    "output must end in .onnx")
        check_output(output, [model])
    baseline, dense, meta = onnx_densified(model, how)
    guard_memory(meta, force, verifying=check is not None, near=check is not None and check.near)
    result = run_checks(baseline, dense, check, progress) if check is not None else None
    written = output is not None and (result is None or result.ok or allow_mismatch)
    if written:
        onnx_api.save(dense, output)
    return Densified(model, output, written, meta, result, None, dense)


def verify_file(model: Path | str | None, dense: Path | str | None = None, *,
                load_options: LoadOptions = LoadOptions(), check: CheckOptions = CheckOptions(),
                force: bool = False, progress: Progress | None = None) -> Verified:
    """Check a dense model file ``dense`` against the baseline file ``model`` (without
    ``model``: against the baseline graph the dense file records; without ``dense``: ``model``
    densified in memory)."""
    how = load_options
    dense = Path(dense) if dense is not None else None
    if is_onnx(model) or (model is None and is_onnx(dense)):
        return _verify_onnx(Path(model) if model is not None else None, dense, how, check,
                            force, progress)
    from econv_convert.torch import api, storage

    notes = []
    if dense is not None:
        from econv_convert.torch.loading import check_file

        if is_onnx(dense):
            raise InvalidInputError(
                f"dense={dense}: a dense ONNX graph exported from a PyTorch model is checked "
                "against the dense model when densify writes it; verify takes the dense .pt "
                "(densify -o dense.pt) against a PyTorch MODEL")
        check_file(dense)
        dense_model = storage.load_dense(dense)
        if model is None:
            baseline = api.inverse(dense_model)
            notes.append("no MODEL given: checked against the baseline graph recorded in the "
                         "dense checkpoint")
            path = dense
        else:
            path, loaded = load(model, how)
            baseline = loaded.model
    else:
        path, loaded, dense_model = densified(model, how)
        baseline = loaded.model
    guard_memory(dense_model, force, near=check.near)
    result = run_checks(baseline, dense_model, check, progress)
    result.notes[:0] = notes
    return Verified(path, dense, dense_model.econv, result)


def _verify_onnx(model: Path | None, dense: Path | None, how: LoadOptions,
                 check: CheckOptions, force: bool, progress: Progress | None) -> Verified:
    from econv_convert import onnx_api

    how.torch_only()
    notes = []
    if dense is not None:
        if not is_onnx(dense):
            raise InvalidInputError(f"{dense}: an ONNX baseline is checked against a dense "
                                    ".onnx model")
        dense_model = load_onnx(dense)
        meta = onnx_api.info(dense_model)
        if model is None:
            baseline = onnx_api.inverse(dense_model)
            notes.append("no MODEL given: checked against the baseline graph recorded in the "
                         "dense model")
        else:
            baseline = load_onnx(model)
        path = model or dense
    else:
        baseline, dense_model, meta = onnx_densified(model, how)
        path = model
    guard_memory(meta, force, near=check.near)
    result = run_checks(baseline, dense_model, check, progress)
    result.notes[:0] = notes
    return Verified(path, dense, meta, result)


def inverse_file(dense: Path | str, output: Path | str, *,
                 check: CheckOptions = CheckOptions(),
                 progress: Progress | None = None) -> Inverted:
    """Inverse transfer: write the baseline's weights taken from the dense model file
    ``dense`` (a ``.pt`` state dict or ``.safetensors``; from a dense ``.onnx``: the baseline
    graph, ``.onnx``), after checking that the baseline with them equals the dense model."""
    from econv_convert.files import atomic_write
    from econv_convert.torch.loading import check_file

    dense, output = Path(dense), Path(output)
    check_file(dense)
    if is_onnx(dense):
        return _inverse_onnx(dense, output, check, progress)
    from econv_convert.torch.api import inverse as invert
    from econv_convert.torch.loading import build_arch
    from econv_convert.torch.state import load_weights_into, portable_state_dict
    from econv_convert.torch.storage import load_dense

    suffix = output.suffix.lower()
    if suffix not in (".pt", ".pth", ".safetensors"):
        raise InvalidInputError(f"{output}: the output must end in .pt, .pth or .safetensors")
    check_output(output, [dense])
    dense_model = load_dense(dense)
    baseline = invert(dense_model)
    meta = dense_model.econv
    if getattr(meta, "arch", None):
        # prove that the weights load into the user's own class, strictly
        load_weights_into(build_arch(meta.arch, meta.arch_kwargs), baseline.state_dict(),
                          f"the dense weights of {dense.name}")
    result = run_checks(baseline, dense_model, check, progress)
    if result.ok:
        weights = portable_state_dict(baseline)  # with module versions (_metadata)
        if suffix == ".safetensors":
            from safetensors.torch import save

            from econv_convert.torch.loading import SAFETENSORS_METADATA

            versions = json.dumps(getattr(weights, "_metadata", {}))
            data = save(dict(weights), metadata={SAFETENSORS_METADATA: versions})
            atomic_write(output, lambda f: f.write(data))
        else:
            import torch

            atomic_write(output, lambda f: torch.save(weights, f))
    return Inverted(dense, output, result,
                    f"{len(baseline.state_dict())} tensors, the baseline's keys and shapes")


def _inverse_onnx(dense: Path, output: Path, check: CheckOptions,
                  progress: Progress | None) -> Inverted:
    from econv_convert import onnx_api

    if not is_onnx(output):
        raise InvalidInputError(f"{output}: a dense ONNX model inverts to an ONNX baseline: the "
                                "output must end in .onnx")
    check_output(output, [dense])
    dense_model = load_onnx(dense)
    baseline = onnx_api.inverse(dense_model)
    result = run_checks(baseline, dense_model, check, progress)
    if result.ok:
        onnx_api.save(baseline, output)
    return Inverted(dense, output, result, "the baseline graph with the dense model's "
                    f"{len(baseline.graph.initializer)} initializers")


def require_equivalent(result) -> None:
    """Raise :class:`EquivalenceError` naming the worst failed check unless ``result`` (a
    verification report) passed."""
    from econv_convert.errors import EquivalenceError

    if result.ok:
        return
    failed = result.failures()
    worst = max(failed, key=lambda c: c.max_abs / c.scale if c.scale > 0 else c.max_abs,
                default=None)
    what = ""
    if worst is not None:
        where = "x".join(map(str, worst.shape[2:]))
        what = f" ({worst.check} at {where}: {worst.detail})" if worst.detail else ""
    elif not result.checked:
        what = " (no input size could be checked)"
    raise EquivalenceError("the dense model is NOT equivalent to the baseline" + what
                           + "; nothing was predicted")


def dense_for_predict(model: Path, how: LoadOptions, verify: bool,
                      progress: Progress | None = None):
    """MODEL as a dense model: ``(dense torch module or None for ONNX, its DenseInfo, save)``
    where ``save(path)`` writes a model densified here (None when MODEL is dense already);
    a model densified here is verified first unless ``verify`` is False."""
    from econv_convert import onnx_api
    from econv_convert.torch import storage

    if is_onnx(model):
        graph = load_onnx(model)
        if onnx_api.is_dense(graph):
            return None, onnx_api.info(graph), None
        how.torch_only()
        baseline, dense, meta = onnx_densified(model, how)
        if verify:
            require_equivalent(run_checks(baseline, dense, CheckOptions(), progress))
        return None, meta, lambda p: onnx_api.save(dense, p)
    if storage.is_dense_checkpoint(model):
        dense = storage.load_dense(model)
        return dense, dense.econv, None
    _, loaded, dense = densified(model, how)
    if verify:
        require_equivalent(run_checks(loaded.model, dense, CheckOptions(), progress))
    return dense, dense.econv, lambda p: storage.save_dense(dense, p)


def predict_file(model: Path | str, image: Path | str, output: Path | str, *,
                 load_options: LoadOptions = LoadOptions(), verify: bool = True,
                 level: int = 0, mpp: float | None = None, layout: str = "auto",
                 mean: list[float] | None = None, std: list[float] | None = None,
                 block: int | None = None, max_memory: int | None = None,
                 workers: int | None = None, scheduler: str | None = None,
                 device: str = "cpu", resume: bool = False, overwrite: bool = False,
                 channel: int | None = None, ngff_version: str = "0.5",
                 mask: str = "default", check_progress: Progress | None = None,
                 on_level: Callable[[int, Any], None] | None = None, **run_options):
    """Dense predictions of the model file ``model`` (a dense ``.pt``/``.onnx``, or a baseline,
    densified here and verified unless ``verify`` is False) over the image file ``image``, into
    the OME-Zarr image ``output`` (``.zarr``), block by block
    (:func:`econv_convert.run.scene.predict_scene`, which takes ``run_options``: progress,
    on_start). ``mpp`` picks the pyramid level nearest to that pixel size (reported through
    ``on_level(level, its pixel size)``) instead of ``level``. Returns its
    :class:`~econv_convert.run.scene.RunReport`. A ``.npy`` output is the whole result in
    memory, for small inputs (:func:`econv_convert.run.arrays.predict_array`: ``level``,
    ``layout``, ``mean``, ``std``, ``block``, ``max_memory``, ``channel``, ``progress``);
    the OME-Zarr options are refused with it."""
    from econv_convert.run import ngff, runner, scene
    from econv_convert.run.sources import SourceSpec, level_for_mpp
    from econv_convert.torch.loading import check_file

    model, image, output = Path(model), Path(image), Path(output)
    if not image.is_dir():  # a zarr input is a folder
        check_file(image)
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InvalidInputError(f"device={device}: expected cpu or cuda")
    if output.suffix.lower() == ".npy":
        given = {"resume": resume, "scheduler": scheduler, "mpp": mpp, "workers": workers,
                 "mask": mask not in ("default", "none"), "ngff": ngff_version != "0.5"}
        used = [k for k, v in given.items() if v]
        if used:
            raise InvalidInputError(f"{used[0]}=... is for OME-Zarr outputs (.zarr); a .npy "
                                    "output is computed in this process, in memory")
        return _predict_array(model, image, output, load_options, verify, check_progress,
                              level=level, layout=layout, mean=mean, std=std, block=block,
                              max_memory=max_memory, channel=channel,
                              progress=run_options.get("progress"))
    if output.suffix.lower() != ".zarr":
        raise InvalidInputError(f"output={output}: must end in .zarr (an OME-Zarr image) or "
                                ".npy (a small result in memory)")
    if not output.parent.is_dir():
        raise InvalidInputError(f"{output}: the folder {output.parent} does not exist")
    if resume and overwrite:
        raise InvalidInputError("resume=True and overwrite=True: choose one")
    if mpp is not None and level:
        raise InvalidInputError("mpp=... and level=...: choose one")
    ngff.zarr_format(ngff_version)
    check_file(model)
    scene.claim_output(output, resume=resume, overwrite=overwrite)  # before anything runs
    how = load_options
    dense, meta, save = dense_for_predict(model, how, verify, check_progress)
    channels = meta.canonical(meta.example_shape)[1]
    source = SourceSpec(str(image), channels, level, layout)
    if mpp is not None:
        level, level_mpp = level_for_mpp(source, mpp)
        source = SourceSpec(str(image), channels, level, layout)
        if on_level:
            on_level(level, level_mpp)
    pool = how.global_pool
    record = {"model": str(model), "model_sha256": scene.checksum(model),
              "options": {"global_pool": getattr(pool, "value", pool), "until": how.until,
                          "output_stride": how.output_stride, "input_shape": how.input_shape,
                          "level": level, "mpp": mpp, "layout": layout, "mean": mean,
                          "std": std, "input": str(image)}}
    # the model the workers load: the given dense file, or the one densified here, saved
    # inside the output (read back before it is used)
    where = Path(str(output) + ".model" + (".onnx" if dense is None else ".pt"))
    if save is not None:  # the output was claimed above
        save(where)
    return scene.predict_scene(
        runner.ModelSpec(str(model if save is None else where), device), source, output,
        record=record, block=block, mean=mean, std=std, workers=workers, scheduler=scheduler,
        resume=resume, overwrite=overwrite, max_memory=max_memory, meta=meta,
        overview_channel=channel, ngff_version=ngff_version, mask=mask, **run_options)


def _predict_array(model: Path, image: Path, output: Path, how: LoadOptions, verify: bool,
                   check_progress: Progress | None, **options):
    from econv_convert.run.arrays import predict_array
    from econv_convert.torch.loading import check_file

    check_file(model)
    check_output(output, [model, image])
    dense, meta, save = dense_for_predict(model, how, verify, check_progress)
    return predict_array(dense, meta, model, save, image, output, **options)
