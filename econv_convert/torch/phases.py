"""Every phase of every node, for PyTorch dense graphs (:mod:`econv_convert.proof` draws the
small random maps and checks each node; this module cuts each node's dense part out of the
dense graph, runs it, and applies the baseline's op).

Nothing runs at the model's own size: the baseline's shapes at the checked size come from a
run on fake tensors (no data), and each node then runs alone, float64, on random maps a few
lattice steps wide. A node's dense part is the dense graph's nodes between the dense values
of its map inputs and of its output; one that reads anything else (the input image's size, a
map that is not its input) is left out, as are nodes where the identity does not apply as
such (a flatten over positions, per-phase values broadcast back onto a map, arguments read
off a map's size). The proof lists those nodes and why; the end-to-end checks cover them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from econv_convert.cases import compare, read_lattice
from econv_convert.core.records import info
from econv_convert.errors import EConvError, describe
from econv_convert.proof import (
    NodeCase,
    NotProven,
    PhaseProof,
    head_of,
    map_inputs,
    plain_maps,
    prove_cases,
)
from econv_convert.torch.rewrite import window


def prove(baseline: fx.GraphModule, dense: fx.GraphModule, nodes: dict[str, dict[str, Any]],
          records: Sequence[dict[str, Any]], x: torch.Tensor,
          tol: tuple[float, float], seed: int = 0) -> PhaseProof:
    """Check identity (*) at every node of ``nodes`` (the dense model's node map,
    :attr:`DenseInfo.nodes`), each on small random maps whose sizes start from the
    baseline's at input ``x`` (only its shape and dtype are used); ``records`` give the
    layers' geometry (their windows and padding). ``tol`` is ``(atol, rtol)``:
    ``|dense - op| <= atol * scale + rtol * |op|``, ``scale`` the node's largest ``|op|``."""
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
        ref = next((p for p in baseline.parameters() if p.is_floating_point()), None)
        shapes = _shapes(baseline, x[:1].to(ref.dtype if ref is not None else x.dtype))
    except Exception as e:  # noqa: BLE001  a graph the proof cannot run: say so, no verdict
        proof.note = f"the baseline graph does not run node by node ({describe(e, 100)})"
        return proof
    constants = _constants(baseline, x.dtype)
    geometry = {r.get("fx_name"): r for r in records}

    def case(node: fx.Node) -> NodeCase:
        names = [a.name for a in node.all_input_nodes]
        maps = map_inputs(names, nodes,
                          lambda n: isinstance(constants.get(n), torch.Tensor))
        spec = nodes[node.name]
        record = geometry.get(node.name)
        nd = sum(kind == "space" for kind, *_ in next(iter(maps.values()))["dims"])
        op = _specialized_op(node, record, nd) or _baseline_op(node, constants, list(maps),
                                                               x.dtype)
        piece = _piece(dense, dense_nodes[spec["dense"]], {nodes[m]["dense"]: m for m in maps})
        return NodeCase(node.name, spec, maps, {m: shapes[m] for m in maps},
                        lambda inputs: _run_piece(dense, piece, spec["dense"], nodes, inputs,
                                                  x.dtype),
                        lambda subs, count: _apply(op, subs, count), record)

    cases = [(node.name, lambda node=node: case(node)) for node in baseline.graph.nodes
             if node.name in nodes and node.op in ("call_function", "call_method")]
    return prove_cases(cases, tol, x.dtype, seed, proof)


def prove_model(dense: nn.Module, x: torch.Tensor, tol: tuple[float, float],
                baseline: fx.GraphModule | None = None) -> PhaseProof:
    """:func:`prove` for a dense model as it is given (its ``econv`` record names the nodes;
    its baseline graph is rebuilt by ``inverse``), in ``x``'s dtype and device: each node's
    weights are converted to that dtype while it runs (no copy of the whole model).
    ``baseline``: that graph, where the caller has rebuilt it already."""
    from econv_convert.torch.api import inverse  # the API builds on this module's checks

    if not isinstance(dense, fx.GraphModule):
        return PhaseProof(note="the dense model is not the graph econv-convert made (a "
                          "wrapper?): checked end to end only")
    meta = info(dense)
    try:
        baseline = (baseline if baseline is not None else inverse(dense)).to(x.device)
    except EConvError as e:
        return PhaseProof(note=f"its baseline graph cannot be rebuilt ({e})")
    with torch.no_grad():
        return prove(baseline, dense, meta.nodes, meta.records, x[:1], tol)


