"""Step 5: train LoRA adapters on the frozen 4-bit base, in the shape of a torchtune recipe:
`run` calls `setup` (speed plan, model, data, optimizer and schedule), `resume`, `train` (for
each optimizer step: its micro-batches -> count their label tokens -> forward + backward
each -> clip -> step, logging the loss) and `save` (the adapter, the log, its plot).

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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tasks import catalog
from tasks.common import PipelineError, StageResult, atomic_dir, resolve, result, write_json
from tasks.config import LoraSection, Params, TrainConfig
from tasks.data.arrowio import list_lengths
from tasks.data.batching import batches, collate_packed, epoch_order, loss_units, pack_bins
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
from tasks.training.step_log import StepLog
from tasks.training.validation import Validation

ADAPTER = catalog.ADAPTER_DIR
BASE = catalog.BASE_MODEL_DIR
WARMUP_STEPS = 3  # steps left out of the steady-state throughput figure (kernel compilation, caches)
REPORT_DIR = catalog.TRAIN_REPORT_DIR


@dataclass
class Setup:
    """What the loop runs on, built once by setup and read by train and save."""

    device: torch.device
    world: int
    t: TrainConfig  # the train settings as the strategy adjusts them
    plan: fast_plan.Plan
    strategy: str
    tok: object
    model: object
    forward: object  # DDP or FSDP around the model under torchrun, else the model itself
    trainable: list
    n_trainable: int
    n_total: int
    initial_adapter: Path | None  # the adapter before training of a base-mutating init
    liger: bool
    applied: dict  # the fast path's patches as installed
    train_rows: object
    val_rows: object
    lengths: list[int]
    total: int  # optimizer steps of the whole run
    validation: Validation  # validation passes, best step, early stopping (tasks/training/validation.py)
    optimizer: object
    opt_name: str
    scheduler: object
    autocast: object
    resume_key: str | None
    ckpt_dir: Path | None  # this run's checkpoints: none without a resume key
    checkpoint_every: int


@dataclass
class Progress:
    """Where training stands: restored from a checkpoint, advanced by train, read by save."""

    log: list = field(default_factory=list)
    step: int = 0
    epoch: int = 0
    skip: int = 0  # rows of this epoch's order already consumed (by all ranks)
    tokens: object = 0  # real tokens of all ranks; a tensor while the loop runs, read at log points
    resume_from: Path | None = None
    tokens_before: object = 0  # at the start of this run
    started: float = 0.0
    seconds: float = 0.0
    val_seconds: float = 0.0  # time in validation passes: left out of the throughput figures
    rank_tokens: int = 0  # this rank's own real tokens in this run: the per-rank figures of the summary
    warm: tuple | None = None  # (clock, tokens, validation seconds) once the warm-up steps are done


def run(params: Params, root: Path, resume_key: str | None = None) -> StageResult:
    """Train the adapter: setup, train, save. `resume_key` names this exact run (its inputs and
    settings, e.g. DVC's run-cache key of the stage): checkpoints are written and resumed only under it."""
    set_threads(params.train.threads)
    torch.manual_seed(params.seed)
    device = distributed.setup(pick_device(params.train.device))
    t, plan, strategy, model_type, tok = _setup_plan(params, root, device)
    # Every patch (Liger's, compiled layers, traced 4-bit layers) ends with this block:
    # evaluation and merge, in this process or another, build and run unpatched models.
    with fast_patch.scoped(model_type, plan) as patches:
        s = setup(params, root, device, t, plan, strategy, model_type, tok, patches, resume_key)
        progress = resume(s, root)
        steps = StepLog(root, enabled=distributed.is_main(), total_steps=s.total)
        try:
            train(s, progress, params, steps)
        finally:
            steps.close()
        # The loop's token totals stay where they are until it ends: read here, once.
        progress.tokens = int(progress.tokens)
        if progress.warm:
            progress.warm = (progress.warm[0], int(progress.warm[1]), progress.warm[2])
        progress.seconds = time.perf_counter() - progress.started
        restored_best = s.validation.restore_best(s.model)  # early stopping saves the best pass's adapter
    return save(s, progress, params, root, restored_best)


def _setup_plan(params: Params, root: Path, device: torch.device):
    """What the step runs on, read from the base model's config: the strategy (single | ddp |
    fsdp), the train settings it adjusts, and the speed plan (train.speed; tasks/fast/plan.py)."""
    tok = load_tokenizer(str(resolve(root, BASE)))
    base_config = json.loads((resolve(root, BASE) / "config.json").read_text())
    model_type = base_config.get("model_type", "")
    strategy, why = sharding.choose(params.train.strategy, resolve(root, BASE), device)
    t, notes = sharding.adjust(params.train, strategy, base_config, device)
    if distributed.world()[1] > 1 and distributed.is_main():
        print("train: " + "; ".join([why, *notes]))
    plan = fast_plan.choose(t, device, params.task, model_type, quantized="quantization_config" in base_config)
    if plan.note and distributed.is_main():
        print(f"train: {plan.note}")
    return t, plan, strategy, model_type, tok


def setup(params: Params, root: Path, device, t, plan, strategy, model_type, tok, patches, resume_key) -> Setup:
    """Model, data, optimizer, in this order: each draws on the seeded generator in turn."""
    model, forward, trainable, initial_adapter, liger, applied = _setup_model(
        params, root, device, t, plan, strategy, model_type, patches
    )
    train_rows, val_rows, lengths, total = _setup_data(params, root, t)
    validation = Validation(t, params.task, params.seed)
    optimizer, opt_name, scheduler = _setup_optimizer(trainable, t, plan, device, total)
    dtype = DTYPES[params.quant.compute_dtype]
    return Setup(
        device=device,
        world=distributed.world()[1],
        t=t,
        plan=plan,
        strategy=strategy,
        tok=tok,
        model=model,
        forward=forward,
        trainable=trainable,
        n_trainable=sum(q.numel() for q in trainable),
        n_total=sum(q.numel() for q in model.parameters()),
        initial_adapter=initial_adapter,
        liger=liger,
        applied=applied,
        train_rows=train_rows,
        val_rows=val_rows,
        lengths=lengths,
        total=total,
        validation=validation,
        optimizer=optimizer,
        opt_name=opt_name,
        scheduler=scheduler,
        autocast=torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32),
        resume_key=resume_key,
        ckpt_dir=checkpoint.run_dir(resolve(root, catalog.CHECKPOINT_DIR), resume_key) if resume_key else None,
        checkpoint_every=t.checkpoint_every if resume_key else 0,
    )


