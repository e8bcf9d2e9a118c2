"""What `qlora run` and `qlora retrain` print, read as a user reads it: a line per stage when it
starts and ends, the train stage's steps (a bar on a terminal, plain lines elsewhere), every line
once, one error line naming a log file that holds the whole log and the traceback, and what a
retraining did with the inbox."""

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flows.dvc.stages import STAGES
from flows.stage_lines import StageLines
from tasks import catalog
from tests.conftest import env, git, make_project, small_cls_params

NAMES = [s.name for s in STAGES]


def _qlora(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([".venv/bin/qlora", *args], cwd=root, env=env(), capture_output=True, text=True, timeout=900)


def _stage_lines(stdout: str) -> list[tuple[str, str]]:
    """(stage, what) of each stage line, in order."""
    return [
        (line.split()[0], line.split(None, 1)[1])
        for line in stdout.splitlines()
        if line.startswith("  ") and line.split() and line.split()[0] in NAMES
    ]


def _log_named(text: str) -> Path:
    return Path(re.search(r"(\.qlora/logs/\S+\.log)", text).group(1))


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [False, True])
def test_train_steps_show_as_a_bar_on_a_terminal_and_as_plain_lines_elsewhere(tmp_path, terminal):
    """The steps the train stage appends to its step file while it runs: on a terminal a rich bar
    (step of total steps, loss) that is gone once training ends; elsewhere a line per tenth of the
    run. Rows an earlier run left in the file are not shown."""
    import time

    steps = tmp_path / catalog.TRAIN_STEPS_LIVE
    steps.parent.mkdir(parents=True)
    steps.write_text(json.dumps({"step": 7, "loss": 9.0, "total_steps": 7}) + "\n")  # an earlier run's
    stream = _Terminal() if terminal else io.StringIO()
    lines = StageLines(tmp_path, stream)
    with lines.train_steps(every_s=0.05):
        for step in range(1, 21):
            with open(steps, "a") as f:
                f.write(json.dumps({"step": step, "epoch": 0, "loss": 2 - step / 20, "total_steps": 20}) + "\n")
            if step == 10:
                with open(steps, "a") as f:  # a validation row carries no loss: not a step to show
                    f.write(json.dumps({"step": 10, "val_loss": 1.5, "total_steps": 20}) + "\n")
            time.sleep(0.02)
    out = stream.getvalue()
    assert "9.0000" not in out and "7/7" not in out
    if terminal:
        assert "20/20" in out and "loss 1.0000" in out, out
        assert "\x1b[" in out  # drawn in place, with terminal control codes
    else:
        assert out.splitlines() == [f"  train     step {2 * k}/20, loss {2 - 2 * k / 20:.4f}" for k in range(1, 11)], (
            out
        )


