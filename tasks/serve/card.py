"""Model cards: a Hugging Face README.md (YAML front-matter + markdown) rendered from facts.

Two kinds of facts, one renderer:
- what a stage determines (stage_facts): the train stage writes models/adapter/README.md and
  the merge stage models/merged/README.md from their own declared inputs only, so these
  DVC-tracked folders stay byte-reproducible (no paths of the machine, no times, no run ids);
- what the MLflow record says (record_facts): `qlora lineage` reads a model version's run
  (metrics, params, data hash, git commit, ...) and the same dict renders the full card that
  is logged with every registered version (flows/serving/model_version.py) and `qlora lineage --card` prints.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tasks.config import Params

PIPELINE_TAG = {"seq_cls": "text-classification", "causal_lm": "text-generation"}
TASK_WORDS = {"seq_cls": "text classification", "causal_lm": "instruction following (causal LM)"}
# metric in reports/metrics.json -> (Hugging Face metric type, shown name)
HF_METRICS = {
    "accuracy": ("accuracy", "accuracy"),
    "macro_f1": ("f1", "macro F1"),
    "eval_loss": ("loss", "answer-token loss"),
    "perplexity": ("perplexity", "perplexity"),
    "exact_match": ("exact_match", "exact match"),
    "rougeL": ("rouge", "ROUGE-L"),
}
# the run's data_verified tag (flows/dvc/data_check.py), said plainly in a version's description
DATA_MATCH = {
    "true": "the data matched the version committed in git",
    "false": "the data did NOT match the version committed in git (the run was allowed on unverified data)",
    "untracked": "the data is not tracked by DVC: there is no committed version to match",
    "pinned": "a hub dataset pinned to a commit",
    "unpinned": "a hub dataset at a moving revision: not verified",
}
BASE_PREFIX = "base_"  # reports/metrics.json: the same metric of the base model alone (tasks/evaluate.py)
CARD_SETTINGS = (
    "task",
    "seed",
    "model.name",
    "model.revision",
    "quant.quant_type",
    "quant.double_quant",
    "quant.compute_dtype",
    "lora.r",
    "lora.alpha",
    "lora.dropout",
    "lora.target_modules",
    "train.epochs",
    "train.max_steps",
    "train.batch_size",
    "train.grad_accum",
    "train.lr",
    "train.precision",
    "tokenize.max_length",
    "tokenize.template",
    "split.method",
    "merge.dtype",
)
LINEAGE_ROWS = (
    ("data_path", "data file"),
    ("dvc_data_md5", "data version (DVC md5)"),
    ("data_md5", "data md5, hashed from the bytes"),
    ("data_verified", "data is its committed DVC version"),
    ("dvc_file", "DVC file"),
    ("dataset_digest", "MLflow dataset digest"),
    ("git_commit", "git commit"),
    ("git_dirty", "uncommitted changes"),
    ("dvc_lock_sha256", "dvc.lock sha256"),
    ("dvc_experiment", "DVC experiment"),
    ("base_model_revision", "base model revision"),
    ("base_model_source", "base model source"),
    ("base_model_file", "base model file"),
    ("base_model_sha256", "base model file sha256"),
    ("prefect_flow_run_id", "Prefect flow run"),
)


def _dataset_names(lineage: dict, configured) -> list[str]:
    if configured:
        return list(configured)
    path = lineage.get("dvc_tracked_path") or lineage.get("data_path") or ""
    p = Path(path)
    return (
        [
            p.name
            if p.suffix == ""
            else (p.parent.name if p.parent.name and p.stem in ("test", "train", "data") else p.stem)
        ]
        if path
        else []
    )


def _loads(value):
    """A params value as MLflow stores it (a string), back to data."""
    if not isinstance(value, str):
        return value
    if value in ("True", "False"):  # MLflow writes Python's bools
        return value == "True"
    try:
        return json.loads(value)
    except ValueError:
        return value


def stage_facts(
    params: Params, kind: str, base_lineage: dict, labels: list[str] | None, adapter_config: dict | None = None
) -> dict:
    """Facts a stage may write into the folder DVC tracks: only what its declared inputs decide.
    base_lineage: models/base/lineage.json (a dependency of train and merge); adapter_config:
    models/adapter/adapter_config.json (merge)."""
    adapter_config = adapter_config or {}
    quant = base_lineage.get("quant", {})
    flat = {
        "task": params.task,
        "model.name": base_lineage.get("base_model"),
        **{f"quant.{k}": quant.get(k) for k in ("quant_type", "double_quant", "compute_dtype")},
    }
    if kind == "adapter":  # train reads these params (flows/dvc/stages.py)
        flat.update({"seed": params.seed, "quant.compute_dtype": params.quant.compute_dtype})
        flat.update({f"lora.{k}": v for k, v in params.lora.model_dump(mode="json").items()})
        flat.update({f"train.{k}": v for k, v in params.train.model_dump(mode="json").items()})
    else:  # merge reads these, and the adapter's config (a dependency)
        flat.update(
            {
                "lora.r": adapter_config.get("r"),
                "lora.alpha": adapter_config.get("lora_alpha"),
                "lora.target_modules": adapter_config.get("target_modules"),
                "merge.dtype": params.merge.dtype,
            }
        )
    return {
        "kind": kind,
        "task": params.task,
        "base_model": base_lineage.get("base_model"),
        "base_model_revision": base_lineage.get("base_model_revision"),
        "labels": labels,
        "settings": {k: flat[k] for k in CARD_SETTINGS if k in flat},
        "origin": {k: base_lineage[k] for k in ORIGIN_KEYS if base_lineage.get(k)},
    }


ORIGIN_KEYS = ("base_model_source", "base_model_file", "base_model_sha256")  # where a GGUF base came from


def record_facts(info: dict, kind: str) -> dict:
    """Card facts from what `qlora lineage` shows (flows/tracking/lineage.py): the MLflow record of a run,
    and of a model version when info has one."""
    lin, params = info.get("lineage", {}), info.get("params", {})
    task = lin.get("task") or params.get("task", "seq_cls")
    labels = _loads(lin.get("label_names")) or _loads(params.get("data.label_names"))
    return {
        "kind": kind,
        "task": task,
        "base_model": lin.get("base_model") or params.get("model.name"),
        "base_model_revision": lin.get("base_model_revision"),
        "labels": labels,
        "license": params.get("card.license"),
        "datasets": _dataset_names(lin, _loads(params.get("card.datasets"))),
        "settings": {
            k: _loads(params[k])
            for k in CARD_SETTINGS
            if k in params and not (task == "seq_cls" and k == "tokenize.template")
        },
        "metrics": info.get("metrics") or {},
        "evaluated_rows": info.get("evaluated_rows") or {},
        "training": info.get("training") or {},
        "origin": {k: lin[k] for k in ORIGIN_KEYS if lin.get(k)},
        "lineage": lin,
        "datasets_logged": info.get("datasets", []),
        "run": info.get("run"),
        "model": info.get("model"),
        "tracking_uri": info.get("tracking_uri"),
    }


def _headline(metrics: dict) -> tuple[str | None, dict[str, float]]:
    """(split, {metric: value}) from record metrics named '<split>_<metric>'."""
    for split in ("test", "validation"):
        got = {m: metrics[f"{split}_{m}"] for m in HF_METRICS if f"{split}_{m}" in metrics}
        if got:
            return split, got
    return None, {}


def front_matter(facts: dict) -> dict:
    kind, task = facts["kind"], facts["task"]
    fm: dict = {
        "base_model": facts["base_model"],
        "library_name": "peft" if kind == "adapter" else "transformers",
        "pipeline_tag": PIPELINE_TAG[task],
    }
    if facts.get("license"):
        fm["license"] = facts["license"]
    if facts.get("datasets"):
        fm["datasets"] = list(facts["datasets"])
    fm["tags"] = [
        "qlora",
        "lora",
        "4-bit",
        "nf4" if facts["settings"].get("quant.quant_type") != "fp4" else "fp4",
        "qlora-flow",
    ] + ([f"base_model:adapter:{facts['base_model']}"] if kind == "adapter" else [])
    split, headline = _headline(facts.get("metrics") or {})
    if headline:
        fm["metrics"] = sorted({HF_METRICS[m][0] for m in headline})
        name = (facts.get("model") or {}).get("name") or f"{facts['base_model'].rsplit('/', 1)[-1]}-qlora"
        fm["model-index"] = [
            {
                "name": name,
                "results": [
                    {
                        "task": {"type": PIPELINE_TAG[task], "name": TASK_WORDS[task]},
                        "dataset": {
                            "name": (facts.get("datasets") or ["data"])[0],
                            "type": (facts.get("datasets") or ["data"])[0],
                            "split": split,
                        },
                        "metrics": [
                            {"type": HF_METRICS[m][0], "value": round(float(v), 6), "name": HF_METRICS[m][1]}
                            for m, v in headline.items()
                        ],
                    }
                ],
            }
        ]
    return fm


def _table(rows: list[tuple[str, object]], head: tuple[str, str] = ("", "")) -> str:
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return "\n".join([f"| {head[0]} | {head[1]} |", "|---|---|"] + [f"| {cell(k)} | {cell(v)} |" for k, v in rows])


def render_card(facts: dict) -> str:
    """The card as text: YAML front-matter, then what the model is, how good, from what, how to use."""
    kind, task = facts["kind"], facts["task"]
    model = facts.get("model") or {}
    s = facts["settings"]
    title = (
        f"{model['name']} version {model['version']}"
        if model.get("version")
        else model.get("name") or f"{facts['base_model'].rsplit('/', 1)[-1]} QLoRA {kind}"
    )
    what = (
        "a LoRA adapter (PEFT)"
        if kind == "adapter"
        else "a merged model: the base with the LoRA adapter folded in (plain transformers, no PEFT or bitsandbytes)"
    )
    lines = [
        "---",
        yaml.safe_dump(front_matter(facts), sort_keys=False, allow_unicode=True).strip(),
        "---",
        "",
        f"# {title}",
        "",
        f"{what[0].upper() + what[1:]} for {TASK_WORDS[task]}, fine-tuned with QLoRA from "
        f"`{facts['base_model']}`"
        + (f" ({facts['base_model_revision']})" if facts.get("base_model_revision") else "")
        + f": the base frozen in 4-bit {str(s.get('quant.quant_type', 'nf4')).upper()}, LoRA rank "
        f"{s.get('lora.r', '?')} (alpha {s.get('lora.alpha', '?')}) trained on it. Made by qlora-flow.",
    ]
    origin = facts.get("origin") or {}
    if origin.get("base_model_file"):
        lines += [
            "",
            f"The base came as the GGUF file `{origin['base_model_file']}` (sha256 "
            f"`{origin.get('base_model_sha256')}`, from {origin.get('base_model_source')}): dequantized, then "
            f"quantized to 4-bit for training; its tokenizer and chat template come from the same file.",
        ]
    if model.get("version"):
        aliases = f" (aliases: {', '.join(model['aliases'])})" if model.get("aliases") else ""
        lines += ["", f"Registered model version `{model['name']}/{model['version']}`{aliases}."]
    if facts.get("labels"):
        lines += ["", "## Labels", "", ", ".join(f"`{n}`" for n in facts["labels"])]
    split, headline = _headline(facts.get("metrics") or {})
    if headline:
        metrics = facts.get("metrics") or {}
        base = {m: metrics[f"{split}_{BASE_PREFIX}{m}"] for m in headline if f"{split}_{BASE_PREFIX}{m}" in metrics}
        rows = [
            (HF_METRICS[m][1], f"{v:.4f}" + (f" (base model: {base[m]:.4f})" if m in base else ""))
            for m, v in headline.items()
        ]
        n = (facts.get("evaluated_rows") or {}).get(split)
        lines += [
            "",
            "## Evaluation",
            "",
            f"On the held-out {split} split" + (f" ({int(n)} rows)" if n else "") + ":",
            "",
            _table(rows, ("metric", "value")),
        ]
    lineage, run = facts.get("lineage"), facts.get("run")
    if lineage or run:
        rows = [(label, f"`{lineage[k]}`") for k, label in LINEAGE_ROWS if lineage and lineage.get(k)]
        for d in facts.get("datasets_logged") or []:
            rows.append(("MLflow dataset input", f"{d['name']} (digest `{d['digest']}`)"))
        if run:
            rows.append(("MLflow run", f"`{run['run_id']}` (experiment {run.get('experiment_id', '?')})"))
        lines += [
            "",
            "## Lineage",
            "",
            "What made this model, as the MLflow record holds it "
            "(`qlora lineage NAME/VERSION --verify` re-hashes the data against it):",
            "",
            _table(rows, ("fact", "value")),
        ]
    training = facts.get("training") or {}
    if training:
        keep = ("steps", "final_loss", "trainable_params", "total_params", "train_seconds", "tokens_per_second")
        fmt = lambda v: (
            int(v) if isinstance(v, float) and v.is_integer() else (f"{v:.4g}" if isinstance(v, float) else v)
        )  # noqa: E731
        rows = [(k, fmt(training[k])) for k in keep if k in training]
        lines += ["", "## Training run", "", _table(rows, ("fact", "value"))]
    lines += [
        "",
        "## Training settings",
        "",
        _table([(k, v if isinstance(v, str) else json.dumps(v)) for k, v in s.items()], ("params.yaml key", "value")),
    ]
    if not (lineage or run):
        lines += [
            "",
            "This card is written by the pipeline stage that made this folder and holds only what that "
            "stage's inputs decide, so the folder is byte-for-byte reproducible. Evaluation, the data "
            "version, git commit and MLflow run are in the card logged with each registered model version "
            "(`qlora lineage NAME/VERSION --card`).",
        ]
    ref = (
        f"models:/{model['name']}/{model['version']}"
        if model.get("version")
        else f"models:/{model.get('name') or 'NAME'}@champion"
    )
    lines += [
        "",
        "## How to use",
        "",
        "```bash",
        f"qlora predict --model {ref} --input rows.csv --output predictions.jsonl",
        f"mlflow models serve -m {ref} --env-manager local --port 5001",
        "```",
    ]
    if kind == "adapter":
        lines += [
            "",
            "With PEFT directly (the base loads in 4-bit as in training):",
            "",
            "```python",
            "from peft import AutoPeftModelFor" + ("SequenceClassification" if task == "seq_cls" else "CausalLM"),
            "model = AutoPeftModelFor"
            + ("SequenceClassification" if task == "seq_cls" else "CausalLM")
            + '.from_pretrained("path/to/this/folder")',
            "```",
        ]
    else:
        cls = "AutoModelForSequenceClassification" if task == "seq_cls" else "AutoModelForCausalLM"
        lines += [
            "",
            "With transformers directly:",
            "",
            "```python",
            f"from transformers import {cls}, AutoTokenizer",
            f'model = {cls}.from_pretrained("path/to/this/folder")',
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
            "```",
        ]
    if task == "causal_lm" and s.get("tokenize.template"):
        where = (
            "the tokenizer's own chat template"
            if s["tokenize.template"] == "model"
            else f"the `{s['tokenize.template']}` template (tasks/data/prompts.py)"
        )
        lines += ["", f"Prompts use {where}; `qlora predict` and the served model apply it."]
    return "\n".join(lines) + "\n"


def write_card(path: Path, facts: dict) -> None:
    Path(path).write_text(render_card(facts))


def parse_front_matter(text: str) -> dict:
    """The YAML front-matter of a card (what the Hugging Face Hub reads)."""
    if not text.startswith("---\n"):
        return {}
    return yaml.safe_load(text[4 : text.index("\n---\n", 4)]) or {}


def write_stage_card(folder: Path, params: Params, root: Path, kind: str) -> None:
    """The card a stage writes beside what it made (train: the adapter, merge: the merged model),
    from its declared inputs: params it reads and models/base (lineage.json, config.json)."""
    from tasks import catalog
    from tasks.common import read_json, resolve

    base_dir = resolve(root, catalog.BASE_MODEL_DIR)
    labels = None
    if params.task == "seq_cls":
        id2label = read_json(base_dir / "config.json").get("id2label") or {}
        labels = [id2label[k] for k in sorted(id2label, key=int)] or None
    adapter_config = read_json(resolve(root, catalog.ADAPTER_DIR) / "adapter_config.json") if kind == "merged" else None
    write_card(
        Path(folder) / catalog.CARD,
        stage_facts(params, kind, read_json(base_dir / "lineage.json"), labels, adapter_config),
    )


def render_summary(facts: dict) -> str:
    """A model version's description in the registry: what a reviewer needs to approve a promotion."""
    lin, run = facts.get("lineage") or {}, facts.get("run") or {}
    split, headline = _headline(facts.get("metrics") or {})
    n = (facts.get("evaluated_rows") or {}).get(split)
    kind = (
        "adapter only: loads its base where it is served"
        if facts["kind"] == "adapter"
        else "merged: standalone, no PEFT or bitsandbytes"
    )
    lines = [f"**{PIPELINE_TAG[facts['task']]}**, QLoRA on `{facts['base_model']}` ({kind})."]
    if headline:
        lines.append(
            f"**{split}**"
            + (f" ({n} rows)" if n else "")
            + ": "
            + ", ".join(f"{HF_METRICS[m][1]} **{v:.4f}**" for m, v in headline.items())
        )
    data = lin.get("data_path")
    if data:
        dvc = lin.get("dvc_data_md5")
        lines.append(
            f"**data** `{data}`: "
            + (f"DVC md5 `{dvc}`" if dvc else f"md5 `{lin.get('data_md5', '?')}`")
            + "; "
            + DATA_MATCH.get(lin.get("data_verified"), "whether it matched a version committed in git is not recorded")
        )
    if lin.get("git_commit"):
        lines.append(
            f"**code** git `{lin['git_commit'][:12]}`"
            + (" (uncommitted changes)" if lin.get("git_dirty") == "True" else "")
        )
    if run:
        lines.append(
            f"**run** `{run['run_id']}`; settings: "
            + ", ".join(
                f"{k}={facts['settings'][k]}"
                for k in ("lora.r", "train.lr", "train.max_steps", "train.epochs")
                if k in facts["settings"]
            )
        )
    model = facts.get("model") or {}
    ref = f"{model.get('name', 'NAME')}/{model.get('version', 'VERSION')}"
    lines.append(
        f"Card: `bundle/README.md` in the model's artifacts, or `qlora lineage {ref} --card`. "
        f"Serve: `mlflow models serve -m models:/{ref} --env-manager local`."
    )
    return "\n\n".join(lines) + "\n"
