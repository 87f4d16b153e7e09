"""The ``econv-convert`` command line (Typer + Rich).

Exit codes: 0 success (equivalent), 1 the dense model is not equivalent, 2 bad input or a
layer that cannot be densified (one line on stderr naming it), 3 an internal error (a bug:
run again with ``--debug`` for the traceback and report it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from econv_convert import workflow
from econv_convert.cli.common import (
    ArchKwargsOpt,
    ArchOpt,
    Check,
    ForceOpt,
    GlobalPool,
    InputNameOpt,
    JsonOpt,
    Load,
    ModelArg,
    OutputStrideOpt,
    PoolOpt,
    TrustOpt,
    _check_options,
    _checking,
    _emit_json,
    _grouped,
    _guarded,
    _load_options,
    app,
    err,
    out,
)


def _info_dict(meta) -> dict[str, Any]:
    return workflow.info_dict(meta)


# -- reports shared by PyTorch models and ONNX graphs -------------------------------------------


def _densify_report(path: Path, output: Path | None, written: bool, meta, result,
                    json_out: bool, json_extra: dict[str, Any], line: str | None,
                    wrote_note: str = "") -> None:
    """What densify prints (or its JSON), then exit 1 if verification failed."""
    from econv_convert import report

    if json_out:
        _emit_json({"model": str(path), "output": str(output) if written else None,
                    "dense": _info_dict(meta),
                    "verification": result.to_dict() if result else None, **json_extra})
    else:
        out.print(report.layers_table(meta, f"Dense model of {path.name}"))
        report.print_summary(out, meta)
        if result is not None:
            out.print(report.verify_table(result))
            report.verify_summary(out, result)
        if line:
            out.print(line)
        if output is None:
            out.print("[dim]nothing written (give -o OUT to write the dense model)[/]")
        elif not written:
            out.print(f"[red]{output} not written[/]: the dense model is not equivalent "
                      "(--allow-mismatch writes it anyway)")
        else:
            out.print(f"wrote [bold]{output}[/]{wrote_note}")
    if result is not None and not result.ok:
        raise typer.Exit(1)


def _verify_report(path: Path, dense: Path | None, meta, result, json_out: bool) -> None:
    """What verify prints (or its JSON), then exit 1 if not equivalent."""
    from econv_convert import report

    if json_out:
        _emit_json({"model": str(path), "dense": str(dense) if dense else None,
                    "verification": result.to_dict()})
    else:
        report.print_summary(out, meta)
        out.print(report.verify_table(result))
        report.verify_summary(out, result)
    if not result.ok:
        raise typer.Exit(1)


def _inverse_report(dense: Path, output: Path, result, json_out: bool, what: str) -> None:
    """What inverse prints (or its JSON), then exit 1 if the baseline does not reproduce the
    dense model (nothing was written then)."""
    from econv_convert import report

    if json_out:
        _emit_json({"dense": str(dense), "output": str(output) if result.ok else None,
                    "verification": result.to_dict()})
    else:
        out.print(report.verify_table(result))
        report.verify_summary(out, result)
        if result.ok:
            out.print(f"wrote [bold]{output}[/] ({what})")
        else:
            out.print(f"[red]{output} not written[/]: the baseline does not reproduce the dense "
                      "model")
    if not result.ok:
        raise typer.Exit(1)


# -- commands -------------------------------------------------------------------------------


@app.command()
@_guarded
@_grouped(how=_load_options(), checking=_check_options())
def densify(
    model: ModelArg = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Where to write the dense model: .pt (dense checkpoint, "
                               "econv_convert.load_dense), .pt2 (torch.export) or .onnx. "
                               "Without it nothing is written.")] = None,
    how: Load = Load(),
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip the equivalence check.")]
    = False,
    allow_mismatch: Annotated[bool, typer.Option(
        "--allow-mismatch", help="Write the dense model even if verification fails.")] = False,
    checking: Check = Check(),
    force: ForceOpt = False,
    freeze_batchnorm: Annotated[bool, typer.Option(
        "--freeze-batchnorm", help="The dense checkpoint keeps BatchNorm on its running "
                                   "statistics when it trains (PyTorch models; the usual choice "
                                   "for fine-tuning with small batches). Without it BatchNorm "
                                   "follows train()/eval() like nn.BatchNorm.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Rewrite MODEL into its dense equivalent, verify it and write it to OUTPUT."""
    with _checking(json_out) as progress:
        done = workflow.densify_file(model, output, load_options=how,
                                     check=None if no_verify else checking,
                                     allow_mismatch=allow_mismatch, force=force,
                                     freeze_batchnorm=freeze_batchnorm, progress=progress)
    check = done.export_check
    extra = None
    if check is not None:
        extra = (f"{check.format} export re-run at {'x'.join(map(str, check.shape))}: "
                 f"max |error| {check.max_abs:.2e}")
    if workflow.is_onnx(done.source):
        _densify_report(done.source, output, done.written, done.info, done.verification,
                        json_out, {}, extra, " (dynamic batch and spatial axes; checked with "
                        "onnx.checker and strict shape inference)")
    else:
        _densify_report(done.source, output, done.written, done.info, done.verification,
                        json_out, {"export_check": check.__dict__ if check else None}, extra)


