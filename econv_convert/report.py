"""Rich rendering of plans and verification reports, and their JSON form. CLI only."""

from __future__ import annotations

import re
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from econv_convert.cases import VerifyReport
from econv_convert.core.costs import Plan
from econv_convert.core.records import DenseInfo

# API arguments as the library's messages name them (``until=layer3``), and the flags that set
# them here
FLAGS = {"until": "--until", "input_shape": "--input-shape", "arch": "--arch",
         "arch_kwargs": "--arch-kwargs", "global_pool": "--global-pool",
         "output_stride": "--output-stride", "trust_pickle": "--trust-pickle",
         "input_name": "--input-name", "force": "--force", "near": "--at-example-size",
         "output": "--output", "dense": "--dense", "freeze_batchnorm": "--freeze-batchnorm",
         # predict's
         "mask": "--mask", "scheduler": "--scheduler", "ngff_version": "--ngff", "tile": "--tile",
         "max_memory": "--max-memory", "device": "--device", "resume": "--resume",
         "overwrite": "--overwrite", "block": "--block", "workers": "--workers",
         "channel": "--channel", "layout": "--layout", "level": "--level", "mpp": "--mpp"}
_ARGUMENT = re.compile(r"(?<![\w.])(" + "|".join(sorted(FLAGS, key=len, reverse=True))
                       + r")=(True\b|\.\.\.)?")


def cli_words(message: str) -> str:
    """A library message in this command line's words: ``until=layer3`` becomes ``--until
    layer3``, ``force=True`` ``--force``, ``input_shape=...`` ``--input-shape``."""
    def flag(m: re.Match) -> str:
        return FLAGS[m.group(1)] + ("" if m.group(2) else " ")

    return _ARGUMENT.sub(flag, message)



