"""SeMe (docs/method.md): sources aligned into the pivot's latent space (semantic alignment, layer
interpolation, vocabulary maps: `seme.semantic.pipeline`) and then fused by Select / Compute /
Erase (METHOD §5). This module is the per-tensor fusion step and the method's declaration."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from seme.methods.inputs import Inputs, compute_dtype
from seme.methods.registry import Method, Param, register
from seme.methods.task_vector import sce_fuse, sce_mean

if TYPE_CHECKING:  # torch is imported inside the functions: planning never loads it
    import torch

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
    # Knowledge stabilisation (METHOD §6, `stabilize` below); off by default because the quality
    # benchmark has not shown that it helps.
    Param("stabilize", bool, default=False),
    # multipliers of η_k lie in [1/range, range], held in float32 as η_k is: its largest finite value bounds them
    Param("stabilize_range", float, default=4.0, minimum=1.0, maximum=3.4e38),
)


def _deltas(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The pivot in the compute dtype and the stacked fusion vectors δ_k = θ̃_k − θ_pivot."""
    import torch

    base = inputs.base.to(compute_dtype(inputs.base))
    return base, torch.stack([x.to(base.dtype) - base for x in inputs.others])


def seme_fuse(inputs: Inputs, p: dict):
    """Select / Compute / Erase over the aligned sources; returns (tensor, statistics)."""
    import torch

    base32, deltas = _deltas(inputs)
    merged, select, erase, eta = sce_fuse(base32, deltas, p["select_topk"])
    selected = select if select is not None else torch.ones_like(base32, dtype=torch.bool)
    live = (deltas != 0) & selected
    conflicts = (live & ~erase).any(dim=0) & selected
    return merged, fusion_stats(base32.numel(), int(selected.sum()), int(conflicts.sum()), eta)


def fusion_stats(n: int, selected: int, conflicts: int, eta) -> dict:
    """What the report says of one tensor's fusion (every implementation builds it here): the
    fraction of its n elements selected, the share of those with a live δ_k of the losing sign, and
    the coefficients η_k, rounded."""
    return {"selected_fraction": selected / max(n, 1), "sign_conflict_rate": conflicts / max(selected, 1),
            "eta": [round(float(e), 6) for e in eta]}


def stabilize(inputs: Inputs, p: dict, mean_drift: Callable[[torch.Tensor], float], unstabilized: float):
    """Knowledge stabilisation (METHOD §6) of one residual-writing tensor: per-source multipliers s_k
    of SCE's coefficients η_k chosen to minimise `mean_drift(merged tensor)`, the mean Jensen–Shannon
    divergence between the semantic signatures of the merged update and of each source's update.

    Per source, not one coefficient c on the update (θ_P + c·update): the signature decodes the
    update's column directions weighted by their relative norms, so it does not change with c.
    Re-weighting η_k keeps the result an SCE merge (an entry-wise weighted mean of the kept source
    updates, so magnitudes stay within the sources'); only the mix changes. Search: one coordinate
    pass over the sources, each s_k tried on {1/r, 1/√r, √r, r} (r = `stabilize_range`) with the
    others held, a change kept only when it lowers the drift; deterministic, at most 4K signatures.
    s = 1 (the plain SCE merge, whose drift is `unstabilized`) is the starting point, so the result
    never drifts more than it.

    Returns (merged tensor, multipliers s_k, applied coefficients η_k·s_k normalised to sum 1)."""
    import torch

    base, deltas = _deltas(inputs)
    _, select, erase, eta = sce_fuse(base, deltas, p["select_topk"])
    kept = deltas * select if select is not None else deltas
    r = p["stabilize_range"]
    steps = [s for s in (1 / r, r ** -0.5, r ** 0.5, r) if s != 1.0]
    scales, best = torch.ones_like(eta), unstabilized
    for k in range(len(eta)):
        start = scales
        for s in steps:
            trial = start.clone()
            trial[k] = s
            drift = mean_drift(sce_mean(base, kept, erase, eta * trial))
            if drift < best:
                scales, best = trial, drift
    weights = eta * scales
    return sce_mean(base, kept, erase, weights), scales.tolist(), (weights / weights.sum()).tolist()


register(Method("seme", seme_fuse, PARAMS, base="required", min_non_base=1, peak_buffers=(1.0, 4.0),
                reference="docs/method.md"))
