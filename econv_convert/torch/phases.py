"""Every phase of every node, for PyTorch dense graphs (:mod:`econv_convert.proof` checks
each node; this module runs the graphs and applies the baseline's ops).

The baseline graph and the dense graph run once on the same input (float64, the real
weights). At every baseline node whose value carries a map, the baseline's own op is applied
to the phase sub-maps of the dense inputs, and must give the dense output on the matching
sub-lattice: identity (*) of :mod:`econv_convert.core.lattice`, for every phase of every axis.
Non-map arguments (weights) are the baseline run's values.

An error anywhere in a dense graph, on the lattice or between it, shows up at the first node
whose output it reaches. A node is left out only where the identity does not apply as such
(a flatten over positions, per-phase values broadcast back onto a map, inputs on different
lattices); the proof lists those nodes and why, and the end-to-end checks cover them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from econv_convert.core.records import info
from econv_convert.errors import EConvError, describe
from econv_convert.proof import NodeProof, NotProven, PhaseProof, check_node, map_inputs


def prove(baseline: fx.GraphModule, dense: fx.GraphModule, nodes: dict[str, dict[str, Any]],
          records: Sequence[dict[str, Any]], x: torch.Tensor,
          tol: tuple[float, float]) -> PhaseProof:
    """Run both graphs on ``x`` and check identity (*) at every node of ``nodes`` (the
    dense model's node map, :attr:`DenseInfo.nodes`); ``records`` give the layers' geometry
    (their padding decides where (*) holds for the phases ``j > 0``). ``tol`` is
    ``(atol, rtol)``: ``|dense - op| <= atol * scale + rtol * |op|``, ``scale`` the node's
    largest ``|op|``."""
    proof = PhaseProof()
    if not nodes:
        proof.note = "the dense model records no node map (written by an older version)"
        return proof
    by_name = {n.name: n for n in baseline.graph.nodes}
    dense_nodes = {n.name: n for n in dense.graph.nodes}
    missing = [k for k, v in nodes.items() if k not in by_name or v["dense"] not in dense_nodes]
    if missing:
        proof.note = (f"the dense graph does not hold the nodes its record names ({missing[0]}"
                      "): not the graph econv-convert made")
        return proof
    try:
        base_env = _run(baseline, x)
    except Exception as e:  # noqa: BLE001  a graph the proof cannot run: say so, no verdict
        proof.note = f"the baseline graph does not run node by node ({describe(e, 100)})"
        return proof
    geometry = {r.get("fx_name"): r for r in records}
    # each baseline node is checked when its dense node has run; the dense values its check
    # reads are kept until then
    due: dict[str, list[fx.Node]] = defaultdict(list)
    wanted: dict[str, str] = {}  # dense node -> the last dense node whose check reads it
    order = {n.name: i for i, n in enumerate(dense.graph.nodes)}
    for node in baseline.graph.nodes:
        spec = nodes.get(node.name)
        if spec is None or node.op not in ("call_function", "call_method"):
            continue
        due[spec["dense"]].append(node)
        for arg in node.all_input_nodes:
            arg_spec = nodes.get(arg.name)
            if arg_spec is not None:
                name = arg_spec["dense"]
                if order[spec["dense"]] > order.get(wanted.get(name, name), -1):
                    wanted[name] = spec["dense"]
    def check(dense_node: fx.Node, env: dict[str, Any]) -> None:
        for node in due.get(dense_node.name, ()):
            try:
                result = _check_node(node, nodes, base_env, env, geometry.get(node.name), tol)
            except NotProven as e:
                proof.skipped[node.name] = str(e)
            except Exception as e:  # noqa: BLE001  the proof's own limit, never a verdict
                proof.skipped[node.name] = f"not evaluated here ({describe(e, 80)})"
            else:
                proof.nodes.append(result)

    try:
        _run(dense, x, after=check, keep=wanted)
    except Exception as e:  # noqa: BLE001  likewise
        proof.note = f"the dense graph does not run node by node ({describe(e, 100)})"
    return proof


def prove_model(dense: nn.Module, x: torch.Tensor, tol: tuple[float, float]) -> PhaseProof:
    """:func:`prove` for a dense model as it is given (its ``econv`` record names the nodes;
    its baseline graph is rebuilt by ``inverse``), in ``x``'s dtype and device, on the first
    sample of ``x`` (every phase of a batch of one is every phase)."""
    from econv_convert.torch.api import inverse  # the API builds on this module's checks

    if not isinstance(dense, fx.GraphModule):
        return PhaseProof(note="the dense model is not the graph econv-convert made (a "
                          "wrapper?): checked end to end only")
    meta = info(dense)
    try:
        baseline = inverse(dense).to(x.device, x.dtype)
    except EConvError as e:
        return PhaseProof(note=f"its baseline graph cannot be rebuilt ({e})")
    with torch.no_grad():
        return prove(baseline, dense, meta.nodes, meta.records, x[:1], tol)


def _run(gm: fx.GraphModule, x: torch.Tensor, after=None,
         keep: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``gm`` on ``x`` node by node. Without ``after``, every value is kept and returned
    by name; with it, ``after(node, env)`` is called after each node and values are dropped
    after their last use (or the last check that reads them, ``keep``)."""
    env: dict[str, Any] = {}
    nodes = list(gm.graph.nodes)
    last: dict[str, int] = {}
    if after is not None:
        index = {n.name: i for i, n in enumerate(nodes)}
        for i, n in enumerate(nodes):
            for a in n.all_input_nodes:
                last[a.name] = max(last.get(a.name, 0), i)
        for name, reader in (keep or {}).items():
            last[name] = max(last.get(name, index[name]), index[reader])
    dying: dict[int, list[str]] = defaultdict(list)
    for name, i in last.items():
        dying[i].append(name)
    placeholders = 0
    for i, node in enumerate(nodes):
        if node.op == "output":
            break
        if node.op == "placeholder":
            value = x if not placeholders else None
            placeholders += 1
        else:
            args = fx.node.map_arg(node.args, lambda n: env[n.name])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n.name])
            if node.op == "get_attr":
                value = gm
                for part in node.target.split("."):
                    value = getattr(value, part)
            elif node.op == "call_function":
                value = node.target(*args, **kwargs)
            elif node.op == "call_method":
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                value = gm.get_submodule(node.target)(*args, **kwargs)
        env[node.name] = value
        if after is not None:
            after(node, env)
            for name in dying.get(i, ()):
                env.pop(name, None)
    return env


