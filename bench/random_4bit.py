"""A random-weight Llama written directly as a pre-quantized 4-bit (NF4, double quant)
checkpoint, one tensor at a time, in the format transformers saves a bitsandbytes 4-bit model
in (what the quantize stage writes and tasks.model.loading.load_saved reads): the bf16 model
(140 GB for the 70B shape) never exists, in memory or on disk. The 4-bit weights are stored
as `quant_storage` (bf16: what FSDP shards, tasks/distributed/sharding.py).

    python bench/random_4bit.py OUT --shape llama-70b [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.models import SHAPES, llama_config  # noqa: E402

LINEAR = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.weight$")  # quantized; embeddings, norms, lm_head are not
SHARD_BYTES = 4 << 30


def save_random_4bit_llama(
    out: Path,
    shape: str,
    device: str = "cuda",
    compute_dtype: str = "bfloat16",
    quant_storage: str = "bfloat16",
    seed: int = 0,
) -> Path:
    """shape: a name in bench/models.SHAPES."""
    import bitsandbytes.functional as F
    from safetensors.torch import save_file
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = llama_config(shape)
    with torch.device("meta"):
        names = [(n, p.shape) for n, p in LlamaForCausalLM(cfg).state_dict().items()]
    g = torch.Generator(device=device).manual_seed(seed)
    storage = getattr(torch, quant_storage)
    shard, shards, weight_map, total = {}, [], {}, 0

    def flush():
        nonlocal shard
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, out / name, metadata={"format": "pt"})
            shards.append(name)
            shard = {}

    for name, size in names:
        if name.endswith("norm.weight"):
            tensors = {name: torch.ones(size, dtype=torch.bfloat16)}
        else:
            w = (torch.randn(size, device=device, generator=g) * 0.02).to(torch.bfloat16)
            if LINEAR.search(name):
                packed, state = F.quantize_4bit(
                    w, blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=storage
                )
                tensors = {name: packed, **{f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()}}
            else:
                tensors = {name: w}
        tensors = {k: v.to("cpu").contiguous() for k, v in tensors.items()}
        for k, v in tensors.items():
            weight_map[k] = f"model-{len(shards) + 1:05d}.safetensors"
            total += v.numel() * v.element_size()
        shard.update(tensors)
        if sum(v.numel() * v.element_size() for v in shard.values()) >= SHARD_BYTES:
            flush()
    flush()
    if len(shards) == 1:
        (out / shards[0]).rename(out / "model.safetensors")
    else:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    cfg.quantization_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
        bnb_4bit_quant_storage=storage,
        llm_int8_skip_modules=["lm_head"],
    ).to_dict()
    cfg.dtype = torch.bfloat16
    cfg.save_pretrained(out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--shape", default="llama-70b", choices=list(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    save_random_4bit_llama(Path(a.out), a.shape, a.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
