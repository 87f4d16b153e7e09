"""What the commands share: the Typer app, the consoles, the options and their groups, the
error guard, JSON output (the commands register on the app in ``cli/__init__.py`` and
``cli/predict.py``)."""

from __future__ import annotations

import contextlib
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


def _emit_json(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, default=_jsonable) + "\n")


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, Path):
        return str(v)
    return str(v)
