"""What the pipeline prints of each stage: a line when DVC is about to run it, a line when it ends
(ran or skipped, its seconds, the key figures of the files it wrote), and the train stage's steps
while it trains: a bar on a terminal, a line per tenth of the run's steps elsewhere (CI, a file),
where a redrawn bar would be hundreds of lines.

The figures are read from the files each stage writes (tasks/catalog.py), so a skipped stage
shows the figures of the outputs it keeps. The steps come from catalog.TRAIN_STEPS_LIVE, read as
flows/tracking/live.py reads it for MLflow.
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from flows.console import verbose
from flows.tracking.live import StepTail
from tasks import catalog

NAME_WIDTH = 9  # the longest stage name, "quantize"/"evaluate", and a space


def _read(root: Path, rel: str) -> dict:
    from tasks.common import read_json

    path = Path(root) / rel
    return read_json(path) if path.exists() else {}


def _num(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def figures(root: Path, stage: str) -> str:
    """The key figures of a stage's outputs as they are on disk; "" when it wrote none of them."""
    root = Path(root)
    if stage == "validate":
        r = _read(root, catalog.VALIDATION_REPORT)
        if not r:
            return ""
        return (
            f"{r.get('valid_rows')} of {r.get('rows')} rows valid, "
            f"{len(r.get('dropped_duplicates') or [])} duplicates dropped"
        )
    if stage == "split":
        from tasks.data.arrowio import count_rows

        counts = [
            f"{name} {count_rows(root / catalog.split_file(catalog.SPLIT_DIR, name))}"
            for name in catalog.SPLITS
            if (root / catalog.split_file(catalog.SPLIT_DIR, name)).exists()
        ]
        return f"rows: {', '.join(counts)}" if counts else ""
    if stage == "tokenize":
        r = _read(root, catalog.TOKENIZE_STATS)
        splits = r.get("splits") or {}
        if not splits:
            return ""
        truncated = ", ".join(
            f"{n} {splits[n].get('truncated_rows', 0)}/{splits[n].get('rows')}" for n in catalog.SPLITS if n in splits
        )
        return f"max_length {r.get('max_length')}, rows truncated: {truncated}"
    if stage == "quantize":
        r = _read(root, catalog.BASE_LINEAGE)
        if not r:
            return ""
        return (
            f"{r.get('base_model')}: {r.get('linear4bit_modules')} layers in 4 bits, "
            f"{r.get('footprint_bytes', 0) / 2**20:.1f} MiB"
        )
    if stage == "train":
        r = _read(root, catalog.TRAIN_SUMMARY)
        if not r:
            return ""
        parts = [f"{r.get('steps')} steps", f"final loss {_num(r.get('final_loss'))}"]
        if r.get("final_val_loss") is not None:
            parts.append(f"val_loss {_num(r['final_val_loss'])}")
        if r.get("tokens_per_second"):
            parts.append(f"{r['tokens_per_second']:.0f} tokens/s")
        return ", ".join(parts)
    if stage == "evaluate":
        r = _read(root, catalog.METRICS)
        if not r:
            return ""
        scores = ", ".join(f"{k} {_num(v)}" for k, v in r.items() if isinstance(v, (int, float)) and k != "rows")
        return f"{r.get('split', 'test')} ({r.get('rows')} rows): {scores}"
    if stage == "merge":
        r = _read(root, f"{catalog.MERGED_DIR}/merge.json")
        return f"{catalog.MERGED_DIR} ({r['dtype']})" if r.get("dtype") else ""
    return ""


def _why(root: Path, stage: str, changes: list[str]) -> str:
    """What DVC found changed, short ("changed deps data/split: modified" -> "data/split modified",
    a params file's entry -> the params), or that dvc.lock has no record of the stage yet."""
    import ast

    from flows.dvc import dvc_ops

    if stage not in dvc_ops.lock(root).get("stages", {}):
        return "no record in dvc.lock yet"
    named = []
    for change in changes:
        what, _, state = change.partition(": ")
        path = what.split(" ", 2)[-1] if what.startswith("changed ") else what
        if state.startswith("{"):  # a params file: {name: new value or state}
            try:
                named += [f"params {name} {value}" for name, value in ast.literal_eval(state).items()]
                continue
            except (ValueError, SyntaxError):
                pass
        named.append(f"{path} {state}".strip())
    shown = ", ".join(named[:3]) + (f" (+{len(named) - 3} more)" if len(named) > 3 else "")
    return shown or "DVC finds it changed"


class StageLines:
    """The console lines of one pipeline run. On a terminal (and not -v, where the stages print
    to the console themselves) the train stage shows a rich progress bar that disappears when it
    ends; its end line stays."""

    def __init__(self, root: Path, stream=None):
        self.root = Path(root)
        self.stream = stream or sys.stdout
        self.bar = bool(getattr(self.stream, "isatty", lambda: False)()) and not verbose()

    def _print(self, stage: str, text: str) -> None:
        print(f"  {stage:<{NAME_WIDTH}} {text}", file=self.stream, flush=True)

    def started(self, stage: str, why: list[str]) -> None:
        self._print(stage, f"started: {_why(self.root, stage, why)}")

    def ended(self, stage: str, ran: bool, seconds: float) -> None:
        facts = figures(self.root, stage)
        status = f"ran in {seconds:.1f} s" if ran else f"skipped in {seconds:.1f} s (up to date in dvc.lock)"
        self._print(stage, status + (f": {facts}" if facts else ""))

    def failed(self, stage: str, seconds: float) -> None:
        self._print(stage, f"failed after {seconds:.1f} s")

    @contextmanager
    def train_steps(self, every_s: float = 0.5):
        """While the train stage runs: its steps from catalog.TRAIN_STEPS_LIVE, as they are written."""
        tail = StepTail(self.root / catalog.TRAIN_STEPS_LIVE, from_end=True)
        stop = threading.Event()
        show = self._bar() if self.bar else self._lines()
        next(show)

        def follow():
            while True:
                last = stop.wait(every_s)
                try:
                    rows = tail.read()
                except (OSError, ValueError):  # a line the stage is still writing is read the next time
                    rows = []
                for row in rows:
                    if "loss" in row and "step" in row:
                        show.send(row)
                if last:
                    return

        thread = threading.Thread(target=follow, name="train-steps", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            show.close()

    def _lines(self):
        """A line each time the step passes a tenth of the run; the last step always has one."""
        shown = 0
        while True:
            row = yield
            total = row.get("total_steps") or 0
            tenth = row["step"] * 10 // total if total else row["step"]
            if tenth > shown:
                shown = tenth
                self._print("train", f"step {row['step']}{f'/{total}' if total else ''}, loss {row['loss']:.4f}")

    def _bar(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(
            TextColumn(f"  {'train':<{NAME_WIDTH}}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps, loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            console=Console(file=self.stream),
            transient=True,
        )
        task = progress.add_task("train", total=None, loss="-")
        progress.start()
        try:
            while True:
                row = yield
                progress.update(
                    task, completed=row["step"], total=row.get("total_steps") or None, loss=f"{row['loss']:.4f}"
                )
        finally:
            progress.stop()