def _check_node(node: fx.Node, nodes: dict[str, dict[str, Any]], base_env: dict[str, Any],
                dense_env: dict[str, Any], record: dict[str, Any] | None,
                tol: tuple[float, float]) -> NodeProof:
    names = [a.name for a in node.all_input_nodes]
    maps = map_inputs(names, nodes, lambda n: isinstance(base_env.get(n), torch.Tensor))
    spec = nodes[node.name]
    nd = sum(kind == "space" for kind, *_ in next(iter(maps.values()))["dims"])
    op = _specialized_op(node, record, nd) or _baseline_op(node, base_env, list(maps))
    return check_node(node.name, spec, maps,
                      {n: dense_env[m["dense"]] for n, m in maps.items()},
                      dense_env[spec["dense"]], lambda subs, count: _apply(op, subs, count),
                      record, tol)


_POOLS = {"avg_pool": (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d),
          "max_pool": (F.max_pool1d, F.max_pool2d, F.max_pool3d)}


def _specialized_op(node: fx.Node, record: dict[str, Any] | None, nd: int):
    """An adaptive pool densified as what it is at the example size: the plain pool of that
    window, or the identity where it keeps the map's size (on a sub-map of another size the
    adaptive op would pick another window)."""
    name = getattr(node.target, "__name__", str(node.target))
    if "adaptive" not in name:
        return None
    if record is None:
        return lambda x: x
    if record["kind"] not in _POOLS:
        return None
    kernel = tuple(record["before"]["kernel"])
    stride = tuple(record["before"]["stride"])
    pool = _POOLS[record["kind"]][nd - 1]
    return lambda x: pool(x, kernel, stride)


def _baseline_op(node: fx.Node, env: dict[str, Any], maps: list[str]):
    """The baseline node as a function of its map arguments (in the order of ``maps``)."""

    def op(*values: torch.Tensor):
        given = dict(zip(maps, values))
        args = fx.node.map_arg(node.args, lambda n: given.get(n.name, env.get(n.name)))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: given.get(n.name, env.get(n.name)))
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)

    return op


def _apply(op, subs: list[torch.Tensor], count: int) -> torch.Tensor:
    """``op`` on each of ``count`` stacked sub-maps (leading dim): vectorized where the op
    allows (``torch.vmap``), one call each otherwise."""
    if count > 1:
        try:
            out = torch.vmap(op)(*subs)
            if isinstance(out, torch.Tensor):
                return out
        except Exception:  # noqa: BLE001  an op vmap cannot batch: call it per sub-map
            pass
    outs = []
    for k in range(count):
        try:
            out = op(*(t[k] for t in subs))
        except Exception as e:  # noqa: BLE001  the op rejects this sub-map: say which
            raise NotProven(f"the baseline op rejects a phase sub-map ({describe(e, 80)})") from e
        if not isinstance(out, torch.Tensor):
            raise NotProven("the op does not return one tensor")
        outs.append(out)
    return torch.stack(outs)
