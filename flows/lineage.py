"""`qlora lineage NAME[@alias|/version]`: what data, code and settings produced a model,
read from MLflow alone; --verify re-hashes the data the user has against the record."""
from __future__ import annotations

import json
from pathlib import Path

from tasks.common import PipelineError, content_hash

LINEAGE_TAGS = ("git_commit", "git_dirty", "data_path", "data_sha256", "dvc_file", "dvc_data_md5",
                "dvc_data_path", "dvc_import_source", "dataset_digest", "base_model", "base_model_source",
                "base_model_revision", "task", "prefect_flow_run_id")


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, alias, None
    if "/" in ref and ref.rsplit("/", 1)[1].isdigit():
        name, version = ref.rsplit("/", 1)
        return name, None, version
    return ref, "champion", None


def lineage(ref: str, client=None) -> dict:
    import mlflow
    client = client or mlflow.tracking.MlflowClient()
    name, alias, version = parse_ref(ref)
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except Exception as exc:
        raise PipelineError(f"model {ref!r} not found in the registry at {mlflow.get_tracking_uri()}: {exc}") from None
    run = client.get_run(mv.run_id)
    tags = run.data.tags
    parents, parent_id = [], tags.get("mlflow.parentRunId")
    while parent_id:
        parent = client.get_run(parent_id)
        parents.append({"run_id": parent_id, "name": parent.info.run_name,
                        "status": parent.data.tags.get("retrain_status", ""),
                        "decision": parent.data.tags.get("champion_decision", ""),
                        "data_git_commit": parent.data.tags.get("data_git_commit", "")})
        parent_id = parent.data.tags.get("mlflow.parentRunId")
    inputs = [{"name": d.dataset.name, "digest": d.dataset.digest, "source": d.dataset.source}
              for d in run.inputs.dataset_inputs]
    return {
        "model": {"name": name, "version": mv.version, "aliases": list(mv.aliases), "source": mv.source},
        "run": {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "status": run.info.status},
        "lineage": {k: tags[k] for k in LINEAGE_TAGS if k in tags},
        "datasets": inputs,
        "metrics": {k: v for k, v in sorted(run.data.metrics.items()) if k.startswith(("test_", "validation_"))
                    and not any(part in k for part in ("_f1_", "_precision_", "_recall_", "_support_", "_rows"))},
        "params": dict(sorted(run.data.params.items())),
        "parents": parents,
    }


def verify(info: dict, root: Path) -> dict:
    """Re-hash the data this user has at the recorded path and compare with the record."""
    from flows.dvc_ops import dvc_md5, find_dvc_file
    lin = info["lineage"]
    path = Path(lin.get("data_path", ""))
    path = path if path.is_absolute() else root / path
    out = {"data_path": str(path), "recorded_sha256": lin.get("data_sha256"), "exists": path.exists()}
    if path.exists():
        out["current_sha256"] = content_hash(path)
        out["sha256_matches"] = out["current_sha256"] == out["recorded_sha256"]
    dvc_file = find_dvc_file(path, root) if path.exists() or path.parent.exists() else None
    if dvc_file is not None and "dvc_data_md5" in lin:
        out["recorded_dvc_md5"], out["current_dvc_md5"] = lin["dvc_data_md5"], dvc_md5(dvc_file)
        out["dvc_matches"] = out["recorded_dvc_md5"] == out["current_dvc_md5"]
    out["ok"] = bool(out.get("sha256_matches")) and out.get("dvc_matches", True)
    return out


def render(info: dict, verified: dict | None = None) -> str:
    from rich.console import Console
    from rich.table import Table
    console = Console(record=True, width=140)
    m = info["model"]
    t = Table(title=f"Lineage of {m['name']} version {m['version']}"
              + (f" ({', '.join(m['aliases'])})" if m["aliases"] else ""), show_lines=False)
    t.add_column("what", style="bold")
    t.add_column("value", overflow="fold")
    t.add_row("model version", f"{m['name']}/{m['version']}  source {m['source']}")
    t.add_row("run", f"{info['run']['run_id']} ({info['run']['status']})")
    for k, v in info["lineage"].items():
        t.add_row(k, str(v))
    for d in info["datasets"]:
        t.add_row("dataset input", f"{d['name']} digest {d['digest']} from {d['source']}")
    for k, v in info["metrics"].items():
        t.add_row(f"metric {k}", f"{v:.4f}")
    key_params = ("task", "seed", "model.name", "quant.quant_type", "lora.r", "lora.alpha", "train.lr",
                  "train.max_steps", "train.epochs", "split.method")
    t.add_row("params", ", ".join(f"{k}={info['params'][k]}" for k in key_params if k in info["params"])
              + f"  (+{len(info['params'])} in --json)")
    for p in info["parents"]:
        t.add_row("parent run", f"{p['run_id']} {p['name'] or ''} {p['status']} {p['decision']}".strip()
                  + (f" data commit {p['data_git_commit']}" if p["data_git_commit"] else ""))
    if verified is not None:
        t.add_row("verify", ("MATCH" if verified["ok"] else "MISMATCH") + ": " + json.dumps(
            {k: v for k, v in verified.items() if k != "ok"}))
    console.print(t)
    return console.export_text()
