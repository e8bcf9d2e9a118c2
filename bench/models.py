"""The models the benchmarks (and the tests) train: the shapes measured, their FLOPs, random-
weight checkpoints of a shape, and a tiny Llama with a BPE tokenizer trained offline on the
Alpaca sample (no hub access).

SHAPES is the one list of benchmark shapes: gpu_qlora_bench.py, unsloth_reference.py,
gpu_ddp_scaling.py and random_4bit.py all read it. A real checkpoint is measured as it is
instead (gpu_qlora_bench.py --model-dir): its config.json gives the architecture.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def llama_shape(
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    vocab_size: int,
) -> dict:
    """The sizes that make a Llama-layout decoder's shape (LlamaConfig's keyword arguments)."""
    return dict(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        vocab_size=vocab_size,
    )


SHAPES = {
    "llama-1b": llama_shape(2048, 8192, 16, 32, 8, 128256),
    "llama-8b": llama_shape(4096, 14336, 32, 32, 8, 128256),
    "llama-70b": llama_shape(8192, 28672, 80, 64, 8, 128256),
    # Other families: model_type names the config class; the sizes are the released checkpoints'
    # config.json's (Qwen/Qwen3-8B, google/gemma-2-9b, google/gemma-3-12b-pt's and -4b-pt's text
    # config, microsoft/Phi-3-mini-4k-instruct, microsoft/Phi-3-medium-4k-instruct)
    "qwen3-8b": {
        "model_type": "qwen3",
        **llama_shape(4096, 12288, 36, 32, 8, 151936),
        "head_dim": 128,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": False,
    },
    "gemma2-9b": {
        "model_type": "gemma2",
        **llama_shape(3584, 14336, 42, 16, 8, 256000),
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "max_position_embeddings": 8192,
    },
    "gemma3-12b": {
        "model_type": "gemma3_text",
        **llama_shape(3840, 15360, 48, 16, 8, 262208),
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "sliding_window": 1024,
        "max_position_embeddings": 131072,
    },
    "gemma3-4b": {
        "model_type": "gemma3_text",
        **llama_shape(2560, 10240, 34, 8, 4, 262208),
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "sliding_window": 1024,
        "max_position_embeddings": 131072,
    },
    "phi3-mini": {
        "model_type": "phi3",
        **llama_shape(3072, 8192, 32, 32, 32, 32064),
        "max_position_embeddings": 4096,
        "pad_token_id": 32000,
        "tie_word_embeddings": False,
    },
    "phi3-medium": {
        "model_type": "phi3",
        **llama_shape(5120, 17920, 40, 40, 10, 32064),
        "max_position_embeddings": 4096,
        "pad_token_id": 32000,
        "tie_word_embeddings": False,
    },
}
RANDOM_DIR = Path("/tmp/qlora-bench")  # where random-weight checkpoints of a shape are written once


def llama_config(name: str):
    """The Llama config of a benchmark shape (Llama 3's rope and context)."""
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[name], max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)


def bench_config(name: str):
    """The config of a benchmark shape: its family's config class (SHAPES' model_type), the Llama
    config of llama_config where it names none."""
    from transformers import AutoConfig

    shape = dict(SHAPES[name])
    model_type = shape.pop("model_type", None)
    return AutoConfig.for_model(model_type, **shape) if model_type else llama_config(name)


def shape_config(model_dir: str | Path) -> dict:
    """A checkpoint's config.json (model_type and sizes), the text config of a multimodal one."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return {**config, **config.get("text_config", {})} if "hidden_size" not in config else config


def flops_per_token(config: dict, seq: int) -> float:
    """Training FLOPs a token (forward and backward: 4N for the matmuls with frozen weights, as in
    ../shared/bench, plus attention's) of a Llama-layout decoder with this config (Gemma's and
    Phi-3's matmuls are the same; sliding windows are counted as full attention)."""
    h, n_layers, inter, vocab = (
        config["hidden_size"],
        config["num_hidden_layers"],
        config["intermediate_size"],
        config["vocab_size"],
    )
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    q = config["num_attention_heads"] * head_dim
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    n = n_layers * (2 * h * q + 2 * h * kv + 3 * h * inter) + 2 * vocab * h
    return 4 * n + 2 * (2 * 2 * n_layers * seq * q)


def model_dir(name: str) -> str:
    """RANDOM_DIR/name: the shape with seeded random bf16 weights (written on the GPU once)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = RANDOM_DIR / name
    if (path / "config.json").exists():
        return str(path)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = AutoModelForCausalLM.from_config(bench_config(name)).to(torch.bfloat16)
    m.save_pretrained(path, safe_serialization=True)
    del m
    torch.cuda.empty_cache()
    return str(path)


def alpaca_sample() -> Path:
    """The Alpaca sample in the shared datasets (bench/device_setup.sh puts it there on a device
    machine); QLORA_ALPACA names another copy."""
    default = Path(__file__).resolve().parent.parent.parent / "shared/datasets/alpaca_sample/alpaca_data_cleaned.json"
    return Path(os.environ.get("QLORA_ALPACA", default))


def build_tiny_llama(out: Path, corpus_json: Path, vocab_size: int = 384, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rows = json.loads(Path(corpus_json).read_text())
    texts = [" ".join([r["instruction"], r["input"], r["output"]]) for r in rows]
    texts.append("Below is an instruction that describes a task ### Instruction: ### Input: ### Response:")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    cfg = LlamaConfig(
        **llama_shape(64, 128, 2, 4, 2, vocab_size=len(tok)),
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def save_random_llama(out: Path, **shape) -> str:
    """A Llama of the given shape with seeded random bf16 weights, saved (no tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **shape)).to(torch.bfloat16).save_pretrained(out)
    return str(out)


def save_random(out: Path, model_type: str, **config) -> str:
    """A model of the family (config.json's model_type) with the given config and seeded random
    bf16 weights, saved (no tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))
    model.to(torch.bfloat16).save_pretrained(out)
    return str(out)
