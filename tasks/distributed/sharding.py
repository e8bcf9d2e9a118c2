"""Which data-parallel strategy a run trains with (params: train.strategy), and FSDP for it.

- one process: neither; the model is trained as it is.
- ddp: every process holds the whole 4-bit base and its adapters; gradients are averaged
  (tasks/distributed/ddp.py). The fastest while the model fits one device.
- fsdp: PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`, no sharding code of ours): each
  decoder layer's parameters (the frozen 4-bit weights, norms and LoRA adapters alike) and
  so the adapters' gradients and AdamW state are split across the processes; a layer's
  weights are all-gathered just before it runs and freed after. For models one device
  cannot hold.
- auto: fsdp when the stored base model takes more than FIT_SHARE of one device's memory,
  else ddp. The base's bytes on disk are its bytes in memory (4-bit weights, the layers kept
  out of 4-bit, quantization constants); the rest of the device is needed for activations,
  the adapters with their gradients and optimizer state, and the allocator's slack.

The 4-bit weights are sharded as they are stored: `quant.quant_storage` (tasks/model/loading.py)
is the compute dtype under fsdp, so FSDP sees bf16 tensors like every other weight (FSDP1's
flat parameters need one floating dtype; FSDP2 also shards uint8, but a mixed-precision
policy would cast them). The quantization constants stay on each module (small, not
sharded), and bitsandbytes' Linear4bit finds them again on the all-gathered weight.

Checkpoints and the adapter are written from full (gathered) state dicts of the trainable
parameters and their optimizer state (`torch.distributed.checkpoint.state_dict`), in the
one-process format: LoRA state is small (Llama-3.1-70B, r=16 on all linear layers: about
207M parameters, 2.5 GB with AdamW's two moments), so the same checkpoint resumes on any
number of processes, with or without FSDP, and rank 0 alone writes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tasks.distributed import ddp

FIT_SHARE = 0.5
STRATEGIES = ("single", "ddp", "fsdp")


def stored_bytes(base_dir: Path) -> int:
    return sum(f.stat().st_size for f in Path(base_dir).glob("*.safetensors"))


def device_memory(device: torch.device) -> int:
    """One device's memory; on CPU the host's RAM over the processes of this node."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, local)


def choose(setting: str, base_dir: Path, device: torch.device) -> tuple[str, str]:
    """(single | ddp | fsdp, why) for this run's train.strategy and world size."""
    world = ddp.world()[1]
    if world == 1:
        return "single", "one process"
    if setting != "auto":
        return setting, f"train.strategy: {setting}, {world} processes"
    need, have = stored_bytes(base_dir), device_memory(device)
    gib = 1 << 30
    if need > FIT_SHARE * have:
        return "fsdp", (
            f"train.strategy: auto: the base takes {need / gib:.2f} GiB, more than {FIT_SHARE:.0%} of one "
            f"device's {have / gib:.1f} GiB: sharded over {world} processes (FSDP)"
        )
    return "ddp", (
        f"train.strategy: auto: the base takes {need / gib:.2f} GiB, at most {FIT_SHARE:.0%} of one "
        f"device's {have / gib:.1f} GiB: a whole copy on each of {world} processes (DDP)"
    )


def adjust(t, strategy: str, base_config: dict, device: torch.device) -> tuple[object, list[str]]:
    """The train settings FSDP changes: the CUDA fast path (tasks/fast/) reads uint8-packed
    4-bit weights in place and is not combined with sharded parameters: off; bitsandbytes'
    paged optimizers update plain tensors, not FSDP's sharded DTensors: torch AdamW."""
    notes, update = [], {}
    storage = (base_config.get("quantization_config") or {}).get("bnb_4bit_quant_storage", "uint8")
    if t.speed != "off" and (strategy == "fsdp" or storage != "uint8"):
        update["speed"] = "off"
        notes.append(
            "speed: off: "
            + (
                "FSDP shards the 4-bit weights the fast path reads in place"
                if strategy == "fsdp"
                else f"the base's 4-bit weights are stored as {storage}, the fast path reads uint8"
            )
        )
    if strategy == "fsdp" and (t.optimizer.startswith("paged") or (t.optimizer == "auto" and device.type == "cuda")):
        update["optimizer"] = "adamw"
        notes.append(
            f"optimizer: adamw (torch) under FSDP, not {t.optimizer}: bitsandbytes' optimizers update "
            f"plain tensors, FSDP's parameters are sharded DTensors"
        )
    return (t.model_copy(update=update) if update else t), notes


