"""`qlora status`: one screen on a project, read without training or writing anything. What DVC
says is stale, the champion and its scores, the last retraining tick and its outcome, and what
an interrupted command left to finish (the project lock's holder, a retraining that stopped
between its steps, a training checkpoint that the next run resumes)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from flows.dvc import dvc_ops
from tasks import catalog
from tasks.config import Params, load_params

# the scores a screen shows (--json has every test metric, per class included)
HEADLINE = (
    "accuracy",
    "macro_f1",
    "eval_loss",
    "perplexity",
    "exact_match",
    "base_exact_match",
    "rougeL",
    "base_rougeL",
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(root: Path) -> dict | None:
    """The command holding the project lock now, if any (the lock file names its last holder)."""
    import fcntl

    path = root / catalog.LOCK_FILE
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return json.loads(os.pread(fd, 4096, 0).decode(errors="replace") or "{}")
        return None
    finally:
        os.close(fd)


def _checkpoints(root: Path) -> list[str]:
    base = root / catalog.CHECKPOINT_DIR
    return sorted(str(p.relative_to(root)) for p in base.glob("*/step-*") if p.is_dir()) if base.is_dir() else []


def _registry(params: Params, root: Path, check) -> dict:
    """The champion, its version's test scores and data version, and any retraining left pending."""
    from flows import retrain_state
    from flows.tracking import mlflow_record

    out: dict = {"tracking_uri": mlflow_record.tracking_uri(params, root)}
    if out["tracking_uri"].startswith("sqlite:///") and not Path(out["tracking_uri"][len("sqlite:///") :]).exists():
        return out  # nothing recorded yet (and opening the store would create it)
    try:
        mlflow, _, _ = mlflow_record.use_store(params, root, create=False, close_dead=False)
    except Exception as exc:  # the server is down: the rest of the screen still answers
        out["error"] = str(exc)
        return out
    client = mlflow.tracking.MlflowClient()
    name = params.tracking.registered_model
    try:
        mv = client.get_model_version_by_alias(name, params.retrain.alias)
    except mlflow.exceptions.MlflowException:
        mv = None
    if mv is not None:
        metrics = client.get_run(mv.run_id).data.metrics
        out["champion"] = {
            "model": f"{name}/{mv.version}",
            "alias": params.retrain.alias,
            "scores": {k.removeprefix("test_"): v for k, v in sorted(metrics.items()) if k.startswith("test_")},
            "data_md5": (mv.tags or {}).get("dvc_data_md5"),
            "run_id": mv.run_id,
        }
    todo = retrain_state.pending(params, root, check, client) if check is not None else None
    if todo is not None:
        out["pending_retrain"] = {"step": todo.step, "why": todo.why}
    return out


def project_status(root: Path) -> dict:
    root = Path(root).resolve()
    from flows.dvc.data_check import check_data
    from tasks.common import PipelineError, read_json

    params = load_params(root / dvc_ops.PARAMS_FILE)
    status: dict = {"project": str(root)}
    try:
        check = check_data(params, root)
        status["data"] = {"path": params.data.path, "md5": check.md5, "status": check.status}
    except PipelineError as exc:
        check, status["data"] = None, {"path": params.data.path, "error": str(exc)}
    status["stale"] = dvc_ops.stale_stages(root)
    status["registry"] = _registry(params, root, check)
    tick = root / catalog.RETRAIN_LAST
    if tick.exists():
        last = read_json(tick)
        if last.get("status") == "running" and not _alive(int(last.get("pid", 0))):
            last["status"] = f"interrupted (process {last.get('pid')} is gone)"
        status["last_retrain"] = last
    holder = _holder(root)
    status["interrupted"] = {
        "lock_holder": holder,
        "checkpoints": [] if holder else _checkpoints(root),
    }
    return status


def render(s: dict) -> str:
    lines = [f"project   {s['project']}"]
    d = s["data"]
    lines.append(f"data      {d['path']}: " + (d["error"] if "error" in d else f"md5 {d['md5']} ({d['status']})"))
    if s["stale"]:
        lines.append("dvc       stale: " + ", ".join(s["stale"]) + " (`qlora run` reruns them)")
        for stage, why in s["stale"].items():
            more = f" (and {len(why) - 1} more)" if len(why) > 1 else ""
            lines.append(f"          {stage}: {why[0] if why else 'changed'}{more}")
    else:
        lines.append("dvc       up to date: every stage matches dvc.lock")
    r = s["registry"]
    if "error" in r:
        lines.append(f"registry  {r['tracking_uri']}: {r['error']}")
    elif "champion" in r:
        c = r["champion"]
        scores = ", ".join(f"{k}={v:.4f}" for k, v in c["scores"].items() if k in HEADLINE) or "no test scores"
        lines.append(f"champion  {c['model']} (@{c['alias']}): {scores}; data md5 {c['data_md5']}")
    else:
        lines.append(f"champion  none yet at {r['tracking_uri']}")
    last = s.get("last_retrain")
    if last:
        what = last.get("decision") or last.get("message") or ""
        lines.append(
            f"retrain   last tick {last.get('finished_at') or last.get('started_at')}: {last['status']}; {what}"
        )
    else:
        lines.append("retrain   no tick yet")
    i = s["interrupted"]
    if i["lock_holder"]:
        h = i["lock_holder"]
        lines.append(
            f"running   {h.get('command')} (pid {h.get('pid')}, since {h.get('since')}) holds the project lock"
        )
    notes = []
    if "pending_retrain" in r:
        notes.append(f"retraining left its {r['pending_retrain']['step']} step: {r['pending_retrain']['why']}")
    if i["checkpoints"]:
        notes.append(f"training checkpoints to resume from: {', '.join(i['checkpoints'][-2:])}")
    if last and str(last["status"]).startswith("interrupted"):
        notes.append(f"the last retraining tick was {last['status']}")
    lines.append(
        "resume    " + ("; ".join(notes) + " (the next run or tick finishes it)" if notes else "nothing interrupted")
    )
    return "\n".join(lines)
