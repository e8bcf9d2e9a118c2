"""DVC glue: the one place that decides what is up to date (dvc.lock), hashes data the way
DVC does, runs parameter experiments, and records new data versions (`dvc add` + push +
git commit of the .dvc file)."""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import yaml

from tasks.common import PipelineError, atomic_file

LOCK_FILE = "dvc.lock"
PARAMS_FILE = "params.yaml"


# --- hashing: DVC's md5 (a file's md5; a folder's md5 of its listing, suffixed .dir), always
# from the bytes: DVC's state database would answer from (inode, mtime, size) and miss an edit
# that keeps them.
def md5(path: Path) -> str:
    from dvc_data.hashfile.hash import hash_file
    from dvc_data.hashfile.tree import Tree
    from dvc_objects.fs.local import LocalFileSystem

    fs, path = LocalFileSystem(), Path(path)
    if path.is_file():
        return hash_file(str(path), fs, "md5", state=None)[1].value
    if not path.is_dir():
        raise FileNotFoundError(path)
    tree = Tree()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        meta, hash_info = hash_file(str(file), fs, "md5", state=None)
        tree.add(file.relative_to(path).parts, meta, hash_info)
    tree.digest()
    return tree.hash_info.value


# --- the pipeline, one stage at a time
_REPOS: dict[str, object] = {}


@contextmanager
def _repo(root: Path):
    """One dvc.repo.Repo per project for this process: opening one costs ~0.2 s, and a run asks
    DVC about seven stages. DVC resets the repo's caches after each locked operation."""
    from dvc.repo import Repo

    key = str(Path(root).resolve())
    with contextlib.chdir(key):  # DVC resolves some paths (targets, stage wdirs) against the cwd
        if key not in _REPOS:
            _REPOS[key] = Repo(key)
            _dvc_console()
        yield _REPOS[key]


