"""Step 4: load the base model in 4-bit (NF4/FP4, double quant) and save it quantized.

Training, evaluation and merging then start from this saved copy: the base is fetched
and quantized once per (model, quant) setting, and changing LoRA settings reuses it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tasks import catalog
from tasks.common import StageResult, atomic_dir, read_json, resolve, result, write_json
from tasks.config import Params
from tasks.model.loading import load_base, load_tokenizer, quant_storage
from tasks.model.source import resolve_source


def run(params: Params, root: Path) -> StageResult:
    torch.manual_seed(params.seed)  # a classification head is initialised here
    source, lineage = resolve_source(params.model)
    names = read_json(resolve(root, catalog.LABELS))["names"] if params.task == "seq_cls" else None
    device = torch.device("cpu")  # saved weights are device-free; training moves them
    if torch.cuda.is_available() and params.train.device != "cpu":
        device = torch.device("cuda")
    quant = params.quant.model_copy(update={"quant_storage": quant_storage(params.quant, params.train.strategy)})
    model = load_base(params.task, source, params.model, quant, device, names)
    tok = load_tokenizer(source, params.model.revision, params.model.trust_remote_code)
    n_params = sum(p.numel() for p in model.parameters())
    footprint = model.get_memory_footprint()
    n_4bit = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
    with atomic_dir(resolve(root, catalog.BASE_MODEL_DIR)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json(
            tmp / Path(catalog.BASE_LINEAGE).name,
            {
                **lineage,
                "quant": quant.model_dump(),
                "task": params.task,
                "stored_params": n_params,
                "footprint_bytes": footprint,
                "linear4bit_modules": n_4bit,
            },
        )
    return result("quantize", [catalog.BASE_MODEL_DIR], footprint_bytes=footprint, linear4bit_modules=n_4bit)
