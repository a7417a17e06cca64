"""Human-readable views of a plan (`--dry-run`)."""
from __future__ import annotations


def _fmt(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def print_plan(plan, out, device: str = "cpu", backend: str = "auto") -> None:
    from seme.executor import largest_need, least_memory

    recipe = plan.recipe
    names = [m.name for m in plan.models]
    out.write(f"method: {recipe.merge_method}\n")
    for i, m in enumerate(plan.models):
        out.write(f"model[{i}]: {m.ref}\n")
    out.write(f"output: {len(plan.tasks)} tensors, {plan.output_bytes / 1e9:.3f} GB written, "
              f"{plan.input_bytes / 1e9:.3f} GB read; layers: "
              f"{plan.num_layers}\n")
    need, name = largest_need(plan, device, backend)
    loop, prepass = least_memory(plan, device, backend)
    least = max(loop, prepass)
    kept = f", {loop - need} bytes kept from SeMe's pre-pass" if loop > need else ""
    out.write(f"memory: {need} bytes ({need / 2**20:.1f} MiB) for the largest tensor's merge, {name}{kept}")
    if prepass:  # on a GPU, the pre-pass holds the GPU's memory
        out.write(f"; {prepass} bytes ({prepass / 2**20:.1f} MiB) for SeMe's alignment pre-pass")
    out.write(f"; the least --max-memory takes: {least} bytes ({least / 2**20:.1f} MiB)\n")
    if device != "cpu":
        import torch

        from seme.backend import implementation
        from seme.engine import device_bytes

        fused = implementation(recipe.merge_method, backend, torch.device(device))[1]
        gpu, name = max(((device_bytes(plan, t, fused), t.name) for t in plan.tasks if not t.copy), default=(0, None))
        out.write(f"{device} memory: {gpu} bytes ({gpu / 2**20:.1f} MiB) for the largest tensor's merge, {name} (a "
                  f"tensor that needs more than the GPU has free is merged on the CPU)\n")
    out.write(f"tokenizer from: {plan.tokenizer_model.path}\n")
    if plan.vocabulary is not None:
        out.write(f"vocabulary: {plan.recipe.tokenizer_source}, {plan.vocabulary.tokens} tokens in "
                  f"{plan.vocabulary.size} rows; embedding and LM head rows re-mapped\n")
    if plan.chat_template is not None:
        out.write(f"chat template ({plan.recipe.chat_template}): {plan.chat_template!r}\n")
    for t in plan.tasks:
        shape = "x".join(map(str, t.shape)) or "scalar"
        inputs = ", ".join(f"{names[m]}" + (" (base)" if i == t.base_index else "")
                           for i, (m, _) in enumerate(t.inputs))
        if t.copy:
            out.write(f"{t.name}  {shape} {t.dtype}  copy from {inputs}\n")
            continue
        params = " ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
        out.write(f"{t.name}  {shape} {t.dtype}  {t.nbytes} B  <- {inputs}  {params}\n")
