"""SeMe's planning and alignment pre-pass: how each source tensor is carried into the pivot's
coordinates before Select / Compute / Erase (METHOD §3–§5, §7).

Planning (headers and tokenizers only) maps pivot layers to source layers (§4), builds vocabulary
maps (shared tokens by string, then by the text they spell: vocab.py) and checks shapes. Before the
streaming pass, `prepare` reads the LM heads, computes semantic bases (§1) and one orthogonal
alignment per source (§3), skipped when it is within `align_tolerance` of the identity. During the
pass, `SemanticContext.load` builds each aligned, interpolated, vocabulary-mapped source tensor.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from seme import distributed
from seme.architectures import VOCAB_ROLES, orientation
from seme.errors import SemeError
from seme.methods.seme import stabilize
from seme.plan import model_depth
from seme.semantic import alignment, layers, vocab
from seme.semantic.bases import semantic_bases
from seme.semantic.mapping import js_divergence, mean_distribution
from seme.vocabulary import Vocabulary, read

_SIGNATURE_COLUMNS = 256
# The drift report's cost grows with V x d (each signature is a [256, d] x [d, V] product): it is
# computed unasked only up to this size, and always for `stabilize`, which needs it.
_DRIFT_REPORT_ELEMENTS = 1 << 27
ROTATED_ROLES = ("read", "lm_head", "embedding", "position_embedding", "write", "write_bias", "stream_map",
                 "stream_vector")
NORMED_ROLES = ("read", "stream_map")  # tensors that may read a norm's output, folding its gain
PIVOT_ROLES = ("norm", "final_norm")  # gains: an aligned source takes the pivot's (folded into its readers)


@dataclass(frozen=True)
class Derived:
    """How to build one source input of a task: a blend of its tensors, then role-wise transforms."""

    model: int
    terms: tuple[tuple[str, float, str | None], ...]  # (tensor, coefficient, the norm gain that feeds it)
    role: str | None
    layout: str
    vocab: bool  # rows are tokens: reorder them through the vocabulary map


@dataclass
class SemanticPlan:
    pivot: int
    sources: list[int]
    layer_maps: dict[int, list[tuple[int, int, float]]]
    token_maps: dict[int, list[int] | None]  # None: same vocabulary
    settings: dict
    head_names: dict[int, tuple[str, str | None]]  # model -> (LM head tensor, final norm gain)
    # whether the merge reports semantic drift (`reports_drift`), set once the tasks' parameters are bound: the
    # memory count asks it of every tensor
    report_drift: bool = False

    def prepare(self, plan, device: torch.device) -> "SemanticContext":
        return SemanticContext(self, plan, device)


def settings_of(recipe, method) -> dict:
    from seme.config import evaluate

    out = {}
    for p in method.params:
        raw = (recipe.parameters or {}).get(p.name)
        value = evaluate(raw, "", 0.0) if raw is not None else None
        out[p.name] = p.default if value is None else p.coerce(value, "parameters")
    return out


def plan_sources(recipe, method, models, archs, index):
    """Validate a SeMe recipe against the model headers; the semantic side of its plan."""
    if recipe.uses_slices:
        raise SemeError("seme merges whole models: give 'models', not 'slices' (layers are matched by SeMe)")
    pivot = index[recipe.base_model]
    sources = [index[s.model] for s in recipe.slices[0].sources if index[s.model] != pivot]
    parch = archs[pivot]
    d = parch.hidden_size(models[pivot].config)
    layer_maps, token_maps, heads = {}, {}, {}
    for m in [pivot] + sources:
        heads[m] = _head_names(models[m], archs[m])
        _check_head(models[m], *heads[m], width=d)
    settings = settings_of(recipe, method)
    v_piv = models[pivot].tensors[heads[pivot][0]].shape[0]
    piv_vocab = _vocabulary(models[pivot], v_piv)
    for m in sources:
        arch, name = archs[m], models[m].name
        if arch is not parch:  # one object per family variant
            raise SemeError(f"SeMe: {name} is a {arch.label} model but the pivot is {parch.label}; "
                            f"cross-architecture merges are not supported yet")
        if arch.hidden_size(models[m].config) != d:
            raise SemeError(f"SeMe: {name} has hidden size {arch.hidden_size(models[m].config)}, the pivot {d}; "
                            f"sources of another width are not supported yet")
        layer_maps[m] = layers.layer_map(model_depth(parch, models[pivot]), model_depth(arch, models[m]))
        v_src = models[m].tensors[heads[m][0]].shape[0]
        src_vocab = _vocabulary(models[m], v_src)
        unread = models[pivot] if piv_vocab is None else models[m] if src_vocab is None else None
        if unread is not None:  # no vocabulary to map by: the rows are taken as the same tokens
            if v_src != v_piv:
                why = "has no tokenizer files" if not unread.tokenizer_files() else \
                    "has a tokenizer that is its own code, which seme never runs"
                raise SemeError(f"SeMe: {name} has {v_src} token rows, the pivot {v_piv}, and no vocabulary to map "
                                f"them by: {unread.name} {why}")
            token_maps[m] = None
        elif src_vocab.ids == piv_vocab.ids and v_src == v_piv:
            token_maps[m] = None
        else:
            token_maps[m] = vocab.token_map(piv_vocab, src_vocab, v_piv)
            shared = sum(j >= 0 for j in token_maps[m])
            if not shared:
                raise SemeError(f"SeMe: {name} shares no token with the pivot's vocabulary")
            if shared < d and settings["alignment"] != "never":  # A = Σ over shared tokens of rank-one terms
                raise SemeError(f"SeMe: {name} shares {shared} tokens with the pivot, fewer than the hidden size "
                                f"{d}: too few to determine the alignment; set alignment: never to merge without it")
    return SemanticPlan(pivot, sources, layer_maps, token_maps, settings, heads)


def reports_drift(sp: SemanticPlan, models, tasks) -> bool:
    """Whether the merge reports semantic drift: unasked where the pivot's head is small enough, and
    always for `stabilize`, which needs it."""
    rows, width = models[sp.pivot].tensors[sp.head_names[sp.pivot][0]].shape
    return rows * width <= _DRIFT_REPORT_ELEMENTS or any(t.params.get("stabilize") for t in tasks if t.derived)


def _vocabulary(model, rows: int) -> Vocabulary | None:
    """The model's vocabulary (seme.vocabulary.read), checked to index its LM head's rows: rows past its tokens
    (padding) are no token's, but a token past its rows has none, and its tokenizer is not the model's."""
    vocabulary = read(model, "SeMe")
    past = sorted((i, tok) for tok, i in vocabulary.ids.items() if i >= rows) if vocabulary is not None else []
    if past:
        raise SemeError(f"SeMe: the tokenizer of {model.name} has {len(past)} tokens past its LM head's {rows} rows "
                        f"({past[0][1]!r} is {past[0][0]}): it is not the model's vocabulary")
    return vocabulary


def _head_names(model, arch) -> tuple[str, str | None]:
    head = embed = gain = None
    for name in model.tensors:
        role = arch.role(name)
        if role is None or role.layer is not None:  # a multi-token-prediction layer's own head and embedding
            continue
        if role.role == "lm_head":
            head = name
        elif role.role == "embedding":
            embed = name
        elif role.role == "final_norm" and not arch.streams_key:  # over several streams (Qwen4-Exp's), its gain
            # scales no channel of what the head reads (their gated average): the head's rows alone
            gain = name
    head = head or embed
    if head is None and arch.rotation_obstacles():  # RemBERT's token tables lie outside the stream: refused as its
        # family's rotations are, in the same words
        raise SemeError(f"{_not_rotatable(arch, arch.rotation_obstacles())}, and {model.name} has no LM head or "
                        f"embedding in the residual stream to derive semantic bases from; merge it with another method")
    if head is None:
        raise SemeError(f"SeMe: {model.name} has no LM head or embedding to derive semantic bases from")
    return head, gain


def _check_head(model, head: str, gain: str | None, width: int) -> None:
    """What the semantic bases are read from, before any tensor is: a float LM head of [tokens, width] (the
    stream's) and the final norm's gain of [width]."""
    from seme.plan import FLOAT_CODES

    h, g = model.tensors[head], model.tensors[gain] if gain else None
    if (h.dtype not in FLOAT_CODES or len(h.shape) != 2 or h.shape[1] != width
            or g is not None and (g.dtype not in FLOAT_CODES or tuple(g.shape) != (width,))):
        found = f"'{head}' of {list(h.shape)} {h.dtype}" + (f" and '{gain}' of {list(g.shape)} {g.dtype}" if g else "")
        raise SemeError(f"SeMe: {model.name} has {found}; the semantic bases are read from a float LM head of "
                        f"[tokens, {width}]" + (f" and a final norm of [{width}]" if g else ""))


def _not_rotatable(arch, why: list[str]) -> str:
    return (f"SeMe: aligning {arch.label} models by rotation is not supported ({' and '.join(why)}: a rotation of the "
            f"residual stream would change the function)")


def derive(sp: SemanticPlan, models, archs, pivot_name: str) -> tuple[Derived, ...]:
    """For one pivot tensor, how every source supplies its counterpart."""
    parch = archs[sp.pivot]
    role = parch.role(pivot_name)
    pshape = models[sp.pivot].tensors[pivot_name].shape
    out = []
    for m in sp.sources:
        arch, folder = archs[m], models[m]
        if role is not None and role.layer is not None and not parch.beside_language(pivot_name):
            a, b, lam = sp.layer_maps[m][role.layer]
            picks = [(a, 1.0 - lam)] + ([(b, lam)] if lam > 0 else [])
            terms = []
            for layer, coef in picks:
                name = arch.rename_layer(pivot_name, layer)
                gain = arch.role(name).norm if role.role in NORMED_ROLES else None
                terms.append((name, coef, gain))
        elif role is not None and role.role == "lm_head":
            terms = [(sp.head_names[m][0], 1.0, sp.head_names[m][1])]
        else:  # a read outside the layers folds its own norm's gain too (Janus' generation head: the final norm's)
            terms = [(pivot_name, 1.0, role.norm if role is not None and role.role in NORMED_ROLES else None)]
        for name, _, _ in terms:
            if name not in folder.tensors:
                raise SemeError(f"SeMe: tensor '{name}' is missing from {folder.name}")
            shape = folder.tensors[name].shape
            token_rows = role is not None and role.role in VOCAB_ROLES
            if (shape[1:] if token_rows else shape) != (pshape[1:] if token_rows else pshape):
                raise SemeError(f"SeMe: tensor '{name}' has shape {list(shape)} in {folder.name}, "
                                f"{list(pshape)} in the pivot")
        vocab_rows = role is not None and role.role in VOCAB_ROLES and sp.token_maps[m] is not None
        out.append(Derived(m, tuple(terms), role.role if role else None, role.layout if role else "out_in", vocab_rows))
    return tuple(out)


class SemanticContext:
    """The alignment pre-pass (reads the LM heads) and the per-tensor source transforms."""

    def __init__(self, sp: SemanticPlan, plan, device: torch.device):
        self.sp, self.plan, self.device = sp, plan, device
        self.stats: dict[str, dict] = {}
        self.params = {t.name: t.params for t in plan.tasks}
        arch = plan.archs[sp.pivot]
        # Under torchrun each rank aligns its share of the sources (every one needs the pivot's bases),
        # and the ranks exchange the rotations.
        group = distributed.current()
        mine = sp.sources[group.rank::group.world]
        models = [sp.pivot] + mine
        heads = [self._head(m) for m in models]
        bases = semantic_bases([h for h, _ in heads], [plan.models[m].name for m in models], [g for _, g in heads])
        self.bases = dict(zip(models, bases))
        aligned = {m: self._align(m) for m in mine}
        if group.world > 1:
            for shared in group.share({m: (None if q is None else q.cpu(), report) for m, (q, report) in aligned.items()}):
                aligned.update({m: (None if q is None else q.to(device), report) for m, (q, report) in shared.items()})
        self.rotations: dict[int, torch.Tensor | None] = {m: aligned[m][0] for m in sp.sources}
        self.alignment_report = {m: aligned[m][1] for m in sp.sources}
        if any(q is not None for q in self.rotations.values()):
            if arch.inferred:  # names alone cannot say which norm gains a reader folds, or which norms turn
                from seme.architectures import known_architectures

                kind = (plan.models[sp.pivot].config.get("architectures") or ["this"])[0]
                raise SemeError(f"SeMe: aligning {kind} models by rotation needs the architecture's role table, "
                                f"and seme has none (it has {', '.join(known_architectures())}); "
                                f"set alignment: never to merge without it")
            why = arch.rotation_obstacles()
            # beside a language model's own table (no text_config) that is not projected, a tower's tensors are
            # undescribed too: what it writes into the stream would not turn
            unknown = [t.name for t in plan.tasks if not t.copy and arch.role(t.name) is None
                       and (not arch.beside_language(t.name) or not arch.settings_key)]
            if unknown:
                more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
                why.append(f"its role table does not describe {', '.join(unknown[:3])}{more}")
            if why:
                raise SemeError(f"{_not_rotatable(arch, why)}; set alignment: never to merge without it")
        # after the alignment only the drift report reads bases, the pivot's (its G⁻¹ and row norms are held)
        self.bases = {sp.pivot: self.bases[sp.pivot]} if sp.report_drift else {}

    def _load(self, m: int, name: str) -> torch.Tensor:
        return self.plan.models[m].load(name).to(self.device, torch.float32)

    def _gain(self, m: int, name: str | None) -> torch.Tensor | None:
        return None if name is None else self._load(m, name) + self.plan.archs[m].gain_offset(name)

    def _head(self, m: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head as stored (read a block at a time by the bases; on a GPU, a copy there) and the gain
        folded into its rows."""
        head, gain = self.sp.head_names[m]
        return self.plan.models[m].load(head).to(self.device), self._gain(m, gain)

    def _align(self, m: int):
        settings, sp = self.sp.settings, self.sp
        tmap = sp.token_maps[m]
        piv_ids = torch.arange(self.bases[sp.pivot].vocab_size)
        src_ids = piv_ids.clone()
        if tmap is not None:
            t = torch.tensor(tmap)
            piv_ids, src_ids = torch.nonzero(t >= 0).flatten(), t[t >= 0]
        report = {"model": self.plan.models[m].path, "shared_tokens": int(piv_ids.numel()),
                  "source_vocab": self.bases[m].vocab_size, "pivot_vocab": self.bases[sp.pivot].vocab_size,
                  "head_condition": self.bases[m].condition, "layer_map": sp.layer_maps[m]}
        if settings["alignment"] == "never":
            return None, {**report, "applied": False, "reason": "alignment: never"}
        A = alignment.alignment_map(self.bases[m], self.bases[sp.pivot], src_ids, piv_ids, mode=settings["align_mode"],
                                    temperature=settings["temperature"], topk=settings["topk"])
        Q = alignment.orthogonal_factor(A)
        distance = alignment.distance_from_identity(Q)
        report.update(distance_from_identity=distance, mode=settings["align_mode"])
        if settings["alignment"] == "auto" and distance < settings["align_tolerance"]:
            return None, {**report, "applied": False, "reason": "already aligned (within align_tolerance)"}
        return Q.to(torch.float32), {**report, "applied": True}

    def load(self, spec: Derived, pivot_name: str) -> torch.Tensor:
        """The source tensor of `spec`, in the pivot's coordinates, layers and vocabulary."""
        m, Q = spec.model, self.rotations[spec.model]
        if Q is not None and spec.role in PIVOT_ROLES:
            return self._load(self.sp.pivot, pivot_name)
        pivot_gain = None
        if Q is not None and spec.role in ("lm_head", *NORMED_ROLES):
            role = self.plan.archs[self.sp.pivot].role(pivot_name)
            pivot_gain = self._gain(self.sp.pivot, role.norm if spec.role in NORMED_ROLES
                                    else self.sp.head_names[self.sp.pivot][1])
        total = None
        for name, coef, gain_name in spec.terms:
            x = self._load(m, name)
            if Q is not None and spec.role in ROTATED_ROLES:
                x = alignment.rotate(x, spec.role, spec.layout, Q, self._gain(m, gain_name), pivot_gain)
            x = x if coef == 1.0 else x * coef  # one term of coefficient 1 (no interpolation) is not copied
            total = x if total is None else total + x
        return self._gather_rows(m, total, pivot_name) if spec.vocab else total

    def _gather_rows(self, m: int, x: torch.Tensor, pivot_name: str) -> torch.Tensor:
        """Rows in the pivot's token order; tokens the source lacks keep the pivot's row (no update), as do
        tokens past the source's rows where a table holds only the first tokens' (gemma 3n's per-layer one)."""
        out = self._load(self.sp.pivot, pivot_name)
        tmap = torch.tensor(self.sp.token_maps[m][:out.shape[0]], device=x.device)
        keep = (tmap >= 0) & (tmap < x.shape[0])
        out[keep] = x[tmap[keep]]
        return out

    def record(self, name: str, stats: dict, inputs, merged: torch.Tensor) -> torch.Tensor:
        """Keep a tensor's statistics and return the tensor to write. For residual-writing tensors add
        its semantic drift (METHOD §6): the Jensen–Shannon divergence between the semantic signature
        of the merged update and of each source's aligned update, decoded on the pivot's bases. With
        `stabilize` (and two sources or more), the returned tensor is `merged` re-weighted to lower
        that drift, and the coefficients and the drift before and after are kept."""
        role = self.plan.archs[self.sp.pivot].role(name)
        if role is not None and role.role == "write" and self.sp.report_drift:
            base = inputs.base.to(torch.float32)
            sources = [self._signature(x.to(torch.float32) - base, role.layout) for x in inputs.others]

            def drift(tensor: torch.Tensor) -> list[float | None] | None:
                sig = self._signature(tensor.to(torch.float32) - base, role.layout)
                return None if sig is None else [js_divergence(sig, s) if s is not None else None for s in sources]

            written = drift(merged)
            params = self.params[name]
            if written is not None and params["stabilize"] and len(sources) > 1:
                before = written
                merged, scales, eta = stabilize(inputs, params, lambda t: _mean(drift(t)), _mean(before))
                written = drift(merged)
                stats["stabilization"] = {"coefficients": scales, "eta": _rounded(eta),
                                          "drift_before": _rounded(before), "drift_after": _rounded(written)}
            if written is not None:
                stats["semantic_drift"] = _rounded(written)
        self.stats[name] = stats
        return merged

    def _signature(self, delta: torch.Tensor, layout: str) -> torch.Tensor | None:
        """Mean distribution of a write update's columns (residual directions), weighted by their
        norms; the `_SIGNATURE_COLUMNS` largest columns stand for the whole update."""
        layout = orientation(layout, "write", delta.shape, self.bases[self.sp.pivot].shape[1])
        columns = delta.mT if layout == "out_in" else delta
        columns = columns.reshape(-1, columns.shape[-1])  # fused experts' [E, in, out]: every expert's columns
        norms = columns.norm(dim=1)
        if float(norms.sum()) == 0.0:
            return None
        top = torch.topk(norms, min(_SIGNATURE_COLUMNS, norms.numel())).indices
        return mean_distribution(columns[top], self.bases[self.sp.pivot], norms[top],
                                 temperature=self.sp.settings["temperature"])

    def write_report(self, folder: str, tensors: dict[str, dict]) -> None:
        """The report, with the statistics of `tensors` (`record`'s, of every tensor: those another
        rank or an interrupted run merged too)."""
        import seme

        report = {
            "method": "seme", "seme_version": seme.__version__, "torch_version": torch.__version__,
            "pivot": self.plan.models[self.sp.pivot].path, "settings": self.sp.settings,
            "random_seed": self.plan.recipe.random_seed,
            "sources": [self.alignment_report[m] for m in self.sp.sources],
            "tensors": tensors,
        }
        with open(os.path.join(folder, "seme_report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
            f.write("\n")


def _mean(drift: list[float | None] | None) -> float:
    """The mean drift over the sources that have a signature; infinite for an update without one."""
    values = [d for d in drift or () if d is not None]
    return sum(values) / len(values) if values else float("inf")


def _rounded(values: list[float | None]) -> list[float | None]:
    return [round(v, 6) if v is not None else None for v in values]