def head_check(dense: nn.Module, x: torch.Tensor, proof: PhaseProof,
               tol: tuple[float, float], dtype: torch.dtype = torch.float64,
               baseline: fx.GraphModule | None = None, reference=None):
    """The end-to-end lattice check of a model that takes one input size, at the cost of its
    head: where the per-node proof covers every map before some frontier
    (:func:`econv_convert.proof.head_of`), the layers after it (a flatten and a fully
    connected head, a pool specialized to the example) run from random dense maps of the
    frontier's sizes at input ``x`` (float64 by default), against the baseline's same layers
    on those maps' lattices. None where that does not apply (the whole model then runs end to
    end). ``baseline``: the baseline graph, where the caller has rebuilt it already.

    The per-node proof and this check compare the dense graph with the baseline graph it
    records (rebuilt with the dense model's weights); ``reference`` ties that graph to the
    model the user gave: ``(run, tol)``, ``run(x)`` giving that model's outputs (or None and
    why), which the rebuilt graph must give too, on ``x`` in the model's own dtype (the
    baseline's cost). Returns the two lattice cases, or None."""
    from econv_convert.torch.api import inverse

    if not isinstance(dense, fx.GraphModule) or not proof.nodes:
        return None
    meta = info(dense)
    nodes = meta.nodes
    try:
        baseline = baseline if baseline is not None else inverse(dense)
    except EConvError:
        return None
    base_out = _single_output(baseline)
    dense_out = _single_output(dense)
    if base_out is None or dense_out is None or len(meta.outputs) != 1:
        return None
    constants = _constants(baseline, dtype)
    order = [(n.name, [a.name for a in n.all_input_nodes]) for n in baseline.graph.nodes
             if n.op not in ("placeholder", "output")]
    found = head_of(order, set(nodes), {p.node for p in proof.nodes}, set(constants),
                    base_out.name, plain_maps(nodes))
    if found is None:
        return None
    head, frontier = found
    try:
        ref = next((p for p in baseline.parameters() if p.is_floating_point()), None)
        shapes = _shapes(baseline, x.to(ref.dtype if ref is not None else x.dtype))
        dense_piece = _piece(dense, dense_out, {nodes[f]["dense"]: f for f in frontier})
        base_piece = _piece(baseline, base_out, {f: f for f in frontier})
    except (NotProven, KeyError):
        return None
    gen = torch.Generator().manual_seed(2)
    maps = {}
    for f in frontier:
        dims = nodes[f]["dims"]
        shape = [(n - 1) * step + 1 if kind == "space" else n
                 for n, (kind, step, _) in zip(shapes[f], dims)]
        maps[f] = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        y = _run_piece(dense, dense_piece, dense_out.name, nodes, maps, dtype)
        lattices = {f: read_lattice(t, nodes[f]["dims"], len(nodes[f]["dims"]))
                    for f, t in maps.items()}
        b = _run_piece(baseline, base_piece, base_out.name, {f: {"dense": f} for f in frontier},
                       lattices, dtype)
    spec = meta.outputs[0]
    name = spec.get("name") or "output 0"
    case = compare("lattice", tuple(x.shape), [b], [read_lattice(y, spec["dims"],
                                                                 spec["base_ndim"])],
                    tol, [(0, name)])
    where = ", ".join(frontier)
    from dataclasses import replace

    cases = [replace(case, detail=case.detail or (
        f"the {len(head)} layers after {where} end to end, from random maps of its sizes at "
        f"this input (every map before it is proven node by node)"))]
    if reference is not None:
        same = _same_as_given(baseline, x, *reference)
        if same is None:
            return None
        cases.insert(0, same)
    return cases


def _same_as_given(baseline: fx.GraphModule, x: torch.Tensor, run, tol):
    """The recorded baseline graph against the model the user gave, on ``x`` in the graph's
    own dtype: a lattice case (the lattice of the dense model is that graph's, by the proof),
    or None where the given model does not run at ``x``."""
    from dataclasses import replace

    from econv_convert.torch.outputs import flatten

    ref = next((p for p in baseline.parameters() if p.is_floating_point()), None)
    x = x.to(ref.dtype if ref is not None else torch.float32)
    given, _ = run(x)
    if given is None:
        return None
    with torch.no_grad():
        rebuilt = flatten(baseline(x))[0]
    if len(rebuilt) != len(given):
        return None
    case = compare("lattice", tuple(x.shape), given, rebuilt, tol,
                    [(k, f"output {k}") for k in range(len(given))])
    return replace(case, detail=case.detail or (
        "the baseline graph the dense model records gives the model's own outputs at this "
        "input (the baseline's cost)"))


