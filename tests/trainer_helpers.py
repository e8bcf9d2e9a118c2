"""Small causal-LM pieces for tests/test_trainer.py, importable by its DDP worker processes
without the flow (Prefect) imports of the test modules."""

import os

import torch
from datasets import Dataset

from bench.models import llama_shape
from tasks import train
from tasks.data.batching import IGNORE, collate
from tasks.distributed import ddp as distributed
from tasks.fast.ops import nf4_lora

CPU = torch.device("cpu")
NO_AUTOCAST = torch.autocast("cpu", enabled=False)
EXTRA = {"use_cache": False}


def tiny_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**llama_shape(32, 64, 2, 4, 2, 100), pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).float()


def rows() -> Dataset:
    """Four instruction rows: prompts of 5, 9, 3, 7 tokens with answers of 1, 6, 2, 11."""
    g = torch.Generator().manual_seed(1)
    ids, labels = [], []
    for prompt, answer in ((5, 1), (9, 6), (3, 2), (7, 11)):
        seq = torch.randint(1, 100, (prompt + answer,), generator=g).tolist()
        ids.append(seq)
        labels.append([IGNORE] * prompt + seq[prompt:])
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def micro_batches(frame: Dataset, size: int) -> list:
    out = []
    for i in range(0, len(frame), size):
        batch = collate(frame[i : i + size], 0, "causal_lm")
        out.append((batch, int(batch["attention_mask"].sum())))
    return out


def ddp_step(rank: int, world: int, port: int, out: str, layer_checkpoint: bool = False) -> None:
    """One of two gloo ranks: an optimizer step of 2 micro-batches (batch 1 x accum 2).
    layer_checkpoint: the decoder layers checkpointed as on train.speed's fast path
    (tasks/fast/ops/layer_checkpoint.py: the layer's backward runs inside the model's, as a nested one)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    model = tiny_model()
    if layer_checkpoint:
        from tasks.fast import patch
        from tasks.fast import plan as fast_plan

        plan = fast_plan.Plan(fast=True, liger=False, gradient_checkpointing=True, precision="bf16")
        assert patch.Patches("llama").apply(model, plan, random=False) == {"checkpointed_layers": 2}
    ddp = DistributedDataParallel(model)
    forwards, reduced_after = [0], []
    model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))

    def hook(state, bucket):  # DDP's gradient all-reduce: note how many micro-steps ran before it
        reduced_after.append(forwards[0])
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, hook)
    counts = []
    real = distributed.sum_over_ranks
    distributed.sum_over_ranks = lambda x, device: counts.append(1) or real(x, device)
    mine = rows().select([rank, rank + 2])  # rank 0: answers of 1 and 2 tokens; rank 1: 6 and 11
    loss, _ = train.accumulate(ddp, micro_batches(mine, 1), "causal_lm", CPU, NO_AUTOCAST, EXTRA)
    distributed.sum_over_ranks = real
    loss = real(loss, CPU) / world
    torch.save(
        {
            "grads": {n: p.grad for n, p in model.named_parameters()},
            "reduced_after": reduced_after,
            "count_reductions": len(counts),
            "loss": float(loss),
        },
        f"{out}/{rank}.pt",
    )
    torch.distributed.destroy_process_group()


def nf4_arguments(t: dict) -> list:
    """dequantize_nf4's and nf4_triton.dequantize's leading arguments from nf4_lora.nf4_tensors(layer):
    its tensors, shape and blocksize."""
    return [*(t[k] for k in nf4_lora.TENSOR_KEYS), t["shape"], t["blocksize"]]
