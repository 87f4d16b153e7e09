"""Stochastic layers (stochastic depth, drop path): found by probing in train mode, recorded so
that the dense graph drops the same branches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from econv_convert.torch.capture.common import Drop, _quiet
from econv_convert.torch.capture.lower import _LOWER


def _export_notes(drops: dict[int, Drop]) -> list[str]:
    if not drops:
        return []
    return [f"stochastic depth in {', '.join(repr(d.name) for d in drops.values())} stays "
            "off when the dense model trains: torch.export captures the eval branch only"]


_PROBE_DRAWS = 32


def stochastic_depth(model: nn.Module, example: torch.Tensor, input_name: str | None
                     ) -> tuple[dict[int, Drop], list[str]]:
    """Stochastic depth in ``model``, recognized by behaviour rather than by name.

    Traced in eval mode, a drop-path module (``DropPath``, ``StochasticDepth``, ...) is the
    identity and leaves no trace, so the dense model could never drop. Modules of the model's
    own code with no parameters, buffers or children that return their input unchanged at the
    example (eval mode) are run in training mode on a probe batch (float64, positive, under a
    forked RNG): one whose output is its input times a per-sample (or per-batch) factor that
    is 0 or one constant ``c`` is stochastic depth with drop rate ``1 - 1/c``, kept in the
    graph as :func:`ops.drop_path`. One that does something else in training, or drops
    without rescaling (its rate cannot be read off), stays off.
    Returns the recognized modules by ``id`` and notes on those that stay off.
    """
    candidates = {
        name: m for name, m in model.named_modules()
        if name and type(m) not in _LOWER and not type(m).__module__.startswith("torch.nn")
        and next(m.children(), None) is None
        and next(m.parameters(recurse=False), None) is None
        and next(m.buffers(recurse=False), None) is None
    }
    if not candidates:
        return {}, []
    seen: dict[str, Any] = {}

    def hook(name):
        def record(m, args, out):
            x = args[0] if len(args) == 1 else None
            same = (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor)
                    and x.is_floating_point() and x.dim() >= 2
                    and (out is x or (out.shape == x.shape and torch.equal(out, x))))
            if name not in seen:
                seen[name] = x if same else None
            elif not same:
                seen[name] = None
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in candidates.items()]
    try:
        with torch.no_grad(), _quiet():
            model(**{input_name: example}) if input_name else model(example)
    except Exception:
        return {}, []  # the capture that follows reports the model's error
    finally:
        for h in handles:
            h.remove()
    drops: dict[int, Drop] = {}
    notes: list[str] = []
    for name, x in seen.items():
        if x is None:
            continue
        m = candidates[name]
        verdict = _probe(m, x, name)
        if isinstance(verdict, Drop):
            drops[id(m)] = verdict
        elif verdict:
            notes.append(f"'{name}' is the identity in eval mode and {verdict} in training: "
                         "the dense model keeps it off when training")
    return drops, notes


def _probe(m: nn.Module, example: torch.Tensor, name: str) -> Drop | str | None:
    """``m`` run in training mode: a :class:`Drop`, None when it is the identity there too,
    or what else it does (a phrase for a note). One draw is held at a time; the probe batch
    is at most about 32 MiB (float64) unless 8 samples are larger."""
    per = example[:1].numel()
    batch = max(8, min(64, 2**22 // max(per, 1)))
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((batch, *example.shape[1:]), generator=gen, dtype=torch.float64) + 0.5
    mode = m.training
    factors = []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            m.train()
            for _ in range(_PROBE_DRAWS):
                o = m(x)
                if not isinstance(o, torch.Tensor) or o.shape != x.shape:
                    return "changes its output's shape"
                r = (o / x).flatten(1)
                if not torch.allclose(r, r[:, :1].expand_as(r), rtol=1e-12, atol=0):
                    return "random per position, not per sample"
                factors.append(r[:, 0])
    except Exception:
        return "fails on a float64 probe"
    finally:
        m.train(mode)
    f = torch.stack(factors)
    if bool((f == 1).all()):
        return None
    kept = f[f != 0]
    if len(kept) == 0 or not torch.allclose(kept, kept[:1].expand_as(kept), rtol=1e-12,
                                            atol=0):
        return "a random factor that is not 0 or one constant"
    scale = float(kept[0])
    if scale <= 1.0:
        return "drops without rescaling (its rate cannot be read off)"
    mixed = bool(((f == 0).any(1) & (f != 0).any(1)).any())
    uniform = bool(((f == 0).all(1) | (f != 0).all(1)).all())
    per_sample = mixed or not (uniform and bool((f == 0).any()))
    return Drop(name, 1.0 - 1.0 / scale, per_sample)
