"""Where a training step's GPU time goes, by kind of work: a torch.profiler chrome trace of a few
steps, each kernel put in one category, in ms per step. Used by bench/gpu_qlora_bench.py
(--profile) for this project's recipes and by bench/unsloth_reference.py for Unsloth's, so that
both are summarised by the same rules.

The step must be annotated with record_function ranges `qf:forward`, `qf:backward` and
`qf:optimizer` inside one `qf:step` per step (`annotated_step`), and the last decoder layer
hooked (`mark_head`): what the forward launches after it, and the backward before its first
recompute (checkpointed layers), is the final norm, the LM head and the loss. A kernel's phase is the range its launch falls in (the
backward launches from autograd's own thread); its kind comes from its name and the CPU ops
that enclose its launch on the launching thread (the trace's correlation ids):
  - GEMM (cuBLAS / CUTLASS kernel names): "LoRA" if the enclosing matmul op has an operand
    dimension of at most 64 (the adapter rank), else "base"; base GEMMs of the backward pass
    are "recompute" when launched by a forward op replayed in backward (a forward autograd
    function or compiled forward nested in a backward node, or anything under a checkpoint's
    backward node), else "bwd";
  - attention (flash / fmha / cuDNN sdpa kernels), NF4 dequantization (bitsandbytes' and
    Unsloth's dequantize kernels, Inductor kernels with the 4-bit unpacking's bitwise ops),
    optimizer (anything in `qf:optimizer`), memcpy/memset;
  - everything else in forward and backward is "elementwise / norm / other" (RMSNorm, RoPE,
    SwiGLU, the LoRA sums, casts, residual adds).
"idle" is the step's wall time (qf:step, which ends with a synchronize) minus the time the GPU
was busy with any kernel or copy.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import torch

GEMM = re.compile(r"gemm|nvjet|xmma|cutlass|cublas|wgmma|s16816|splitk", re.I)
ATTENTION = re.compile(r"flash|fmha|attention|sdpa|cudnn", re.I)
DEQUANT = re.compile(r"dequant|nf4|triton_.*(bitwise|rshift|right_shift)", re.I)
MATMUL_OPS = {
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::matmul",
    "aten::linear",
    "aten::addmm_",
    "aten::baddbmm",
    "aten::_addmm_activation",
}
CATEGORIES = [
    "GEMM base fwd",
    "GEMM base recompute",
    "GEMM base bwd",
    "GEMM LoRA",
    "attention",
    "NF4 dequant",
    "elementwise / norm / other",
    "LM head + loss (all kernels)",
    "optimizer",
    "memcpy / memset",
    "idle / host gaps",
]
HEAD_DONE = "qf:last_layer_done"  # the instant mark_head sets


def annotated_step(forward_loss, optimizer):
    """One training step with the qf:* ranges this summary reads (and a synchronize at its end)."""
    from torch.profiler import record_function

    with record_function("qf:step"):
        with record_function("qf:forward"):
            loss = forward_loss()
        with record_function("qf:backward"):
            loss.backward()
        with record_function("qf:optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    return loss


def mark_head(model) -> list:
    """A hook on the last decoder layer: an instant when its forward is done (what the forward
    launches after it is the final norm, the LM head and the loss). Returns the handles."""
    from torch.profiler import record_function

    layers = [m for m in model.modules() if hasattr(m, "self_attn") and hasattr(m, "mlp")]
    if not layers:
        return []

    def after_forward(module, args, output):
        with record_function(HEAD_DONE):
            pass

    return [layers[-1].register_forward_hook(after_forward)]


def profile_steps(step, steps: int, trace_path: str, model=None) -> dict:
    """Run `step` (annotated_step inside) `steps` times under torch.profiler; summarise."""
    from torch.profiler import ProfilerActivity, profile

    hooks = mark_head(model) if model is not None else []
    torch.cuda.synchronize()
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
    finally:
        for h in hooks:
            h.remove()
    prof.export_chrome_trace(trace_path)
    return summarize(trace_path)


def _dims(args: dict) -> list:
    dims = args.get("Input Dims") or args.get("Input dims") or []
    return [d for d in dims if isinstance(d, list) and d]


def _gemm_kind(dims: list) -> str:
    """By the matmul's operands as matrices (leading dimensions folded into the rows)."""
    flat = []
    for d in dims[:3]:
        rows = 1
        for n in d[:-1]:
            rows *= n
        flat += [rows, d[-1]] if len(d) > 1 else d
    if flat and min(flat) <= 64:
        return "LoRA"
    return "base"


