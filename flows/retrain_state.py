"""Where retraining stands, read from durable facts only: the data file against its .dvc file
and git's HEAD, the git history of the .dvc file, and the MLflow registry. Each retraining tick
reads it first and finishes an interrupted retraining before it looks at the inbox.

The steps and what marks each one done:
  append    the raw data holds the committed version's bytes followed by new rows, and the
            ingest report says the inbox was merged;
  version   `dvc add` (the .dvc file names the data on disk), `dvc push`, then a git commit of
            the .dvc file whose message carries the trailer `Qlora-Data-Version: <md5>`;
  model     a registered version whose `dvc_data_md5` tag is that md5;
  decision  that version's `champion_decision` tag, set after the alias moved (or stayed).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from flows.dvc import dvc_ops
from flows.dvc.data_check import DataCheck
from tasks import catalog
from tasks.common import resolve
from tasks.config import Params

DATA_TRAILER = "Qlora-Data-Version"
DECISION_TAG = "champion_decision"  # on a model version: the decision is applied
PENDING_TAG = "champion_decision_pending"  # on a model version: the decision, before the alias moves


@dataclass(frozen=True)
class Pending:
    step: str  # "version" | "train" | "decide"
    md5: str  # the data version it is about
    model_version: str | None = None
    why: str = ""


def commit_message(files: list[str], md5: str) -> str:
    names = ", ".join(Path(f).name for f in files) or "the retraining inbox"
    return f"data: merge {names} from the retraining inbox\n\n{DATA_TRAILER}: {md5}\n"


def _git(root: Path, *args: str) -> str:
    p = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    return p.stdout if p.returncode == 0 else ""


def retrained_versions(root: Path, dvc_file: str) -> list[tuple[str, str]]:
    """[(commit, data md5)] of the data versions retraining committed, newest first (git history)."""
    out = _git(root, "log", f"--format=%H %(trailers:key={DATA_TRAILER},valueonly,separator=%x2C)", "--", dvc_file)
    pairs = []
    for line in out.splitlines():
        commit, _, md5 = line.partition(" ")
        if md5.strip():
            pairs.append((commit, md5.strip()))
    return pairs


def _cached_listing(root: Path, md5: str) -> list[dict] | None:
    """A folder version's listing ([{md5, relpath}]) from the local DVC cache."""
    with dvc_ops._repo(root) as repo:
        path = Path(repo.cache.local.oid_to_path(md5))
    return json.loads(path.read_text()) if path.exists() else None


def _prefix_md5(path: Path, size: int) -> str:
    import hashlib

    h, left = hashlib.md5(), size
    with open(path, "rb") as f:
        while left > 0:
            block = f.read(min(left, 1 << 20))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.hexdigest() if left == 0 else ""


def _cache_size(root: Path, md5: str) -> int | None:
    with dvc_ops._repo(root) as repo:
        path = Path(repo.cache.local.oid_to_path(md5))
    return path.stat().st_size if path.exists() else None


def appended_to_committed(params: Params, root: Path, check: DataCheck) -> bool:
    """The data on disk is the committed version with rows appended to data.path by an ingest that
    reported a merge, and nothing else changed: an append whose versioning was interrupted."""
    report = resolve(root, catalog.INGEST_REPORT)
    if check.committed_md5 is None or check.dvc_file is None or not report.exists():
        return False
    if json.loads(report.read_text()).get("status") != "merged":
        return False
    raw, tracked = resolve(root, params.data.path), Path(root) / check.tracked_path
    if check.committed_md5.endswith(".dir"):
        listing = _cached_listing(root, check.committed_md5)
        if listing is None:
            return False
        entries = {tracked / e["relpath"]: e["md5"] for e in listing}
        on_disk = {p for p in tracked.rglob("*") if p.is_file()}
        if on_disk != set(entries):
            return False
    else:
        entries = {tracked: check.committed_md5}
    for path, md5 in entries.items():
        if path.resolve() == raw.resolve():
            size = _cache_size(root, md5)
            if size is None or path.stat().st_size <= size or _prefix_md5(path, size) != md5:
                return False
        elif dvc_ops.md5(path) != md5:
            return False
    return True


def _dvc_file_holds_disk_data(root: Path, check: DataCheck) -> bool:
    """`dvc add` ran: the .dvc file on disk names the data on disk."""
    return check.recorded_md5 == check.md5


def pending(params: Params, root: Path, check: DataCheck, client) -> Pending | None:
    """What an interrupted retraining left to do, or None. Reads no private state."""
    root = Path(root)
    if check.dvc_file is None or not dvc_ops.is_git_repo(root) or not params.retrain.git_commit:
        return None
    if check.status in ("modified", "uncommitted"):
        if check.status == "uncommitted" and not _dvc_file_holds_disk_data(root, check):
            return None
        if appended_to_committed(params, root, check):
            return Pending(
                "version",
                check.md5,
                why=f"data appended from the inbox but not committed "
                f"({'not `dvc add`ed' if check.status == 'modified' else 'not committed'})",
            )
        return None
    versions = retrained_versions(root, check.dvc_file)
    if not versions or versions[0][1] != check.committed_md5:
        return None  # the committed data version is not one retraining made (the seed, a user's commit)
    md5 = check.committed_md5
    name = params.tracking.registered_model
    found = client.search_model_versions(f"name='{name}' and tags.dvc_data_md5='{md5}'")
    if not found:
        return Pending("train", md5, why=f"data version {md5} (commit {versions[0][0][:7]}) has no model")
    mv = sorted(found, key=lambda v: int(v.version))[0]
    if DECISION_TAG not in (mv.tags or {}):
        return Pending("decide", md5, str(mv.version), why=f"model version {mv.version} has no champion decision")
    return None


def commit_pipeline_state(root: Path, md5: str) -> str | None:
    """Commit dvc.lock and params.yaml as the pipeline left them for this data version, so the
    commit reproduces with `dvc repro` (nothing to run) and `dvc status` (up to date)."""
    files = [f for f in (dvc_ops.LOCK_FILE, dvc_ops.PARAMS_FILE) if (Path(root) / f).exists()]
    subprocess.run(["git", "add", "--", *files], cwd=root, check=True, capture_output=True)
    if subprocess.run(["git", "diff", "--cached", "--quiet", "--", *files], cwd=root).returncode == 0:
        return None
    subprocess.run(
        ["git", "commit", "-q", "-m", f"pipeline: dvc.lock for data version {md5}", "--", *files],
        cwd=root,
        check=True,
        capture_output=True,
    )
    return _git(root, "rev-parse", "HEAD").strip()
