"""The task-vector family: task arithmetic, TIES, DARE, breadcrumbs, DELLA (mergekit's
"generalized task arithmetic"), LRP and SCE. Plain-torch references; the fused kernels match them.

Per tensor, with deltas δ_k = θ_k − θ_base:
  sparsify each δ_k (magnitude top-k, random drop, outlier band, DELLA rank-weighted drop),
  optionally rescale it to its original L1 norm, weight it, elect a sign per element ("sum"
  consensus: the sign of Σ_k w_k δ_k, ties to +), and take the (weighted, disjoint) mean.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from seme.methods import rng
from seme.methods.inputs import Inputs, compute_dtype
from seme.methods.registry import NON_BASE, SHARED, Method, Param, register
from seme.methods.selection import rank_interval_mask, rank_positions, top_k_mask

if TYPE_CHECKING:  # torch is imported inside the functions: planning never loads it
    import torch

_RESCALE_EPS = 1e-7


def rescale_l1(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Masked delta scaled back to the original L1 norm (mergekit's `rescale`)."""
    before = delta.abs().sum()
    after = kept.abs().sum()
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return kept
    return kept * (before / after)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density·n) largest |δ| (at least one)."""
    k = max(1, int(density * delta.numel()))
    return top_k_mask(delta.abs(), k)


def outlier_band_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the int(gamma·n) largest |δ| and enough of the smallest to keep density."""
    n = delta.numel()
    keep = int(density * n)
    n_bottom = max(0, n - keep - int(gamma * n))
    return rank_interval_mask(delta.abs(), n_bottom, n_bottom + keep)


def random_mask(delta: torch.Tensor, keep_probability: torch.Tensor | float, key: int) -> torch.Tensor:
    u = rng.uniform(key, delta.numel(), delta.device).reshape(delta.shape)
    return u < keep_probability


def della_keep_probability(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA: keep probability grows linearly with the |δ| rank within each row, in density ± ε. A
    row runs along dimension 1, as mergekit ranks: the last for a matrix, not for fused experts'
    [E, in, out] (a vector is one row)."""
    import torch

    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.movedim(1, -1)
    ranks = rank_positions(rows.abs()).to(torch.float32)
    # A tensor, not a Python number: CUDA divides by a CPU scalar through its reciprocal, which rounds
    # differently from a division (and from the C++ and CUDA kernels).
    span = torch.tensor(float(max(rows.shape[-1] - 1, 1)), device=delta.device)
    probability = (density - epsilon) + (ranks / span).clamp(0, 1) * 2 * epsilon
    return probability.reshape(delta.shape) if delta.dim() < 2 else probability.movedim(-1, 1)


def sparsify(delta: torch.Tensor, method: str | None, density: float, rescale: bool, *,
             gamma: float = 0.0, epsilon: float = 0.0, key: int = 0) -> torch.Tensor:
    import torch

    if method is None or density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    if method == "magnitude":
        mask = magnitude_mask(delta, density)
    elif method == "magnitude_outliers":
        mask = outlier_band_mask(delta, density, gamma)
    elif method == "random":
        mask = random_mask(delta, density, key)
    elif method == "della_magprune":
        mask = random_mask(delta, della_keep_probability(delta, density, epsilon), key)
    else:
        raise ValueError(method)
    kept = delta * mask
    return rescale_l1(delta, kept) if rescale else kept


def sign_consensus(deltas: torch.Tensor) -> torch.Tensor:
    """[K, ...] mask of the entries whose sign agrees with the sign of their sum (0 counts as +)."""
    import torch

    elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    return deltas.sign() == elected


def _family_merge(sparsification: str | None, consensus: bool):
    def merge(inputs: Inputs, p: dict):
        # int8_mask is accepted for compatibility: a memory knob in mergekit, masks here are booleans.
        import torch

        base = inputs.base
        dtype = compute_dtype(base)
        base32 = base.to(dtype)
        if not inputs.others:
            return base
        deltas = torch.stack([
            sparsify(x.to(dtype) - base32, sparsification, p["density"][j], p["rescale"],
                     gamma=p["gamma"][j] if "gamma" in p else 0.0,
                     epsilon=p["epsilon"][j] if "epsilon" in p else 0.0,
                     key=rng.stream_key(inputs.seed, inputs.name, i))
            for j, (i, x) in enumerate(zip(inputs.other_indices, inputs.others))
        ])
        weights = torch.tensor(p["weight"], dtype=dtype, device=deltas.device).reshape(-1, *([1] * base.dim()))
        deltas *= weights
        if consensus:
            mask = sign_consensus(deltas)
            mixed = (deltas * mask).sum(dim=0)
            divisor = (weights * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = deltas.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if p["normalize"]:
            mixed /= divisor
        if p["lambda"] != 1:
            mixed *= p["lambda"]
        return base32 + mixed

    return merge


def _della_check(p: dict) -> str | None:
    for d, e in zip(p["density"], p["epsilon"]):  # density 0 drops a model, 1 keeps it whole: no draws
        if 0 < d < 1 and not (0 < d - e and d + e < 1):
            return f"DELLA needs 0 < density - epsilon and density + epsilon < 1 (density {d}, epsilon {e})"
    return None


def _register_family(name, sparsification, consensus, normalize, rescale, peak_buffers, reference):
    params = [
        Param("weight", float, NON_BASE),
        Param("density", float, NON_BASE, default=1.0, minimum=0.0, maximum=1.0),
        Param("normalize", bool, default=normalize),
        Param("rescale", bool, default=rescale),
        Param("lambda", float, default=1.0),
        Param("int8_mask", bool, default=False),
    ]
    if sparsification == "magnitude_outliers":
        params.append(Param("gamma", float, NON_BASE, default=0.01, minimum=0.0, maximum=1.0))
    if sparsification == "della_magprune":
        params.append(Param("epsilon", float, NON_BASE, default=0.15, minimum=0.0, maximum=0.5))
    register(Method(name, _family_merge(sparsification, consensus), tuple(params), base="required",
                    peak_buffers=peak_buffers, reference=reference,
                    check=_della_check if sparsification == "della_magprune" else None))


_register_family("task_arithmetic", None, False, False, False, (1.0, 2.0), "https://arxiv.org/abs/2212.04089")
_register_family("ties", "magnitude", True, True, False, (2.5, 3.0), "https://arxiv.org/abs/2306.01708")
_register_family("dare_ties", "random", True, False, True, (3.0, 3.0), "https://arxiv.org/abs/2311.03099")
_register_family("dare_linear", "random", False, False, True, (5.5, 1.5), "https://arxiv.org/abs/2311.03099")
_register_family("breadcrumbs", "magnitude_outliers", False, False, False, (5.5, 1.5), "https://arxiv.org/abs/2312.06795")
_register_family("breadcrumbs_ties", "magnitude_outliers", True, False, False, (2.5, 3.0), "https://arxiv.org/abs/2312.06795")
_register_family("della", "della_magprune", True, True, True, (4.5, 2.5), "https://arxiv.org/abs/2406.11617")
_register_family("della_linear", "della_magprune", False, False, True, (6.5, 1.5), "https://arxiv.org/abs/2406.11617")


def with_base(inputs: Inputs) -> Inputs:
    """`inputs` with zeros as their base where they have none (LRP without a base merges the models
    themselves, as mergekit does)."""
    import torch

    if inputs.base is not None:
        return inputs
    return Inputs((torch.zeros_like(inputs.tensors[0]), *inputs.tensors), 0, inputs.name, inputs.seed)


def family_params(method: str, p: dict) -> dict:
    """The family's parameters of `method`'s bound ones: LRP is TIES' selection (each model's
    int(density·n) largest |δ|, at least one) without sign election, divided by the weights' sum."""
    if method != "lrp":
        return p
    return {"weight": p["weight"], "density": [p["density"]] * len(p["weight"]), "normalize": True,
            "rescale": False, "lambda": 1.0}


