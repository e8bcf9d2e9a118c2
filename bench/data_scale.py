"""Wall time and peak memory of the data stages (validate, split, tokenize) at 100k, 1M and
10M rows, each stage run as users run it: `bin/qlora stage NAME --set data.path=...` in a
scratch copy of the project, one process tree per stage.

Inputs are built from the shared AG News rows (7,600), made unique by a counter appended to
the description, ~255 bytes a row. Peak RSS is sampled every 50 ms
over the stage's whole process tree (the stage and its Dataset.map workers, summed: file
pages a worker maps count once per process, so this overstates rather than understates),
and also reported as the kernel's high-water mark of the largest single process.

    python bench/data_scale.py --rows 100000 1000000 10000000 --out bench/results/data_scale.jsonl
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
AG_NEWS = REPO.parent / "shared" / "datasets" / "ag_news" / "test.csv"
STAGES = ("validate", "split", "tokenize")


def build_input(rows: int, dest: Path) -> Path:
    """AG News rows repeated, each made unique: '<description> (copy N)'."""
    path = dest / f"ag_news_{rows}.csv"
    if path.exists():
        return path
    with open(AG_NEWS, newline="") as f:
        base = list(csv.reader(f))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        for i in range(rows):
            label, title, desc = base[i % len(base)]
            w.writerow([label, title, f"{desc} (copy {i // len(base)})"])
    tmp.rename(path)
    return path


def scratch_project(dest: Path) -> Path:
    """The repository's files (as git lists them) in a fresh folder, with the venv linked."""
    if dest.exists():
        shutil.rmtree(dest)
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dest / f)
    (dest / ".venv").symlink_to(REPO / ".venv")
    return dest


def run_stage(project: Path, stage: str, data: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "QLORA_", "MLFLOW_"))}
    started = time.perf_counter()
    proc = psutil.Popen(
        [str(project / "bin/qlora"), "stage", stage, "--set", f"data.path={data}"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peak = [0]

    def sample():
        while proc.poll() is None:
            try:
                tree = [proc] + proc.children(recursive=True)
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.stdout.read()
    code = proc.wait()
    wall = time.perf_counter() - started
    sampler.join()
    if code != 0:
        raise SystemExit(f"{stage} failed ({code}):\n{out[-3000:]}")
    return {
        "stage": stage,
        "wall_s": round(wall, 1),
        "peak_tree_rss_gb": round(peak[0] / 1e9, 2),
        "max_process_rss_gb": round(children_maxrss() / 1e9, 2),
    }


def children_maxrss() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux; max over all children so far


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    ap.add_argument("--work", type=Path, default=Path("/tmp/qlora-data-scale"))
    ap.add_argument("--out", type=Path, default=None, help="append the JSON lines here")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.node()}: {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB"
    lines = [
        {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": machine,
            "commit": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
            ).stdout.strip(),
        }
    ]
    print(json.dumps(lines[0]), flush=True)
    for rows in args.rows:
        data = build_input(rows, args.work)
        project = scratch_project(args.work / "project")
        for stage in STAGES:
            # ru_maxrss of children is a running maximum: a fresh one per stage needs a fresh parent
            res = subprocess.run(
                [sys.executable, __file__, "--one-stage", stage, str(project), str(data)],
                capture_output=True,
                text=True,
            )
            if res.returncode != 0:
                raise SystemExit(res.stdout + res.stderr)
            line = {"rows": rows, "csv_mb": round(data.stat().st_size / 1e6), **json.loads(res.stdout.splitlines()[-1])}
            lines.append(line)
            print(json.dumps(line), flush=True)
        shutil.rmtree(project)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(x) + "\n" for x in lines)
    print("\n| rows | stage | wall s | peak RSS, process tree (GB) | largest process (GB) |")
    print("| --- | --- | --- | --- | --- |")
    for x in lines[1:]:
        print(f"| {x['rows']:,} | {x['stage']} | {x['wall_s']} | {x['peak_tree_rss_gb']} | {x['max_process_rss_gb']} |")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--one-stage":
        print(json.dumps(run_stage(Path(sys.argv[3]), sys.argv[2], Path(sys.argv[4]))))
    else:
        main()
