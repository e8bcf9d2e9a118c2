"""Step 5: train LoRA adapters on the frozen 4-bit base. The loop is the whole story:
setup (speed plan, model, LoRA, optimizer, schedule), then for each optimizer step: its
micro-batches -> count their label tokens -> forward + backward each -> clip -> step,
logging the loss; finally save the adapter, the log and its plot.

Two rules keep it correct while fast:
- The loss of an optimizer step is the sum over its label tokens (examples, for seq_cls)
  divided by their number over all its micro-batches and ranks, so batch 4 x accum 1 and
  batch 1 x accum 4 give the same gradients (a mean of micro-batch means would weigh the
  tokens of short answers more).
- Nothing waits on the GPU inside the loop except at log and checkpoint points: losses stay
  on the device until then, counts are all-reduced once per optimizer step (under DDP),
  batches are copied from pinned memory without blocking, and DDP all-reduces gradients in
  the last micro-step's backward only.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tasks import catalog
from tasks.common import PipelineError, StageResult, atomic_dir, resolve, result, write_json
from tasks.config import LoraSection, Params, TrainConfig
from tasks.data.arrowio import list_lengths
from tasks.data.batching import IGNORE, batches, collate_packed, epoch_order, pack_bins
from tasks.distributed import ddp as distributed
from tasks.distributed import sharding
from tasks.fast import patch as fast_patch
from tasks.fast import plan as fast_plan
from tasks.model import precision
from tasks.model.loading import DTYPES, load_saved, load_tokenizer, pick_device, set_threads
from tasks.serve.card import write_stage_card
from tasks.tokenize import load_split
from tasks.training import checkpoint
from tasks.training.plots import plot_loss
from tasks.training.validation import Validation

ADAPTER = catalog.ADAPTER_DIR
BASE = catalog.BASE_MODEL_DIR
WARMUP_STEPS = 3  # steps left out of the steady-state throughput figure (kernel compilation, caches)
REPORT_DIR = catalog.TRAIN_REPORT_DIR


def add_lora(model, lora: LoraSection, task: str, t: TrainConfig, compute_dtype: torch.dtype):
    """Freeze the base, set up checkpointing and precision (tasks/model/precision.py), add adapters."""
    from peft import LoraConfig, get_peft_model

    model = precision.prepare_base(model, t.precision, t.gradient_checkpointing, t.gradient_checkpointing_skip_last)
    if t.gradient_checkpointing and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=lora.target_modules,
        task_type="SEQ_CLS" if task == "seq_cls" else "CAUSAL_LM",
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        init_lora_weights=True if lora.init == "default" else lora.init,
        modules_to_save=list(lora.modules_to_save) or None,
    )
    check_modules_to_save(model, lora.modules_to_save)
    model = get_peft_model(model, cfg)
    for p in model.parameters():  # trained weights stay fp32: bf16 would round small updates away
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if t.precision == "mixed":
        precision.apply_mixed(model, compute_dtype)
    return model


def check_modules_to_save(model, names: list[str]) -> None:
    """Each lora.modules_to_save entry names a module of the base that can train in full: one that
    exists and has float weights (a 4-bit copy cannot be trained; PEFT fails deep inside otherwise)."""
    for key in names:
        found = [m for n, m in model.named_modules() if n == key or n.endswith("." + key)]
        if not found:
            raise PipelineError(f"lora.modules_to_save: no module named {key!r} in the model")
        if any(not p.is_floating_point() for m in found for p in m.parameters()):
            raise PipelineError(
                f"lora.modules_to_save: {key!r} is 4-bit quantized and cannot train; add it to "
                f"quant.skip_modules (the quantize stage then keeps it in full precision)"
            )


# lora.init values that move part of the base weight into the adapter (W = W_res + B0 A0): the
# adapter is saved converted to a plain LoRA on the unchanged base (rank 2r: [B, -B0] [A; A0]).
MUTATES_BASE = ("olora", "pissa")


def save_initial_adapter(model, lora: LoraSection) -> Path | None:
    """Before training, the initial adapter of a base-mutating init (what the conversion subtracts)."""
    if lora.init not in MUTATES_BASE:
        return None
    path = Path(tempfile.mkdtemp(prefix="qlora-initial-adapter-")) / "initial"
    model.save_pretrained(path, safe_serialization=True)
    return path


def apply_speedups(model_type: str, t: TrainConfig, device: torch.device) -> bool:
    """Patch the model classes with Liger kernels before the model is built; True if applied.
    (train.speed: off, or a model off the fast path; call inside fast_patch.scoped so it ends there.)"""
    if not (t.liger_kernels and device.type == "cuda" and model_type in fast_plan.LIGER):
        return False
    import liger_kernel.transformers as liger

    getattr(liger, fast_plan.LIGER[model_type])(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True
    )
    return True


def make_optimizer(params, t: TrainConfig, device: torch.device):
    name = t.optimizer
    if name == "auto":
        name = "paged_adamw_32bit" if device.type == "cuda" else "adamw"
    if (
        name == "paged_adamw_32bit_flat"
    ):  # train.speed's fast path: one launch for all adapters (tasks/training/flat_optim.py)
        from tasks.training import flat_optim

        return flat_optim.make(params, t.lr, t.weight_decay), "paged_adamw_32bit"
    if name == "adamw":  # on CUDA one fused kernel for all tensors
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=device.type == "cuda"), name
    import bitsandbytes as bnb  # paged optimizers page their state to CPU RAM under memory pressure

    cls = bnb.optim.PagedAdamW32bit if name == "paged_adamw_32bit" else bnb.optim.PagedAdamW8bit
    return cls(params, lr=t.lr, weight_decay=t.weight_decay), name


def linear_schedule(optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_batches(rows, lengths: list[int], params: Params, pad_id: int, epoch: int, start: int):
    """This rank's (batch, real-token count) pairs of this epoch, from row (packed row) `start` of
    the epoch's order on: the rows before it were consumed by all ranks (a resume, from a
    checkpoint written by any number of processes)."""
    t = params.train
    order = epoch_order(lengths, t.batch_size, params.seed, epoch)
    if t.packing and params.task == "causal_lm":
        bins = distributed.shard(pack_bins(order, lengths, params.tokenize.max_length)[start:])
        groups = [bins[i : i + t.batch_size] for i in range(0, len(bins), t.batch_size)]
        return (collate_packed(rows, g, pad_id) for g in groups)
    order = distributed.shard(order[start:])
    return ((b, real_tokens(b)) for b in batches(rows, t.batch_size, pad_id, params.task, order))


def real_tokens(batch: dict) -> int:
    """Non-pad tokens of a padded batch, counted on the host from the CPU batch."""
    return int(batch["attention_mask"].sum())


def save_adapter(
    model, tok, path: Path, base_model: str, state_dict: dict | None = None, initial: Path | None = None
) -> None:
    """The adapter folder, byte-for-byte the same for the same training, wherever it ran:
    PEFT writes target_modules in set order (which changes with Python's hash seed) and the
    absolute path of the base it was loaded from; write the sorted list and the base's name.
    initial: the adapter before training of a base-mutating init (save_initial_adapter)."""
    for cfg in model.peft_config.values():
        cfg.base_model_name_or_path = base_model
        if isinstance(cfg.target_modules, (set, frozenset, list, tuple)):
            cfg.target_modules = sorted(cfg.target_modules)
    base = model.get_base_model()  # PEFT's README.md names the base by the path it was loaded from
    base.config._name_or_path = base.name_or_path = base_model
    if initial is not None:  # PEFT converts it to a plain LoRA on the unchanged base
        model.save_pretrained(
            path,
            safe_serialization=True,
            state_dict=state_dict,  # state_dict: FSDP's, gathered
            path_initial_model_for_weight_conversion=str(initial),
        )
        shutil.rmtree(initial.parent, ignore_errors=True)
    else:
        model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
    config_path = path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok.save_pretrained(path)


def optimizer_steps(rows, lengths: list[int], params: Params, pad_id: int, epoch: int, start: int):
    """This epoch's optimizer steps from row `start` of its order on: (rows of the order all ranks
    consumed after the step, [(batch, real tokens)] * grad_accum). A last, incomplete group is dropped."""
    group, per_micro = [], params.train.batch_size * distributed.world()[1]
    for micro, item in enumerate(epoch_batches(rows, lengths, params, pad_id, epoch, start), 1):
        group.append(item)
        if len(group) == params.train.grad_accum:
            yield start + micro * per_micro, group
            group = []


def loss_units(batch: dict, task: str) -> int:
    """What the loss averages over: the label tokens a causal LM predicts (labels shift by one),
    or the examples of a classifier. Counted on the host, from the CPU batch: no GPU sync."""
    if task == "seq_cls":
        return len(batch["labels"])
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def to_device(batch: dict, device: torch.device) -> dict:
    if device.type == "cuda":  # from pinned memory without blocking: a plain copy waits for the GPU to drain
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def accumulate(forward, group: list, task: str, device: torch.device, autocast, extra: dict):
    """Forward and backward over one optimizer step's micro-batches; gradients add up in .grad.
    Returns (this rank's share of the step's loss, the step's real tokens on all ranks), both
    left where they are (a device tensor; an int or a tensor) for the caller to fetch later."""
    units = [loss_units(batch, task) for batch, _ in group]
    # One all-reduce per optimizer step (none on one process): [loss units, real tokens] of all ranks.
    counts = distributed.sum_over_ranks(torch.tensor([sum(units), sum(real for _, real in group)]), device)
    world = distributed.world()[1]
    step_loss = torch.zeros((), device=device)
    for i, ((batch, _), n) in enumerate(zip(group, units)):
        batch = to_device(batch, device)
        with distributed.no_sync(forward, skip=i < len(group) - 1):  # DDP all-reduces in the last backward only
            with autocast:
                mean = forward(**batch, **extra).loss  # mean over this micro-batch's n units (any loss path: Liger too)
            # The sum over this micro-batch / the step's units on all ranks; times world: DDP averages ranks.
            loss = mean * (n * world / counts[0])
            loss.backward()
        if n:  # a micro-batch with no label tokens has a NaN mean, a zero weight and zero gradients
            step_loss += loss.detach()
    return step_loss, counts[1]


def run(params: Params, root: Path, resume_key: str | None = None) -> StageResult:
    """Train the adapter. `resume_key` names this exact run (its inputs and settings, e.g.
    DVC's run-cache key of the stage): checkpoints are written and resumed only under it."""
    t = params.train
    set_threads(t.threads)
    torch.manual_seed(params.seed)
    device = distributed.setup(pick_device(t.device))
    world = distributed.world()[1]
    # --- setup: what the step runs on (train.speed; tasks/fast/plan.py), then model and optimizer
    tok = load_tokenizer(str(resolve(root, BASE)))
    base_config = json.loads((resolve(root, BASE) / "config.json").read_text())
    model_type = base_config.get("model_type", "")
    strategy, why = sharding.choose(t.strategy, resolve(root, BASE), device)  # single | ddp | fsdp
    t, notes = sharding.adjust(t, strategy, base_config, device)
    if world > 1 and distributed.is_main():
        print("train: " + "; ".join([why, *notes]))
    plan = fast_plan.choose(t, device, params.task, model_type, quantized="quantization_config" in base_config)
    if plan.note and distributed.is_main():
        print(f"train: {plan.note}")
    # Every patch (Liger's, compiled layers, traced 4-bit layers) ends with this block:
    # evaluation and merge, in this process or another, build and run unpatched models.
    with fast_patch.scoped(model_type, plan) as patches:
        liger = apply_speedups(model_type, t, device) if plan.liger and not plan.fast else False
        model = load_saved(params.task, resolve(root, BASE), sharding.load_device(strategy, device))  # FSDP: host RAM
        dtype = DTYPES[params.quant.compute_dtype]
        t_model = t.model_copy(
            update={"precision": plan.precision, "gradient_checkpointing": plan.gradient_checkpointing}
        )
        model = add_lora(model, params.lora, params.task, t_model, dtype)
        initial_adapter = save_initial_adapter(model, params.lora) if distributed.is_main() else None
        applied = patches.apply(model, plan, random=params.lora.dropout > 0) if plan.fast else {}
        liger = liger or "liger" in applied
        forward = sharding.wrap(model, device, strategy)  # DDP or FSDP under torchrun, else the model itself
        trainable = [p for p in model.parameters() if p.requires_grad]
        n_trainable, n_total = sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters())
        train_rows = load_split(root, "train")
        val_rows = load_split(root, "validation") if t.eval_every else None
        validation = Validation(
            t, params.task, params.seed
        )  # validation passes, best step, early stopping (tasks/training/validation.py)
        lengths = list_lengths(train_rows).tolist()  # from the Arrow offsets: no row is read
        rows_per_epoch = (
            len(pack_bins(list(range(len(lengths))), lengths, params.tokenize.max_length))
            if t.packing and params.task == "causal_lm"
            else len(train_rows)
        )
        steps_per_epoch = math.ceil(rows_per_epoch // world / (t.batch_size * t.grad_accum))
        total = t.max_steps if t.max_steps > 0 else math.ceil(steps_per_epoch * t.epochs)
        optimizer, opt_name = make_optimizer(trainable, t.model_copy(update={"optimizer": plan.optimizer}), device)
        scheduler = linear_schedule(optimizer, int(t.warmup_ratio * total), total)
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        # --- resume from the last checkpoint of this same run, if a crash left one
        ckpt_root = resolve(root, catalog.CHECKPOINT_DIR)
        ckpt_dir = checkpoint.run_dir(ckpt_root, resume_key) if resume_key else None
        checkpoint_every = t.checkpoint_every if resume_key else 0
        log, step, epoch, skip, tokens = [], 0, 0, 0, 0
        if checkpoint_every:
            for path in checkpoint.prune(ckpt_root, resume_key):
                print(f"train: removed {path}: another run's checkpoints or a killed save's temp folder")
        resume_from = checkpoint.latest(ckpt_dir, resume_key) if checkpoint_every else None
        if resume_from is not None:
            state = checkpoint.restore(resume_from, model, optimizer, scheduler)
            log, step, epoch, tokens = state["log"], state["step"], state["epoch"], state["tokens"]
            skip = state["next_row"]  # rows of this epoch's order already consumed (by all ranks)
            validation.load(state.get("validation"), checkpoint.extra_tensors(resume_from))
            print(f"train: resuming from {resume_from} (step {step} of {total})")
        # --- train
        extra = {"use_cache": False} if params.task == "causal_lm" else {}  # a cache would disable packing masks
        pending = []  # log rows whose loss is still on the device: fetched together at the next log point

        def fetch_log() -> None:
            """The one host sync of a log interval: the pending steps' losses (summed over ranks)."""
            if not pending:
                return
            losses = distributed.sum_over_ranks(torch.stack([loss for _, loss, _ in pending]), device) / world
            seen = torch.stack([n for _, _, n in pending])  # tokens so far after each step (host, or device under DDP)
            for (row, _, _), loss, n in zip(pending, losses.tolist(), seen.tolist()):
                log.append(
                    {
                        "step": row["step"],
                        "epoch": row["epoch"],
                        "loss": round(loss, 6),
                        "lr": row["lr"],
                        "tokens": int(n),
                    }
                )
            pending.clear()

        started, tokens_before, step_at_start, warm = time.perf_counter(), tokens, step, None
        rank_tokens = 0  # this rank's own real tokens in this run: the per-rank figures of the summary
        val_seconds = 0.0  # time in validation passes: left out of the throughput figures
        model.train()
        bar = tqdm(total=total, initial=step, desc="train", unit="step")
        while step < total and not validation.stop:
            for next_row, group in optimizer_steps(train_rows, lengths, params, tok.pad_token_id, epoch, skip):
                step_loss, step_tokens = accumulate(forward, group, params.task, device, autocast, extra)
                rank_tokens += sum(real for _, real in group)
                torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens = tokens + step_tokens  # a CPU tensor, or a device tensor under DDP: read at log points
                pending.append(({"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0]}, step_loss, tokens))
                if step == step_at_start + WARMUP_STEPS:  # throughput is measured after warm-up
                    distributed.synchronize(device)  # once: the clock must not run ahead of the GPU
                    warm = (time.perf_counter(), tokens, val_seconds)
                bar.update(1)
                if validation.due(step, total):  # a host sync, like a log point; before a checkpoint, which keeps it
                    at = time.perf_counter()
                    row = validation.run(model, val_rows, t.batch_size, tok.pad_token_id, device, autocast, step)
                    val_seconds += time.perf_counter() - at
                    if distributed.is_main():
                        bar.write(
                            f"train: step {step}: "
                            + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step")
                            + (f"; early stopping: best step {validation.best_step}" if validation.stop else "")
                        )
                done = step >= total or validation.stop
                save_now = checkpoint_every and step % checkpoint_every == 0 and not done
                if step % t.log_every == 0 or save_now or done:
                    fetch_log()
                    bar.set_postfix(
                        loss=f"{sum(r['loss'] for r in log[-t.log_every :]) / min(len(log), t.log_every):.4f}"
                    )
                if save_now:  # every rank: FSDP's shards are gathered; rank 0 writes
                    checkpoint.save(
                        ckpt_dir,
                        model,
                        optimizer,
                        scheduler,
                        {
                            "fingerprint": resume_key,
                            "step": step,
                            "epoch": epoch,
                            "next_row": next_row,
                            "tokens": int(tokens),
                            "log": log,
                            "validation": validation.state(),
                        },
                        extra=validation.tensors(),
                    )
                if done:
                    break
            epoch, skip = epoch + 1, 0
        bar.close()
        tokens = int(tokens)
        seconds = time.perf_counter() - started
        restored_best = validation.restore_best(model)  # early stopping saves the best pass's adapter
    # --- save (one writer: rank 0; the adapter format is the same for any number of GPUs)
    ranks = distributed.per_rank([rank_tokens, seconds - val_seconds], device)  # every rank calls
    adapter_state = sharding.full_trainable_state(model)  # FSDP: gathered to rank 0 (every rank calls); else None
    if not distributed.is_main():
        distributed.barrier()
        return result("train", [ADAPTER, REPORT_DIR], world_size=world)
    with atomic_dir(resolve(root, ADAPTER)) as tmp:
        save_adapter(model, tok, tmp, params.model.name, adapter_state, initial_adapter)
        write_stage_card(tmp, params, root, "adapter")  # replaces PEFT's template (it names the base's local path)
    tail = log[-max(1, len(log) // 10) :]
    summary = {
        "steps": step,
        "resumed_from_step": int(resume_from.name.split("-")[1]) if resume_from else 0,
        "epochs_seen": epoch,
        "final_loss": log[-1]["loss"],
        "mean_loss_last_10pct": sum(r["loss"] for r in tail) / len(tail),
        "train_seconds": round(seconds, 2),
        "tokens": tokens,
        "tokens_per_second": round((tokens - int(tokens_before)) / (seconds - val_seconds), 1),  # all ranks, this run
        "tokens_per_second_after_warmup": round(
            (tokens - int(warm[1])) / (time.perf_counter() - warm[0] - (val_seconds - warm[2])), 1
        )
        if warm
        else None,
        "validation_seconds": round(val_seconds, 2),
        **validation.summary(),
        "restored_best": restored_best,
        "trainable_params": n_trainable,
        "total_params": n_total,
        "optimizer": opt_name,
        "liger_kernels": liger,
        "precision": plan.precision,
        "speed": {**plan.describe(), **applied},
        "device": str(device),
        "world_size": world,
        "strategy": strategy,
        "ranks": [
            {
                "rank": r,
                "tokens": int(n),
                "train_seconds": round(sec, 2),
                "tokens_per_second": round(n / sec, 1) if sec > 0 else None,
            }
            for r, (n, sec) in enumerate(ranks)
        ],
    }
    with atomic_dir(resolve(root, REPORT_DIR)) as tmp:
        with open(tmp / "loss.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(log[0]))
            w.writeheader()
            w.writerows(log)
        with open(tmp / Path(catalog.TRAIN_VALIDATION_CSV).name, "w", newline="") as f:
            w = csv.DictWriter(
                f, fieldnames=["step", "val_loss"] + (["val_accuracy"] if params.task == "seq_cls" else [])
            )
            w.writeheader()
            w.writerows(validation.history)
        plot_loss(log, tmp / "loss.png", validation.history, validation.best_step if validation.stopping else None)
        write_json(tmp / "summary.json", summary)
    if ckpt_dir is not None:
        checkpoint.clear(ckpt_dir)  # the adapter is saved: checkpoints of this run are spent
    distributed.barrier()
    return result("train", [ADAPTER, REPORT_DIR], **summary)