_magnitude_sum = _family_merge("magnitude", False)


def lrp(inputs: Inputs, p: dict):
    return _magnitude_sum(with_base(inputs), family_params("lrp", p))


def _lrp_check(p: dict) -> str | None:
    return "lrp weights sum to 0, and it divides by their sum" if abs(sum(p["weight"])) < 1e-12 else None


# mergekit's "lrp" ranks by Layer-wise Relevance Propagation scores where its caller passes files of
# them, which no recipe can: by |δ| otherwise, as here.
register(Method("lrp", lrp, (
    Param("density", float, SHARED, default=0.7, minimum=0.0, maximum=1.0),
    Param("weight", float, NON_BASE, default=1.0),
), base="optional", min_non_base=1, peak_buffers=(7.0, 1.5), reference="https://github.com/arcee-ai/mergekit",
   check=_lrp_check))


def sce_select_mask(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """SCE select: the int(select_topk · #nonzero) elements of largest variance across models."""
    import torch

    var = torch.var(deltas, dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * select_topk)
    if k == 0:
        return torch.zeros_like(var, dtype=torch.bool)
    return top_k_mask(var, k)


def sce_coefficients(deltas: torch.Tensor) -> torch.Tensor:
    """SCE compute: η_k ∝ mean(δ_k²), uniform when all deltas vanish."""
    import torch

    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = float(energy.sum())
    if abs(total) < 1e-6:
        return torch.full_like(energy, 1.0 / deltas.shape[0])
    return energy / total


def sce_fuse(base: torch.Tensor, deltas: torch.Tensor, select_topk: float):
    """SCE on stacked deltas [K, ...]: (merged, select mask or None, erase mask, η)."""
    import torch

    select = None
    if select_topk < 1:
        select = sce_select_mask(deltas, select_topk) if select_topk > 0 else torch.zeros_like(deltas[0], dtype=torch.bool)
        deltas = deltas * select
    erase = sign_consensus(deltas)
    eta = sce_coefficients(deltas)
    return sce_mean(base, deltas, erase, eta), select, erase, eta


def sce_mean(base: torch.Tensor, deltas: torch.Tensor, erase: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """SCE's disjoint weighted mean: base + Σ_k η_k δ_k [kept] / Σ_k η_k [kept] (0 where nothing is kept)."""
    w = eta.reshape(-1, *([1] * base.dim())) * erase
    return base + (deltas * w).sum(dim=0) / w.sum(dim=0).clamp(min=1e-6)


def sce(inputs: Inputs, p: dict):
    import torch

    base = inputs.base
    if not inputs.others:
        return base
    dtype = compute_dtype(base)
    base32 = base.to(dtype)
    deltas = torch.stack([x.to(dtype) - base32 for x in inputs.others])
    return sce_fuse(base32, deltas, p["select_topk"])[0]


register(Method("sce", sce, (
    Param("select_topk", float, default=1.0, minimum=0.0, maximum=1.0),
    Param("int8_mask", bool, default=False),
), base="required", peak_buffers=(1.0, 4.0), reference="https://arxiv.org/abs/2408.07990"))