@pytest.mark.slow
def test_qlora_run_prints_each_stage_once_and_an_error_names_its_log(tmp_path, agnews_small):
    """A fresh clone's `qlora run` (not a terminal): each stage has a start line and an end line
    with its seconds and figures, the train stage a line per tenth of its steps; no line twice
    (DVC's "Running stage" lines only in the log file), no library notice, nothing on stderr. Then
    a bug in the evaluate stage's code: the run re-runs evaluate alone, prints the other stages as
    skipped, and ends in one error line naming the cause and a log file holding the traceback."""
    root = make_project(tmp_path / "project", small_cls_params(agnews_small))
    first = _qlora(root, "run")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stderr == "", first.stderr
    lines = [line for line in first.stdout.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), first.stdout  # no line printed twice
    assert "Running stage" not in first.stdout and "Finished in state" not in first.stdout
    shown = _stage_lines(first.stdout)
    for name in NAMES:
        mine = [what for stage, what in shown if stage == name and not what.startswith("step ")]
        assert len(mine) == 2 and mine[0] == "started: no record in dvc.lock yet", (name, first.stdout)
        assert re.match(r"ran in \d+\.\d s: \S", mine[1]), (name, first.stdout)
    assert [stage for stage, what in shown if what.startswith("ran in")] == NAMES  # in the DAG's order
    ended = {stage: what for stage, what in shown if what.startswith("ran in")}
    summary = json.loads((root / catalog.TRAIN_SUMMARY).read_text())
    metrics = json.loads((root / catalog.METRICS).read_text())
    assert ended["validate"].endswith(": 400 of 400 rows valid, 0 duplicates dropped")
    assert ended["split"].endswith(": rows: train 320, validation 40, test 40")
    assert f": 4 steps, final loss {summary['final_loss']:.4g}, " in ended["train"]
    assert ended["train"].endswith(f"{summary['tokens_per_second']:.0f} tokens/s")
    assert ended["evaluate"].endswith(
        f": test (40 rows): accuracy {metrics['accuracy']:.4g}, macro_f1 {metrics['macro_f1']:.4g}"
    )
    steps = [what for stage, what in shown if stage == "train" and what.startswith("step ")]
    assert steps and steps[-1].startswith("step 4/4, loss "), first.stdout
    log = root / _log_named(first.stdout)
    text = log.read_text()
    assert text.count("Running stage 'train'") == 1  # DVC's line, once, in the file
    assert "train: steps=4," in text  # the stage's own output

    evaluate = root / "tasks/evaluate.py"
    code = evaluate.read_text()
    head = "def run(params: Params, root: Path) -> StageResult:\n"
    evaluate.write_text(code.replace(head, head + "    raise ZeroDivisionError('a bug in evaluate')\n"))
    git(root, "commit", "-qam", "evaluate: a bug")
    broken = _qlora(root, "run")
    assert broken.returncode == 2, broken.stdout[-3000:] + broken.stderr[-3000:]
    shown = _stage_lines(broken.stdout)
    assert [s for s, what in shown if what.startswith("skipped in ")] == NAMES[:5], broken.stdout
    assert ("evaluate", "started: tasks/evaluate.py modified") in shown, broken.stdout
    assert any(s == "evaluate" and what.startswith("failed after ") for s, what in shown)
    errors = [line for line in broken.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, broken.stderr
    assert errors[0].startswith("qlora: error: stage evaluate: ZeroDivisionError: a bug in evaluate (full log: ")
    assert "Traceback" not in broken.stdout + broken.stderr
    log = _log_named(errors[0])
    assert errors[0].endswith(f"(full log: {log})") and log != _log_named(first.stdout)
    text = (root / log).read_text()
    assert "Traceback (most recent call last)" in text and "ZeroDivisionError: a bug in evaluate" in text


@pytest.mark.slow
def test_qlora_retrain_says_what_it_did_with_the_inbox(tmp_path):
    """An empty inbox and a drop of rows the dataset already has are both skipped, each saying
    why; a drop of a good file and a bad one: the rows added, the file rejected with its row and
    rule, the new data and model versions, and the champion decision."""
    import pandas as pd

    from tests.test_audit import owned_dataset_project

    root = owned_dataset_project(tmp_path / "project")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "remote", "add", "-d", "local", "../remote"], cwd=root, check=True, capture_output=True)
    git(root, "commit", "-qam", "dvc: a remote beside the project")
    empty = _qlora(root, "retrain")
    assert empty.returncode == 0, empty.stdout[-3000:] + empty.stderr[-3000:]
    assert "ingest: 0 file(s) taken from data/inbox: 0 rows added, 0 skipped, 0 file(s) rejected" in empty.stdout
    assert "retrain: skipped: data/inbox is empty; no data version, no training" in empty.stdout

    data = root / "data/raw/news/data.csv"
    known = pd.read_csv(data, header=None, dtype=str, keep_default_na=False)
    known.head(5).to_csv(root / "data/inbox/old.csv", header=False, index=False)
    dup = _qlora(root, "retrain")
    assert dup.returncode == 0, dup.stdout[-3000:] + dup.stderr[-3000:]
    assert re.search(r"accepted \S+old\.csv: 0 rows added, 5 skipped \(duplicates\)", dup.stdout), dup.stdout
    assert "ingest: 1 file(s) taken from data/inbox: 0 rows added, 5 skipped (5 already in the dataset)" in dup.stdout
    assert "retrain: skipped: every row of the drop is already in the dataset" in dup.stdout

    (root / "data/inbox/new.csv").write_text(
        '"1","A new world title","A new world body"\n"2","A new sports title","A new sports body"\n'
    )
    (root / "data/inbox/bad.csv").write_text('"9","A title","A body"\n')
    got = _qlora(root, "retrain")
    assert got.returncode == 0, got.stdout[-3000:] + got.stderr[-3000:]
    out = got.stdout
    assert re.search(r"accepted \S+new\.csv: 2 rows added, 0 skipped", out), out
    assert re.search(r"rejected \S+bad\.csv: row 1, column \S+: rule ", out), out
    assert "ingest: 2 file(s) taken from data/inbox: 2 rows added, 0 skipped, 1 file(s) rejected" in out
    assert re.search(
        r"retrain: trained: data version md5 [0-9a-f]{32}(\.dir)?, git commit [0-9a-f]{7}; model version 1 ", out
    )
    assert "champion: version 1 is the champion (no champion yet)" in out, out
    assert [s for s, what in _stage_lines(out) if what.startswith("ran in")] == NAMES, out
