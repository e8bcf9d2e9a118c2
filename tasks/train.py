"""Step 5: train LoRA adapters on the frozen 4-bit base. The loop is the whole story:
setup (model, LoRA, optimizer, schedule), then for each step: batch -> forward -> backward
-> clip -> step, logging the loss; finally save the adapter, the log and its plot.
"""
from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tasks.batching import batches, collate_packed, epoch_order, pack_bins
from tasks import catalog, checkpoint, distributed, precision
from tasks.card import write_stage_card
from tasks.common import StageResult, atomic_dir, resolve, result, write_json
from tasks.config import LoraSection, Params, TrainConfig
from tasks.modeling import DTYPES, load_saved, load_tokenizer, pick_device, set_threads
from tasks.plots import plot_loss
from tasks.tokenize import load_split

ADAPTER = catalog.ADAPTER_DIR
BASE = catalog.BASE_MODEL_DIR
WARMUP_STEPS = 3  # steps left out of the steady-state throughput figure (kernel compilation, caches)
REPORT_DIR = catalog.TRAIN_REPORT_DIR


def add_lora(model, lora: LoraSection, task: str, t: TrainConfig, compute_dtype: torch.dtype):
    """Freeze the base, set up checkpointing and precision (tasks/precision.py), add adapters."""
    from peft import LoraConfig, get_peft_model
    model = precision.prepare_base(model, t.precision, t.gradient_checkpointing, t.gradient_checkpointing_skip_last)
    if t.gradient_checkpointing and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias=lora.bias,
                     target_modules=lora.target_modules, task_type="SEQ_CLS" if task == "seq_cls" else "CAUSAL_LM")
    model = get_peft_model(model, cfg)
    for p in model.parameters():  # trained weights stay fp32: bf16 would round small updates away
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if t.precision == "mixed":
        precision.apply_mixed(model, compute_dtype)
    return model


LIGER = {"llama": "apply_liger_kernel_to_llama", "mistral": "apply_liger_kernel_to_mistral",
         "qwen2": "apply_liger_kernel_to_qwen2"}


def apply_speedups(model_type: str, t: TrainConfig, device: torch.device) -> bool:
    """Patch the model classes with Liger kernels before the model is built; True if applied."""
    if not (t.liger_kernels and device.type == "cuda" and model_type in LIGER):
        return False
    import liger_kernel.transformers as liger
    getattr(liger, LIGER[model_type])(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                      fused_linear_cross_entropy=True)
    return True


def make_optimizer(params, t: TrainConfig, device: torch.device):
    name = t.optimizer
    if name == "auto":
        name = "paged_adamw_32bit" if device.type == "cuda" else "adamw"
    if name == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay), name
    import bitsandbytes as bnb  # paged optimizers page their state to CPU RAM under memory pressure
    cls = bnb.optim.PagedAdamW32bit if name == "paged_adamw_32bit" else bnb.optim.PagedAdamW8bit
    return cls(params, lr=t.lr, weight_decay=t.weight_decay), name


