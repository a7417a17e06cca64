"""Triton kernels of the fused task-vector family: task_arithmetic, ties, dare_ties, dare_linear,
breadcrumbs, breadcrumbs_ties, della, della_linear and sce (GPU; CPU under TRITON_INTERPRET=1).

`fused_merge(method, inputs, params)` has the contract of the plain-torch reference
`registry.get(method).fn(inputs, params)` and reproduces its masks exactly (selection ties, Philox
draws); values agree to float32 rounding (only sums over many elements are reordered).

Per tensor, with δ_k = x_k − base never materialised (each pass recomputes it from the inputs):
  1. exact rank selection without sorting (ties, breadcrumbs: per-model |δ_k|; sce: the across-model
     variance): a radix select on the float32 bit patterns (non-negative floats order like their int32
     bits), three digit levels of 11 + 10 + 10 bits, each a histogram pass (`_hist_kernel`) and a
     one-program pick (`_pick_kernel`) that narrows the prefix and the rank left to place. It ends with
     the threshold key v and `room`: rank < r ⇔ key < v, or key == v among the first `room` equal
     elements by position (the reference's tie rule). `_count_kernel` counts the equal elements per
     block; an exclusive cumsum over blocks gives each block its offset among the equals;
  2. one reduction pass (`_sums_kernel`) for what needs a whole-tensor sum first: Σ|δ| and Σ|kept δ|
     of the L1 rescale, Σ(masked δ)² of the SCE coefficients. DELLA is the one non-fused step: its
     keep probability needs the rank of |δ| within each row, taken with a stable torch sort, one model
     at a time; `_della_kernel` then draws its mask into bit k of a shared [n] int32 word;
  3. ONE element pass over all K inputs (`_merge_kernel`): mask, rescale, weight, sign election,
     (weighted, disjoint) mean, λ, base + mixed.
Every small step in between (picks, cumsums, rescale factors, SCE coefficients) stays on the device and
the parameter tables go up with asynchronous copies: the host never waits for the device.

Exactness: launches pass enable_fp_fusion=False, since a fused multiply-add would round differently
from the reference (sign election, Welford variance); fp32 divisions use div_rn.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.random import philox_impl

from seme.fused_merge import _DELLA, _KERNEL, _NONE, _RANK, FAMILY, GPU_METHODS, RANK_CUTS, stream_keys
from seme.methods import registry
from seme.methods.inputs import Inputs, compute_dtype
from seme.methods.task_vector import _RESCALE_EPS, della_keep_probability, family_params, with_base

SUPPORTED = GPU_METHODS

# Sparsification modes (kernel constexpr): the C++ kernel's codes (seme.fused_merge), and SCE's.
_SCE = 4
# method: (mode, rank bounds per model (RANK), sign consensus), from the one table of the family
_FAMILY = {method: (_KERNEL[sparsification], RANK_CUTS.get(sparsification, 0), consensus)
           for method, (sparsification, consensus) in FAMILY.items()}

BLOCK = 1024  # elements per program of the element passes (the equal-count offsets are per block)
# Radix-select digits (shift, bits): the 31 value bits of a non-negative float32.
_LEVELS = ((20, 11), (10, 10), (0, 10))
MAX_MODELS = 31  # DELLA keeps one mask bit per model in an int32 word
_OPTS = dict(enable_fp_fusion=False)


# ---------------------------------------------------------------------------------------------------
# Element helpers


@triton.jit
def _delta(x_ptr, base, offs, m):
    return tl.load(x_ptr + offs, mask=m, other=0).to(tl.float32) - base


@triton.jit
def _philox_words(start, k0, k1, BLOCK: tl.constexpr):
    """Philox4x32-10 words of elements start .. start+BLOCK (start % 4 == 0), seme.methods.rng's layout:
    element i draws word i & 3 of counter (i >> 2, 0, 0, 0) under key (k0, k1); i < 2^34."""
    c0 = (start // 4 + tl.arange(0, BLOCK // 4)).to(tl.uint32)
    zero = c0 * 0
    w0, w1, w2, w3 = philox_impl(c0, zero, zero, zero, k0, k1)
    return tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))  # element order: w0 w1 w2 w3 w0 ...


@triton.jit
def _uniform(start, keys_ptr, k, BLOCK: tl.constexpr):
    """float32 draws in [0, 1) of model slot k (keys[k] = its stream key's lo, hi words)."""
    k0 = tl.load(keys_ptr + 2 * k).to(tl.uint32)
    k1 = tl.load(keys_ptr + 2 * k + 1).to(tl.uint32)
    return (_philox_words(start, k0, k1, BLOCK) >> 8).to(tl.float32) * (1.0 / 16777216)


@triton.jit
def _variance(xs, base, offs, m, K: tl.constexpr):
    # torch.var (CPU) over the models: Welford in float64, rounded to float32. Replicated step by step
    # so that the SCE selection ranks bit-identical keys. It starts from +0 (not base * 0, which is -0
    # for a negative base: one model's variance then stays -0, whose int32 key ranks below every other).
    mean = tl.zeros_like(base).to(tl.float64)
    m2 = mean
    for k in tl.static_range(K):
        x = _delta(xs[k], base, offs, m).to(tl.float64)
        d = x - mean
        mean = mean + d / (k + 1)
        m2 = m2 + d * (x - mean)
    return (m2 / K).to(tl.float32)


@triton.jit
def _key(xs, base, offs, m, s: tl.constexpr, K: tl.constexpr, VAR: tl.constexpr):
    """Selection key s as int32 bits: |δ_s|, or (VAR) the across-model variance of δ."""
    if VAR:
        v = _variance(xs, base, offs, m, K)
    else:
        v = tl.abs(_delta(xs[s], base, offs, m))
    return v.to(tl.int32, bitcast=True)


@triton.jit
def _below(key, m, sel_ptr, eqoff_ptr, row, pid, nblocks):
    """Elements of ascending rank < r, for the bound r whose selected (v, room) is row `row` of sel."""
    v = tl.load(sel_ptr + 2 * row).to(tl.int32)
    room = tl.load(sel_ptr + 2 * row + 1)
    eq = ((key == v) & m).to(tl.int32)
    position = tl.load(eqoff_ptr + row * nblocks + pid) + tl.cumsum(eq, 0) - eq  # among the equals
    return (key < v) | ((eq != 0) & (position < room))


@triton.jit
def _rank_keep(key, m, sel_ptr, eqoff_ptr, s: tl.constexpr, NB: tl.constexpr, pid, nblocks):
    """Rank in [lo, hi) (NB == 2) or >= lo (NB == 1) for selection key s."""
    keep = ~_below(key, m, sel_ptr, eqoff_ptr, s * NB, pid, nblocks)
    if NB == 2:
        keep = keep & _below(key, m, sel_ptr, eqoff_ptr, s * NB + 1, pid, nblocks)
    return keep


@triton.jit
def _keep(d, k: tl.constexpr, offs, m, pid, nblocks, sel_ptr, eqoff_ptr, coef_ptr, keys_ptr, bits_ptr,
          MODE: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr):
    """Sparsification mask of model slot k (coef[k] = scale, weight, keep probability)."""
    if MODE == 1:  # _RANK: magnitude top-k / outlier band
        keep = _rank_keep(tl.abs(d).to(tl.int32, bitcast=True), m, sel_ptr, eqoff_ptr, k, NB, pid, nblocks)
    elif MODE == 2:  # _RANDOM: DARE
        keep = _uniform(pid * BLOCK, keys_ptr, k, BLOCK) < tl.load(coef_ptr + 3 * k + 2)
    elif MODE == 3:  # _DELLA: drawn by _della_kernel
        keep = ((tl.load(bits_ptr + offs, mask=m, other=0) >> k) & 1) != 0
    else:
        keep = m
    return keep


@triton.jit
def _store(out_ptr, offs, value, m, BF16_BITS: tl.constexpr):
    """Store fp32 `value` in out's dtype, rounded to nearest even (BF16_BITS: out is the int16 view of a
    bfloat16 tensor, rounded by hand: the interpreter's own cast truncates). A NaN becomes torch's 0x7FC0:
    rounding its bits would carry a full mantissa (a GPU's NaN is 0x7FFFFFFF) into a zero."""
    if BF16_BITS:
        bits = value.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.int16)
        value = tl.where(value != value, 0x7FC0, rounded).to(tl.int16)
    tl.store(out_ptr + offs, value.to(out_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _hist_kernel(xs, b_ptr, sel_ptr, hist_ptr, zeros_ptr, n, nblocks, NSEL: tl.constexpr, K: tl.constexpr,
                 NB: tl.constexpr, NH: tl.constexpr, VAR: tl.constexpr, SHIFT: tl.constexpr, BITS: tl.constexpr,
                 COUNT_ZERO: tl.constexpr, BLOCK: tl.constexpr):
    """hist[s, h, digit] += #elements whose key s matches bound h's prefix above SHIFT + BITS, by the
    BITS-bit digit at SHIFT. Grid-stride over blocks; one atomic add per non-empty bin per program."""
    pid = tl.program_id(0)
    bins = tl.arange(0, 1 << BITS)
    for s in tl.static_range(NSEL):
        for h in tl.static_range(NH):
            prefix = tl.load(sel_ptr + 2 * (s * NB + h)).to(tl.int32) >> (SHIFT + BITS)
            acc = tl.zeros([1 << BITS], tl.int32)
            zeros = tl.zeros([], tl.int32)
            for blk in range(pid, nblocks, tl.num_programs(0)):
                offs = blk * BLOCK + tl.arange(0, BLOCK)
                m = offs < n
                base = tl.load(b_ptr + offs, mask=m, other=0).to(tl.float32)
                key = _key(xs, base, offs, m, s, K, VAR)
                match = m & ((key >> (SHIFT + BITS)) == prefix)
                acc += tl.histogram((key >> SHIFT) & ((1 << BITS) - 1), 1 << BITS, mask=match)
                if COUNT_ZERO:
                    zeros += tl.sum(((key == 0) & m).to(tl.int32))
            tl.atomic_add(hist_ptr + (s * NH + h) * (1 << BITS) + bins, acc, mask=acc > 0)
            if COUNT_ZERO:
                tl.atomic_add(zeros_ptr, zeros)


@triton.jit
def _pick_kernel(hist_ptr, sel_ptr, NB: tl.constexpr, NH: tl.constexpr, SHIFT: tl.constexpr, BITS: tl.constexpr):
    """One program per (key, bound): sel = (prefix, rank r left to place) -> the digit holding the r-th
    smallest matching key, and the rank left within it."""
    row = tl.program_id(0)
    if NH == NB:
        hrow = row
    else:  # the first digit has no prefix: one histogram serves every bound of a key
        hrow = row // NB
    h = tl.load(hist_ptr + hrow * (1 << BITS) + tl.arange(0, 1 << BITS))
    r = tl.load(sel_ptr + 2 * row + 1)
    below = tl.cumsum(h, 0) < r
    digit = tl.sum(below.to(tl.int64))
    tl.store(sel_ptr + 2 * row, tl.load(sel_ptr + 2 * row) | (digit << SHIFT))
    tl.store(sel_ptr + 2 * row + 1, r - tl.sum(tl.where(below, h, 0).to(tl.int64)))


@triton.jit
def _count_kernel(xs, b_ptr, sel_ptr, cnt_ptr, n, nblocks, NSEL: tl.constexpr, K: tl.constexpr, NB: tl.constexpr,
                  VAR: tl.constexpr, BLOCK: tl.constexpr):
    """cnt[s, j, block] = #elements of the block whose key s equals the selected v of bound j."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    base = tl.load(b_ptr + offs, mask=m, other=0).to(tl.float32)
    for s in tl.static_range(NSEL):
        key = _key(xs, base, offs, m, s, K, VAR)
        for j in tl.static_range(NB):
            v = tl.load(sel_ptr + 2 * (s * NB + j)).to(tl.int32)
            tl.store(cnt_ptr + (s * NB + j) * nblocks + pid, tl.sum(((key == v) & m).to(tl.int32)))


@triton.jit
def _sums_kernel(xs, b_ptr, sums_ptr, sel_ptr, eqoff_ptr, coef_ptr, keys_ptr, n, nblocks, K: tl.constexpr,
                 MODE: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr):
    """Per-block partial sums of model slot k: sums[k, 0] = Σ|δ|, sums[k, 1] = Σ|kept δ| (the L1 rescale),
    or for SCE sums[k, 1] = Σ(masked δ)²."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    base = tl.load(b_ptr + offs, mask=m, other=0).to(tl.float32)
    if MODE == 4:  # _SCE: one selection (by variance) shared by the models
        selected = m
        if NB == 1:
            selected = _rank_keep(_key(xs, base, offs, m, 0, K, True), m, sel_ptr, eqoff_ptr, 0, 1, pid, nblocks)
    for k in tl.static_range(K):
        d = _delta(xs[k], base, offs, m)
        if MODE == 4:
            kept = tl.where(selected, d, 0.0)
            tl.store(sums_ptr + (2 * k + 1) * nblocks + pid, tl.sum(kept * kept))
        else:
            # MODE is RANK or RANDOM here (DELLA's sums come from _della_kernel): bits_ptr is never read.
            keep = _keep(d, k, offs, m, pid, nblocks, sel_ptr, eqoff_ptr, coef_ptr, keys_ptr, sums_ptr, MODE, NB,
                         BLOCK)
            tl.store(sums_ptr + 2 * k * nblocks + pid, tl.sum(tl.abs(d)))
            tl.store(sums_ptr + (2 * k + 1) * nblocks + pid, tl.sum(tl.where(keep, tl.abs(d), 0.0)))


@triton.jit
def _della_kernel(x_ptr, b_ptr, prob_ptr, bits_ptr, sums_ptr, keys_ptr, k, n, nblocks, BLOCK: tl.constexpr):
    """DELLA, model slot k: keep where the draw < the rank-based probability; sets bit k of bits and
    writes the rescale partial sums like _sums_kernel."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    d = _delta(x_ptr, tl.load(b_ptr + offs, mask=m, other=0).to(tl.float32), offs, m)
    keep = _uniform(pid * BLOCK, keys_ptr, k, BLOCK) < tl.load(prob_ptr + offs, mask=m, other=0)
    bits = tl.load(bits_ptr + offs, mask=m, other=0)
    tl.store(bits_ptr + offs, bits | (keep.to(tl.int32) << k), mask=m)
    tl.store(sums_ptr + 2 * k * nblocks + pid, tl.sum(tl.abs(d)))
    tl.store(sums_ptr + (2 * k + 1) * nblocks + pid, tl.sum(tl.where(keep, tl.abs(d), 0.0)))


@triton.jit
def _merge_kernel(xs, b_ptr, out_ptr, sel_ptr, eqoff_ptr, coef_ptr, keys_ptr, bits_ptr, stats_ptr, n, nblocks, divisor,
                  lam, K: tl.constexpr, MODE: tl.constexpr, NB: tl.constexpr, CONSENSUS: tl.constexpr,
                  NORMALIZE: tl.constexpr, LAMBDA: tl.constexpr, BF16_BITS: tl.constexpr, STATS: tl.constexpr,
                  BLOCK: tl.constexpr):
    """out = base + mixed, in the reference's order of operations, into out's dtype (`_store`).
    coef[k] = (scale, weight, keep probability); for SCE scale is the coefficient η_k. STATS (SCE):
    stats[2·block] = the selected elements, stats[2·block + 1] = those with a live δ_k of the losing sign
    (what SeMe reports)."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    base = tl.load(b_ptr + offs, mask=m, other=0).to(tl.float32)
    if MODE == 4:
        selected = m
        if NB == 1:
            selected = _rank_keep(_key(xs, base, offs, m, 0, K, True), m, sel_ptr, eqoff_ptr, 0, 1, pid, nblocks)
    ds = ()
    total = tl.zeros([BLOCK], tl.float32)
    for k in tl.static_range(K):
        d = _delta(xs[k], base, offs, m)
        if MODE == 4:
            d = tl.where(selected, d, 0.0)
        else:
            keep = _keep(d, k, offs, m, pid, nblocks, sel_ptr, eqoff_ptr, coef_ptr, keys_ptr, bits_ptr, MODE, NB,
                         BLOCK)
            scale = tl.load(coef_ptr + 3 * k)
            keep = tl.where(scale != 0, keep, False)  # a dropped model (scale 0) adds zeros, not NaN · 0
            d = tl.where(keep, d, 0.0) * scale * tl.load(coef_ptr + 3 * k + 1)
        ds = ds + (d,)
        total = total + d  # the reference's sum over the stacked models, in model order
    if CONSENSUS:
        elected = total >= 0  # "sum" sign election, ties to +
        mixed = tl.zeros([BLOCK], tl.float32)
        norm = tl.zeros([BLOCK], tl.float32)
        conflict = m & (m == 0)  # all false
        for k in tl.static_range(K):
            agree = tl.where(elected, ds[k] > 0, ds[k] < 0)  # zeros never count
            if STATS:
                conflict = conflict | ((ds[k] != 0) & ~agree)
            if MODE == 4:
                eta = tl.where(agree, tl.load(coef_ptr + 3 * k), 0.0)
                mixed = mixed + ds[k] * eta
                norm = norm + eta
            else:
                mixed = mixed + tl.where(agree, ds[k], 0.0)
                norm = norm + tl.where(agree, tl.load(coef_ptr + 3 * k + 1), 0.0)
        if STATS:
            tl.store(stats_ptr + 2 * pid, tl.sum((selected & m).to(tl.int32)))
            tl.store(stats_ptr + 2 * pid + 1, tl.sum(conflict.to(tl.int32)))
        if MODE == 4:
            mixed = tl.math.div_rn(mixed, tl.maximum(norm, 1e-6))
        elif NORMALIZE:
            mixed = tl.math.div_rn(mixed, tl.where(norm == 0, 1.0, norm))
    else:
        mixed = total
        if NORMALIZE:
            mixed = tl.math.div_rn(mixed, divisor)
    if LAMBDA:
        mixed = mixed * lam
    _store(out_ptr, offs, base + mixed, m, BF16_BITS)


# ---------------------------------------------------------------------------------------------------
# Host side


def _upload(rows, dtype, device: torch.device) -> torch.Tensor:
    """A small parameter table on the device, copied asynchronously (pinned) so the host never waits."""
    t = torch.tensor(rows, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def _hist_programs(device: torch.device, nblocks: int) -> int:
    if device.type == "cuda":
        return min(nblocks, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(nblocks, 4)  # the interpreter: few programs, still a grid-stride loop


def _select(xs, b, sel, nsel, nb, var, topk=None):
    """Radix select, in place on sel [nsel, nb, 2] = (prefix, rank r) -> (v, room) for each key and
    bound, then the per-block offsets of the key == v elements among the equals: [nsel, nb, nblocks].
    topk (SCE): r = n − int(#nonzero · topk), from the zero count of the first pass."""
    n = b.numel()
    nblocks = triton.cdiv(n, BLOCK)
    K = len(xs)
    for level, (shift, bits) in enumerate(_LEVELS):
        nh = 1 if level == 0 else nb
        hist = torch.zeros(nsel, nh, 1 << bits, dtype=torch.int32, device=b.device)
        zeros = torch.zeros(1, dtype=torch.int32, device=b.device)
        count_zero = level == 0 and topk is not None
        _hist_kernel[(_hist_programs(b.device, nblocks),)](
            xs, b, sel, hist, zeros, n, nblocks, NSEL=nsel, K=K, NB=nb, NH=nh, VAR=var, SHIFT=shift, BITS=bits,
            COUNT_ZERO=count_zero, BLOCK=BLOCK, **_OPTS)
        if count_zero:
            sel[..., 1] = n - ((n - zeros).double() * topk).floor().long()
        _pick_kernel[(nsel * nb,)](hist, sel, NB=nb, NH=nh, SHIFT=shift, BITS=bits, **_OPTS)
    cnt = torch.empty(nsel, nb, nblocks, dtype=torch.int32, device=b.device)
    _count_kernel[(nblocks,)](xs, b, sel, cnt, n, nblocks, NSEL=nsel, K=K, NB=nb, VAR=var, BLOCK=BLOCK, **_OPTS)
    return torch.cumsum(cnt, -1) - cnt


def _bounds(nb: int, n: int, density: float, gamma: float, active: bool) -> list[int]:
    """The reference's rank interval: ties keeps rank >= n − k, breadcrumbs rank in [lo, lo + keep);
    a model that is not sparsified keeps every rank."""
    if not active:
        return [0, n][:nb]
    if nb == 1:
        return [n - max(1, int(density * n))]
    keep = int(density * n)
    lo = max(0, n - keep - int(gamma * n))
    return [lo, lo + keep]


def _family(method, inputs: Inputs, p: dict, xs, b, out):
    mode, nb, consensus = _FAMILY[method]
    p = family_params(method, p)
    K, n, dev = len(xs), b.numel(), b.device
    nblocks = triton.cdiv(n, BLOCK)
    density = p["density"]
    # A model is sparsified when 0 < density < 1; otherwise it is kept whole (density >= 1, no rescale)
    # or dropped (density <= 0: scale 0). task_arithmetic ignores density.
    active = [mode != _NONE and 0 < d < 1 for d in density]
    if not any(active):
        mode = _NONE
    scale = [0.0 if method != "task_arithmetic" and d <= 0 else 1.0 for d in density]
    coef = _upload([[s, w, d if a else 1.0] for s, w, d, a in zip(scale, p["weight"], density, active)],
                   torch.float32, dev)
    keys = _upload([[key & 0xFFFFFFFF, key >> 32]
                    for key in stream_keys(method, inputs.seed, inputs.name, inputs.other_indices)], torch.int64, dev)
    sel = eqoff = bits = sums = torch.zeros(1, dtype=torch.int64, device=dev)  # placeholders when unused
    rescale = p["rescale"] and any(active)
    if mode == _RANK:
        gamma = p["gamma"] if nb == 2 else [0.0] * K
        sel = _upload([[[0, r] for r in _bounds(nb, n, d, g, a)] for d, g, a in zip(density, gamma, active)],
                      torch.int64, dev)
        eqoff = _select(xs, b, sel, K, nb, False)
    if rescale or mode == _DELLA:
        sums = torch.zeros(K, 2, nblocks, dtype=torch.float32, device=dev)
    if mode == _DELLA:
        bits = torch.zeros(n, dtype=torch.int32, device=dev)
        b32 = b.to(torch.float32)
        for k, (x, d, a) in enumerate(zip(xs, density, active)):
            if not a:
                bits |= 1 << k
                continue
            # The one non-fused step: rank of |δ| within each row (stable torch sort), one model at a time.
            prob = della_keep_probability(x.to(torch.float32) - b32, d, p["epsilon"][k]).contiguous()
            _della_kernel[(nblocks,)](x, b, prob, bits, sums, keys, k, n, nblocks, BLOCK=BLOCK, **_OPTS)
    elif rescale:
        _sums_kernel[(nblocks,)](xs, b, sums, sel, eqoff, coef, keys, n, nblocks, K=K, MODE=mode, NB=nb,
                                 BLOCK=BLOCK, **_OPTS)
    if rescale:
        before, after = sums.sum(-1).unbind(-1)
        apply = _upload(active, torch.bool, dev) & (before >= _RESCALE_EPS) & (after >= _RESCALE_EPS)
        coef[:, 0] = torch.where(apply, before / after, coef[:, 0])
    divisor = float(torch.tensor(p["weight"], dtype=torch.float32).reshape(-1, 1).sum(0))
    _merge_kernel[(nblocks,)](xs, b, out, sel, eqoff, coef, keys, bits, bits, n, nblocks,
                              divisor if abs(divisor) >= 1e-8 else 1.0, p["lambda"], K=K, MODE=mode, NB=nb,
                              CONSENSUS=consensus, NORMALIZE=p["normalize"], LAMBDA=p["lambda"] != 1,
                              BF16_BITS=out.dtype == torch.int16, STATS=False, BLOCK=BLOCK, **_OPTS)


def _sce(p: dict, xs, b, out, stats: torch.Tensor | None = None) -> torch.Tensor:
    """SCE into out; returns η (on the device). stats ([nblocks, 2] int32): SeMe's per-block counts."""
    K, n, dev = len(xs), b.numel(), b.device
    nblocks = triton.cdiv(n, BLOCK)
    topk = p["select_topk"]
    nb = int(topk < 1)  # select: keep the int(topk · #nonzero) elements of largest variance
    sel = eqoff = torch.zeros(1, 1, 2, dtype=torch.int64, device=dev)
    if nb:
        eqoff = _select(xs, b, sel, 1, 1, True, topk)
    sums = torch.zeros(K, 2, nblocks, dtype=torch.float32, device=dev)
    # (coef, keys and bits are unused by SCE: any tensor will do)
    _sums_kernel[(nblocks,)](xs, b, sums, sel, eqoff, sums, sel, n, nblocks, K=K, MODE=_SCE, NB=nb,
                             BLOCK=BLOCK, **_OPTS)
    energy = sums[:, 1].sum(-1) / n  # η_k ∝ mean of the masked δ_k², uniform when all vanish
    total = energy.sum()
    eta = torch.where(total.abs() < 1e-6, torch.full_like(energy, 1.0 / K), energy / total)
    coef = torch.stack([eta, torch.ones_like(eta), torch.ones_like(eta)], -1).contiguous()
    _merge_kernel[(nblocks,)](xs, b, out, sel, eqoff, coef, sel, sel, stats if stats is not None else sel, n,
                              nblocks, 1.0, 1.0, K=K, MODE=_SCE, NB=nb, CONSENSUS=True, NORMALIZE=True,
                              LAMBDA=False, BF16_BITS=out.dtype == torch.int16, STATS=stats is not None,
                              BLOCK=BLOCK, **_OPTS)
    return eta


def seme_fuse(inputs: Inputs, params: dict) -> tuple[torch.Tensor, dict]:
    """SeMe's Select / Compute / Erase (METHOD §5) on the SCE kernel, with the statistics SeMe reports
    (as `seme.methods.seme.seme_fuse` gives them): (float32 tensor, statistics)."""
    from seme.methods.seme import fusion_stats

    base, others = inputs.base, inputs.others
    n, K = base.numel(), len(others)
    if not fits(n, K):
        raise ValueError(f"seme_fuse: at most 2^31 elements and {MAX_MODELS} models")
    out = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    if n == 0:
        return out, fusion_stats(0, 0, 0, [1 / K] * K)
    stats = torch.empty(triton.cdiv(n, BLOCK), 2, dtype=torch.int32, device=base.device)
    eta = _sce(params, tuple(x.contiguous() for x in others), base.contiguous(), out, stats)
    selected, conflicts = stats.sum(0, dtype=torch.int64).tolist()
    return out, fusion_stats(n, selected, conflicts, eta.tolist())


def fits(n: int, models: int) -> bool:
    """Whether the kernels take n elements of `models` non-base models (int32 offsets, DELLA's mask word)."""
    return n < 2 ** 31 and models <= MAX_MODELS


_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # written by the kernel; others are a cast of fp32


def fused_merge(method: str, inputs: Inputs, params: dict, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Merge one tensor like `registry.get(method).fn(inputs, params)`, into `out_dtype`."""
    if method not in SUPPORTED:
        raise ValueError(f"fused_merge: unsupported method {method!r}")
    inputs = with_base(inputs)
    base = inputs.base
    if not inputs.others:
        return base.to(out_dtype)
    if compute_dtype(base) != torch.float32:  # float64 is merged in float64: the reference does it
        return registry.get(method).fn(inputs, params).to(out_dtype)
    if out_dtype not in _OUT_DTYPES:
        return fused_merge(method, inputs, params).to(out_dtype)
    n = base.numel()
    if not fits(n, len(inputs.others)):
        raise ValueError(f"fused_merge: at most 2^31 elements and {MAX_MODELS} models")
    out = torch.empty(base.shape, dtype=out_dtype, device=base.device)
    if n:
        xs = tuple(x.contiguous() for x in inputs.others)
        target = out.view(torch.int16) if out_dtype == torch.bfloat16 else out
        if method == "sce":
            _sce(params, xs, base.contiguous(), target)
        else:
            _family(method, inputs, params, xs, base.contiguous(), target)
    return out
