"""The ``econv-convert`` command line (Typer + Rich).

Exit codes: 0 success (equivalent), 1 the dense model is not equivalent, 2 bad input or a
layer that cannot be densified (one line on stderr naming it), 3 an internal error (a bug:
run again with ``--debug`` for the traceback and report it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect as py_inspect
import json
import os
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from econv_convert import __version__, workflow
from econv_convert.errors import EConvError, describe
from econv_convert.report import cli_words

DEFAULT_MODEL = workflow.DEFAULT_MODEL

app = typer.Typer(
    name="econv-convert",
    help="Turn a strided CNN into its exact dense equivalent, prove it, and move weights both "
         "ways.",
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="rich",
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)
_state = {"debug": False}


class GlobalPool(str, Enum):
    phase = "phase"
    lattice = "lattice"
    dense = "dense"
    window = "window"


class Precision(str, Enum):
    float64 = "float64"
    model = "model"


# the options as plain data the workflows take (the CLI's enums become their values)
Load = workflow.LoadOptions
Check = workflow.CheckOptions


def _version(value: bool) -> None:
    if value:
        out.print(f"econv-convert {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    _state["debug"] = debug or bool(os.environ.get("ECONV_DEBUG"))  # per invocation


def _guarded(fn):
    """Run a command; turn library errors into one line on stderr and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except EConvError as e:
            if _state["debug"]:
                raise
            err.print(f"[bold red]error[/]: {escape(cli_words(str(e)))}", soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("[bold red]interrupted[/]: nothing was written")
            raise typer.Exit(130) from None
        except Exception as e:
            if _state["debug"]:
                raise
            err.print(f"[bold red]internal error[/]: {describe(e, None)} (run with --debug "
                      "for the traceback, and please report it)", soft_wrap=True)
            raise typer.Exit(3) from None

    return wrapper


# -- shared options ---------------------------------------------------------------------------

ModelArg = Annotated[Path | None, typer.Argument(
    help="Baseline model: .pt/.pth checkpoint or state dict, .safetensors, or .pt2 program. "
         "Default: the bundled patch classifier fixture.", show_default=False)]
ArchOpt = Annotated[str | None, typer.Option(
    "--arch", help="MODULE:CALLABLE that builds the baseline; MODEL's weights are loaded into "
                   "it. Imports only that module.")]
ArchKwargsOpt = Annotated[str | None, typer.Option(
    "--arch-kwargs", help="JSON object of keyword arguments for --arch.")]
ShapeOpt = Annotated[str | None, typer.Option(
    "--input-shape", help="Example input N,C,H,W (default: what the checkpoint records, else "
                          "1,3,224,224).")]
PoolOpt = Annotated[GlobalPool, typer.Option(
    "--global-pool", help="phase: one output per lattice phase (phase 0 = baseline); lattice: "
                          "the baseline's pool only; dense: pool every position (a different "
                          "function); window: the pool of the example's map slides over the "
                          "dense map, one prediction per window position (a patch classifier "
                          "as a heat map).")]
OutputStrideOpt = Annotated[int | None, typer.Option(
    "--output-stride", min=1, help="Keep the baseline's strides up to this cumulative stride "
                                   "and densify the rest (DeepLab style); must divide the total "
                                   "stride.")]
UntilOpt = Annotated[str | None, typer.Option(
    "--until", help="Stop at this module (a name from named_modules()) and return its output; "
                    "for an ONNX graph, at this value (a node's output name).")]
TrustOpt = Annotated[bool, typer.Option(
    "--trust-pickle", help="Allow checkpoints that run code when loaded (a whole pickled "
                           "model). Only for files you trust.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable report on "
                                                      "stdout instead of tables.")]
TrialsOpt = Annotated[int, typer.Option("--trials", min=1, help="Random inputs per size.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the random inputs.")]
AtolOpt = Annotated[float | None, typer.Option(
    "--atol", min=0.0, help="Absolute tolerance, times the output's scale (default 1e-9 in "
                            "float64; 1e-5 in float32, more for deep models; 1e-2 in "
                            "fp16/bf16).", show_default=False)]
RtolOpt = Annotated[float | None, typer.Option(
    "--rtol", min=0.0, help="Relative tolerance (default 1e-9 in float64; 1e-4 in float32, "
                            "more for deep models; 1e-2 in fp16/bf16).", show_default=False)]
PrecisionOpt = Annotated[Precision, typer.Option(
    "--precision", help="float64: check CPU copies of both models in float64, where a pass is "
                        "a proof; model: check them in the model's own dtype and device.")]
InputNameOpt = Annotated[str | None, typer.Option(
    "--input-name", help="Call the model with its image as this keyword argument "
                         "(model(NAME=x)), for a forward() that does not take the image "
                         "first.")]
NearOpt = Annotated[bool, typer.Option(
    "--at-example-size", help="Check around the example input size. By default a model that "
                              "takes any input size is checked at small sizes (one lattice "
                              "step plus one), which proves the same dense graph much faster.")]
ForceOpt = Annotated[bool, typer.Option(
    "--force", help="Run even where the memory estimate exceeds the available memory.")]


# -- option groups: the options several commands share, declared once -------------------------


def _load_options(pool: Any = PoolOpt, global_pool: GlobalPool = GlobalPool.phase):
    """How a model file is read and densified: :class:`Load`."""
    return Load, {"arch": (ArchOpt, None), "arch_kwargs": (ArchKwargsOpt, None),
                  "input_shape": (ShapeOpt, None), "input_name": (InputNameOpt, None),
                  "global_pool": (pool, global_pool), "until": (UntilOpt, None),
                  "output_stride": (OutputStrideOpt, None), "trust_pickle": (TrustOpt, False)}


def _check_options(trials: int = 1, near: bool = True):
    """How a dense model is checked: :class:`Check`."""
    opts = {"trials": (TrialsOpt, trials), "seed": (SeedOpt, 0), "atol": (AtolOpt, None),
            "rtol": (RtolOpt, None), "precision": (PrecisionOpt, Precision.float64)}
    if near:
        opts["near"] = (NearOpt, False)
    return Check, opts


def _grouped(**groups):
    """Give a command one parameter per group (``name=(make, {option: (type, default)})``):
    Typer sees the group's options in the command's signature, in place of that parameter;
    the command receives ``make(**their values)``."""

    def wrap(fn):
        sig = py_inspect.signature(fn, eval_str=True)
        params = []
        for p in sig.parameters.values():
            if p.name in groups:
                params += [py_inspect.Parameter(n, p.KEYWORD_ONLY, default=d, annotation=t)
                           for n, (t, d) in groups[p.name][1].items()]
            else:
                params.append(p.replace(kind=p.KEYWORD_ONLY))

        @functools.wraps(fn)
        def command(**kwargs):
            for name, (make, opts) in groups.items():
                kwargs[name] = make(**{n: kwargs.pop(n) for n in opts})
            return fn(**kwargs)

        command.__signature__ = sig.replace(parameters=params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return wrap


@contextlib.contextmanager
def _checking(quiet: bool):
    """A progress callback for the equivalence checks, drawing a bar on stderr (None when
    ``quiet``): a line per check above the bar. The bar starts with the first check, so
    what comes before it (loading, errors) prints as if there were none."""
    if quiet:
        yield None
        return
    columns = (TextColumn("verifying"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.description}"), TimeElapsedColumn())
    bar = Progress(*columns, console=err, transient=True)
    task: list[Any] = []
    since = [time.perf_counter()]

    def progress(done: int, total: int, what: str) -> None:
        if not task:
            bar.start()
            task.append(bar.add_task("", total=None))
            since[0] = time.perf_counter()
        # a line per check (the shifted windows as one), above the bar
        if not what.startswith("shift") or done == total:
            label = "shifted windows" if what.startswith("shift") else what
            bar.console.print(f"[dim]checked {label} "
                              f"({time.perf_counter() - since[0]:.1f} s)[/]")
            since[0] = time.perf_counter()
        bar.update(task[0], completed=done, total=total, description=what)

    def stop() -> None:  # before another live display takes stderr
        if task:
            bar.stop()

    progress.stop = stop  # type: ignore[attr-defined]
    try:
        yield progress
    finally:
        stop()


def _verify(baseline, dense, how: Check, *, quiet: bool):
    """Run the checks (PyTorch models, or ONNX graphs in onnxruntime) with a progress bar."""
    with _checking(quiet) as progress:
        return workflow.run_checks(baseline, dense, how, progress)


def _emit_json(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=_jsonable) + "\n")


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, Path):
        return str(v)
    return str(v)


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
