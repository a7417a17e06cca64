"""What a SeMe merge on the CPU holds in memory beside the mapped inputs and the results waiting to
be written, so that --max-memory counts it before any tensor is read: the alignment pre-pass's peak
(`prepass_bytes`), what the merge loop keeps from it (`held_bytes`) and one tensor's derived inputs,
merge and drift report (`task_bytes`). On a GPU these are the GPU's memory, and the host holds none.

Bounds, not exact counts: G⁻¹ is counted in float64 (float32 where the head is well conditioned),
every source as rotated (`alignment: auto` may skip one). tests/test_memory.py measures them."""
from __future__ import annotations

import math

# Rows of a head converted at a time, by bytes (an fp64 block of 64 MiB: 8192 rows of a 1024-wide head, 2048 of a
# 4096-wide one): the pre-pass holds blocks and d x d matrices, never a [V, d] copy of a head.
BLOCK_BYTES = 64 << 20
# The pre-pass's transients, measured (tests/test_memory.py), in d x d float64 matrices and fp64 blocks of rows:
_FACTOR = (4.0, 2.0)  # a head's Gram matrices, eigenvalues, Cholesky factor and inverse; a block in fp32 and fp64
_CROSS = (3.0, 3.5)  # the alignment's cross product and its sum; both heads' rows (gathered, scaled, fp64)
_POLAR = 7.0  # A, its SVD (U, Vh, LAPACK's workspace) and the product U Vh
_ANCHORS = 4096  # probability mode's anchors: every max(1, V // _ANCHORS)-th row (alignment.alignment_map)


def block_rows(width: int) -> int:
    """Rows of a `width`-wide head in one block (`BLOCK_BYTES` in fp64)."""
    return max(1, BLOCK_BYTES // (8 * max(width, 1)))


def drift_bytes(vocab: int, width: int) -> int:
    """A drift signature's (mapping.mean_distribution over the pivot's bases): the cosines it keeps between
    its passes, a block of them with its temporaries and the block of head rows they come from."""
    from seme.semantic.mapping import _CHUNK, _KEPT_COSINES
    from seme.semantic.pipeline import _SIGNATURE_COLUMNS

    q = _SIGNATURE_COLUMNS
    cols = min(_CHUNK, block_rows(width), vocab)
    return min(_KEPT_COSINES, 4 * q * vocab) + 4 * 4 * q * cols + 2 * 4 * cols * width


def _heads(plan) -> list[tuple[int, int]]:
    """(rows, width) of every model's LM head, the pivot's first."""
    sp = plan.semantic
    return [tuple(plan.models[m].tensors[sp.head_names[m][0]].shape) for m in [sp.pivot] + sp.sources]


def prepass_bytes(plan, device: str) -> int:
    """The alignment pre-pass's peak: every head's G⁻¹ and row norms, the rotations, and the larger of
    one head's factorisation and one source's alignment (their d x d matrices and blocks of rows);
    heads a LoRA adapter changes are whole copies."""
    if device != "cpu":
        return 0
    sp = plan.semantic
    heads = _heads(plan)
    d = heads[0][1]
    square, block = 8 * d * d, 8 * min(block_rows(d), max(v for v, _ in heads)) * d
    held = len(heads) * square + 4 * sum(v for v, _ in heads) + len(sp.sources) * square // 2
    held += sum(plan.models[m].tensors[sp.head_names[m][0]].nbytes for m in [sp.pivot] + sp.sources
                if plan.models[m].adapted(sp.head_names[m][0]))
    work = _FACTOR[0] * square + _FACTOR[1] * block
    if sp.settings["alignment"] != "never":
        cross = _CROSS[0] * square + _CROSS[1] * block
        if sp.settings["align_mode"] == "probability":
            cross = max(_anchors_bytes(v, d, heads[0][0], sp.settings["topk"]) for v, _ in heads[1:])
        work = max(work, cross, _POLAR * square)
    return int(held + work)


def _anchors_bytes(vocab: int, width: int, pivot_vocab: int, topk: int) -> int:
    """Probability alignment (alignment.alignment_map) from a source of `vocab` tokens: its anchors (unit rows,
    φ, the fp64 least squares), a block of their cosines and their top tokens' rows (mapping.semantic_mix),
    measured (tests/test_memory.py)."""
    step = max(1, vocab // _ANCHORS)
    anchors = -(-vocab // step)
    return int(5 * 8 * anchors * width + min(4 * anchors * pivot_vocab, BLOCK_BYTES // 2)
               + 1.5 * min(4 * anchors * topk * width, BLOCK_BYTES // 8))


def held_bytes(plan, device: str) -> int:
    """What the merge loop keeps from the pre-pass: the rotations and, for the drift report, the
    pivot's G⁻¹ and row norms."""
    if device != "cpu":
        return 0
    v, d = _heads(plan)[0]
    held = len(plan.semantic.sources) * 4 * d * d
    return held + (8 * d * d + 4 * v if plan.semantic.report_drift else 0)


def task_bytes(plan, task, fused: bool, out_size: int) -> int:
    """A SeMe tensor's merge on the CPU beside its mapped inputs and results waiting to be written: its
    derived inputs as the merge takes them (each built in fp32 (its read, the rotation's copies, an
    interpolation's second layer, rows put in the pivot's token order), then cast to the compute dtype
    before the next is built: engine.TorchEngine.merge), then the larger of the merge (the pivot
    widened to fp32, the fp32 result and its cast to `out_size` bytes an element; the reference's
    temporaries unless `fused`) and, for a tensor writing the stream, the drift report (the pivot and
    one update in fp32, a signature's blocks; with `stabilize`, the reference's temporaries)."""
    from seme.methods import registry
    from seme.plan import DTYPE_SIZES, TORCH_NAMES
    from seme.semantic.pipeline import ROTATED_ROLES

    sp = plan.semantic
    n = math.prod(task.shape)
    rotating = sp.settings["alignment"] != "never"
    compute = TORCH_NAMES.get(task.compute_dtype) if task.compute_dtype else None
    kept = DTYPE_SIZES[compute] if compute else 4
    built = peak = 0
    for spec in task.derived[1:]:
        rows = max(math.prod(plan.models[spec.model].tensors[name].shape) for name, _, _ in spec.terms)
        one = 4 * rows * (3 if rotating and spec.role in ROTATED_ROLES else 1) + 8 * rows * (len(spec.terms) - 1)
        one += (4 * n if spec.vocab else 0) + (kept * n if compute else 0)
        peak = max(peak, built + one)
        built += kept * n
    widened = kept * n if kept >= 4 else 0  # the pivot, unless cast to a half dtype as the inputs are
    merge = built + widened + 4 * n + out_size * n
    if not fused:
        merge += registry.get("seme").working_bytes(len(task.inputs), n)
    report = 0
    role = plan.archs[sp.pivot].role(task.name)
    if role is not None and role.role == "write" and sp.report_drift:
        report = built + 4 * n + 3 * 4 * n + drift_bytes(*_heads(plan)[0])
        if task.params.get("stabilize"):
            report += registry.get("seme").working_bytes(len(task.inputs), n)
    return int(max(peak, merge, report))
