"""`qlora` command line: run the Prefect flow, run one stage (what dvc.yaml calls), render dvc.yaml."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import yaml


def _configure_env(root: Path) -> None:
    # Must happen before Prefect is imported: it reads settings at import time.
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Cache records live with the outputs they describe.
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(root / ".qlora" / "prefect-results"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


def _fail(msg: str) -> int:
    print(f"qlora: error: {msg}", file=sys.stderr)
    return 2


def cmd_run(args) -> int:
    root = Path.cwd()
    _configure_env(root)
    from tasks.common import PipelineError
    from tasks.config import ParamsError, load_params
    try:
        params = load_params(args.params, args.set)
    except ParamsError as exc:
        return _fail(str(exc))
    from flows.lock import ProjectBusy, project_lock
    from flows.pipeline import qlora_pipeline
    started = time.perf_counter()
    try:
        with project_lock(root, wait=args.wait):
            out = qlora_pipeline(params.model_dump(mode="json"), str(root), args.params)
    except ProjectBusy as exc:
        print(f"qlora: {exc}", file=sys.stderr)
        return 3
    except PipelineError as exc:
        return _fail(str(exc))
    seconds = time.perf_counter() - started
    stages, ml = out["stages"], out["mlflow"]
    print(f"\nqlora run finished in {seconds:.1f} s")
    for name, s in stages.items():
        keys = ", ".join(f"{k}={v}" for k, v in s["summary"].items() if k in
                         ("rows", "accuracy", "macro_f1", "eval_loss", "perplexity", "final_loss", "steps"))
        print(f"  {name:<9} {s['status']:<7} {keys}")
    from tasks import evaluate, merge, train
    print(f"  adapter:  {root / train.ADAPTER}")
    print(f"  merged:   {root / merge.OUT_DIR}")
    print(f"  metrics:  {root / evaluate.METRICS}")
    print(f"  mlflow:   run {ml['run_id']} at {ml['tracking_uri']}"
          + (f" (model version {ml['model_version']})" if ml.get("model_version") else ""))
    return 0


def cmd_stage(args) -> int:
    root = Path.cwd()
    _configure_env(root)
    from flows.lock import ProjectBusy, project_lock
    from flows.stages import BY_NAME
    from tasks.common import PipelineError
    from tasks.config import ParamsError, load_params
    if args.name not in BY_NAME:
        return _fail(f"unknown stage {args.name!r}; stages: {', '.join(BY_NAME)}")
    try:
        params = load_params(args.params, args.set)
        # Under torchrun the ranks of one run share the project: only rank 0 takes the lock.
        lock = project_lock(root, wait=args.wait, what=f"qlora stage {args.name}") \
            if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()
        with lock:
            res = BY_NAME[args.name].run(params, root)
    except ProjectBusy as exc:
        print(f"qlora: {exc}", file=sys.stderr)
        return 3
    except (ParamsError, PipelineError) as exc:
        return _fail(str(exc))
    print(f"{args.name}: " + ", ".join(f"{k}={v}" for k, v in res.summary.items()))
    return 0


def cmd_dvc_yaml(args) -> int:
    from flows.stages import dvc_yaml
    text = "# Rendered by `qlora dvc-yaml` from flows/stages.py; a test fails if they disagree.\n" \
        + yaml.safe_dump(dvc_yaml(), sort_keys=False)
    if args.write:
        Path("dvc.yaml").write_text(text)
    else:
        print(text, end="")
    return 0


def cmd_track(args) -> int:
    """Record outputs made by `dvc repro` as an MLflow run, as `qlora run` does."""
    root = Path.cwd()
    _configure_env(root)
    from flows import tracking
    from flows.stages import STAGES
    from tasks.common import content_hash
    from tasks.config import load_params
    params = load_params(args.params, args.set)
    stages = {s.name: {"status": "dvc", "outputs": {o: content_hash(root / o) for o in s.outs
                                                    if (root / o).exists()}} for s in STAGES}
    with tracking.pipeline_run(params, root, params_file=args.params) as run:
        run.record(stages)
    print(f"mlflow: run {run.info['run_id']} at {run.info['tracking_uri']}")
    return 0


def cmd_retrain(args) -> int:
    root = Path.cwd()
    _configure_env(root)
    from flows.lock import ProjectBusy, project_lock
    from flows.retrain import retrain_flow
    from tasks.common import PipelineError
    from tasks.config import ParamsError
    try:
        with project_lock(root, wait=args.wait, what="qlora retrain"):
            out = retrain_flow(str(root), args.params, args.set)
    except ProjectBusy as exc:
        print(f"qlora: {exc}", file=sys.stderr)
        return 3
    except (ParamsError, PipelineError) as exc:
        return _fail(str(exc))
    print(f"retrain: {out['status']}" + (f"; {out['decision']['reason']}" if "decision" in out else ""))
    return 0


def _local_prefect_server(root: Path):
    """Prefect's ephemeral API has no scheduler, so a cron needs a server: start one on
    loopback for as long as `qlora serve` runs (its database stays in .prefect/)."""
    import socket
    import subprocess
    import urllib.request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (root / ".prefect").mkdir(exist_ok=True)
    log = open(root / ".prefect" / "server.log", "a")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return proc, url
        except Exception:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the local Prefect server did not start; see {root / '.prefect' / 'server.log'}")


def cmd_serve(args) -> int:
    """Serve the retraining flow on a cron schedule (Prefect `serve`): a long-running process.
    Against PREFECT_API_URL when set; otherwise against a Prefect server it starts locally."""
    root = Path.cwd()
    _configure_env(root)
    from tasks.config import ParamsError, check_retrain_ready, load_params
    try:
        check_retrain_ready(load_params(args.params, args.set))  # fail now, not at 3 a.m.
    except ParamsError as exc:
        return _fail(str(exc))
    server = None
    if not os.environ.get("PREFECT_API_URL"):
        server, os.environ["PREFECT_API_URL"] = _local_prefect_server(root)
        print(f"qlora serve: started a local Prefect server at {os.environ['PREFECT_API_URL']} (UI and scheduler)")
    try:
        from flows.retrain import retrain_flow
        retrain_flow.serve(name=args.name, cron=args.cron,
                           parameters={"root": str(root), "params_file": args.params, "overrides": args.set})
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    return 0


def cmd_lineage(args) -> int:
    root = Path.cwd()
    _configure_env(root)
    import json

    import mlflow

    from flows import lineage, tracking
    from tasks.common import PipelineError
    from tasks.config import load_params
    params = load_params(args.params) if Path(args.params).exists() else None
    uri = args.tracking_uri or (tracking.tracking_uri(params, root) if params else None) \
        or tracking.USER_TRACKING_URI or f"sqlite:///{root / 'mlruns.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        info = lineage.lineage(args.model)
    except PipelineError as exc:
        return _fail(str(exc))
    verified = lineage.verify(info, root) if args.verify else None
    if args.json:
        print(json.dumps({**info, **({"verify": verified} if verified else {})}, indent=2))
    else:
        lineage.render(info, verified)
    return 0 if verified is None or verified["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qlora", description="Reproducible QLoRA fine-tuning pipeline")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, fn, helptext in (("run", cmd_run, "run the whole Prefect flow (cached stages + MLflow)"),
                               ("stage", cmd_stage, "run one stage (what dvc.yaml calls)"),
                               ("track", cmd_track, "record the current outputs as an MLflow run"),
                               ("retrain", cmd_retrain, "ingest the inbox, version data, retrain, promote"),
                               ("serve", cmd_serve, "serve the retraining flow on a cron schedule")):
        p = sub.add_parser(name, help=helptext)
        if name == "stage":
            p.add_argument("name")
        if name == "serve":
            p.add_argument("--cron", required=True, help='e.g. "0 3 * * 1" (Mondays 03:00)')
            p.add_argument("--name", default="qlora-retrain", help="deployment name")
        p.add_argument("--params", default="params.yaml")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a params value, e.g. --set train.lr=1e-4 (repeatable)")
        p.add_argument("--wait", action="store_true", help="wait for a run already holding the project")
        p.set_defaults(fn=fn)
    p = sub.add_parser("lineage", help="what data, code and settings produced a registered model")
    p.add_argument("model", help="NAME[@alias] or NAME/VERSION (default alias: champion)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--verify", action="store_true", help="re-hash local data against the record")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(fn=cmd_lineage)
    p = sub.add_parser("dvc-yaml", help="print (or --write) dvc.yaml rendered from flows/stages.py")
    p.add_argument("--write", action="store_true")
    p.set_defaults(fn=cmd_dvc_yaml)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
