"""``econv-convert predict``: parse, call :func:`econv_convert.workflow.predict_file` (OME-Zarr
block by block, or an array in memory for ``.npy`` outputs), print."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from econv_convert import workflow
from econv_convert.cli.common import (
    GlobalPool,
    JsonOpt,
    Load,
    _checking,
    _emit_json,
    _grouped,
    _guarded,
    _load_options,
    app,
    err,
    out,
)
from econv_convert.errors import InvalidInputError


def _floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise InvalidInputError(f"{what} '{text}': expected numbers like 0.485,0.456,0.406") \
            from None


def _bytes(text: str | None) -> int | None:
    if text is None:
        return None
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise InvalidInputError(f"--max-memory '{text}': expected a size like 2G or 512M") \
            from None


@app.command()
@_guarded
@_grouped(how=_load_options(Annotated[GlobalPool, typer.Option(
    "--global-pool", help="How a baseline's global pool is densified; the default, window, "
                          "makes a classifier of patches of the example size a heat map: one "
                          "prediction per window position.")], GlobalPool.window))
def predict(
    model: Annotated[Path, typer.Argument(
        help="A baseline checkpoint or ONNX graph (densified in memory with the options "
             "below), a dense checkpoint (.pt from densify) or a dense .onnx.",
        show_default=False)],
    input: Annotated[Path, typer.Argument(
        help="The image, read window by window: TIFF/BigTIFF/OME-TIFF (tiled, any codec; "
             "--level for pyramids), a .zarr array or OME-Zarr, a slide (.svs, .ndpi, .mrxs, "
             "...: pip install 'econv-convert[slides]'), a .npy array (memory-mapped; C,H,W "
             "or H,W,C) or PNG/JPEG (decoded whole).", show_default=False)],
    output: Annotated[Path, typer.Option(
        "-o", "--output", help="OUT.zarr: a chunked (C, H', W') float32 array written block "
                               "by block, with an overview OUT.png beside it. OUT.npy: the "
                               "whole result in memory, for small inputs.")],
    how: Load = Load(),
    no_verify: Annotated[bool, typer.Option(
        "--no-verify", help="Skip checking a model densified here.")] = False,
    level: Annotated[int, typer.Option("--level", min=0, help="Pyramid level of a TIFF, "
                                       "slide or OME-Zarr (0: full resolution).")] = 0,
    mpp: Annotated[float | None, typer.Option(
        "--mpp", help="Read the pyramid level whose pixel size is nearest to this many "
                      "micrometres per pixel, at or finer (the file must record its pixel "
                      "size); instead of --level.")] = None,
    layout: Annotated[str, typer.Option("--layout", help="Channel axis of 3-D arrays: auto "
                                        "(from the file, else the model's channels), chw or "
                                        "hwc.")] = "auto",
    mean: Annotated[str | None, typer.Option(
        "--mean", help="Per-channel mean to subtract, like 0.485,0.456,0.406. Integer images "
                       "are scaled to [0, 1] by their type's maximum first; RGBA loses its "
                       "alpha.")] = None,
    std: Annotated[str | None, typer.Option("--std", help="Per-channel std to divide by.")]
    = None,
    block: Annotated[int | None, typer.Option(
        "--block", "--tile", help="Output positions per block side (one zarr chunk, one "
                                  "task). Default: the largest that fits --max-memory.")] = None,
    max_memory: Annotated[str | None, typer.Option(
        "--max-memory", help="Memory budget of all workers together, like 8G (default: half "
                             "of the available memory).")] = None,
    workers: Annotated[int | None, typer.Option(
        "--workers", min=0, help="Worker processes of the embedded Dask cluster (default: one "
                                 "per two cores); 0 runs in this process.")] = None,
    scheduler: Annotated[str | None, typer.Option(
        "--scheduler", help="Run on an existing Dask cluster, like tcp://HOST:8786 (its "
                            "workers need this package and the input and output paths).")]
    = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda (each worker on its "
                                        "own GPU).")] = "cpu",
    resume: Annotated[bool, typer.Option(
        "--resume", help="Finish an interrupted OUT.zarr: only the missing blocks are "
                         "computed; refused if the model or options differ.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing "
                                            "output.")] = False,
    channel: Annotated[int | None, typer.Option(
        "--channel", help="Overview of this output channel (default: the arg-max "
                          "class).")] = None,
    mask: Annotated[str, typer.Option(
        "--mask", help="Skip background: auto (a tissue mask by Otsu's threshold on a "
                       "low-resolution view; the default for slides and pyramids), none (the "
                       "default for other inputs), or PATH, a binary image of any size with "
                       "the input's aspect ratio. Skipped outputs are NaN.")] = "default",
    ngff_version: Annotated[str, typer.Option(
        "--ngff", help="OME-NGFF version of OUT.zarr: 0.5 (zarr v3) or 0.4 (zarr v2, for "
                       "viewers that read only 0.4).")] = "0.5",
    json_out: JsonOpt = False,
) -> None:
    """Dense predictions over an image of any size: exact at every position, block by block
    in bounded memory, on an embedded Dask cluster or an existing one. OUT.zarr is an
    OME-Zarr image at the input's physical scale (a pyramid, the arg-max class as a label
    image)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    bar = Progress(*columns, console=err, transient=True, disable=json_out)
    task: list = []
    with _checking(json_out) as check_progress:

        def blocks_bar() -> None:  # once the checks are done: one live display at a time
            if not task:
                if check_progress is not None:
                    check_progress.stop()
                bar.start()
                task.append(bar.add_task("blocks", total=None))

        def started(where_: str, dashboard: str | None) -> None:
            blocks_bar()
            if not json_out:
                err.print(f"running on {where_}" + (f"; dashboard {dashboard}" if dashboard
                                                     else ""))

        def advanced(done: int, total: int) -> None:
            blocks_bar()
            bar.update(task[0], completed=done, total=total)

        def chosen(level_: int, level_mpp) -> None:
            if not json_out:
                err.print(f"--mpp {mpp:g}: level {level_} "
                          f"({' x '.join(f'{m:.4g}' for m in level_mpp)} um per pixel)")

        try:
            report = workflow.predict_file(
                model, input, output, load_options=how, verify=not no_verify, level=level,
                mpp=mpp, layout=layout, mean=_floats(mean, "--mean"),
                std=_floats(std, "--std"), block=block, max_memory=_bytes(max_memory),
                workers=workers, scheduler=scheduler, device=device, resume=resume,
                overwrite=overwrite, channel=channel, ngff_version=ngff_version, mask=mask,
                check_progress=check_progress, on_level=chosen, progress=advanced,
                on_start=started)
        finally:
            if task:
                bar.stop()
    data = report.to_dict()
    if json_out:
        _emit_json(data if output.suffix.lower() == ".npy" else {"model": str(model), **data})
        return
    if output.suffix.lower() == ".npy":
        out.print(f"{report.blocks} blocks of {'x'.join(map(str, report.block))} outputs "
                  f"(halo {'x'.join(map(str, report.halo))} pixels); output "
                  f"{'x'.join(map(str, report.shape))}, one per "
                  f"{'x'.join(map(str, report.step))} input pixels")
        out.print(f"wrote [bold]{output}[/]" + (f" and [bold]{report.heat_map}[/]"
                                                if report.heat_map else ""))
        return
    g = report.geometry
    masked = (f", {report.blocks_masked} without tissue skipped "
              f"({report.mask['tissue_fraction']:.0%} tissue)" if report.mask else "")
    out.print(f"{report.blocks_total} blocks of {g['block']}x{g['block']} outputs "
              f"({report.blocks_skipped} already done{masked}) on {report.scheduler} with "
              f"{report.workers} worker{'s' if report.workers != 1 else ''} in "
              f"{report.seconds:.1f} s; output {'x'.join(map(str, report.shape))}, one per "
              f"{'x'.join(map(str, g['step']))} input pixels, window "
              f"{'x'.join(map(str, g['window']))}")
    physical = (f"{' x '.join(f'{v:.4g}' for v in report.scale)} um per output pixel"
                if report.unit else "pixel units (the input records no pixel size)")
    out.print(f"OME-NGFF {report.ngff}, {report.levels} level"
              f"{'s' if report.levels != 1 else ''}, {physical}")
    out.print(f"wrote [bold]{output}[/]" + (f" and [bold]{report.overview}[/]"
                                            if report.overview else ""))
