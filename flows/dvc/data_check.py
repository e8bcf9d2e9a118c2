"""Is the data on disk the version git and DVC say it is? Checked by hashing the bytes (DVC's
md5), before any stage reads them, by every door: `qlora run`, `dvc repro` (the validate
stage), `qlora retrain`, and `qlora lineage --verify` afterwards.

Statuses: verified (the bytes are the version in the .dvc file that git's HEAD holds),
untracked (no .dvc file covers data.path: nothing to check against; recorded as such),
modified (the bytes differ from the .dvc file), uncommitted (the .dvc file itself differs
from git's HEAD, e.g. `dvc repro` re-recorded a changed import). The last two stop the run
unless the user opts in (--allow-unverified-data, or QLORA_ALLOW_UNVERIFIED_DATA=1); the
run is then recorded with the real hash and data_verified=false.

A Hugging Face hub dataset (data.path hf://NAME) has no bytes here to hash before it is
loaded: it is `pinned` when data.revision is a commit hash (the hub never changes a commit)
and `unpinned` otherwise (a branch or tag can move: the run needs the same opt-in). The
loaded dataset's fingerprint is recorded by the validate stage (data/validated/source.json).
A local dataset folder given as hf://DIR is checked like any path.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from flows.dvc import dvc_ops
from tasks.common import PipelineError, resolve
from tasks.config import Params
from tasks.data.readers import HUB_PREFIX, is_hub

ALLOW_ENV = "QLORA_ALLOW_UNVERIFIED_DATA"


class DataVersionMismatch(PipelineError):
    """The data on disk is not the committed DVC version."""


@dataclass(frozen=True)
class DataCheck:
    data_path: str  # data.path as params give it
    status: str  # verified | untracked | modified | uncommitted | pinned | unpinned
    md5: str  # DVC md5 of what the .dvc file tracks (of data.path if untracked)
    file_md5: str  # DVC md5 of data.path itself
    dvc_file: str | None = None  # relative to the project
    tracked_path: str | None = None  # what the .dvc file tracks (data.path or a folder above it)
    recorded_md5: str | None = None  # md5 in the .dvc file on disk
    committed_md5: str | None = None  # md5 in the .dvc file at git's HEAD
    revision: str | None = None  # hf:// hub datasets: data.revision

    @property
    def verified(self) -> bool:
        return self.status == "verified"

    def problem(self) -> str:
        if self.status == "unpinned":
            return (
                f"{self.data_path}: data.revision {self.revision!r} is not a commit hash, so the hub dataset "
                f"it names can change without the record knowing"
            )
        where = f"{self.tracked_path} (tracked by {self.dvc_file})"
        if self.status == "modified":
            return (
                f"{self.data_path}: the data on disk is not the version recorded in {self.dvc_file}: "
                f"{where} hashes to md5 {self.md5}, the recorded version is {self.recorded_md5}"
                + (f" (committed: {self.committed_md5})" if self.committed_md5 not in (None, self.recorded_md5) else "")
            )
        return (
            f"{self.data_path}: {self.dvc_file} differs from the version git's HEAD holds: the data hashes "
            f"to md5 {self.md5}, the committed version is {self.committed_md5 or '(not committed)'}"
        )

    def tags(self) -> dict[str, str]:
        """What MLflow records about the data of a run."""
        tags = {
            "data_path": self.data_path,
            "data_md5": self.md5,
            "data_file_md5": self.file_md5,
            "data_verified": {"verified": "true", "untracked": "untracked", "pinned": "pinned"}.get(
                self.status, "false"
            ),
            "data_check": self.status,
        }
        if self.revision is not None:
            tags["data_revision"] = self.revision
        tags.update(
            {
                k: v
                for k, v in (
                    ("dvc_file", self.dvc_file),
                    ("dvc_tracked_path", self.tracked_path),
                    ("dvc_data_md5", self.committed_md5 or self.recorded_md5),
                )
                if v
            }
        )
        return tags

    def to_json(self) -> dict:
        return asdict(self)


COMMIT = re.compile(r"[0-9a-f]{40}")


def check_data(params: Params, root: Path) -> DataCheck:
    root = Path(root).resolve()
    d = params.data
    if is_hub(d.path):
        local = resolve(root, d.path[len(HUB_PREFIX) :])
        if not local.is_dir():  # a hub id: nothing on disk until datasets.load_dataset fetches it
            pinned = bool(d.revision and COMMIT.fullmatch(d.revision))
            return DataCheck(d.path, "pinned" if pinned else "unpinned", "", "", revision=d.revision or "main")
        path = local
    else:
        path = resolve(root, d.path)
    if not path.exists():
        raise PipelineError(f"{path}: file not found (data.path)")
    file_md5 = dvc_ops.md5(path)
    dvc_file = dvc_ops.find_dvc_file(path, root)
    if dvc_file is None:
        return DataCheck(params.data.path, "untracked", file_md5, file_md5)
    meta = yaml.safe_load(dvc_file.read_text())
    tracked = dvc_file.parent / meta["outs"][0]["path"]
    actual = file_md5 if tracked.resolve() == path.resolve() else dvc_ops.md5(tracked)
    recorded = meta["outs"][0].get("md5")
    committed = dvc_ops.committed_dvc_md5(dvc_file, root) if dvc_ops.is_git_repo(root) else recorded
    if actual != recorded:
        status = "modified"
    elif committed != recorded:
        status = "uncommitted"
    else:
        status = "verified"
    return DataCheck(
        params.data.path,
        status,
        actual,
        file_md5,
        str(dvc_file.relative_to(root)),
        str(tracked.relative_to(root)),
        recorded,
        committed,
    )


def allowed_by_user() -> bool:
    return os.environ.get(ALLOW_ENV, "").lower() in ("1", "true", "yes")


def require_committed_version(check: DataCheck, allow: bool | None = None) -> DataCheck:
    """Stop (DataVersionMismatch) unless the data is verified, untracked, a pinned hub revision, or
    the user opted in."""
    allow = allowed_by_user() if allow is None else allow
    if check.status in ("modified", "uncommitted", "unpinned"):
        if not allow and check.status == "unpinned":
            raise DataVersionMismatch(
                check.problem() + ". Pin data.revision to the commit to train on, or run on it anyway with "
                f"--allow-unverified-data ({ALLOW_ENV}=1): the run is then recorded as unverified."
            )
        if not allow:
            # One line (a refusal is one `qlora: error:` line). The restore needs --force: DVC
            # will not overwrite bytes it has no copy of without it, and those bytes are exactly
            # the change being discarded.
            raise DataVersionMismatch(
                check.problem()
                + ". Restore the committed data, discarding the change on disk (`git checkout "
                + str(check.dvc_file)
                + f" && dvc checkout --force {check.dvc_file}`), record it as a new version "
                f"(`dvc add {check.tracked_path}` and commit {check.dvc_file}), or run on it anyway with "
                f"--allow-unverified-data ({ALLOW_ENV}=1): the run is then recorded with the real hash as unverified."
            )
        print(f"warning: {check.problem()}; running on it as asked ({ALLOW_ENV}); recorded as unverified")
    return check