def summarize(trace_path: str) -> dict:
    events = json.loads(Path(trace_path).read_text())["traceEvents"]
    launches, cpu, gpu = {}, collections.defaultdict(list), []
    for e in events:
        if e.get("ph") != "X":
            continue
        cat = e.get("cat", "")
        if cat in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {}):
            launches[e["args"]["correlation"]] = (e["pid"], e["tid"], e["ts"])
        elif cat in ("cpu_op", "user_annotation"):
            cpu[(e["pid"], e["tid"])].append((e["ts"], e["ts"] + e.get("dur", 0), e["name"], e.get("args", {})))
        elif cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            gpu.append(e)
    # Each launch's enclosing CPU ops (outermost first): one sweep per thread over nested ranges.
    queries = collections.defaultdict(list)
    for corr, (pid, tid, ts) in launches.items():
        queries[(pid, tid)].append((ts, corr))
    stacks = {}
    for key, qs in queries.items():
        ops = sorted(cpu.get(key, []), key=lambda r: (r[0], -r[1]))
        qs.sort()
        stack, i = [], 0
        for ts, corr in qs:
            while i < len(ops) and ops[i][0] <= ts:
                while stack and stack[-1][1] < ops[i][0]:
                    stack.pop()
                stack.append(ops[i])
                i += 1
            while stack and stack[-1][1] < ts:
                stack.pop()
            stacks[corr] = list(stack)
    steps = [r for rows in cpu.values() for r in rows if r[2] == "qf:step"]
    ranges = sorted(
        (r[0], r[1], r[2])
        for rows in cpu.values()
        for r in rows
        if r[2] in ("qf:forward", "qf:backward", "qf:optimizer")
    )
    head_done = sorted(r[0] for rows in cpu.values() for r in rows if r[2] == HEAD_DONE)

    def phase(ts):
        """(range name, its start, its end) that the launch at ts falls in."""
        for a, b, name in ranges:
            if a <= ts <= b:
                return name, a, b
        return "", 0, 0

    # the backward of the head and loss ends where the first layer's recompute begins
    first_recompute = {}
    for k in gpu:
        corr = k.get("args", {}).get("correlation")
        if corr in launches and _recomputed([r[2] for r in stacks.get(corr, [])]):
            where, a, b = phase(launches[corr][2])
            if where == "qf:backward":
                first_recompute[a] = min(first_recompute.get(a, b), launches[corr][2])

    def in_head(ts, name, a, b):
        if name == "qf:forward":
            return any(a <= t <= ts for t in head_done)
        if name == "qf:backward":
            return ts < first_recompute.get(a, a)
        return False

    ms = collections.Counter()
    names = collections.defaultdict(collections.Counter)
    busy = []
    for k in gpu:
        dur = k.get("dur", 0) / 1000
        corr = k.get("args", {}).get("correlation")
        stack = stacks.get(corr, [])
        labels = [r[2] for r in stack]
        name = k["name"]
        busy.append((k["ts"], k["ts"] + k.get("dur", 0)))
        where, a, b = phase(launches[corr][2]) if corr in launches else ("", 0, 0)
        if where == "qf:optimizer":
            cat = "optimizer"
        elif k.get("cat") != "kernel" or "memcpy" in name.lower() or "memset" in name.lower():
            cat = "memcpy / memset"
        elif in_head(launches[corr][2], where, a, b):
            cat = "LM head + loss (all kernels)"
        elif GEMM.search(name) and not ATTENTION.search(name):
            op = next((r for r in reversed(stack) if r[2] in MATMUL_OPS), None)
            kind = _gemm_kind(_dims(op[3])) if op else "base"
            if kind != "base":
                cat = f"GEMM {kind}"
            elif where != "qf:backward":
                cat = "GEMM base fwd"
            else:
                cat = "GEMM base recompute" if _recomputed(labels) else "GEMM base bwd"
        elif ATTENTION.search(name):
            cat = "attention"
        elif DEQUANT.search(name):
            cat = "NF4 dequant"
        else:
            cat = "elementwise / norm / other"
        ms[cat] += dur
        names[cat][name[:90]] += dur
    n = max(len(steps), 1)
    wall = sum(r[1] - r[0] for r in steps) / 1000
    union, end = 0.0, None
    for a, b in sorted(busy):
        if end is None or a > end:
            union += b - a
            end = b
        elif b > end:
            union += b - end
            end = b
    ms["idle / host gaps"] = max(wall - union / 1000, 0.0)
    per_step = {c: round(ms.get(c, 0.0) / n, 1) for c in CATEGORIES}
    return {
        "steps": len(steps),
        "step_ms": round(wall / n, 1),
        "gpu_busy_ms": round(union / 1000 / n, 1),
        "ms_per_step": per_step,
        "top_kernels": {c: [[k, round(v / n, 2)] for k, v in names[c].most_common(6)] for c in names},
    }


def _recomputed(labels: list) -> bool:
    """A kernel launched in backward by a forward that is being replayed (checkpointing)."""
    inner = max(
        (i for i, name in enumerate(labels) if name.startswith("autograd::engine::evaluate_function")), default=-1
    )
    if inner >= 0 and "Checkpoint" in labels[inner]:
        return True  # reentrant checkpoint: its backward node reruns the forward
    deeper = labels[inner + 1 :]
    # non-reentrant checkpoint (ours): the recompute runs a compiled forward (or a forward
    # autograd function) inside the backward node that first unpacks a saved tensor
    return any(
        name == "CompiledFunction"
        or (
            not name.startswith(("aten::", "qf:", "autograd::", "torch::autograd", "cuda", "##", "<"))
            and "Backward" not in name
            and "backward" not in name
        )
        for name in deeper
    )


def table(rows: dict) -> str:
    """rows: recipe -> summary; a markdown table of ms per step by category, recipes side by side."""
    recipes = list(rows)
    lines = ["| category | " + " | ".join(recipes) + " |", "| --- |" + " --- |" * len(recipes)]
    for c in CATEGORIES:
        lines.append(f"| {c} | " + " | ".join(f"{rows[r]['ms_per_step'].get(c, 0):.1f}" for r in recipes) + " |")
    lines.append("| GPU busy | " + " | ".join(f"{rows[r]['gpu_busy_ms']:.1f}" for r in recipes) + " |")
    lines.append("| step (wall, profiled) | " + " | ".join(f"{rows[r]['step_ms']:.1f}" for r in recipes) + " |")
    return "\n".join(lines)
