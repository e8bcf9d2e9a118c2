"""Load on the served champion: `mlflow models serve -m models:/NAME@champion` on a loopback
port, under a bounded number of concurrent clients (each has one request in flight at a time)
for a fixed time, then stopped. Prints p50/p99 latency, throughput and the error count.

The project is --project (its tracking store, params.yaml's tracking settings); with none,
a scratch copy of this repository is made and a tiny classifier trained and registered
there first (`qlora run`, 400 AG News rows, 16 steps), and its version made champion.
Requests are real AG News rows the model never saw, one row per request (--rows-per-request).

    python bench/serve_load.py --clients 8 --seconds 120 --out bench/results/serve_load_cpu2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parent.parent
AG_NEWS = REPO.parent / "shared" / "datasets" / "ag_news" / "test.csv"
sys.path[:0] = [str(REPO), str(REPO / "bench")]
from data_scale import scratch_project  # noqa: E402

from tasks.serve.model_server import ServerDidNotAnswer, model_server  # noqa: E402


def _env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "QLORA_", "MLFLOW_"))}
    env.update(
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DVC_NO_ANALYTICS="1",
        PYTHONUNBUFFERED="1",
        PATH=f"{REPO / '.venv/bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return env | (extra or {})


def tiny_champion(dest: Path, name: str) -> Path:
    """A scratch project with a tiny classifier trained, registered and made champion."""
    root = scratch_project(dest / "project")
    data = dest / "news.csv"
    ag = pd.read_csv(AG_NEWS, header=None, dtype=str, keep_default_na=False)
    ag.groupby(0, group_keys=False).head(100).to_csv(data, header=False, index=False)
    (dest / "shared").symlink_to(REPO.parent / "shared")  # where the repository expects ../shared
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["path"] = str(data)
    raw["tokenize"]["max_length"] = 48
    raw["train"].update(max_steps=16, batch_size=16, lr=0.003, log_every=1)
    raw["eval"]["batch_size"] = 64
    raw["tracking"]["registered_model"] = name
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (root / "data/raw/ag_news.dvc").unlink(missing_ok=True)
    git = ["git", "-c", "user.email=bench@qlora", "-c", "user.name=bench"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "bench project"]):
        subprocess.run(git + args, cwd=root, check=True, capture_output=True)
    run = subprocess.run([str(root / ".venv/bin/qlora"), "run"], cwd=root, env=_env(), capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"qlora run failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    version = run.stdout.split("(model version ")[1].split(")")[0]
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlruns.db'}")
    mlflow.tracking.MlflowClient().set_registered_model_alias(name, "champion", version)
    return root


def load(url: str, bodies: list[bytes], clients: int, seconds: float) -> dict:
    """`clients` threads, each sending its next request when the last one answered, until the time is up."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(i: int) -> None:
        n = i
        while time.perf_counter() < stop_at:
            body = bodies[n % len(bodies)]
            n += clients
            req = urllib.request.Request(url + "/invocations", data=body, headers={"Content-Type": "application/json"})
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    ok = r.status == 200 and "predictions" in json.loads(r.read())
                    problem = None if ok else f"status {r.status}"
            except Exception as exc:  # an HTTP error, a timeout, a refused connection: all count
                problem = f"{type(exc).__name__}: {exc}"
            dt = time.perf_counter() - t0
            with lock:
                if problem:
                    errors.append(problem)
                else:
                    latencies.append(dt)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else [float("nan")] * 99
    return {
        "requests": len(latencies) + len(errors),
        "ok": len(latencies),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(latencies) / wall, 2),
        "latency_ms": {
            "p50": round(q[49] * 1000, 1),
            "p90": round(q[89] * 1000, 1),
            "p99": round(q[98] * 1000, 1),
            "mean": round(statistics.fmean(latencies) * 1000, 1) if latencies else None,
            "max": round(max(latencies) * 1000, 1) if latencies else None,
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", type=Path, default=None, help="a project with a champion (default: train one)")
    ap.add_argument("--model", default="serve-load", help="registered model name")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--rows-per-request", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="append the result as a JSON line")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qlora-serve-load-"))
    t0 = time.perf_counter()
    root = args.project.resolve() if args.project else tiny_champion(work, args.model)
    setup_s = time.perf_counter() - t0
    raw = yaml.safe_load((root / "params.yaml").read_text())
    tracking_uri = raw["tracking"].get("tracking_uri") or f"sqlite:///{root / 'mlruns.db'}"
    name = raw["tracking"]["registered_model"] if args.project else args.model
    ag = pd.read_csv(AG_NEWS, header=None, dtype=str, keep_default_na=False).iloc[4000:4400]  # not trained on
    k = args.rows_per_request
    bodies = [
        json.dumps(
            {"dataframe_split": {"columns": ["title", "description"], "data": ag.iloc[i : i + k, 1:3].values.tolist()}}
        ).encode()
        for i in range(0, len(ag) - k + 1, k)
    ]
    env = _env({"MLFLOW_TRACKING_URI": tracking_uri})
    try:
        with model_server(
            REPO / ".venv/bin/mlflow", f"models:/{name}@champion", root, env, work / "serve.log", 300
        ) as url:
            load(url, bodies[:2], 1, 0.1)  # warm-up: the first request loads lazily held state
            result = load(url, bodies, args.clients, args.seconds)
    except ServerDidNotAnswer as exc:
        sys.exit(str(exc))
    result = {
        "bench": "serve_load",
        "model": f"models:/{name}@champion",
        "clients": args.clients,
        "seconds": args.seconds,
        "rows_per_request": k,
        **result,
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "setup_s": round(setup_s, 1),
        "date": time.strftime("%Y-%m-%d"),
    }
    lat = result["latency_ms"]
    print(
        f"serve_load: {result['clients']} clients x {args.seconds:.0f} s on {url} ({os.cpu_count()} CPUs): "
        f"{result['ok']} ok, {result['errors']} errors; {result['throughput_rps']} req/s; "
        f"latency p50 {lat['p50']} ms, p99 {lat['p99']} ms (mean {lat['mean']}, max {lat['max']})"
    )
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