def wrap(model, device: torch.device, strategy: str):
    """What the loop calls forward on: the model (one process), DDP around it, or the model
    itself sharded in place by FSDP2 (strategy fsdp)."""
    if strategy == "fsdp" and ddp.world()[1] > 1:
        return shard(model, device)
    return ddp.wrap(model, device)


def block_classes(model) -> set[str]:
    """The transformer blocks' class names (each becomes one FSDP unit): what the Hugging Face
    models list in `_no_split_modules` (LlamaDecoderLayer, BertLayer, ...)."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return names


def load_device(strategy: str, device: torch.device) -> torch.device:
    """Where the base is loaded: under FSDP on a GPU, host memory (each process reads the whole
    4-bit base there, then fully_shard moves its shard of each layer to its GPU: no GPU ever
    holds the whole model; host RAM needs a copy per process of the node), else the device."""
    return torch.device("cpu") if strategy == "fsdp" else device


def shard(model, device: torch.device):
    """FSDP2 over all processes: one unit per transformer block, then the root (embeddings,
    head, what is left). In place: the model is the FSDP module afterwards, its shards on
    `device` (and the 4-bit layers' quantization constants, whole, on every process)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (ddp.world()[1],))
    for m in model.modules():  # fully_shard moves parameters and buffers to the device, not bitsandbytes'
        for state in {
            id(q): q
            for q in (
                getattr(m, "quant_state", None),  # quantization constants
                getattr(getattr(m, "weight", None), "quant_state", None),
            )
            if q is not None
        }.values():
            state.to(device)
    blocks = block_classes(model)
    for m in list(model.modules()):
        if type(m).__name__ in blocks and m is not model:
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True, **kw)


def trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def full_trainable_state(model) -> dict[str, torch.Tensor] | None:
    """The trainable parameters as full CPU tensors on rank 0 ({} on the others): a collective
    under FSDP (every rank calls it). Anything else: None (the model's own tensors are whole)."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options())


def full_training_state(model, optimizer) -> tuple[dict, dict]:
    """(trainable weights, optimizer.state_dict()) whole, in the one-process format (optimizer
    state keyed by position, in the order of the optimizer's parameters): a collective under
    FSDP, where ranks other than 0 get ({}, {})."""
    if not is_sharded(model):  # whole on every rank (DDP: the same): rank 0's copy
        if not ddp.is_main():
            return {}, {}
        return (
            {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad},
            optimizer.state_dict(),
        )
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    weights = get_model_state_dict(model, options=_options())
    optim = get_optimizer_state_dict(model, optimizer, options=_options())
    if not ddp.is_main():
        return {}, {}
    order = [name for group in optim["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    groups, start = [], 0
    for group in optim["param_groups"]:
        groups.append({**group, "params": list(range(start, start + len(group["params"])))})
        start += len(group["params"])
    return weights, {"state": {index[n]: s for n, s in optim["state"].items()}, "param_groups": groups}


def load_training_state(model, optimizer, weights: dict | None, optim: dict | None) -> None:
    """Put full state (from rank 0; None elsewhere) into a model trained by any strategy."""
    names = {id(p): n for n, p in model.named_parameters()}
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        full = {}
        if ddp.is_main():
            order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
            groups = [{**g, "params": [order[i] for i in g["params"]]} for g in optim["param_groups"]]
            full = {"state": {order[int(i)]: s for i, s in optim["state"].items()}, "param_groups": groups}
        loaded = set_model_state_dict(
            model, weights if ddp.is_main() else {}, options=_options(broadcast_from_rank0=True, strict=False)
        )  # frozen: not in it
        missing = sorted(set(loaded.missing_keys) & set(trainable_names(model)))
        if missing or loaded.unexpected_keys:
            raise RuntimeError(
                f"checkpoint does not fit the model: missing {missing[:3]}, unexpected "
                f"{sorted(loaded.unexpected_keys)[:3]}"
            )
        set_optimizer_state_dict(model, optimizer, full, options=_options(broadcast_from_rank0=True))
        return
    if ddp.world()[1] > 1:  # DDP: rank 0 read it; the others may be on other hosts
        weights, optim = ddp.broadcast_object((weights, optim))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device))
    optimizer.load_state_dict(optim)
