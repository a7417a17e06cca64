"""How one output tensor is merged into the buffer the shard writer hands out (a writable memoryview).

`NativeEngine` runs the C++ kernels on raw addresses: the inputs are the memory-mapped safetensors
files and the output is that buffer, so no input is copied and torch is never imported
(importing it takes about a second, a third of a whole CPU merge of four 223M models). It serves CPU
merges of the methods the kernels cover. `TorchEngine` serves everything else: other methods,
`--backend reference`, GPUs, SeMe and torchrun. Both give the same bytes where both apply (the
native engine is the fused backend on CPU without torch around it).
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import warnings

from seme import fused_merge
from seme.errors import SemeError
from seme.fused_merge import KERNEL_DTYPES
from seme.io.safetensors_file import DTYPE_SIZES, TORCH_NAMES
from seme.options import format_size

# The share of a GPU's free memory a merge plans to use: the caching allocator's rounding and
# fragmentation, and the CUDA kernels' workspaces, take some of the rest.
DEVICE_ROOM = 0.85


def make_engine(plan, device: str, backend: str, world: int, allow_nonfinite: bool = False):
    """The engine for this merge: native where it can serve the whole run, else torch. An input
    holding NaN or Inf is an error naming it, unless `allow_nonfinite` (`check_inputs`)."""
    if native_serves(plan, device, backend, world):
        return NativeEngine(plan, device, allow_nonfinite)
    return TorchEngine(plan, device, backend, allow_nonfinite=allow_nonfinite)


def native_serves(plan, device: str, backend: str, world: int) -> bool:
    """Whether the merge runs on the NativeEngine (which hands it the tasks it cannot take, `native_takes`)."""
    return (device == "cpu" and backend in ("auto", "fused") and world == 1 and not plan.semantic
            and plan.recipe.merge_method in fused_merge.METHODS and fused_merge.available())


def native_takes(plan, task) -> bool:
    """Whether the C++ kernels merge `task` as it lies: from the mapped inputs straight into the output
    buffer (see NativeEngine)."""
    models = plan.models
    codes = {models[m].tensors[name].dtype for m, name in task.inputs}
    code = codes.pop()
    base = 0 if plan.recipe.merge_method == "linear" else task.base_index
    compute = TORCH_NAMES.get(task.compute_dtype, code)
    return not (codes or code not in KERNEL_DTYPES or task.dtype not in KERNEL_DTYPES or compute not in (code, "F32")
                or base is None or (len(task.inputs) < 2 and plan.recipe.merge_method != "linear")
                or math.prod(task.shape) >= fused_merge.MAX_ELEMENTS or task.remap_rows
                or not fused_merge.covers(plan.recipe.merge_method, task.params, task.shape)
                or any(models[m].adapted(name) for m, name in task.inputs))


class TorchEngine:
    """Inputs as torch tensors on the merge device, `seme.backend`'s implementation of the method,
    and the result copied into the output. On a GPU the inputs of the next tasks are staged while
    one merges (`seme.staging`; `stage` forces it on or off, as the tests do on a CPU), and a tensor
    whose merge would not fit in the GPU's free memory is merged on the CPU instead (`route`)."""

    def __init__(self, plan, device: str, backend: str, stage: bool | None = None, allow_nonfinite: bool = False):
        import torch

        from seme.backend import implementation

        self.plan, self.device, self.backend = plan, torch.device(device), backend
        self.allow_nonfinite = allow_nonfinite
        self.impl, self.fused = implementation(plan.recipe.merge_method, backend, self.device)
        self.reference = implementation(plan.recipe.merge_method, "reference", self.device)[0]
        self.semantic = plan.semantic.prepare(plan, self.device) if plan.semantic else None
        self.stage = self.device.type == "cuda" if stage is None else stage
        self.stager = None
        self.on_host: set[str] = set()  # tasks merged on the CPU: too large for the device
        self._host: TorchEngine | None = None

    def staging(self, tasks, budget: int, progress):
        """A context in which the inputs of `tasks` (in merge order) are staged ahead, `budget` bytes
        at most beyond the task being merged; the readers' time is `progress`'s read stage."""
        if not self.stage:
            return contextlib.nullcontext()
        from seme.staging import InputStager

        tasks = [t for t in tasks if not t.copy]
        memory = device_memory(self.device)
        if memory is not None:  # staged inputs wait in GPU memory, beside the largest merge
            room = int(memory[0] * DEVICE_ROOM)
            tasks, largest = self.route(tasks, room)
            budget = max(0, min(budget, memory[1] // 4, room - largest))
        self.stager = InputStager(self.device, tasks, self._sources, budget,
                                  lambda seconds, nbytes: progress.stage("read", seconds, nbytes))
        return self.stager

    def route(self, tasks, room: int) -> tuple[list, int]:
        """Send the tasks whose merge needs more than `room` bytes of the device's memory
        (`device_bytes`) to the CPU, saying which; the others, and the most one of them needs. SeMe's
        tasks cannot move (their derived inputs are made on the device): one too large is refused."""
        # with allow_nonfinite, a tensor may be merged by the reference (check_inputs): its temporaries count
        needs = [(task, device_bytes(self.plan, task, self.fused and not self.allow_nonfinite)) for task in tasks]
        self.on_host = {task.name for task, need in needs if need > room}
        if self.on_host and self.semantic is not None:
            task, need = max(needs, key=lambda item: item[1])
            raise SemeError(f"merging '{task.name}' needs {format_size(need)} of {self.device}'s memory, "
                            f"{format_size(room)} are free to use: merge on the CPU (--device cpu)")
        if self.on_host:
            largest = max(need for task, need in needs if task.name in self.on_host)
            warnings.warn(f"{len(self.on_host)} tensor(s) ({', '.join(sorted(self.on_host)[:3])}"
                          f"{', ...' if len(self.on_host) > 3 else ''}) need up to {format_size(largest)} of "
                          f"{self.device}'s memory, more than the {format_size(room)} free to use: merged on the CPU")
        kept = [(task, need) for task, need in needs if task.name not in self.on_host]
        return [task for task, _ in kept], max((need for _, need in kept), default=0)

    def _sources(self, task) -> list:
        """The inputs to stage: all but SeMe's derived ones, which are built on the device."""
        return [None if task.derived and task.derived[i] else self.plan.models[m].load(name)
                for i, (m, name) in enumerate(task.inputs)]

    def merge(self, task, out: memoryview) -> bool:
        """Merge `task` into `out`; whether the result is finite. A NaN / Inf input is an error, or
        with `allow_nonfinite` merged by the reference (`check_inputs`)."""
        if task.name in self.on_host:
            if self._host is None:
                self._host = TorchEngine(self.plan, "cpu", self.backend, stage=False,
                                         allow_nonfinite=self.allow_nonfinite)
            return self._host.merge(task, out)
        import torch

        from seme.backend import WIDENED_BY_KERNELS
        from seme.methods.inputs import Inputs, all_finite
        from seme.plan import CODE_NAMES

        plan = self.plan
        # read here only when not staged: a LoRA adapter's update makes a read cost a product
        sources = self.stager.get(task) if self.stager is not None else [plan.models[m].load(n) for m, n in task.inputs]
        if task.derived:  # built one at a time, each cast to the compute dtype below before the next is built
            sources = (self.semantic.load(d, task.name) if d else t for d, t in zip(task.derived, sources))
        if task.remap_rows:
            sources = plan.vocabulary.apply([m for m, _ in task.inputs], sources, task.remap_base,
                                            columns=task.token_columns)
        compute = getattr(torch, task.compute_dtype) if task.compute_dtype else None
        on_device = []
        for t in sources:
            dtype = compute or t.dtype
            if self.fused and dtype == torch.float32 and t.dtype in WIDENED_BY_KERNELS:
                dtype = t.dtype  # the kernels widen to fp32 as they load: a cast first would only copy
            on_device.append(t.to(device=self.device, dtype=dtype, non_blocking=True))
            del t  # a derived input in fp32, once cast
        inputs = Inputs(tuple(on_device), task.base_index, task.name, plan.recipe.random_seed)
        out_dtype = getattr(torch, CODE_NAMES[task.dtype])
        merged = self.impl(inputs, task.params, out_dtype)
        if merged.inputs_finite is not True:  # unchecked, or a kernel saw a NaN / Inf δ: find which input
            # scanned on the merge device (a GPU's copies), unless derived inputs changed them
            defective = check_inputs(plan, task, [plan.models[m].load(n) for m, n in task.inputs] if task.derived
                                     else inputs.tensors, self.allow_nonfinite)
            if self.fused and (defective or merged.inputs_finite is False):
                merged = self.reference(inputs, task.params, out_dtype)
        result = merged.tensor
        if merged.stats is not None:
            result = self.semantic.record(task.name, merged.stats, inputs, result)
        result = result.to(out_dtype)
        finite = merged.output_finite if merged.output_finite is not None else all_finite(result)
        if len(out) and self.stager is not None:
            self.stager.put(result, out)
        elif len(out):
            torch.frombuffer(out, dtype=torch.uint8).copy_(result.contiguous().reshape(-1).view(torch.uint8))
        return finite


def device_bytes(plan, task, fused: bool) -> int:
    """The GPU memory `task`'s merge holds at its peak, `fused` if a GPU kernel serves the method:
    the staged inputs, their copies in the compute dtype or with re-mapped rows, the method's
    temporaries (a plain-torch merge's `Method.peak_buffers`; a fused kernel's scratch) and the
    result in the output dtype."""
    numel = math.prod(task.shape)
    codes = [plan.models[m].tensors[n].dtype for m, n in task.inputs]
    compute = TORCH_NAMES[task.compute_dtype] if task.compute_dtype else None
    kernel = kernel_merges(plan, task, fused)
    held = sum(plan.models[m].tensors[n].nbytes for m, n in task.inputs) + numel * DTYPE_SIZES[task.dtype]
    held += remapped_bytes(plan, task)
    if compute is not None and not (kernel and compute == "F32"):  # the kernels widen as they load
        held += sum(DTYPE_SIZES[compute] * numel for c in codes if c != compute)
    method = plan.recipe.merge_method
    if kernel and not method.startswith("della"):
        from seme.cuda_merge import METHODS, selection_rows

        # the CUDA kernels' selection buffer: a byte an element for each cut (the Triton kernels'
        # histograms and the per-block tables of both are small)
        return held + (selection_rows(method, task.params, len(codes)) * numel if method in METHODS else 0)
    # plain torch, or DELLA, whose keep probabilities the kernels take as the reference computes them
    return held + reference_bytes(plan, task, fused=False)


def torch_host_bytes(plan, task, fused: bool) -> int:
    """What a TorchEngine's CPU merge of `task` holds beside its inputs, their re-mapped or adapted copies and a
    plain-torch merge's temporaries (`reference_bytes`), `fused` if a kernel serves the method: the inputs' copies
    in the compute dtype and, where a kernel merges, the fp32 copies it widens inputs of mixed dtypes into
    (`fused_merge.kernel_inputs`) and its result, made before it is copied into the output buffer."""
    from seme.plan import _promote_codes

    numel = math.prod(task.shape)
    codes = [plan.models[m].tensors[n].dtype for m, n in task.inputs]
    if task.remap_rows:  # re-mapped into the widest input dtype
        codes = [_promote_codes(codes)] * len(codes)
    compute = TORCH_NAMES[task.compute_dtype] if task.compute_dtype else None
    held = 0
    if compute is not None:  # TorchEngine.merge's casts; the kernels widen half inputs to fp32 as they load
        cast = [c for c in codes if c != compute and not (fused and compute == "F32" and c in KERNEL_DTYPES)]
        held += len(cast) * DTYPE_SIZES[compute] * numel
        codes = [compute if c in cast else c for c in codes]
    if not kernel_merges(plan, task, fused):
        return held  # the reference's result is among its temporaries
    if len(set(codes)) > 1:
        held += sum(4 * numel for c in codes if c != "F32")
    if plan.recipe.merge_method == "seme" or task.dtype not in KERNEL_DTYPES:  # an fp32 result, then its cast
        return held + numel * (4 + (DTYPE_SIZES[task.dtype] if task.dtype != "F32" else 0))
    return held + numel * DTYPE_SIZES[task.dtype]


def remapped_bytes(plan, task) -> int:
    """A vocabulary re-mapping's copies of a task's inputs (`Remap.apply`: one per input, with the
    output's rows, in the widest input dtype); 0 where its rows are not re-mapped."""
    if not task.remap_rows:
        return 0
    width = max(DTYPE_SIZES[plan.models[m].tensors[n].dtype] for m, n in task.inputs)
    return len(task.inputs) * math.prod(task.shape) * width


def _in_float64(plan, task) -> bool:
    return task.compute_dtype == "float64" or any(plan.models[m].tensors[n].dtype == "F64" for m, n in task.inputs)


def kernel_merges(plan, task, fused: bool) -> bool:
    """Whether a fused kernel merges `task`, where one serves its method (`fused`): not a tensor beyond
    the kernels' index range, nor a merge in float64 (those take the plain-torch reference)."""
    return fused and not _in_float64(plan, task) and math.prod(task.shape) < fused_merge.MAX_ELEMENTS


def reference_bytes(plan, task, fused: bool) -> int:
    """The temporaries of a plain-torch merge of `task` (`Method.peak_buffers`, in float64 where the
    merge is), where one runs (not `kernel_merges`); else 0."""
    from seme.methods import registry

    if kernel_merges(plan, task, fused):
        return 0
    return registry.get(plan.recipe.merge_method).working_bytes(len(task.inputs), math.prod(task.shape),
                                                                8 if _in_float64(plan, task) else 4)


def device_memory(device) -> tuple[int, int] | None:
    """(free, total) bytes of a GPU's memory; None off CUDA."""
    if device.type != "cuda":
        return None
    import torch

    return torch.cuda.mem_get_info(device)


class NativeEngine:
    """CPU merges with the C++ kernels, from the mapped inputs straight into the output buffer. A
    tensor the kernels cannot take as it is (inputs of mixed dtypes, a `dtype` that would round
    the inputs first, a single model, 2^32 elements or more, rows to re-map, a LoRA adapter's
    update to add) goes to a TorchEngine made on first need."""

    semantic = None
    on_host: frozenset = frozenset()  # it runs on the CPU: no task is moved there

    def __init__(self, plan, device: str, allow_nonfinite: bool = False):
        self.plan, self.device, self.allow_nonfinite = plan, device, allow_nonfinite
        self._torch: TorchEngine | None = None
        self._reference: TorchEngine | None = None

    def staging(self, tasks, budget: int, progress):
        """Nothing to stage: the kernels read the mapped inputs where they lie."""
        return contextlib.nullcontext()

    def merge(self, task, out: memoryview) -> bool:
        """Merge `task` into `out`; whether the result is finite. A NaN / Inf input is an error, or
        with `allow_nonfinite` merged by the reference (`check_inputs`)."""
        if not native_takes(self.plan, task):
            if self._torch is None:
                self._torch = TorchEngine(self.plan, self.device, "auto", allow_nonfinite=self.allow_nonfinite)
            return self._torch.merge(task, out)
        if not len(out):
            return True
        models = self.plan.models
        code = models[task.inputs[0][0]].tensors[task.inputs[0][1]].dtype
        base = 0 if self.plan.recipe.merge_method == "linear" else task.base_index
        others = [i for i in range(len(task.inputs)) if i != base]
        anchor = ctypes.c_char.from_buffer(out)
        address = ctypes.addressof(anchor)
        del anchor  # the export would keep `out` from being released; the buffer outlives the call
        addresses = [models[m].address(name) for m, name in task.inputs]
        inputs_finite, output_finite = fused_merge.launch(
            self.plan.recipe.merge_method, task.params, base=addresses[base],
            others=[addresses[i] for i in others], out=address, shape=task.shape, in_dtype=KERNEL_DTYPES[code],
            out_dtype=KERNEL_DTYPES[task.dtype],
            keys=fused_merge.stream_keys(self.plan.recipe.merge_method, self.plan.recipe.random_seed, task.name, others))
        if not inputs_finite:  # rare: torch is loaded only then, to name the culprit and merge as the reference
            if self._reference is None:
                self._reference = TorchEngine(self.plan, self.device, "reference",
                                              allow_nonfinite=self.allow_nonfinite)
            return self._reference.merge(task, out)
        return output_finite


def check_inputs(plan, task, tensors, allow_nonfinite: bool) -> bool:
    """Whether an input of `task` holds NaN or Inf: an error naming it (tensor and model), or with
    `allow_nonfinite` a warning naming each. The engines then merge the tensor with the reference
    (plain torch, as mergekit does: a NaN or Inf reaches the output even where a mask drops it, as
    NaN * 0), whose output the kernels, which leave masked elements out, would not match."""
    from seme.methods.inputs import all_finite

    defective = False
    for (m, name), t in zip(task.inputs, tensors):
        if t.is_floating_point() and not all_finite(t):
            what = f"input tensor '{name}' of {plan.models[m].name} contains NaN or Inf"
            if not allow_nonfinite:
                raise SemeError(f"{what} (pass --allow-nonfinite to merge it anyway)")
            warnings.warn(what)
            defective = True
    return defective
