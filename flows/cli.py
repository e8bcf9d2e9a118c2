"""`qlora` command line. The pipeline's state lives in DVC (dvc.yaml, params.yaml, dvc.lock):
`qlora run` reproduces it through DVC inside a Prefect flow and records the result in MLflow;
`qlora stage NAME` is the command each dvc.yaml stage runs (through bin/qlora)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from flows.console import (
    EXIT_BUSY,
    EXIT_ERROR,
    EXIT_REJECTED,
    PARAMS,
    VERBOSE_ENV,
    configure_env,
    error_line,
    fail,
    log_exception,
    open_log,
)

PARAMS_DOC = "docs/reference/params.md"


class _ConsoleOnce:
    """A filter for Prefect's console handler (on the root logger), so that each thing reaches the
    console once. DVC's records: DVC's own handlers print them (flows/dvc/dvc_ops.py). Without -v,
    Prefect's progress records stay in the log file and errors reach the console as the command's
    one `qlora: error:` line, their tracebacks in the log file. With -v: Prefect logs a failed task's
    and flow's exception with its traceback (task, then flow); for the errors whose message says
    it all (a refusal, a stage's cause) the command's error line is enough. The Prefect API (its UI)
    keeps every record."""

    def filter(self, record) -> bool:
        from flows.console import verbose
        from tasks.common import PipelineError
        from tasks.config import ParamsError

        if record.name.split(".")[0] in ("dvc", "dvc_objects", "dvc_data"):
            return False
        if not verbose():
            return record.levelno == logging.WARNING
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (PipelineError, ParamsError)):
            return False
        # The command's own Prefect server gone mid-run: its error line names the server
        # (flows/prefect_server.py); a server of the user's that goes away still raises to the shell.
        import httpx

        return not isinstance(exc, httpx.TransportError)


def _console_once() -> None:
    """Install _ConsoleOnce on Prefect's console handlers (after Prefect set up logging)."""
    import prefect.main  # noqa: F401 (`import prefect` alone sets up no logging; prefect.main does)
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(isinstance(f, _ConsoleOnce) for f in handler.filters):
            handler.addFilter(_ConsoleOnce())


def _print_outcome(root: Path, out, seconds: float) -> None:
    """After the stage lines: the totals and where the results are."""
    from flows.console import log_path
    from tasks import catalog

    ran = sum(s.ran for s in out.stages.values())
    print(f"\nqlora run finished in {seconds:.1f} s: {ran} stage(s) ran, {len(out.stages) - ran} skipped")
    print(f"  data:     {out.data['data_path']} md5 {out.data['md5']} ({out.data['status']})")
    print(f"  adapter:  {root / catalog.ADAPTER_DIR}")
    print(f"  merged:   {root / catalog.MERGED_DIR}")
    print(f"  metrics:  {root / catalog.METRICS}")
    if out.experiment:
        print(
            f"  dvc:      experiment {out.experiment.name} ({out.experiment.rev[:7]}, baseline "
            f"{out.experiment.baseline[:7]}): `dvc exp show`, `dvc exp apply {out.experiment.name}`"
        )
    ml = out.mlflow
    if ml.get("reused"):
        print(f"  mlflow:   nothing changed: run {ml['run_id']} at {ml['tracking_uri']} already holds these outputs")
    else:
        print(
            f"  mlflow:   run {ml['run_id']} at {ml['tracking_uri']}"
            + (f" (model version {ml['model_version']})" if ml.get("model_version") else "")
        )
    print(f"  log:      {log_path()}")


def _apply_overrides(root: Path, overrides: list[str]) -> None:
    from flows.dvc import dvc_ops

    dvc_ops.apply_params(root, overrides)
    print(
        f"params.yaml: set {', '.join(overrides)}. As with `dvc exp run -S`, the workspace keeps these values "
        f"after the run; `dvc exp apply`/`git checkout params.yaml` switch back."
    )


def cmd_run(args) -> int:
    root = Path.cwd()
    configure_env(root)
    from flows.dvc.data_check import ALLOW_ENV
    from flows.lock import ProjectBusy, project_lock
    from flows.prefect_server import prefect_api
    from tasks.common import PipelineError
    from tasks.config import ParamsError, load_params

    if args.allow_unverified_data:
        os.environ[ALLOW_ENV] = "1"
    started = time.perf_counter()
    try:
        params = load_params(root / PARAMS, args.set)  # every override checked before params.yaml changes
        from tasks.model.source import check_reachable

        check_reachable(params.model, root)  # before any stage: one line, no hub retries
        with project_lock(root, wait=args.wait):
            if not (root / ".dvc").is_dir():
                raise PipelineError(f"{root} is not a DVC project (no .dvc/): run qlora in a clone of qlora-flow")
            open_log(root, "run")  # from here on, an error line names it
            if args.set:
                _apply_overrides(root, args.set)
            from flows.dvc.stages import sync_dvc_yaml

            note = sync_dvc_yaml(root, params, write=True)
            if note:
                print(note)
            from flows.dvc import dvc_ops

            experiment = bool(args.set or args.name)
            if experiment and not dvc_ops.is_git_repo(root):
                print("warning: not a git repository with a commit: the run is not saved as a DVC experiment")
                experiment = False
            with prefect_api(root):  # before Prefect's import: its settings read PREFECT_API_URL then
                _console_once()
                from flows.pipeline import Project, qlora_pipeline

                out = qlora_pipeline(Project(root=root), experiment=experiment, experiment_name=args.name)
    except ProjectBusy as exc:
        print(error_line(str(exc)), file=sys.stderr)
        return EXIT_BUSY
    except (ParamsError, PipelineError) as exc:
        return fail(str(exc))
    except Exception as exc:  # not one of ours: its traceback goes to the log, the console gets its last line
        log_exception(exc)
        return fail(f"{type(exc).__name__}: {exc}".splitlines()[0])
    _print_outcome(root, out, time.perf_counter() - started)
    return 0


def cmd_stage(args) -> int:
    """One stage, as dvc.yaml runs it (bin/qlora runs flows/dvc/stage_command.py directly)."""
    from flows.dvc import stage_command

    return stage_command.run(args.name, args.set, args.wait)


def cmd_sweep(args) -> int:
    root = Path.cwd()
    configure_env(root)
    from flows.dvc import dvc_ops
    from flows.lock import ProjectBusy, project_lock
    from flows.prefect_server import prefect_api
    from tasks.common import PipelineError
    from tasks.config import ParamsError

    if not dvc_ops.is_git_repo(root):
        return fail("a sweep saves DVC experiments, which need a git repository with a commit")
    name = args.name or time.strftime("sweep-%Y%m%d-%H%M%S")
    params_path, lock_path = root / PARAMS, root / dvc_ops.LOCK_FILE
    try:
        with project_lock(root, wait=args.wait, what="qlora sweep"):
            before = (params_path.read_bytes(), lock_path.read_bytes() if lock_path.exists() else None)
            with prefect_api(root):
                from flows.pipeline import Project
                from flows.sweep import sweep_flow

                out = sweep_flow(Project(root=root), args.grid, name)
            restored = _restore_workspace(root, *before)
    except ProjectBusy as exc:
        print(f"qlora: error: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except (ParamsError, PipelineError) as exc:
        return fail(str(exc))
    _print_table(out["rows"], out["columns"])
    print(f"\nbest by {out['metric']}: {out['best']['experiment']}  (`dvc exp apply {out['best']['experiment']}`)")
    print(f"comparison: {out['dir']}/comparison.csv, comparison.png; MLflow parent run {out['parent_run_id']}")
    print(restored)
    return 0


def _restore_workspace(root: Path, params_bytes: bytes, lock_bytes: bytes | None) -> str:
    """Put the workspace back as it was before the sweep (as a queued `dvc exp run` leaves it)."""
    from flows.dvc import dvc_ops

    if lock_bytes is None:
        return "workspace: left at the last point (there was no dvc.lock to go back to)"
    (root / PARAMS).write_bytes(params_bytes)
    (root / dvc_ops.LOCK_FILE).write_bytes(lock_bytes)
    dvc_ops.dvc(root, "checkout", "-q", "--force")
    return "workspace: params.yaml, dvc.lock and outputs restored to what they were before the sweep"


def _print_table(rows: list[dict], columns: list[str]) -> None:
    shown = [c for c in columns if c not in ("mlflow_run",)]
    cells = [[f"{r.get(c):.4f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in shown] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(shown)]
    print("  ".join(c.ljust(w) for c, w in zip(shown, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def cmd_dvc_yaml(args) -> int:
    from flows.dvc.stages import render_dvc_yaml
    from tasks.config import load_params

    text = render_dvc_yaml(load_params(PARAMS))
    if args.write:
        Path("dvc.yaml").write_text(text)
    else:
        print(text, end="")
    return 0


def cmd_params(args) -> int:
    """params.yaml and its reference page, rendered from the typed defaults in tasks/config.py (one source)."""
    from tasks.config import render_params_doc, render_params_yaml

    text = render_params_yaml()
    if args.write:
        Path(PARAMS).write_text(text)
        Path(PARAMS_DOC).parent.mkdir(parents=True, exist_ok=True)
        Path(PARAMS_DOC).write_text(render_params_doc())
    else:
        print(text, end="")
    return 0


def _flow_exit(state) -> int:
    if state.is_completed():
        return 0
    if state.name == "Skipped":  # another command holds the project
        return EXIT_BUSY
    if state.name == "Rejected":
        return EXIT_REJECTED
    return EXIT_ERROR


def cmd_retrain(args) -> int:
    root = Path.cwd()
    configure_env(root)
    from flows.dvc.data_check import ALLOW_ENV
    from flows.prefect_server import prefect_api

    if args.allow_unverified_data:
        os.environ[ALLOW_ENV] = "1"
    from tasks.common import PipelineError
    from tasks.config import ParamsError, load_params
    from tasks.model.source import check_reachable

    inbox = "the inbox"
    try:  # a bad setting is the flow's to refuse; a base model that cannot be had stops it here
        params = load_params(root / PARAMS, args.set)
        inbox = params.retrain.inbox
        check_reachable(params.model, root)
    except PipelineError as exc:
        return fail(str(exc))
    except ParamsError:
        pass
    if (root / ".dvc").is_dir():
        open_log(root, "retrain")
    try:
        with prefect_api(root):  # before Prefect's import: its settings read PREFECT_API_URL then
            _console_once()
            from flows.retrain import retrain_flow

            state = retrain_flow(str(root), args.set, wait_for_lock=args.wait, return_state=True)
    except Exception as exc:  # not one of ours: its traceback goes to the log, the console gets its last line
        log_exception(exc)
        return fail(f"{type(exc).__name__}: {exc}".splitlines()[0])
    code = _flow_exit(state)
    out = state.result(raise_on_failure=False) if code in (0, EXIT_REJECTED) else None
    if isinstance(out, dict) and "ingest" in out:
        _print_ingest(out["ingest"], inbox)
    if code == 0:
        _print_retrain(out)
    elif state.name == "Refused":  # the message names the file or setting and what to do
        print(error_line(state.message), file=sys.stderr)
    else:
        raised = state.result(raise_on_failure=False) if code != EXIT_BUSY else None
        if isinstance(raised, BaseException):
            log_exception(raised)
        print(error_line(f"retrain {state.name}: {state.message}"), file=sys.stderr)
    return code


def _print_ingest(got: dict, inbox: str) -> None:
    """What the inbox gave: the files merged and the files rejected, with their first errors; the
    rows added and skipped, and why a drop added nothing."""
    from tasks import catalog

    for a in got.get("accepted", []):
        print(f"  accepted {a['file']}: {a['rows_added']} rows added, {a['rows_skipped']} skipped (duplicates)")
    for r in got.get("rejected", []):
        errs = [e for e in got.get("errors", []) if e["file"] == r["file"]][:3]
        why = "; ".join(f"row {e['row']}, column {e['column']}: rule {e['rule']} ({e['value']})" for e in errs)
        print(f"  rejected {r['file']}: " + (why or r.get("reason", "")))
    for e in got.get("errors", []):
        if not any(e["file"] == r["file"] for r in got.get("rejected", [])):  # a rule of the merged dataset
            print(f"  refused  {e['file']} with the drop merged: rule {e['rule']} ({e['value']})")
    for w in got.get("waiting", []):
        print(f"  waiting  {w}: still being written; a later run takes it")
    if got.get("accepted") or got.get("rejected"):
        print(f"  report:  {catalog.INGEST_REPORT}")
    reasons: dict[str, int] = {}
    for row in got.get("skipped_duplicates", []):
        reasons[row["reason"]] = reasons.get(row["reason"], 0) + 1
    skipped = ", ".join(f"{n} {why}" for why, n in reasons.items())
    print(
        f"ingest: {len(got.get('files', []))} file(s) taken from {inbox}: {got.get('added_rows', 0)} rows added, "
        f"{sum(reasons.values())} skipped{f' ({skipped})' if skipped else ''}, "
        f"{len(got.get('rejected', []))} file(s) rejected"
    )
    if got.get("status") == "no_new_data":
        if got.get("accepted"):
            why = "every row of the drop is already in the dataset"
        elif got.get("waiting"):
            why = f"{len(got['waiting'])} file(s) in {inbox} are still being written"
        else:
            why = f"{inbox} is empty"
        print(f"retrain: skipped: {why}; no data version, no training")


def _print_retrain(out: dict) -> None:
    """What a retraining did: the data version, the pipeline's model version, the champion decision."""
    if out["status"] == "skipped":  # _print_ingest said why
        return
    data, pipeline, decision = out.get("data") or {}, out.get("pipeline") or {}, out.get("decision") or {}
    commit = f", git commit {data['git_commit'][:7]}" if data.get("git_commit") else ""
    print(
        f"retrain: {out['status']}: data version md5 {data.get('md5')}{commit}; "
        f"model version {pipeline.get('model_version')} (MLflow run {pipeline.get('run_id')})"
    )
    if decision:
        who = decision.get("challenger_version")
        outcome = (
            f"version {who} is the champion"
            if decision.get("promoted")
            else (f"version {decision.get('champion_after')} stays the champion")
        )
        print(f"champion: {outcome} ({decision.get('reason')})")


def cmd_serve(args) -> int:
    """Serve the retraining flow on a cron schedule (Prefect `serve`): a long-running process.
    Against PREFECT_API_URL when set; otherwise against a Prefect server (UI and scheduler) it
    starts for as long as it runs. Each scheduled run takes the project lock, or ends Skipped."""
    root = Path.cwd()
    configure_env(root)
    from flows.prefect_server import prefect_api
    from tasks.common import PipelineError
    from tasks.config import ParamsError, check_retrain_ready, load_params
    from tasks.model.source import check_reachable

    try:  # fail now, not at 3 a.m.
        params = load_params(root / PARAMS, args.set)
        check_retrain_ready(params)
        check_reachable(params.model, root)
    except (ParamsError, PipelineError) as exc:
        return fail(str(exc))
    from flows.lock import AlreadyServed, serve_lock
    from tasks.catalog import SERVE_LOCK_FILE

    try:
        with serve_lock(root), prefect_api(root, services=True, ui=True) as (url, server):
            print(f"qlora serve: serving {root} (lock {root / SERVE_LOCK_FILE})", flush=True)
            if server is not None:
                print(f"qlora serve: started a local Prefect server at {url} (UI and scheduler)", flush=True)
            from flows.retrain import retrain_flow

            retrain_flow.serve(name=args.name, cron=args.cron, parameters={"root": str(root), "overrides": args.set})
    except AlreadyServed as exc:
        print(f"qlora: error: {exc}", file=sys.stderr)
        return EXIT_BUSY
    return 0


def _use_tracking(root: Path, explicit: str | None):
    """Point MLflow at --tracking-uri, else the project's store (params.yaml), else $MLFLOW_TRACKING_URI."""
    import mlflow

    from flows.tracking import mlflow_record
    from tasks.config import load_params

    params = load_params(root / PARAMS) if (root / PARAMS).exists() else None
    uri = (
        explicit
        or (mlflow_record.tracking_uri(params, root) if params else None)
        or mlflow_record.USER_TRACKING_URI
        or f"sqlite:///{root / 'mlruns.db'}"
    )
    mlflow.set_tracking_uri(uri)
    return params


def cmd_lineage(args) -> int:
    root = Path.cwd()
    configure_env(root)
    import json

    from flows.tracking import lineage
    from tasks.common import PipelineError
    from tasks.config import ParamsError

    try:
        _use_tracking(root, args.tracking_uri)
        info = lineage.lineage(args.model)
    except (PipelineError, ParamsError) as exc:
        return fail(str(exc))
    if args.card:
        print(lineage.card(info), end="")
        return 0
    verified = lineage.verify(info, root) if args.verify else None
    if args.json:
        print(json.dumps({**info, **({"verify": verified} if verified else {})}, indent=2))
    else:
        lineage.render(info, verified)
    return 0 if verified is None or verified["ok"] else 1


def cmd_predict(args) -> int:
    """Batch inference: a registered version (models:/NAME@alias, models:/NAME/N) or a model folder,
    on a file of rows checked against the training data's contract (the label optional)."""
    root = Path.cwd()
    configure_env(root)
    import json

    import pandas as pd

    from flows.serving import model_version
    from tasks.common import PipelineError, atomic_file
    from tasks.config import ParamsError
    from tasks.serve import predict as P

    out_path = Path(args.output)
    if out_path.suffix.lower() not in (".csv", ".jsonl"):
        return fail(f"--output {out_path}: write .csv or .jsonl")
    started = time.perf_counter()
    try:
        project = _use_tracking(root, args.tracking_uri)
        with model_version.local_model(args.model) as (path, version):
            info = P.describe(path)
            params = P.bundle_params(info, path) if info["kind"] == "bundle" else project
            if params is None:
                raise PipelineError(
                    f"{args.model}: a plain model folder needs the project's params.yaml (its data "
                    f"contract and prompt template): run in the project"
                )
            columns = args.columns.split(",") if args.columns else None
            rows = P.prepare(
                params, P.read_rows(Path(args.input), params, args.format, args.header, columns), args.input
            )
            pred = P.load_predictor(path, project, root, device=args.device)
            out = P.predict(pred, rows, args.batch_size, args.max_new_tokens, progress=True)
    except (PipelineError, ParamsError) as exc:
        return fail(str(exc))
    used = f"{version['name']}/{version['version']}" if version else str(args.model)
    result = pd.concat([rows[["row"]], out] + ([rows[["expected"]]] if "expected" in rows else []), axis=1)
    result["model"] = used
    with atomic_file(out_path) as tmp:
        if out_path.suffix.lower() == ".csv":
            result.to_csv(tmp, index=False)
        else:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.to_dict("records")))
    aliases = f" ({', '.join(version['aliases'])})" if version and version["aliases"] else ""
    note = ""
    if "expected" in rows and params.task == "seq_cls":
        note = f"; accuracy {float((result['label'] == result['expected']).mean()):.4f} against the given labels"
    print(
        f"qlora predict: {len(result)} rows of {args.input} -> {out_path} with {used}{aliases} "
        f"[{pred.variant}, {pred.device}] in {time.perf_counter() - started:.1f} s{note}"
    )
    return 0


def cmd_status(args) -> int:
    """One screen, read only: nothing trains and nothing is written."""
    root = Path.cwd()
    configure_env(root)
    import json

    from flows.status import project_status, render
    from tasks.common import PipelineError
    from tasks.config import ParamsError

    try:
        status = project_status(root)
    except (ParamsError, PipelineError) as exc:
        return fail(str(exc))
    print(json.dumps(status, indent=2, default=str) if args.json else render(status))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qlora", description="Reproducible QLoRA fine-tuning pipeline")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, fn, helptext in (
        ("run", cmd_run, "reproduce the pipeline through DVC in a Prefect flow, record it in MLflow"),
        ("stage", cmd_stage, "run one stage (what each dvc.yaml stage calls)"),
        ("sweep", cmd_sweep, "run every combination of --grid values as DVC experiments"),
        ("retrain", cmd_retrain, "ingest the inbox, version data, retrain, promote"),
        ("serve", cmd_serve, "serve the retraining flow on a cron schedule"),
    ):
        p = sub.add_parser(name, help=helptext)
        if name == "stage":
            p.add_argument("name")
        if name == "serve":
            p.add_argument("--cron", required=True, help='e.g. "0 3 * * 1" (Mondays 03:00)')
            p.add_argument("--name", default="qlora-retrain", help="deployment name")
        if name in ("run", "sweep"):
            p.add_argument("--name", default=None, help="DVC experiment name (sweeps: prefix)")
        if name == "sweep":
            p.add_argument(
                "--grid",
                action="append",
                required=True,
                metavar="KEY=V1,V2",
                help="values of one params key (repeatable: every combination runs)",
            )
        else:
            p.add_argument(
                "--set",
                action="append",
                default=[],
                metavar="KEY=VALUE",
                help="set a params.yaml value, e.g. --set train.lr=1e-4 (repeatable); run: "
                "as a DVC experiment (`dvc exp run -S` semantics)",
            )
        if name in ("run", "retrain"):
            p.add_argument(
                "--allow-unverified-data",
                action="store_true",
                help="run on data that is not its committed DVC version; recorded as unverified",
            )
        p.add_argument("--wait", action="store_true", help="wait for a command already holding the project")
        p.add_argument(
            "-v", "--verbose", action="store_true", help="library notices too (deprecations, optional kernels)"
        )
        p.set_defaults(fn=fn)
    p = sub.add_parser("lineage", help="what data, code and settings produced a registered model")
    p.add_argument("model", help="NAME[@alias] or NAME/VERSION (default alias: champion)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--verify", action="store_true", help="re-hash the data on disk against the record")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--card", action="store_true", help="print the version's model card (rendered from these facts)")
    p.set_defaults(fn=cmd_lineage)
    p = sub.add_parser("predict", help="batch predictions of a registered model version or a model folder")
    p.add_argument(
        "--model",
        required=True,
        help="models:/NAME@champion, models:/NAME/VERSION, or a folder "
        "(models/merged, models/adapter, a downloaded version)",
    )
    p.add_argument(
        "--input",
        required=True,
        help="rows to predict: CSV, JSONL, JSON or parquet, with the training "
        "data's columns (the label column optional)",
    )
    p.add_argument("--output", required=True, help="predictions: .jsonl or .csv (each row names the model version)")
    p.add_argument("--format", default="auto", choices=["auto", "csv", "jsonl", "json", "parquet"])
    p.add_argument(
        "--header",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CSV: the first line names the columns (default: as the training data)",
    )
    p.add_argument(
        "--columns",
        default=None,
        help="CSV without a header: column names, comma-separated (default: the training data's data.columns)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: the model's eval.batch_size")
    p.add_argument("--max-new-tokens", type=int, default=None, help="causal_lm (default: eval.max_new_tokens)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--tracking-uri", default=None)
    p.set_defaults(fn=cmd_predict)
    p = sub.add_parser("status", help="what is stale, the champion, the last retraining tick, what was interrupted")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_status)
    for name, fn, helptext in (
        ("dvc-yaml", cmd_dvc_yaml, "print (or --write) dvc.yaml rendered from flows/dvc/stages.py"),
        (
            "params",
            cmd_params,
            "print params.yaml (--write: it and docs/reference/params.md) rendered from tasks/config.py",
        ),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--write", action="store_true")
        p.set_defaults(fn=fn)
    args = ap.parse_args(argv)
    if getattr(args, "verbose", False):
        os.environ[VERBOSE_ENV] = "1"  # before configure_env, and inherited by the stages
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