def linear_schedule(optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_batches(rows, lengths: list[int], params: Params, pad_id: int, epoch: int, skip: int):
    """This epoch's (batch, real-token count) pairs, from micro-batch `skip` on (a resume)."""
    t = params.train
    order = epoch_order(lengths, t.batch_size, params.seed, epoch)
    if t.packing and params.task == "causal_lm":
        bins = distributed.shard(pack_bins(order, lengths, params.tokenize.max_length))
        groups = [bins[i: i + t.batch_size] for i in range(0, len(bins), t.batch_size)]
        return (collate_packed(rows, g, pad_id) for g in groups[skip:])
    order = distributed.shard(order)
    return ((b, int(b["attention_mask"].sum()))
            for b in batches(rows, t.batch_size, pad_id, params.task, order[skip * t.batch_size:]))


def save_adapter(model, tok, path: Path, base_model: str) -> None:
    """The adapter folder, byte-for-byte the same for the same training, wherever it ran:
    PEFT writes target_modules in set order (which changes with Python's hash seed) and the
    absolute path of the base it was loaded from; write the sorted list and the base's name."""
    for cfg in model.peft_config.values():
        cfg.base_model_name_or_path = base_model
        if isinstance(cfg.target_modules, (set, frozenset, list, tuple)):
            cfg.target_modules = sorted(cfg.target_modules)
    base = model.get_base_model()  # PEFT's README.md names the base by the path it was loaded from
    base.config._name_or_path = base.name_or_path = base_model
    model.save_pretrained(path, safe_serialization=True)
    config_path = path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok.save_pretrained(path)


def run(params: Params, root: Path, resume_key: str | None = None) -> StageResult:
    """Train the adapter. `resume_key` names this exact run (its inputs and settings, e.g.
    DVC's run-cache key of the stage): checkpoints are written and resumed only under it."""
    t = params.train
    set_threads(t.threads)
    torch.manual_seed(params.seed)
    device = distributed.setup(pick_device(t.device))
    # --- setup
    tok = load_tokenizer(str(resolve(root, BASE)))
    model_type = json.loads((resolve(root, BASE) / "config.json").read_text()).get("model_type", "")
    liger = apply_speedups(model_type, t, device)
    model = load_saved(params.task, resolve(root, BASE), device)
    dtype = DTYPES[params.quant.compute_dtype]
    model = add_lora(model, params.lora, params.task, t, dtype)
    forward = distributed.wrap(model, device)  # DDP under torchrun, else the model itself
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable, n_total = sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters())
    train_rows = load_split(root, "train")
    lengths = train_rows["input_ids"].map(len).tolist()
    rows_per_epoch = len(pack_bins(list(range(len(lengths))), lengths, params.tokenize.max_length)) \
        if t.packing and params.task == "causal_lm" else len(train_rows)
    steps_per_epoch = math.ceil(rows_per_epoch // distributed.world()[1] / (t.batch_size * t.grad_accum))
    total = t.max_steps if t.max_steps > 0 else math.ceil(steps_per_epoch * t.epochs)
    optimizer, opt_name = make_optimizer(trainable, t, device)
    scheduler = linear_schedule(optimizer, int(t.warmup_ratio * total), total)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    # --- resume from the last checkpoint of this same run, if a crash left one
    ckpt_dir = resolve(root, catalog.CHECKPOINT_DIR)
    checkpoint_every = t.checkpoint_every if resume_key else 0
    log, step, epoch, skip, tokens = [], 0, 0, 0, 0
    resume_from = checkpoint.latest(ckpt_dir, resume_key) if checkpoint_every else None
    if resume_from is not None:
        state = checkpoint.restore(resume_from, model, optimizer, scheduler)
        log, step, epoch, tokens = state["log"], state["step"], state["epoch"], state["tokens"]
        skip = state["next_micro"]  # micro-batches of this epoch already consumed
        print(f"train: resuming from {resume_from} (step {step} of {total})")
    # --- train
    extra = {"use_cache": False} if params.task == "causal_lm" else {}  # a cache would disable packing masks
    started, tokens_before, step_at_start, warm = time.perf_counter(), tokens, step, None
    model.train()
    bar = tqdm(total=total, initial=step, desc="train", unit="step")
    while step < total:
        optimizer.zero_grad(set_to_none=True)
        accum = 0.0
        for micro, (batch, n_tokens) in enumerate(epoch_batches(train_rows, lengths, params, tok.pad_token_id,
                                                                  epoch, skip), skip):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast:
                loss = forward(**batch, **extra).loss / t.grad_accum
            loss.backward()
            accum += loss.item()
            tokens += distributed.total(n_tokens, device)
            if (micro + 1) % t.grad_accum:
                continue
            torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            log.append({"step": step, "epoch": epoch, "loss": round(distributed.mean(accum, device), 6),
                        "lr": scheduler.get_last_lr()[0], "tokens": tokens})
            accum = 0.0
            if step == step_at_start + WARMUP_STEPS:  # throughput is measured after warm-up
                warm = (time.perf_counter(), tokens)
            bar.update(1)
            if step % t.log_every == 0:
                bar.set_postfix(loss=f"{sum(r['loss'] for r in log[-t.log_every:]) / t.log_every:.4f}")
            if checkpoint_every and step % checkpoint_every == 0 and step < total and distributed.is_main():
                checkpoint.save(ckpt_dir, model, optimizer, scheduler,
                                {"fingerprint": resume_key, "step": step, "epoch": epoch,
                                 "next_micro": micro + 1, "tokens": tokens, "log": log})
            if step >= total:
                break
        epoch, skip = epoch + 1, 0
    bar.close()
    seconds = time.perf_counter() - started
    # --- save (one writer: rank 0; the adapter format is the same for any number of GPUs)
    if not distributed.is_main():
        distributed.barrier()
        return result("train", [ADAPTER, REPORT_DIR], world_size=distributed.world()[1])
    with atomic_dir(resolve(root, ADAPTER)) as tmp:
        save_adapter(model, tok, tmp, params.model.name)
        write_stage_card(tmp, params, root, "adapter")  # replaces PEFT's template (it names the base's local path)
    tail = log[-max(1, len(log) // 10):]
    summary = {"steps": step, "resumed_from_step": int(resume_from.name.split("-")[1]) if resume_from else 0,
               "epochs_seen": epoch, "final_loss": log[-1]["loss"],
               "mean_loss_last_10pct": sum(r["loss"] for r in tail) / len(tail),
               "train_seconds": round(seconds, 2), "tokens": tokens,
               "tokens_per_second": round((tokens - tokens_before) / seconds, 1),  # all ranks, this process's run
               "tokens_per_second_after_warmup":
                   round((tokens - warm[1]) / (time.perf_counter() - warm[0]), 1) if warm else None,
               "trainable_params": n_trainable, "total_params": n_total, "optimizer": opt_name, "liger_kernels": liger,
               "precision": t.precision,
               "device": str(device), "world_size": distributed.world()[1]}
    with atomic_dir(resolve(root, REPORT_DIR)) as tmp:
        with open(tmp / "loss.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(log[0]))
            w.writeheader()
            w.writerows(log)
        plot_loss(log, tmp / "loss.png")
        write_json(tmp / "summary.json", summary)
    checkpoint.clear(ckpt_dir)  # the adapter is saved: checkpoints of this run are spent
    distributed.barrier()
    return result("train", [ADAPTER, REPORT_DIR], **summary)
