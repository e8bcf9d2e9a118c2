"""Validation during training (train.eval_every) and early stopping (tasks/training/validation.py): the
curve is logged, the best pass's adapter is the one saved, and a resumed run decides as an
uninterrupted one."""

import json

import pandas as pd
import pytest
import torch

from tasks import quantize, split, tokenize, train, validate
from tasks.config import Params, ParamsError, load_params
from tasks.evaluate import load_adapted
from tasks.model.loading import load_tokenizer
from tasks.tokenize import load_split
from tasks.training import checkpoint
from tasks.training.validation import score
from tests.conftest import REPO, small_cls_params, write_params
from tests.test_causal_lm import causal_params, tiny_llama  # noqa: F401 (fixture)

CPU = torch.device("cpu")
BF16 = torch.autocast("cpu", dtype=torch.bfloat16)


def prepare(params: Params, root):
    for stage in (validate, split, tokenize, quantize):
        stage.run(params, root)


def reloaded_score(params: Params, root) -> dict:
    """The saved adapter, loaded as evaluate loads it, scored on the validation split."""
    model = load_adapted(params, root, CPU)
    tok = load_tokenizer(str(root / "models/adapter"))
    return score(model, load_split(root, "validation"), 8, tok.pad_token_id, params.task, CPU, BF16)


def summary(root) -> dict:
    return json.loads((root / "reports/train/summary.json").read_text())


def test_validation_curve_for_classification(tmp_path, agnews_small):
    raw = small_cls_params(agnews_small)
    raw["train"].update(max_steps=5, eval_every=2)
    params = Params.model_validate(raw)
    prepare(params, tmp_path)
    train.run(params, tmp_path)
    curve = pd.read_csv(tmp_path / "reports/train/validation.csv")
    assert curve["step"].tolist() == [2, 4, 5]  # every 2 steps, and the last
    assert curve["val_loss"].notna().all() and curve["val_accuracy"].between(0, 1).all()
    s = summary(tmp_path)
    assert s["final_val_loss"] == curve["val_loss"].iloc[-1] and s["saved_adapter_step"] == 5
    assert s["best_step"] == curve.loc[curve["val_loss"].idxmin(), "step"] and not s["stopped_early"]
    assert s["validation_seconds"] > 0 and (tmp_path / "reports/train/loss.png").stat().st_size > 0
    # the in-training pass and the saved adapter reloaded agree: the pass scored what was saved
    again = reloaded_score(params, tmp_path)
    assert again["loss"] == pytest.approx(s["final_val_loss"], rel=2e-3)
    assert again["accuracy"] == pytest.approx(s["final_val_accuracy"], abs=1 / 40)


def early_params(tiny, **train_updates) -> Params:
    raw = causal_params(tiny)
    # min_delta far above any change: the first pass stays the best, so patience runs out
    raw["train"].update(
        {
            "max_steps": 8,
            "eval_every": 1,
            "early_stopping": True,
            "early_stopping_patience": 3,
            "early_stopping_min_delta": 100.0,
            "checkpoint_every": 0,
            **train_updates,
        }
    )
    return Params.model_validate(raw)


def test_early_stopping_stops_and_saves_the_best_adapter(tmp_path, tiny_llama):  # noqa: F811
    params = early_params(tiny_llama)
    prepare(params, tmp_path)
    train.run(params, tmp_path)
    s = summary(tmp_path)
    curve = pd.read_csv(tmp_path / "reports/train/validation.csv")
    assert s["steps"] == 4 and s["stopped_early"] and s["stopped_at_step"] == 4
    assert s["best_step"] == 1 and s["saved_adapter_step"] == 1 and s["restored_best"]
    assert curve["step"].tolist() == [1, 2, 3, 4]
    losses = curve.set_index("step")["val_loss"]
    assert abs(losses[4] - losses[1]) > 1e-3  # training moved on (lr 0.01): the saved adapter is not the last one
    # the saved adapter is step 1's, not step 4's
    assert reloaded_score(params, tmp_path)["loss"] == pytest.approx(losses[1], rel=2e-3)


def test_early_stopping_state_survives_a_crash(tmp_path, tiny_llama, monkeypatch):  # noqa: F811
    """Killed after the checkpoint at step 2 (best step 1, one pass without improvement), the resumed run
    stops at the same step and saves the same adapter, byte for byte, as an uninterrupted run."""
    params = early_params(tiny_llama, checkpoint_every=2)
    a, b = tmp_path / "a", tmp_path / "b"
    prepare(params, a)
    prepare(params, b)
    train.run(params, a, resume_key="k")

    real_save = checkpoint.save

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("crash after the checkpoint")

    monkeypatch.setattr(checkpoint, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train.run(params, b, resume_key="k")
    monkeypatch.setattr(checkpoint, "save", real_save)
    saved = sorted((b / ".qlora/checkpoints/train/k").glob("step-*"))  # the folder of resume key "k"
    assert [p.name for p in saved] == ["step-00000002"] and (saved[0] / checkpoint.EXTRA).exists()
    train.run(params, b, resume_key="k")
    sa, sb = summary(a), summary(b)
    assert sb["resumed_from_step"] == 2 and sa["resumed_from_step"] == 0
    for key in ("steps", "best_step", "stopped_at_step", "saved_adapter_step", "best_val_loss", "final_val_loss"):
        assert sa[key] == sb[key], key
    for name in ("validation.csv", "loss.csv"):
        assert (a / "reports/train" / name).read_text() == (b / "reports/train" / name).read_text()
    assert (a / "models/adapter/adapter_model.safetensors").read_bytes() == (
        b / "models/adapter/adapter_model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize(
    "override, key",
    [
        (["train.early_stopping=true", "train.eval_every=0"], "train.early_stopping"),
        (["task=causal_lm", "train.early_stopping_metric=accuracy"], "train.early_stopping_metric"),
    ],
)
def test_wrong_early_stopping_settings_name_the_key(tmp_path, override, key):
    path = write_params(tmp_path, __import__("yaml").safe_load((REPO / "params.yaml").read_text()))
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        load_params(path, override)