def _setup_model(params: Params, root: Path, device, t, plan, strategy, model_type, patches):
    """The 4-bit base with adapters, patched as the plan says, wrapped for the strategy."""
    liger = apply_speedups(model_type, t, device) if plan.liger and not plan.fast else False
    model = load_saved(params.task, resolve(root, BASE), sharding.load_device(strategy, device))  # FSDP: host RAM
    t_model = t.model_copy(update={"precision": plan.precision, "gradient_checkpointing": plan.gradient_checkpointing})
    model = add_lora(model, params.lora, params.task, t_model, DTYPES[params.quant.compute_dtype])
    initial_adapter = save_initial_adapter(model, params.lora) if distributed.is_main() else None
    applied = patches.apply(model, plan, random=params.lora.dropout > 0) if plan.fast else {}
    forward = sharding.wrap(model, device, strategy)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, forward, trainable, initial_adapter, liger or "liger" in applied, applied


def _setup_data(params: Params, root: Path, t: TrainConfig):
    """The tokenized splits, the training rows' lengths and the run's number of optimizer steps."""
    train_rows = load_split(root, "train")
    val_rows = load_split(root, "validation") if t.eval_every else None
    lengths = list_lengths(train_rows).tolist()  # from the Arrow offsets: no row is read
    rows_per_epoch = (
        len(pack_bins(list(range(len(lengths))), lengths, params.tokenize.max_length))
        if t.packing and params.task == "causal_lm"
        else len(train_rows)
    )
    steps_per_epoch = math.ceil(rows_per_epoch // distributed.world()[1] / (t.batch_size * t.grad_accum))
    total = t.max_steps if t.max_steps > 0 else math.ceil(steps_per_epoch * t.epochs)
    return train_rows, val_rows, lengths, total


def _setup_optimizer(trainable: list, t: TrainConfig, plan, device: torch.device, total: int):
    """The optimizer the plan picks and its linear warm-up and decay over the run's steps."""
    optimizer, opt_name = make_optimizer(trainable, t.model_copy(update={"optimizer": plan.optimizer}), device)
    return optimizer, opt_name, linear_schedule(optimizer, int(t.warmup_ratio * total), total)


def resume(s: Setup, root: Path) -> Progress:
    """The progress of this same run's last checkpoint, if a crash left one; else a fresh start."""
    progress = Progress()
    if not s.checkpoint_every:
        return progress
    for path in checkpoint.prune(resolve(root, catalog.CHECKPOINT_DIR), s.resume_key):
        print(f"train: removed {path}: another run's checkpoints or a killed save's temp folder")
    progress.resume_from = checkpoint.latest(s.ckpt_dir, s.resume_key)
    if progress.resume_from is not None:
        state = checkpoint.restore(progress.resume_from, s.model, s.optimizer, s.scheduler)
        progress.log, progress.step, progress.epoch = state["log"], state["step"], state["epoch"]
        progress.tokens, progress.skip = state["tokens"], state["next_row"]
        s.validation.load(state.get("validation"), checkpoint.extra_tensors(progress.resume_from))
        print(f"train: resuming from {progress.resume_from} (step {progress.step} of {s.total})")
    return progress


def fetch_log(pending: list, log: list, device: torch.device, world: int) -> None:
    """The one host sync of a log interval: the pending steps' losses (summed over ranks) into log."""
    if not pending:
        return
    losses = distributed.sum_over_ranks(torch.stack([loss for _, loss, _ in pending]), device) / world
    seen = torch.stack([n for _, _, n in pending])  # tokens so far after each step (host, or device under DDP)
    for (row, _, _), loss, n in zip(pending, losses.tolist(), seen.tolist()):
        log.append(
            {"step": row["step"], "epoch": row["epoch"], "loss": round(loss, 6), "lr": row["lr"], "tokens": int(n)}
        )
    pending.clear()


def train(s: Setup, p: Progress, params: Params, steps: StepLog | None = None) -> None:
    """The loop: each optimizer step's micro-batches forward and backward (accumulate), clip,
    step; validation passes, log points and checkpoints where they are due. `steps` receives
    each log row and validation row as it is made (the run's earlier rows first, when resumed)."""
    t, validation = s.t, s.validation
    steps = steps or StepLog(Path("."), enabled=False)
    steps.write(p.log + validation.history)
    extra = {"use_cache": False} if params.task == "causal_lm" else {}  # a cache would disable packing masks
    pending = []  # log rows whose loss is still on the device: fetched together at the next log point
    p.started, p.tokens_before, step_at_start = time.perf_counter(), p.tokens, p.step
    s.model.train()
    bar = tqdm(total=s.total, initial=p.step, desc="train", unit="step")
    while p.step < s.total and not validation.stop:
        for next_row, group in optimizer_steps(s.train_rows, s.lengths, params, s.tok.pad_token_id, p.epoch, p.skip):
            step_loss, step_tokens = accumulate(s.forward, group, params.task, s.device, s.autocast, extra)
            p.rank_tokens += sum(real for _, real in group)
            torch.nn.utils.clip_grad_norm_(s.trainable, t.max_grad_norm)
            s.optimizer.step()
            s.scheduler.step()
            s.optimizer.zero_grad(set_to_none=True)
            p.step += 1
            p.tokens = p.tokens + step_tokens  # a CPU tensor, or a device tensor under DDP: read at log points
            pending.append(
                ({"step": p.step, "epoch": p.epoch, "lr": s.scheduler.get_last_lr()[0]}, step_loss, p.tokens)
            )
            if p.step == step_at_start + WARMUP_STEPS:  # throughput is measured after warm-up
                distributed.synchronize(s.device)  # once: the clock must not run ahead of the GPU
                p.warm = (time.perf_counter(), p.tokens, p.val_seconds)
            bar.update(1)
            if validation.due(p.step, s.total):  # a host sync, like a log point; before a checkpoint, which keeps it
                at = time.perf_counter()
                row = validation.run(
                    s.model, s.val_rows, t.batch_size, s.tok.pad_token_id, s.device, s.autocast, p.step
                )
                p.val_seconds += time.perf_counter() - at
                steps.write([row])
                if distributed.is_main():
                    bar.write(
                        f"train: step {p.step}: "
                        + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step")
                        + (f"; early stopping: best step {validation.best_step}" if validation.stop else "")
                    )
            done = p.step >= s.total or validation.stop
            save_now = s.checkpoint_every and p.step % s.checkpoint_every == 0 and not done
            if p.step % t.log_every == 0 or save_now or done:
                logged = len(p.log)
                fetch_log(pending, p.log, s.device, s.world)
                steps.write(p.log[logged:])
                recent = p.log[-t.log_every :]
                bar.set_postfix(loss=f"{sum(r['loss'] for r in recent) / min(len(p.log), t.log_every):.4f}")
            if save_now:  # every rank: FSDP's shards are gathered; rank 0 writes
                _save_checkpoint(s, p, next_row)
            if done:
                break
        p.epoch, p.skip = p.epoch + 1, 0
    bar.close()


def _save_checkpoint(s: Setup, p: Progress, next_row: int) -> None:
    state = {
        "fingerprint": s.resume_key,
        "step": p.step,
        "epoch": p.epoch,
        "next_row": next_row,
        "tokens": int(p.tokens),
        "log": p.log,
        "validation": s.validation.state(),
    }
    checkpoint.save(s.ckpt_dir, s.model, s.optimizer, s.scheduler, state, extra=s.validation.tensors())


def save(s: Setup, p: Progress, params: Params, root: Path, restored_best: bool) -> StageResult:
    """The adapter, the loss log, its plot and the summary. One writer, rank 0: the adapter's
    format is the same for any number of GPUs."""
    ranks = distributed.per_rank([p.rank_tokens, p.seconds - p.val_seconds], s.device)  # every rank calls
    adapter_state = sharding.full_trainable_state(s.model)  # FSDP: gathered to rank 0 (every rank calls); else None
    if not distributed.is_main():
        distributed.barrier()
        return result("train", [ADAPTER, REPORT_DIR], world_size=s.world)
    with atomic_dir(resolve(root, ADAPTER)) as tmp:
        save_adapter(s.model, s.tok, tmp, params.model.name, adapter_state, s.initial_adapter)
        write_stage_card(tmp, params, root, "adapter")  # replaces PEFT's template (it names the base's local path)
    summary = _summary(s, p, ranks, restored_best)
    with atomic_dir(resolve(root, REPORT_DIR)) as tmp:
        _write_csv(tmp / Path(catalog.TRAIN_LOSS_CSV).name, list(p.log[0]), p.log)
        val_columns = ["step", "val_loss"] + (["val_accuracy"] if params.task == "seq_cls" else [])
        _write_csv(tmp / Path(catalog.TRAIN_VALIDATION_CSV).name, val_columns, s.validation.history)
        v = s.validation
        plot_loss(p.log, tmp / Path(catalog.TRAIN_LOSS_PNG).name, v.history, v.best_step if v.stopping else None)
        write_json(tmp / Path(catalog.TRAIN_SUMMARY).name, summary)
    if s.ckpt_dir is not None:
        checkpoint.clear(s.ckpt_dir)  # the adapter is saved: checkpoints of this run are spent
    distributed.barrier()
    return result("train", [ADAPTER, REPORT_DIR], **summary)


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)


