"""The training loop's rules (tasks/train.py), on CPU: the loss of an optimizer step weighs
every label token the same however the step is cut into micro-batches and ranks; under DDP
only the last micro-step all-reduces gradients; the loop reads no tensor value between log
points; and Liger-style patches end with training, so evaluation runs the model unpatched."""

import contextlib
import dataclasses
import json
import os
import socket
import sys

import pandas as pd
import pytest
import torch
from datasets import Dataset

from tasks import evaluate, quantize, split, tokenize, train, validate
from tasks.config import Params
from tasks.data.batching import IGNORE
from tasks.distributed import ddp as distributed
from tasks.fast import plan as fast_plan
from tests.test_causal_lm import causal_params, tiny_llama  # noqa: F401 (fixture)
from tests.trainer_helpers import CPU, EXTRA, NO_AUTOCAST, ddp_step, micro_batches, rows, tiny_model


def grads_after(model, group) -> tuple[dict, float]:
    model.zero_grad(set_to_none=True)
    loss, _ = train.accumulate(model, group, "causal_lm", CPU, NO_AUTOCAST, EXTRA)
    return {n: p.grad.clone() for n, p in model.named_parameters()}, float(loss)


def test_batch_4_and_batch_1_times_4_give_the_same_gradients():
    model = tiny_model()
    one, loss_one = grads_after(model, micro_batches(rows(), 4))  # batch 4 x accum 1
    four, loss_four = grads_after(model, micro_batches(rows(), 1))  # batch 1 x accum 4
    assert loss_one == pytest.approx(loss_four, rel=1e-5)
    for name in one:
        assert torch.allclose(one[name], four[name], rtol=1e-4, atol=1e-7), name
    # The mean of micro-batch means (the usual bug) weighs the 1-token answer 20 times the 11-token one's tokens
    model.zero_grad(set_to_none=True)
    for batch, _ in micro_batches(rows(), 1):
        (model(**batch, **EXTRA).loss / 4).backward()
    naive = {n: p.grad for n, p in model.named_parameters()}
    assert max((naive[n] - one[n]).norm() / one[n].norm() for n in one) > 0.05


def test_the_loss_unit_is_a_label_token_or_an_example():
    batch = micro_batches(rows(), 4)[0][0]
    assert train.loss_units(batch, "causal_lm") == 1 + 6 + 2 + 11  # the shift drops no answer token here
    assert train.loss_units({"labels": torch.tensor([0, 3, 1])}, "seq_cls") == 3


@pytest.mark.parametrize("layer_checkpoint", [False, True])
def test_ddp_all_reduces_once_per_optimizer_step_and_matches_one_process(tmp_path, monkeypatch, layer_checkpoint):
    """Also with the decoder layers under tasks/fast/ops/layer_checkpoint.py (train.speed's fast path),
    whose backward runs each layer's own backward inside the model's: DDP's gradient hooks
    still fire once per parameter and reduce after the last micro-step only."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.multiprocessing.spawn(ddp_step, args=(2, port, str(tmp_path), layer_checkpoint), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    single, loss = grads_after(tiny_model(), micro_batches(rows(), 4))  # all 4 rows, one process
    for r in ranks:
        assert r["reduced_after"] and set(r["reduced_after"]) == {2}  # only in the last micro-step's backward
        assert r["count_reductions"] == 1  # the label-token count: one all-reduce for the step
        assert r["loss"] == pytest.approx(loss, rel=1e-5)
        for name, g in single.items():
            assert torch.allclose(r["grads"][name], g, rtol=1e-4, atol=1e-7), name


@pytest.fixture()
def prepared(tmp_path, tiny_llama):  # noqa: F811 (fixture)
    raw = causal_params(tiny_llama)
    raw["train"].update(max_steps=6, batch_size=4, grad_accum=2, log_every=3, checkpoint_every=0)
    params = Params.model_validate(raw)
    for stage in (validate, split, tokenize, quantize):
        stage.run(params, tmp_path)
    return params


def test_the_loop_reads_tensor_values_only_at_log_points(prepared, tmp_path, monkeypatch):
    """.item(), .tolist(), float(), int() on tensors wait for the GPU: inside the loop, only
    fetch_log calls them (at log points), never the per-micro-step code."""
    callers = []
    for name in ("item", "tolist", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            frame = sys._getframe(1)
            if frame.f_code.co_filename.endswith(os.path.join("tasks", "train.py")):
                callers.append(frame.f_code.co_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    train.run(prepared, tmp_path)
    log = pd.read_csv(tmp_path / "reports/train/loss.csv")
    assert log["step"].tolist() == [1, 2, 3, 4, 5, 6] and log["loss"].notna().all()
    assert "accumulate" not in callers
    assert callers.count("fetch_log") == 2 * 2  # 2 log points (steps 3 and 6), 2 fetches each
    assert callers.count("run") <= 2  # after the loop: the token totals for the summary
    assert set(callers) <= {"fetch_log", "run", "loss_units", "real_tokens"}  # these two: the CPU batch


def test_liger_style_patches_end_with_training(prepared, tmp_path, monkeypatch):
    """Class-level patches made for training (as Liger's are) are undone when it ends:
    evaluation in the same process builds and runs the unpatched classes."""
    from transformers.models.llama import modeling_llama

    original, norm, calls = modeling_llama.LlamaForCausalLM.forward, modeling_llama.LlamaRMSNorm, []

    def fake_liger(model_type, t, device):  # what apply_liger_kernel_to_llama does, minus the kernels
        def forward(self, *args, **kwargs):
            calls.append(1)
            return original(self, *args, **kwargs)

        modeling_llama.LlamaForCausalLM.forward = forward
        modeling_llama.LlamaRMSNorm = type("PatchedRMSNorm", (norm,), {})
        return True

    real_choose = fast_plan.choose
    monkeypatch.setattr(fast_plan, "choose", lambda *a, **k: dataclasses.replace(real_choose(*a, **k), liger=True))
    monkeypatch.setattr(train, "apply_speedups", fake_liger)
    train.run(prepared, tmp_path)
    trained = len(calls)
    assert trained > 0 and json.loads((tmp_path / "reports/train/summary.json").read_text())["liger_kernels"]
    assert modeling_llama.LlamaForCausalLM.forward is original and modeling_llama.LlamaRMSNorm is norm
    evaluate.run(prepared, tmp_path)
    assert len(calls) == trained  # evaluation ran the unpatched forward


def test_a_run_without_label_tokens_in_a_micro_batch_keeps_finite_gradients():
    model = tiny_model()
    columns = rows().to_dict()
    columns["labels"][0] = [IGNORE] * len(columns["labels"][0])
    group = micro_batches(Dataset.from_dict(columns), 1)
    grads, loss = grads_after(model, group)
    assert all(torch.isfinite(g).all() for g in grads.values()) and loss == loss
    assert train.loss_units(group[0][0], "causal_lm") == 0


def test_no_sync_is_a_no_op_without_ddp():
    assert isinstance(distributed.no_sync(tiny_model(), skip=True), contextlib.nullcontext)
