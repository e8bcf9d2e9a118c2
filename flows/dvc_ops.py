"""DVC and git glue for data versions: find the .dvc file behind a path, record a new
version (`dvc add`), push it to the remote, and commit the .dvc file to git."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tasks.common import PipelineError


def find_dvc_file(path: Path, root: Path) -> Path | None:
    """The .dvc file tracking `path` (the file itself or a folder above it, inside root)."""
    path, root = Path(path).resolve(), Path(root).resolve()
    for p in [path, *path.parents]:
        if not p.name or not p.is_relative_to(root):
            break
        candidate = p.with_name(p.name + ".dvc")
        if candidate.is_file():
            return candidate
    return None


def dvc_md5(dvc_file: Path) -> str:
    return yaml.safe_load(Path(dvc_file).read_text())["outs"][0]["md5"]


def _run(cmd: list[str], root: Path) -> str:
    p = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if p.returncode:
        raise PipelineError(f"`{' '.join(cmd[2:] if cmd[0] == sys.executable else cmd)}` failed in {root}:\n"
                            f"{p.stdout}{p.stderr}")
    return p.stdout


def dvc(root: Path, *args: str) -> str:
    return _run([sys.executable, "-m", "dvc", *args], root)


def new_version(data_path: Path, root: Path, remote: str | None, commit: bool, message: str) -> dict:
    """`dvc add` the dataset behind data_path, push it, and commit its .dvc file."""
    dvc_file = find_dvc_file(data_path, root)
    if dvc_file is None:
        raise PipelineError(f"{data_path} is not tracked by DVC: `dvc add` it (or its folder) first")
    meta = yaml.safe_load(dvc_file.read_text())
    if meta.get("deps") or meta.get("frozen"):
        raise PipelineError(f"{dvc_file} is a `dvc import`; retraining appends rows to data you own: "
                            f"`dvc add` a copy of it and point data.path there")
    target = dvc_file.with_suffix("")
    dvc(root, "add", "-q", str(target.relative_to(root)))
    push = ["push", "-q", str(dvc_file.relative_to(root))] + (["-r", remote] if remote else [])
    dvc(root, *push)
    committed = None
    if commit and (root / ".git").exists():
        rel = str(dvc_file.relative_to(root))
        _run(["git", "add", rel], root)
        if subprocess.run(["git", "diff", "--cached", "--quiet", "--", rel], cwd=root).returncode:
            _run(["git", "commit", "-q", "-m", message, "--", rel], root)
            committed = _run(["git", "rev-parse", "HEAD"], root).strip()
    return {"dvc_file": str(dvc_file.relative_to(root)), "md5": dvc_md5(dvc_file), "git_commit": committed}