@app.command()
@_guarded
@_grouped(how=_load_options(), checking=_check_options(trials=2))
def verify(
    model: ModelArg = None,
    dense: Annotated[Path | None, typer.Option(
        "--dense", help="A saved dense checkpoint (.pt) to check against MODEL. Without it "
                        "MODEL is densified in memory.")] = None,
    how: Load = Load(),
    checking: Check = Check(),
    compared: Annotated[list[str] | None, typer.Option(
        "--output", help="Compare only this output of the model, by the name the report gives "
                         "it (logits, hidden_states.2, ...); repeat for several.")] = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Check that a dense model reproduces MODEL on random inputs (exit 0 equal, 1 not)."""
    checking = dataclasses.replace(checking, outputs=tuple(compared or ()))
    with _checking(json_out) as progress:
        done = workflow.verify_file(model, dense, load_options=how, check=checking, force=force,
                                    progress=progress)
    _verify_report(done.source, dense, done.info, done.verification, json_out)


@app.command()
@_guarded
@_grouped(checking=_check_options(near=False))
def inverse(
    dense: Annotated[Path, typer.Argument(help="A dense checkpoint (.pt) written by densify, "
                                               "possibly fine-tuned.", show_default=False)],
    output: Annotated[Path, typer.Option(
        "-o", "--output", help="Baseline weights to write: .pt (a state dict for the "
                               "baseline's load_state_dict) or .safetensors.")],
    checking: Check = Check(),
    json_out: JsonOpt = False,
) -> None:
    """Inverse transfer: write the baseline's weights taken from a dense model, after checking
    that the baseline with them equals the dense model on the lattice."""
    with _checking(json_out) as progress:
        done = workflow.inverse_file(dense, output, check=checking, progress=progress)
    _inverse_report(dense, output, done.verification, json_out, done.what)


@app.command()
@_guarded
@_grouped(how=_load_options())
def inspect(
    model: ModelArg = None,
    how: Load = Load(),
    json_out: JsonOpt = False,
) -> None:
    """Show the plan without writing anything: per layer its lattice step, receptive field,
    output sizes and multiply-adds, baseline vs dense. The dense model is never run (no
    memory guard is needed), so this is quick for any model size."""
    from econv_convert import report

    done = workflow.inspect_file(model, load_options=how)
    if json_out:
        _emit_json(done.to_dict())
        return
    out.print(report.plan_table(done.plan))
    report.print_summary(out, done.info)


@app.command()
@_guarded
def bench(
    model: ModelArg = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    input_shape: Annotated[str | None, typer.Option(
        "--input-shape", help="Input to time at (default: the example input; for patch "
                              "classifiers 1,C,512,512).")] = None,
    global_pool: PoolOpt = GlobalPool.phase,
    output_stride: OutputStrideOpt = None,
    input_name: InputNameOpt = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    runs: Annotated[int, typer.Option("--runs", min=1, help="Timed runs per case (the median "
                                                            "is reported).")] = 5,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed runs first.")] = 1,
    channels_last: Annotated[bool, typer.Option(
        "--channels-last/--contiguous", help="Memory format of every case (2-D and 3-D "
                                             "models).")] = True,
    trust_pickle: TrustOpt = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Time the baseline, the dense model, shift-and-stitch and (patch classifiers) the sliding
    window, in one run, with multiply-adds and ratios."""
    how = Load(arch, arch_kwargs, trust_pickle, global_pool=global_pool,
               output_stride=output_stride, input_name=input_name)
    shape = workflow.example_shape(input_shape, None) if input_shape else None
    with err.status("timing", spinner="dots") as status:
        done = workflow.bench_file(model, load_options=how, input_shape=shape, device=device,
                                   runs=runs, warmup=warmup, channels_last=channels_last,
                                   force=force,
                                   progress=lambda name: status.update(f"timing {name}"))
    path, shape, result = done.source, done.shape, done.result
    data = result.to_dict()
    if json_out:
        _emit_json({"model": str(path), **data})
        return
    from rich.table import Table

    table = Table(title=f"{path.name} at {'x'.join(map(str, shape))} on {result.device} "
                        f"(median of {runs})", title_justify="left", header_style="bold")
    for col in ("case", "time", "multiply-adds", "vs dense", "note"):
        table.add_column(col, justify="right" if col in ("time", "multiply-adds", "vs dense")
                         else "left", overflow="fold")
    dense_t = result.timings["dense"].seconds
    for name, t in result.timings.items():
        table.add_row(name, f"{t.seconds * 1e3:.1f} ms", f"{t.macs / 1e9:.3f} G",
                      f"{t.seconds / dense_t:.2f}x", t.note)
    out.print(table)
    for key, value in data["speedups"].items():
        macs = data["mac_ratios"][key.removeprefix("dense_vs_") + "_vs_dense"]
        out.print(f"{key}: [bold]{value:.1f}x[/] faster (multiply-add ratio {macs:.1f}x)")
    if result.dilation_overhead is not None:
        out.print(f"dilated convolutions vs the same undilated (equal multiply-adds): "
                  f"{result.dilation_overhead:.2f}x; in space-to-batch form: "
                  f"{result.space_to_batch_overhead:.2f}x")
    out.print(f"dense activation memory estimate: {result.dense_activation_estimate / 2**20:.0f}"
              " MiB" + (" (measured peaks in --json)" if device == "cuda" else ""))


# the commands that live in modules of their own register on import
from econv_convert.cli import predict as _predict  # noqa: E402, F401


def main() -> None:
    app()


if __name__ == "__main__":
    main()
