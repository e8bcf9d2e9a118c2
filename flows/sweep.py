"""`qlora sweep --grid lora.r=8,16 --grid train.lr=1e-3,2e-3`: every combination as a DVC
experiment, one after another in the workspace, inside one Prefect flow.

Why workspace experiments run in turn rather than DVC's queue: the queue runs each point in
a fresh temporary copy of the repository, so nothing upstream would be shared unless it
came back through the run cache, and its celery workers run outside Prefect's view. In the
workspace the points share the upstream stages directly (DVC skips tokenize and quantize
after the first point: only train, evaluate and merge run again), every stage stays a
visible Prefect task, and on a machine with one accelerator (or 2 CPU cores) parallel
points would only compete for it. Each point is saved with `dvc exp save`, so `dvc exp
show` lists them and `dvc exp apply NAME` restores the winner. MLflow gets one parent run
with a child run per point; the comparison is printed, written as CSV and PNG, and logged.
"""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

from prefect import flow, get_run_logger

from flows.dvc import dvc_ops
from flows.pipeline import Project, qlora_pipeline
from flows.tracking import mlflow_record
from tasks import catalog
from tasks.common import PipelineError, read_json
from tasks.config import load_params


def parse_grid(grid: list[str]) -> list[list[str]]:
    """['lora.r=8,16', 'train.lr=1e-3,2e-3'] -> the 4 override lists, first key slowest."""
    axes = []
    for item in grid:
        if "=" not in item:
            raise PipelineError(f"--grid {item!r}: expected KEY=V1,V2,...")
        key, values = item.split("=", 1)
        axes.append([f"{key.strip()}={v.strip()}" for v in values.split(",") if v.strip()])
    return [list(point) for point in itertools.product(*axes)]


def plot_comparison(rows: list[dict], keys: list[str], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [", ".join(f"{k.split('.')[-1]}={r[k]}" for k in keys) for r in rows]
    values = [r.get(metric) or 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(rows)), 3.5), dpi=110)
    bars = ax.bar(range(len(rows)), values, color="#4c72b0")
    ax.bar_label(bars, fmt="%.4f", fontsize=8)
    ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(f"Sweep: {metric} per point")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@flow(name="qlora-sweep")
def sweep_flow(project: Project, grid: list[str], name: str) -> dict:
    logger = get_run_logger()
    root = project.root
    points = parse_grid(grid)
    baseline_params = (root / dvc_ops.PARAMS_FILE).read_bytes()
    for point in points:  # every point must be valid before the first one runs
        load_params(root / dvc_ops.PARAMS_FILE, point)
    keys = [p.split("=", 1)[0] for p in points[0]]
    params = project.params()
    mlflow, _, _ = mlflow_record.use_store(params, root)
    out_dir = root / catalog.SWEEPS_DIR / name
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with mlflow.start_run(run_name=name, tags={"qlora_kind": "sweep", "sweep_grid": " ".join(grid)}) as parent:
        for i, point in enumerate(points, start=1):
            (root / dvc_ops.PARAMS_FILE).write_bytes(baseline_params)
            dvc_ops.apply_params(root, point)
            logger.info(f"point {i}/{len(points)}: {', '.join(point)}")
            out = qlora_pipeline(
                project, experiment=True, experiment_name=f"{name}-{i}", parent_run_id=parent.info.run_id
            )
            metrics = read_json(root / catalog.METRICS)
            rows.append(
                {
                    **{p.split("=", 1)[0]: p.split("=", 1)[1] for p in point},
                    "experiment": out.experiment.name,
                    "mlflow_run": out.mlflow["run_id"],
                    "ran": " ".join(n for n, s in out.stages.items() if s.ran),
                    **{k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                }
            )
        metric = (
            params.retrain.metric
            if params.retrain.metric in rows[0]
            else next(k for k in rows[0] if k not in keys and isinstance(rows[0][k], float))
        )
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with open(out_dir / "comparison.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows(rows)
        plot_comparison(rows, keys, metric, out_dir / "comparison.png")
        mlflow.log_artifacts(str(out_dir), "sweep")
        best = (
            max(rows, key=lambda r: r.get(metric, float("-inf")))
            if params.retrain.greater_is_better
            else min(rows, key=lambda r: r.get(metric, float("inf")))
        )
        mlflow.set_tags({"sweep_best_experiment": best["experiment"], "sweep_metric": metric})
    return {
        "rows": rows,
        "columns": columns,
        "metric": metric,
        "best": best,
        "parent_run_id": parent.info.run_id,
        "dir": str(out_dir),
        "baseline_params": baseline_params.decode(),
    }