def _dvc_console() -> None:
    """DVC's log records print once. Importing dvc gives its loggers handlers of their own that
    print to the console, and its records also propagate to the root logger, where Prefect's
    console handler prints them again (flows/cli.py filters DVC's records out of that one) and the
    command's log file keeps them. Its INFO lines ("Running stage", "Updating lock file") say what
    the stage lines of `qlora run` say: on the console only with -v; its warnings always.
    The level is set here, explicitly: left unset, the loggers take the root logger's level
    (WARNING under Prefect) and the INFO records reach neither the console nor the log file."""
    import logging

    from flows.console import verbose

    for name in ("dvc", "dvc_objects", "dvc_data"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        for handler in logger.handlers:
            if handler.level < logging.WARNING and not verbose():
                handler.setLevel(logging.WARNING)  # its stdout handlers, which print only below WARNING


def reproduce(root: Path, stage: str) -> bool:
    """`dvc repro --single-item STAGE`: DVC runs the stage's command when its deps, params or
    code changed (or its outputs are missing), records it in dvc.lock, and skips it otherwise.
    Returns whether it ran."""
    from dvc.exceptions import ReproductionError

    with _repo(root) as repo:
        repo.scm_context.quiet = True  # no "git add dvc.lock" hints after every stage
        try:
            ran = repo.reproduce(targets=[f"{repo.root_dir}/dvc.yaml:{stage}"], single_item=True)
        except ReproductionError as exc:
            raise PipelineError(stage_error(root, stage) or f"stage {stage} failed: {exc.__cause__ or exc}") from None
    return bool(ran)


def stale_stages(root: Path, stage: str | None = None) -> dict[str, list[str]]:
    """{stage: what changed} as `dvc status` reports it; {} when everything is up to date.
    stage: that stage alone, against its deps as they are now (what `dvc repro` of it would find)."""
    import logging

    with _repo(root) as repo:  # first: importing dvc sets its loggers' levels, which are kept below
        dvc_log = logging.getLogger("dvc")
        level = dvc_log.level
        dvc_log.setLevel(logging.ERROR)  # not DVC's note that an imported dataset's .dvc file is frozen
        try:
            status = repo.status(targets=[f"{repo.root_dir}/dvc.yaml:{stage}"] if stage else None)
        finally:
            dvc_log.setLevel(level)
    stale = {}
    for target, changes in status.items():
        stage = target.rsplit(":", 1)[-1]  # "dvc.yaml:train" or "train"; a .dvc file keeps its path
        why = []
        for change in changes:
            if isinstance(change, dict):
                for kind, items in change.items():
                    why += (
                        [f"{kind} {path}: {state}" for path, state in (items or {}).items()]
                        if isinstance(items, dict)
                        else [f"{kind}: {items}"]
                    )
            else:
                why.append(str(change))
        stale[stage] = why
    return stale


def stage_error_path(root: Path, stage: str) -> Path:
    from tasks.catalog import STAGE_ERRORS_DIR

    return Path(root) / STAGE_ERRORS_DIR / f"{stage}.txt"


def stage_error(root: Path, stage: str) -> str | None:
    """The message a failed stage left (its process is DVC's child; the message names file, row, rule)."""
    path = stage_error_path(root, stage)
    return path.read_text().strip() if path.exists() else None


def stage_key(root: Path, stage: str) -> str:
    """DVC's run-cache key of a stage as it stands: the sha256 of its command, the hashes of its
    deps and its params (not its outputs). Names one exact training run: what resumable
    checkpoints are keyed on. (DVC computes the same key for its run cache; it declines to for
    stages with persistent outputs, so the key is computed here with DVC's functions.)"""
    from dvc.stage.cache import _get_cache_hash
    from dvc.stage.serialize import to_single_stage_lockfile

    with _repo(root) as repo:
        (target,) = repo.stage.collect(f"{repo.root_dir}/dvc.yaml:{stage}")
        target.save_deps()
        return _get_cache_hash(to_single_stage_lockfile(target), key=True)


def lock(root: Path) -> dict:
    path = Path(root) / LOCK_FILE
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(path.read_text(), Loader=loader) if path.exists() else {}


def lock_digest(root: Path) -> str:
    """One hash of every stage's recorded deps, params and outputs: equal digests, equal results."""
    path = Path(root) / LOCK_FILE
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


def locked_outs(root: Path, stage: str) -> dict[str, str]:
    """{output path: DVC md5} of a stage as dvc.lock records it."""
    entry = lock(root).get("stages", {}).get(stage, {})
    return {o["path"]: o.get("md5", "") for o in entry.get("outs", [])}


# --- experiments: `qlora run --set` is `dvc exp run -S` in the workspace, in steps
def apply_params(root: Path, overrides: list[str]) -> None:
    """Write the overrides into params.yaml, changing only the values they set: a round trip
    through ruamel keeps every comment, the flow lists and `null`, so `git diff` of an experiment
    shows the settings it changed and nothing else. Values parse as YAML, as `--set` reads them."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    from tasks.config import apply_overrides

    path = Path(root) / PARAMS_FILE
    yaml_rt = YAML()
    yaml_rt.preserve_quotes = True
    yaml_rt.width = 4096  # never re-wrap a long value
    yaml_rt.indent(mapping=2, sequence=4, offset=2)
    yaml_rt.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    doc = yaml_rt.load(path.read_text())
    apply_overrides({}, list(overrides))  # the same KEY=VALUE errors as load_params
    for item in overrides:
        key, value = item.split("=", 1)
        *sections, leaf = key.strip().split(".")
        node = doc
        for part in sections:
            if part not in node:
                node[part] = CommentedMap()
            node = node[part]
            if not isinstance(node, dict):
                raise PipelineError(f"--set {item!r}: '{part}' is not a section of {path}")
        parsed = yaml_rt.load(value)  # YAML 1.2, as DVC reads params: 2e-4 is a number
        if isinstance(parsed, CommentedSeq):  # a list keeps the block style of a block list it replaces
            old = node.get(leaf)
            if isinstance(old, CommentedSeq) and not old.fa.flow_style():
                parsed.fa.set_block_style()
        node[leaf] = parsed
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        yaml_rt.dump(doc, f)


def is_git_repo(root: Path) -> bool:
    return subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True).returncode == 0


def save_experiment(root: Path, name: str | None) -> tuple[str, str]:
    """`dvc exp save`: the workspace (params, dvc.lock, outputs in the DVC cache) becomes an
    experiment that `dvc exp show` lists and `dvc exp apply`/`branch` restore. Returns (name, rev)."""
    with _repo(root) as repo:
        rev = repo.experiments.save(name=name, force=bool(name))
        names = repo.experiments.get_exact_name([rev])
    return names.get(rev) or name or rev[:7], rev


# --- data versions
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


def committed_dvc_md5(dvc_file: Path, root: Path) -> str | None:
    """The md5 in the .dvc file as git's HEAD has it; None when git does not track it."""
    rel = Path(dvc_file).resolve().relative_to(Path(root).resolve()).as_posix()
    p = subprocess.run(["git", "show", f"HEAD:{rel}"], cwd=root, capture_output=True, text=True)
    if p.returncode:
        return None
    return yaml.safe_load(p.stdout)["outs"][0]["md5"]


def _run(cmd: list[str], root: Path) -> str:
    p = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if p.returncode:
        raise PipelineError(
            f"`{' '.join(cmd[2:] if cmd[0] == sys.executable else cmd)}` failed in {root}:\n{p.stdout}{p.stderr}"
        )
    return p.stdout


def dvc(root: Path, *args: str) -> str:
    return _run([sys.executable, "-m", "dvc", *args], root)


def new_version(data_path: Path, root: Path, remote: str | None, commit: bool, message) -> dict:
    """`dvc add` the dataset behind data_path, push it, and commit its .dvc file.
    message: the commit message, or a function of the new version's md5 that returns it."""
    dvc_file = find_dvc_file(data_path, root)
    if dvc_file is None:
        raise PipelineError(f"{data_path} is not tracked by DVC: `dvc add` it (or its folder) first")
    meta = yaml.safe_load(dvc_file.read_text())
    if meta.get("deps") or meta.get("frozen"):
        raise PipelineError(
            f"{dvc_file} is a `dvc import`; retraining appends rows to data you own: "
            f"`dvc add` a copy of it and point data.path there"
        )
    target = dvc_file.with_suffix("")
    dvc(root, "add", "-q", str(target.relative_to(root)))
    push = ["push", "-q", str(dvc_file.relative_to(root))] + (["-r", remote] if remote else [])
    dvc(root, *push)
    committed = None
    if commit and (root / ".git").exists():
        rel = str(dvc_file.relative_to(root))
        _run(["git", "add", rel], root)
        if subprocess.run(["git", "diff", "--cached", "--quiet", "--", rel], cwd=root).returncode:
            text = message(dvc_md5(dvc_file)) if callable(message) else message
            _run(["git", "commit", "-q", "-m", text, "--", rel], root)
            committed = _run(["git", "rev-parse", "HEAD"], root).strip()
    return {"dvc_file": str(dvc_file.relative_to(root)), "md5": dvc_md5(dvc_file), "git_commit": committed}
