"""LoRA variants from params (lora.use_dora, use_rslora, init, modules_to_save): each trains a few
steps on the tiny Llama on CPU, its saved adapter reloads (as evaluate loads it) to the model that
was trained, and merge folds it into a plain model that agrees. Wrong combinations name the key."""

import json

import pytest
import torch
import yaml

from tasks import merge, quantize, split, tokenize, train, validate
from tasks.common import PipelineError
from tasks.config import Params, ParamsError, load_params
from tasks.evaluate import load_adapted
from tasks.model.loading import load_tokenizer
from tasks.tokenize import load_split
from tasks.training.validation import score
from tests.conftest import REPO, write_params
from tests.test_causal_lm import causal_params, tiny_llama  # noqa: F401 (fixture)

CPU = torch.device("cpu")
BF16 = torch.autocast("cpu", dtype=torch.bfloat16)


def variant_params(tiny, lora: dict, quant: dict | None = None) -> Params:
    raw = causal_params(tiny)
    raw["lora"].update(r=8, alpha=16, **lora)
    raw["quant"].update(quant or {})
    raw["train"].update(max_steps=3, eval_every=3, gradient_checkpointing=False)
    raw["merge"].update(dtype="float32")
    return Params.model_validate(raw)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_llama):  # noqa: F811
    """validate/split/tokenize once; quantize once per quant setting (a copy of the project each)."""
    import shutil

    root = tmp_path_factory.mktemp("variants")
    params = variant_params(tiny_llama, {})
    for stage in (validate, split, tokenize):
        stage.run(params, root)
    bases = {}

    def project(tmp_path, params: Params):
        key = params.quant.load_in_4bit
        if key not in bases:
            bases[key] = tmp_path_factory.mktemp(f"base-4bit-{key}")
            quantize.run(params, bases[key])
        for d in ("data", "models"):
            shutil.copytree(root / d if d == "data" else bases[key] / d, tmp_path / d, dirs_exist_ok=True)
        return tmp_path

    return project


def val_loss(model, root, params) -> float:
    tok = load_tokenizer(str(root / "models/adapter"))
    return score(model, load_split(root, "validation"), 8, tok.pad_token_id, "causal_lm", CPU, BF16)["loss"]


VARIANTS = {
    "dora": ({"use_dora": True}, None),
    "rslora": ({"use_rslora": True}, None),
    "olora_dora": ({"init": "olora", "use_dora": True}, None),
    "gaussian": ({"init": "gaussian"}, None),
    "olora": ({"init": "olora"}, None),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, None),
    "pissa": ({"init": "pissa"}, {"load_in_4bit": False}),
    "orthogonal": ({"init": "orthogonal"}, {"load_in_4bit": False}),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_reloads_and_merges(name, tmp_path, prepared, tiny_llama):  # noqa: F811
    lora, quant = VARIANTS[name]
    params = variant_params(tiny_llama, lora, quant)
    root = prepared(tmp_path, params)
    train.run(params, root)
    summary = json.loads((root / "reports/train/summary.json").read_text())
    trained = summary["final_val_loss"]  # scored in training, on the in-memory model, at the last step
    config = json.loads((root / "models/adapter/adapter_config.json").read_text())
    assert config["use_dora"] == lora.get("use_dora", False) and config["use_rslora"] == lora.get("use_rslora", False)
    reloaded = val_loss(load_adapted(params, root, CPU), root, params)
    if lora.get("init") in ("olora", "pissa"):
        # saved converted: a plain LoRA of rank 2r on the base as it was (loading must not re-run the init)
        assert config["r"] == 16 and config["init_lora_weights"] is True
    # olora on a 4-bit base: its residual weight was re-quantized in training, the converted adapter
    # applies to the original 4-bit weight: close, not equal
    tol = 2e-2 if lora.get("init") == "olora" else 2e-3
    assert reloaded == pytest.approx(trained, rel=tol), (reloaded, trained)
    if lora.get("modules_to_save"):
        from safetensors.torch import load_file

        keys = load_file(root / "models/adapter/adapter_model.safetensors")
        assert any("lm_head" in k for k in keys)
    merge.run(params, root)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(root / "models/merged", dtype=torch.float32).eval()
    assert val_loss(merged, root, params) == pytest.approx(trained, rel=3e-2)


@pytest.mark.parametrize(
    "override, key",
    [
        (["lora.init=pissa"], "lora.init"),  # 4-bit base (the default)
        (["lora.init=orthogonal", "quant.load_in_4bit=false", "lora.r=5"], "lora.init"),
        (["lora.init=sideways"], "lora.init"),
        (["lora.modules_to_save=lm_head"], "lora.modules_to_save"),
    ],
)
def test_wrong_lora_settings_name_the_key(tmp_path, override, key):
    path = write_params(tmp_path, yaml.safe_load((REPO / "params.yaml").read_text()))
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        load_params(path, override)


@pytest.mark.parametrize("modules, words", [(["nonexistent"], "no module named"), (["down_proj"], "4-bit")])
def test_modules_to_save_must_exist_and_not_be_4bit(tmp_path, prepared, tiny_llama, modules, words):  # noqa: F811
    params = variant_params(tiny_llama, {"modules_to_save": modules})
    root = prepared(tmp_path, params)
    with pytest.raises(PipelineError, match=f"lora.modules_to_save: .*{words}"):
        train.run(params, root)
