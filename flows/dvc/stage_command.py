"""The command every dvc.yaml stage runs (`bin/qlora stage NAME`): one stage, on params.yaml as DVC
tracks it. This module and the stage's own module are the entry points whose imports make the
stage's code dependencies (flows/dvc/code_deps.py), so it imports only what running a stage needs.

With train.processes or train.nodes above 1, the train stage launches its own workers through
PyTorch's elastic launcher (the engine behind torchrun): each worker runs this same command with
RANK, WORLD_SIZE and the rendezvous in its environment, and the launcher takes every worker down
when one fails. DVC and the project lock see one stage, one process tree."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from flows.console import EXIT_BUSY, EXIT_ERROR, PARAMS, configure_env, fail, stage_output_to_log

RDZV_ENV = "QLORA_RDZV_ENDPOINT"  # host:port of the c10d rendezvous when train.nodes > 1
STAGE_MODULE = __spec__.name  # this module, as the workers run it
LAUNCH_LOGS = ".qlora/launch"  # each launch's per-rank stdout/stderr (the failed rank's cause is read there)


def run(name: str, overrides: list[str], wait: bool) -> int:
    root = Path.cwd()
    stage_output_to_log()  # started for `qlora run`/`retrain`: this stage's output goes to its log
    configure_env(root)
    from flows.dvc import dvc_ops
    from flows.dvc.data_check import check_data, require_committed_version
    from flows.dvc.stages import BY_NAME, sync_dvc_yaml
    from flows.lock import ProjectBusy, die_with_holder, project_lock
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
        lock = (
            project_lock(root, wait=wait, what=f"qlora stage {name}")
            if os.environ.get("RANK", "0") == "0"
            else contextlib.nullcontext()
        )
        with lock:
            if name == "validate":  # before any stage reads the data, whoever started the stage
                require_committed_version(check_data(params, root))
            if name == "train":
                if launches_workers(params) and params.train.nodes > 1 and not os.environ.get(RDZV_ENV):
                    return fail(_no_endpoint(params))  # before anything else: the setting is the cause
                resume_key = dvc_ops.stage_key(root, "train") if in_dvc_project and not overrides else None
                if launches_workers(params):
                    return launch_train(root, params, overrides, resume_key)
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
    except Exception as exc:  # a bug or a library's failure: the traceback, and its last line for the caller
        import traceback

        traceback.print_exc()
        if os.environ.get("DVC_STAGE"):
            with contextlib.suppress(OSError):
                error_file.parent.mkdir(parents=True, exist_ok=True)
                error_file.write_text(f"stage {name}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")
        return EXIT_ERROR
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
    return (
        f"stage {stage}: {exc.strerror or exc}{where}; its outputs are as they were before this run "
        f"(written to temp folders, renamed in only when whole): {todo}; DVC reruns the stage"
    )


def processes(params) -> int:
    if params.train.processes != "auto":
        return params.train.processes
    import torch

    return max(torch.cuda.device_count(), 1)


def launches_workers(params) -> bool:
    """This process is the launcher: several workers are asked for and none runs yet."""
    inside = "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ  # a worker (ours or torchrun's)
    return not inside and (processes(params) > 1 or params.train.nodes > 1)


def launch_train(root: Path, params, overrides: list[str], resume_key: str | None) -> int:
    """Run the train stage as processes x nodes workers; one line names the rank that failed."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nproc, nodes = processes(params), params.train.nodes
    endpoint = os.environ.get(RDZV_ENV, "")
    if nodes > 1 and not endpoint:
        return fail(_no_endpoint(params))
    # Every node must name the same run: the stage's DVC key is equal exactly where inputs and params are.
    run_id = (resume_key or "qlora-train")[:32]
    if params.train.threads == 0 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))  # the workers share the cores
    logs = root / LAUNCH_LOGS
    logs.mkdir(parents=True, exist_ok=True)
    config = LaunchConfig(
        min_nodes=nodes,
        max_nodes=nodes,
        nproc_per_node=nproc,
        run_id=run_id,
        rdzv_backend="c10d",
        rdzv_endpoint=endpoint if nodes > 1 else "localhost:0",
        rdzv_configs={"join_timeout": 600} if nodes > 1 else {},
        max_restarts=0,
        logs_specs=DefaultLogsSpecs(log_dir=str(logs), tee=Std.ALL),
    )
    if nodes == 1:  # --standalone: the rendezvous lives in the launcher; nothing to meet
        config.rdzv_configs["is_host"] = True
    print(
        f"train: launching {nproc} process(es) on {nodes} node(s) ({'NCCL' if _cuda(params) else 'gloo'})", flush=True
    )
    argv = ["-m", STAGE_MODULE, "train", *[a for kv in overrides for a in ("--set", kv)]]
    try:
        elastic_launch(config, sys.executable)(*argv)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()  # the first to fail; the others were stopped after it
        return fail(
            f"train: rank {rank} (local {failure.local_rank}, pid {failure.pid}) {_cause(failure, logs)}; the "
            f"other workers were stopped. A rerun resumes from the last checkpoint on any number of processes"
        )
    except Exception as exc:  # the rendezvous: a node that never came, a port in use
        return fail(f"train: the launch of {nproc} x {nodes} workers failed: {type(exc).__name__}: {exc}")
    return 0


def _no_endpoint(params) -> str:
    return (
        f"train.nodes is {params.train.nodes}: set {RDZV_ENV}=host:port, the same on every node (the c10d "
        f"rendezvous, e.g. the first node's address and a free port)"
    )


def _cuda(params) -> bool:
    import torch

    return params.train.device != "cpu" and torch.cuda.is_available()


def _cause(failure, logs: Path) -> str:
    """How a worker ended: its signal or exit code, and the last error line it printed."""
    import signal

    how = (
        f"was killed by {signal.Signals(-failure.exitcode).name}"
        if failure.exitcode < 0
        else f"exited with code {failure.exitcode}"
    )
    lines = []
    for path in sorted(logs.glob(f"*/attempt_*/{failure.local_rank}/stderr.log"), key=lambda p: p.stat().st_mtime):
        lines = path.read_text(errors="replace").splitlines()
    said = [line for line in lines if line.startswith("qlora: error:")] or [
        line for line in lines if "Error" in line and not line.startswith((" ", "\t", "Traceback"))
    ]
    return how + (f": {said[-1].removeprefix('qlora: error: ')}" if said else "")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("name")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a params value for this run only (not what dvc.lock records)",
    )
    parser.add_argument("--wait", action="store_true", help="wait for a command already holding the project")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = add_arguments(argparse.ArgumentParser(prog="qlora stage")).parse_args(argv)
    return run(args.name, args.set, args.wait)


if __name__ == "__main__":
    sys.exit(main())
