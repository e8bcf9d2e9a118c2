"""Step 7 (optional): dequantize the 4-bit base to merge.dtype, fold the adapter in, and
save a plain transformers model (safetensors + tokenizer) that needs neither PEFT nor
bitsandbytes. The adapter was trained against the quantized weights, so merging into
their dequantized values reproduces the adapted model's outputs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tasks import catalog
from tasks.common import StageResult, atomic_dir, resolve, result, write_json
from tasks.config import Params
from tasks.model.loading import DTYPES, auto_class, check_safe_dir, load_saved, load_tokenizer
from tasks.serve.card import write_stage_card


def merged_model(params: Params, root: Path, dtype: torch.dtype):
    from peft import PeftModel

    check_safe_dir(resolve(root, catalog.ADAPTER_DIR), "adapter")
    base = load_saved(params.task, resolve(root, catalog.BASE_MODEL_DIR), torch.device("cpu"))
    if getattr(base, "is_loaded_in_4bit", False):
        base = base.dequantize(dtype=dtype)
    base = base.to(dtype)
    model = PeftModel.from_pretrained(base, str(resolve(root, catalog.ADAPTER_DIR)))
    return model.merge_and_unload().eval()


def plain_copy(model, task: str):
    """The same weights in a model built from a config that claims no quantization, so it
    saves (and later loads) as a plain transformers model."""
    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    dtype = next(model.parameters()).dtype
    plain = auto_class(task).from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])  # tied copies are not stored twice
    if unexpected or [k for k in missing if k not in tied]:
        raise RuntimeError(f"merged weights do not fit the plain model: missing={missing}, unexpected={unexpected}")
    return plain.eval()


def run(params: Params, root: Path) -> StageResult:
    with atomic_dir(resolve(root, catalog.MERGED_DIR)) as tmp:
        if not params.merge.enabled:
            write_json(tmp / "skipped.json", {"reason": "merge.enabled is false"})
        else:
            model = plain_copy(merged_model(params, root, DTYPES[params.merge.dtype]), params.task)
            model.save_pretrained(tmp, safe_serialization=True)
            load_tokenizer(str(resolve(root, catalog.ADAPTER_DIR))).save_pretrained(tmp)
            write_json(
                tmp / "merge.json",
                {"dtype": params.merge.dtype, "base": catalog.BASE_MODEL_DIR, "adapter": catalog.ADAPTER_DIR},
            )
            write_stage_card(tmp, params, root, "merged")
    return result("merge", [catalog.MERGED_DIR], merged=params.merge.enabled, dtype=params.merge.dtype)
