"""`qlora lineage NAME[@alias|/version]`: what data, code and settings produced a model,
read from MLflow alone; --verify re-hashes the data the user has against the record."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.common import PipelineError

LINEAGE_TAGS = (
    "git_commit",
    "git_dirty",
    "data_path",
    "data_md5",
    "data_file_md5",
    "data_verified",
    "data_check",
    "data_revision",
    "data_fingerprint",
    "dvc_file",
    "dvc_tracked_path",
    "dvc_data_md5",
    "dataset_digest",
    "dvc_experiment",
    "dvc_experiment_rev",
    "dvc_experiment_baseline",
    "dvc_lock_sha256",
    "base_model",
    "base_model_source",
    "base_model_revision",
    "base_model_file",
    "base_model_sha256",
    "task",
    "label_names",
    "prefect_flow_run_id",
)


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
    return {
        "model": {
            "name": name,
            "version": mv.version,
            "aliases": list(mv.aliases),
            "source": mv.source,
            "variant": (mv.tags or {}).get("variant", "merged"),
        },
        **run_info(mv.run_id, client),
    }


def run_info(run_id: str, client) -> dict:
    """What the MLflow record says about the run that made a model: the facts `qlora lineage`
    shows and the model card is rendered from (flows/serving/model_version.py, tasks/serve/card.py)."""
    run = client.get_run(run_id)
    tags = run.data.tags
    parents, parent_id = [], tags.get("mlflow.parentRunId")
    while parent_id:
        parent = client.get_run(parent_id)
        parents.append(
            {
                "run_id": parent_id,
                "name": parent.info.run_name,
                "status": parent.data.tags.get("retrain_status", ""),
                "decision": parent.data.tags.get("champion_decision", ""),
                "data_git_commit": parent.data.tags.get("data_git_commit", ""),
            }
        )
        parent_id = parent.data.tags.get("mlflow.parentRunId")
    inputs = [
        {"name": d.dataset.name, "digest": d.dataset.digest, "source": d.dataset.source}
        for d in run.inputs.dataset_inputs
    ]
    metrics = run.data.metrics
    return {
        "run": {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "status": run.info.status},
        "lineage": {k: tags[k] for k in LINEAGE_TAGS if k in tags},
        "datasets": inputs,
        "metrics": {
            k: v
            for k, v in sorted(metrics.items())
            if k.startswith(("test_", "validation_"))
            and not any(part in k for part in ("_f1_", "_precision_", "_recall_", "_support_", "_rows"))
        },
        "evaluated_rows": {
            k.removesuffix("_rows"): int(v) for k, v in metrics.items() if k in ("test_rows", "validation_rows")
        },
        "training": {
            k.removeprefix("train_"): v
            for k, v in sorted(metrics.items())
            if k.startswith("train_") and k != "train_loss"
        },
        "params": dict(sorted(run.data.params.items())),
        "parents": parents,
    }


def card(info: dict, kind: str | None = None) -> str:
    """The model card of a version (or of a run about to be registered), from these facts."""
    from tasks.serve.card import record_facts, render_card

    return render_card(record_facts(info, kind or info.get("model", {}).get("variant", "merged")))


def verify(info: dict, root: Path) -> dict:
    """Re-hash the data on disk (DVC's md5, from the bytes) and compare it with the record: the
    version is ok only if the bytes are what the run trained on AND the run's data was the
    committed DVC version (a run on unverified data never verifies)."""
    from flows.dvc.dvc_ops import md5
    from tasks.data.readers import is_hub

    lin = info["lineage"]
    if is_hub(lin.get("data_path", "")) and not lin.get("data_md5"):  # a hub id: nothing here to re-hash
        pinned = lin.get("data_verified") == "pinned"
        return {
            "path": lin["data_path"],
            "revision": lin.get("data_revision"),
            "fingerprint": lin.get("data_fingerprint"),
            "recorded_verified": lin.get("data_verified", "unknown"),
            "problems": [] if pinned else ["the run's hub dataset was not pinned to a commit (data.revision)"],
            "ok": pinned,
        }
    tracked = lin.get("dvc_tracked_path") or lin.get("data_path", "")
    path = Path(tracked) if Path(tracked).is_absolute() else root / tracked
    out = {
        "path": str(path),
        "recorded_md5": lin.get("data_md5"),
        "exists": path.exists(),
        "recorded_verified": lin.get("data_verified", "unknown"),
    }
    if path.exists():
        out["current_md5"] = md5(path)
        out["bytes_match"] = out["current_md5"] == out["recorded_md5"]
    problems = []
    if out["exists"] and not out["bytes_match"] and lin.get("dvc_file"):
        # Newer data committed since: the version is checked against its own data version, found in
        # the git history of the .dvc file and re-hashed from the DVC cache, provided the data on
        # disk is itself a committed version.
        out["trained_version"] = _committed_version(
            root, lin["dvc_file"], lin.get("dvc_data_md5") or "", out["current_md5"]
        )
        out["bytes_match"] = out["trained_version"]["ok"]
    if not out["exists"]:
        problems.append(f"{path} does not exist here")
    elif not out["bytes_match"]:
        why = out.get("trained_version", {}).get("problem")
        problems.append(
            f"{path} hashes to md5 {out['current_md5']}, the run trained on {out['recorded_md5']}"
            + (f" ({why})" if why else "")
        )
    if out["recorded_verified"] == "false":
        problems.append("the run's data was not its committed DVC version (recorded as unverified)")
    elif out["recorded_verified"] not in ("true", "untracked"):
        problems.append("the record has no data verification")
    out["problems"] = problems
    out["ok"] = not problems
    return out


def _committed_version(root: Path, dvc_file: str, trained_md5: str, current_md5: str) -> dict:
    """Whether trained_md5 is a data version git committed (in the .dvc file's history) whose bytes the
    DVC cache holds intact, while the data on disk is the version at git's HEAD (not edited)."""
    import subprocess

    from flows.dvc.dvc_ops import committed_dvc_md5

    out = {"ok": False, "md5": trained_md5}
    if committed_dvc_md5(Path(root) / dvc_file, root) != current_md5:
        out["problem"] = f"the data on disk is not the version {dvc_file} holds at git's HEAD"
        return out
    log = subprocess.run(
        ["git", "log", "--format=%H", f"-S{trained_md5}", "--", dvc_file], cwd=root, capture_output=True, text=True
    ).stdout.split()
    if not trained_md5 or not log:
        out["problem"] = f"md5 {trained_md5 or '(none recorded)'} is not in the git history of {dvc_file}"
        return out
    out["git_commit"] = log[-1]  # the commit that introduced it
    cached = _cached_md5(root, trained_md5)
    if cached != trained_md5:
        out["problem"] = f"the DVC cache does not hold version {trained_md5} intact" + (
            f" (it hashes to {cached})" if cached else " (`dvc fetch` it)"
        )
        return out
    out["ok"] = True
    return out


def _cached_md5(root: Path, md5: str) -> str | None:
    """DVC's md5 of a version as the local DVC cache holds it, re-hashed from the bytes."""
    from dvc_data.hashfile.tree import Tree

    from flows.dvc.dvc_ops import _repo
    from flows.dvc.dvc_ops import md5 as file_md5

    with _repo(root) as repo:
        path = Path(repo.cache.local.oid_to_path(md5))
        if not path.exists():
            return None
        if not md5.endswith(".dir"):
            return file_md5(path)
        listing = json.loads(path.read_text())
        for entry in listing:
            obj = Path(repo.cache.local.oid_to_path(entry["md5"]))
            if not obj.exists() or file_md5(obj) != entry["md5"]:
                return f"(object {entry['relpath']} missing or altered)"
    tree = Tree.from_list(listing)
    tree.digest()
    return tree.hash_info.value


def render(info: dict, verified: dict | None = None) -> str:
    from rich.console import Console
    from rich.table import Table

    console = Console(record=True, width=140)
    m = info["model"]
    t = Table(
        title=f"Lineage of {m['name']} version {m['version']}"
        + (f" ({', '.join(m['aliases'])})" if m["aliases"] else ""),
        show_lines=False,
    )
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
    key_params = (
        "task",
        "seed",
        "model.name",
        "quant.quant_type",
        "lora.r",
        "lora.alpha",
        "train.lr",
        "train.max_steps",
        "train.epochs",
        "split.method",
    )
    t.add_row(
        "params",
        ", ".join(f"{k}={info['params'][k]}" for k in key_params if k in info["params"])
        + f"  (+{len(info['params'])} in --json)",
    )
    for p in info["parents"]:
        t.add_row(
            "parent run",
            f"{p['run_id']} {p['name'] or ''} {p['status']} {p['decision']}".strip()
            + (f" data commit {p['data_git_commit']}" if p["data_git_commit"] else ""),
        )
    if verified is not None:
        t.add_row(
            "verify",
            ("MATCH" if verified["ok"] else "MISMATCH")
            + ": "
            + json.dumps({k: v for k, v in verified.items() if k != "ok"}),
        )
    console.print(t)
    return console.export_text()
