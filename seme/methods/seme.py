"""SeMe (docs/method.md): sources aligned into the pivot's latent space (semantic alignment, layer
interpolation, vocabulary maps: `seme.semantic.pipeline`) and then fused by Select / Compute /
Erase (METHOD §5). This module is the per-tensor fusion step and the method's declaration."""
from __future__ import annotations

import torch

from seme.methods.inputs import Inputs, compute_dtype
from seme.methods.registry import Method, Param, register
from seme.methods.task_vector import sce_fuse

PARAMS = (
    # 1.0, not METHOD.md's 0.1: on the zoo (docs/results.md) 0.1 kept 4-21% of the experts'
    # skills and 1.0 kept 86-93%.
    Param("select_topk", float, default=1.0, minimum=0.0, maximum=1.0),
    # Alignment settings are read once per merge (from the global parameters), not per tensor.
    Param("alignment", str, default="auto", choices=("auto", "always", "never")),
    Param("align_mode", str, default="linear", choices=("linear", "probability")),
    Param("align_tolerance", float, default=0.05, minimum=0.0),
    Param("temperature", float, default=0.05, minimum=1e-4),
    Param("topk", int, default=64, minimum=1),
)


def seme_fuse(inputs: Inputs, p: dict):
    """Select / Compute / Erase over the aligned sources; returns (tensor, statistics)."""
    base = inputs.base
    dtype = compute_dtype(base)
    base32 = base.to(dtype)
    deltas = torch.stack([x.to(dtype) - base32 for x in inputs.others])
    merged, select, erase, eta = sce_fuse(base32, deltas, p["select_topk"])
    selected = select if select is not None else torch.ones_like(base32, dtype=torch.bool)
    live = (deltas != 0) & selected
    conflicts = (live & ~erase).any(dim=0) & selected
    n_selected = int(selected.sum())
    stats = {
        "selected_fraction": n_selected / max(base32.numel(), 1),
        "sign_conflict_rate": int(conflicts.sum()) / max(n_selected, 1),
        "eta": [round(float(e), 6) for e in eta],
    }
    return merged, stats


register(Method("seme", seme_fuse, PARAMS, base="required", min_non_base=1,
                reference="docs/method.md"))