def _t(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        if len(set(map(str, v))) == 1 and v and not isinstance(v[0], (list, tuple)):
            return str(v[0])
        return "x".join(_t(x) for x in v)
    return str(v)


def _geometry(g: dict[str, Any]) -> str:
    short = {"kernel": "k", "stride": "s", "padding": "p", "dilation": "d", "ceil_mode": "ceil",
             "count_include_pad": "incl_pad", "in_features": "in", "mode": "mode", "dims": "dims",
             "pad": "pad"}
    parts = []
    for key, v in g.items():
        if key in ("ceil_mode", "count_include_pad"):
            if v:
                parts.append(short[key])
            continue
        parts.append(f"{short.get(key, key)}={_t(v)}")
    return " ".join(parts)


def layers_table(meta: DenseInfo, title: str = "Rewritten layers") -> Table:
    table = Table(title=title, title_justify="left", header_style="bold")
    for col in ("#", "node", "kind", "baseline", "dense", "lattice step", "receptive field"):
        table.add_column(col, justify="right" if col == "#" else "left", overflow="fold")
    for i, r in enumerate(meta.layer_records(), 1):
        step = f"{_t(r.step_in)} -> {_t(r.step_out)}"
        table.add_row(str(i), r.node, r.kind, _geometry(r.before), _geometry(r.after), step,
                      _t(r.field) if r.field else "")
    return table


def verify_table(report: VerifyReport) -> Table:
    many = len(report.outputs) > 1
    table = Table(title=f"Equivalence ({report.precision})", title_justify="left",
                  header_style="bold")
    for col in ("check", "input", "offset") + (("output",) if many else ()) + (
            "max |error|", "error / scale", "result"):
        table.add_column(col, overflow="fold")
    skipped: dict[str, list[str]] = {}
    shifts = [c for c in report.cases if c.check == "shift" and c.ok and not c.skipped]
    for c in report.cases:
        shape = "x".join(map(str, c.shape))
        offset = _t(c.offset) if c.offset else ""
        if c.skipped:
            skipped.setdefault(_short_reason(c.detail), []).append(shape)
            continue
        if c in shifts:  # the passing offsets in one row
            if c is not shifts[0]:
                continue
            worst = max(shifts, key=lambda k: k.max_abs / k.scale if k.scale else k.max_abs)
            c, offset = worst, f"{len(shifts)} offsets"
        rel = c.max_abs / c.scale if c.scale else 0.0
        result = "[green]equal[/]" if c.ok else f"[red]DIFFERENT[/]: {c.detail}"
        table.add_row(c.check, shape, offset, *((c.output,) if many else ()),
                      f"{c.max_abs:.2e}", f"{rel:.2e}", result)
    for why, shapes in skipped.items():
        table.add_row("skipped", ", ".join(shapes), "", *(("",) if many else ()), "", "",
                      f"[yellow]{why}[/]")
    return table


def proven_line(report: VerifyReport) -> str:
    """What the checks that ran cover, in one line."""
    p = report.proven()
    lattice = p["lattice"]
    parts = [f"the lattice end to end at {_plural(len(lattice['sizes']), 'size')} "
             f"({', '.join('x'.join(map(str, s)) for s in lattice['sizes'])}; "
             f"{lattice['precision']}; {_seconds(lattice['seconds'])})"]
    phases = p["phases"]
    if phases:
        left = phases["not_checked"]
        parts.append(f"every phase of {_plural(phases['nodes'], 'node')}, each alone on small "
                     f"random maps ({phases['precision']}; {phases['phase_checks']:,} phase "
                     f"checks, {_seconds(phases['seconds'])}"
                     + (f"; {_plural(len(left), 'node')} end to end only: "
                        f"{', '.join(list(left)[:4])}" + ("..." if len(left) > 4 else "")
                        if left else "") + ")")
    shift = p["shift"]
    if shift:
        inner = ", ".join(f"{a}..{b}" for a, b in shift["interior"])
        parts.append(f"shifted windows at {_plural(shift['offsets'], 'offset')}, outputs "
                     f"{inner} per axis ({_seconds(shift['seconds'])})")
    return "; ".join(parts) + f"; {_seconds(report.seconds)} in all"


def _plural(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _seconds(t: float) -> str:
    return f"{t:.1f} s" if t >= 1 else f"{t:.2f} s"


def _short_reason(detail: str) -> str:
    """A skip's reason without the exception text it quotes (one row for many sizes)."""
    return detail.split(" (", 1)[0]


def plan_table(p: Plan) -> Table:
    table = Table(title=f"Plan at input {'x'.join(map(str, p.input_shape))}", title_justify="left",
                  header_style="bold")
    for col in ("node", "kind", "step", "receptive field", "baseline out", "dense out",
                "baseline MACs", "dense MACs", "x"):
        table.add_column(col, justify="right" if "MAC" in col or col == "x" else "left",
                         overflow="fold")
    for layer in p.layers:
        ratio = f"{layer.dense_macs / layer.base_macs:.0f}" if layer.base_macs else ""
        table.add_row(layer.node, layer.kind, f"{_t(layer.step_in)} -> {_t(layer.step_out)}",
                      _t(layer.field), _t(layer.base_shape), _t(layer.dense_shape),
                      _count(layer.base_macs), _count(layer.dense_macs), ratio)
    ratio = f"{p.dense_macs / p.base_macs:.1f}" if p.base_macs else ""
    table.add_section()
    table.add_row("whole model", "", "", "", "", "", _count(p.base_macs), _count(p.dense_macs),
                  ratio)
    return table


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def print_summary(console: Console, meta: DenseInfo) -> None:
    step = _t(meta.total_step) if meta.total_step else "1"
    console.print(f"global pooling: [bold]{meta.global_pool}[/]   total lattice step: "
                  f"[bold]{step}[/]   example input: {'x'.join(map(str, meta.example_shape))}")
    console.print(f"training: {training_mode(meta)}")
    for note in meta.notes:
        console.print(f"[yellow]note[/]: {escape(cli_words(note))}")


def training_mode(meta: DenseInfo) -> str:
    """What the dense model does when it trains, in a phrase."""
    if meta.capture == "onnx":
        return "inference only (ONNX)"
    if meta.frozen_batchnorm:
        return "BatchNorm frozen (running statistics in train() too); dropout follows train()"
    return "BatchNorm and dropout follow train()/eval()"


def verify_summary(console: Console, report: VerifyReport) -> None:
    for note in report.notes:
        console.print(f"[yellow]note[/]: {escape(cli_words(note))}")
    n = len(report.checked)
    if len(report.outputs) > 1:
        console.print(f"outputs compared: {', '.join(report.outputs)}")
    if report.ok:
        console.print(f"[bold green]equivalent[/] in {report.precision}: {n} checks, largest "
                      f"error {report.max_abs:.2e} ({report.max_rel:.2e} of the output scale; "
                      f"tolerance atol {report.atol:g} x scale + rtol {report.rtol:g})")
    elif not n:
        console.print("[bold red]nothing checked[/]: the baseline accepted none of the input "
                      "sizes; give --input-shape")
    else:
        bad = report.failures()
        console.print(f"[bold red]NOT equivalent[/] in {report.precision}: {len(bad)} of {n} "
                      f"checks fail; worst: {bad[0].detail}")
    if report.checked:
        console.print(f"proven: {proven_line(report)}")
    native = report.native
    if native and "max_error_over_scale" in native:
        console.print(f"at the model's own {native['dtype']}: "
                      f"{native['max_error_over_scale']:.2e} of the output scale "
                      f"(input {'x'.join(map(str, native['shape'][2:]))}; for information)")