def _summary(s: Setup, p: Progress, ranks: list, restored_best: bool) -> dict:
    log, tail = p.log, p.log[-max(1, len(p.log) // 10) :]
    return {
        "steps": p.step,
        "resumed_from_step": int(p.resume_from.name.split("-")[1]) if p.resume_from else 0,
        "epochs_seen": p.epoch,
        "final_loss": log[-1]["loss"],
        "mean_loss_last_10pct": sum(r["loss"] for r in tail) / len(tail),
        "train_seconds": round(p.seconds, 2),
        "tokens": p.tokens,
        "tokens_per_second": round((p.tokens - int(p.tokens_before)) / (p.seconds - p.val_seconds), 1),  # all ranks
        "tokens_per_second_after_warmup": round(
            (p.tokens - p.warm[1]) / (time.perf_counter() - p.warm[0] - (p.val_seconds - p.warm[2])), 1
        )
        if p.warm
        else None,
        "validation_seconds": round(p.val_seconds, 2),
        **s.validation.summary(),
        "restored_best": restored_best,
        "trainable_params": s.n_trainable,
        "total_params": s.n_total,
        "optimizer": s.opt_name,
        "liger_kernels": s.liger,
        "precision": s.plan.precision,
        "speed": {**s.plan.describe(), **s.applied},
        "device": str(s.device),
        "world_size": s.world,
        "strategy": s.strategy,
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
    fast_patch.apply_liger(model_type, kernels=True)
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