def _single_output(gm: fx.GraphModule) -> fx.Node | None:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    value = out.args[0]
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    return value if isinstance(value, fx.Node) else None


def _shapes(gm: fx.GraphModule, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor value of ``gm`` at input ``x``'s shape, from a run on fake
    tensors (no data is computed); a graph fake tensors cannot run (data-dependent code)
    runs for real, at the baseline's cost."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    found: dict[str, tuple[int, ...]] = {}

    class _Shapes(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                found[n.name] = tuple(out.shape)
            return out

    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            _Shapes(gm).run(mode.from_tensor(x))
    except Exception:  # noqa: BLE001  data-dependent: run it for real
        found.clear()
        _Shapes(gm).run(x)
    return found


def _constants(gm: fx.GraphModule, dtype: torch.dtype) -> dict[str, Any]:
    """The values of ``gm``'s nodes that do not depend on its input: weights as they are
    (converted when a node uses them), and what is computed from them alone, in ``dtype``."""
    values: dict[str, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            values[node.name] = _attr(gm, node.target)
        elif node.op in ("call_function", "call_method") and all(
                a.name in values for a in node.all_input_nodes):
            try:
                values[node.name] = _call(gm, node, {
                    a.name: _in_dtype(values[a.name], dtype) for a in node.all_input_nodes})
            except Exception:  # noqa: BLE001  not a constant after all: left to the checks
                pass
    return values


def _attr(gm: fx.GraphModule, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _call(gm: fx.GraphModule, node: fx.Node, env: dict[str, Any]):
    args = fx.node.map_arg(node.args, lambda n: env[n.name])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n.name])
    if node.op == "get_attr":
        return _attr(gm, node.target)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return gm.get_submodule(node.target)(*args, **kwargs)


def _piece(dense: fx.GraphModule, out: fx.Node, seeds: dict[str, str]) -> list[fx.Node]:
    """The dense graph's nodes that compute ``out`` from the dense values ``seeds`` (dense
    name -> the baseline input it stands for) and constants, in graph order; NotProven where
    they read anything else."""
    wanted: set[fx.Node] = set()
    stack = [out]
    while stack:
        n = stack.pop()
        if n in wanted or n.name in seeds:
            continue
        if n.op == "placeholder":
            raise NotProven("its dense part reads the input image (its size), not only its "
                            "inputs")
        wanted.add(n)
        stack.extend(n.all_input_nodes)
    if out.name in seeds:
        return []
    return [n for n in dense.graph.nodes if n in wanted]


def _run_piece(dense: fx.GraphModule, piece: list[fx.Node], out_name: str,
               nodes: dict[str, dict[str, Any]], inputs: dict[str, torch.Tensor],
               dtype: torch.dtype) -> torch.Tensor:
    """The dense part ``piece`` (ending at ``out_name``) on ``inputs`` (baseline input name
    -> dense value), its weights in ``dtype``."""
    env: dict[str, Any] = {nodes[m]["dense"]: t for m, t in inputs.items()}
    last = {a.name: i for i, node in enumerate(piece) for a in node.all_input_nodes}
    for i, node in enumerate(piece):
        env[node.name] = _in_dtype(_call(dense, node, env), dtype) if node.op == "get_attr" \
            else _call(dense, node, env)
        for a in node.all_input_nodes:  # a weight's copy in ``dtype`` goes with its last use
            if last.get(a.name) == i and a.name != out_name:
                env.pop(a.name, None)
    out = env[out_name]
    if not isinstance(out, torch.Tensor):
        raise NotProven("its dense value is not one tensor")
    return out


# the registered pools by kind, 1-D to 3-D
_POOLS = {"avg_pool": window.AVG_POOL_FUNCTIONS[:3], "max_pool": window.MAX_POOL_FUNCTIONS[:3]}


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


def _in_dtype(value: Any, dtype: torch.dtype) -> Any:
    """A floating-point tensor in ``dtype`` (other values as they are)."""
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    return value


def _baseline_op(node: fx.Node, env: dict[str, Any], maps: list[str], dtype: torch.dtype):
    """The baseline node as a function of its map arguments (in the order of ``maps``), its
    other tensors (weights) in ``dtype``."""
    fixed = {n.name: _in_dtype(env.get(n.name), dtype) for n in node.all_input_nodes
             if n.name not in maps}

    def op(*values: torch.Tensor):
        given = dict(zip(maps, values))
        args = fx.node.map_arg(node.args, lambda n: given.get(n.name, fixed.get(n.name)))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: given.get(n.name, fixed.get(n.name)))
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
