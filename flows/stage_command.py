"""The command every dvc.yaml stage runs (`bin/qlora stage NAME`): one stage, on params.yaml as DVC
tracks it. This module and the stage's own module are the entry points whose imports make the
stage's code dependencies (flows/code_deps.py), so it imports only what running a stage needs."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from flows.console import EXIT_BUSY, PARAMS, configure_env, fail


def run(name: str, overrides: list[str], wait: bool) -> int:
    root = Path.cwd()
    configure_env(root)
    from flows import dvc_ops
    from flows.data_check import check_data, require_committed_version
    from flows.lock import ProjectBusy, die_with_holder, project_lock
    from flows.stages import BY_NAME, sync_dvc_yaml
    from tasks.common import PipelineError
    from tasks.config import ParamsError, load_params
    if name not in BY_NAME:
        return fail(f"unknown stage {name!r}; stages: {', '.join(BY_NAME)}")
    die_with_holder()  # started for a `qlora run` that was killed: do not train on alone
    error_file = dvc_ops.stage_error_path(root, name)
    error_file.unlink(missing_ok=True)
    if overrides:
        print(f"warning: --set {' '.join(overrides)}: this run of {name} is not what dvc.lock will record")
    try:
        params = load_params(root / PARAMS, overrides)
        in_dvc_project = (root / "dvc.yaml").exists()  # else a stage run by hand: no record, no resume
        if in_dvc_project and not overrides:
            sync_dvc_yaml(root, params, write=False)
        # Under torchrun the ranks of one run share the project: only rank 0 takes the lock.
        lock = project_lock(root, wait=wait, what=f"qlora stage {name}") \
            if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()
        with lock:
            if name == "validate":  # before any stage reads the data, whoever started the stage
                require_committed_version(check_data(params, root))
            if name == "train":
                resume_key = dvc_ops.stage_key(root, "train") if in_dvc_project and not overrides else None
                res = BY_NAME["train"].run(params, root, resume_key=resume_key)
            else:
                res = BY_NAME[name].run(params, root)
    except ProjectBusy as exc:
        print(f"qlora: error: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except (ParamsError, PipelineError, OSError) as exc:
        msg = str(exc) if not isinstance(exc, OSError) else _os_error(name, exc)
        if os.environ.get("DVC_STAGE"):  # run by DVC: leave the message for whoever called DVC
            with contextlib.suppress(OSError):  # the disk that is full may be this one
                error_file.parent.mkdir(parents=True, exist_ok=True)
                error_file.write_text(msg)
        return fail(msg)
    print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in res.summary.items()))
    return 0


def _os_error(stage: str, exc: OSError) -> str:
    """A stage's OS error (a full disk, a quota, a read-only folder) as one line: outputs are
    written beside their target and renamed in, so nothing half-written was published."""
    import errno
    where = f" writing {exc.filename}" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        todo = "free space on that disk (or point the project elsewhere) and run again"
    else:
        todo = "fix the cause and run again"
    return (f"stage {stage}: {exc.strerror or exc}{where}; its outputs are as they were before this run "
            f"(written to temp folders, renamed in only when whole): {todo}; DVC reruns the stage")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("name")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="set a params value for this run only (not what dvc.lock records)")
    parser.add_argument("--wait", action="store_true", help="wait for a command already holding the project")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = add_arguments(argparse.ArgumentParser(prog="qlora stage")).parse_args(argv)
    return run(args.name, args.set, args.wait)


if __name__ == "__main__":
    sys.exit(main())
