"""The longest sequence a recipe trains at batch 1 on one GPU: doubling the length from a start
until a step fails, then bisecting between the longest that trained and the shortest that did not.

Each recipe runs in worker processes (gpu_qlora_bench.py --trial-worker for the project's,
unsloth_reference.py --serve for Unsloth's) that load the model once and then train one trial a
length read from stdin: one warm-up step (for the project's compiled layers, the recompile for a
new length) and one timed step, printing one JSON line (tokens/s, peak memory) or, on running out
of memory, that line and their exit. The next trial then starts in a new process: an allocator
that ran out of memory may be left fragmented. A length that fails in a worker that trained other
lengths before is tried once more in a fresh one, so that what earlier trials left behind does not
decide it. A trial that outlasts its time limit ends the search: it says nothing about memory.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time

import torch


def trial(step, vocab: int, seq: int) -> dict:
    """One length in a worker: `step(ids)` (forward, backward, optimizer step; returns the loss)
    twice on batch 1 of `seq` random tokens; the second step's tokens/s and the peak memory."""
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        ids = torch.randint(0, vocab, (1, seq), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = step(ids)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        row = {
            "seq": seq,
            "tokens_per_s": round(seq / times[1], 1),
            "step_s": round(times[1], 3),
            "first_step_s": round(times[0], 2),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "loss": round(float(loss), 5),
        }
    except torch.OutOfMemoryError as exc:
        row = {"seq": seq, "oom": True, "error": str(exc).splitlines()[0][:300]}
    return row


def serve(step, vocab: int) -> int:
    """A worker's loop: a length a line from stdin, one JSON line a trial on stdout; exits after
    the first that runs out of memory."""
    for line in sys.stdin:
        if not line.strip():
            continue
        row = trial(step, vocab, int(line))
        print(json.dumps(row), flush=True)
        if row.get("oom"):
            return 0
    return 0


class Worker:
    """A worker process, asked one length at a time."""

    def __init__(self, cmd: list, env: dict, log: str):
        self.log = open(log, "a")
        self.proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1
        )
        self.trials = 0

    def ask(self, seq: int, timeout: float) -> dict:
        self.trials += 1
        try:
            self.proc.stdin.write(f"{seq}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return {"seq": seq, "error": "the worker had exited"}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            line = self.proc.stdout.readline()
            if not line:  # exited: killed for memory by the host, or crashed
                return {"seq": seq, "error": f"the worker exited (rc {self.proc.wait()})"}
            if line.startswith("{") and '"seq"' in line:
                return json.loads(line)
        self.close()
        return {"seq": seq, "timeout": True, "error": f"no result within {timeout:.0f} s"}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def search(cmd: list, env: dict, start: int, cap: int, resolution: int, trial_timeout: float, budget: float) -> dict:
    """Doubling from `start` up to `cap`, then bisecting to `resolution` tokens, within `budget`
    seconds (no new trial after it); the longest length that trained, its tokens/s and peak, the
    shortest that did not, and every trial."""
    began = time.monotonic()
    log = tempfile.NamedTemporaryFile(prefix="long_context_", suffix=".log", delete=False).name
    env = {**env, "PYTORCH_CUDA_ALLOC_CONF": env.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")}
    rows, worker = [], None

    def run(seq: int) -> dict:
        nonlocal worker
        if worker is None:
            worker = Worker(cmd, env, log)
        row = worker.ask(seq, trial_timeout)
        fresh = worker.trials == 1
        if not ("tokens_per_s" in row or row.get("timeout")):
            worker.close()
            worker = None
            if row.get("oom") and not fresh:  # once more where no earlier trial ran
                worker = Worker(cmd, env, log)
                row = {**worker.ask(seq, trial_timeout), "retried_fresh": True}
                if "tokens_per_s" not in row:
                    worker.close()
                    worker = None
        rows.append(row)
        print(json.dumps({"trial": True, **row}), flush=True)
        return row

    longest, failing, stopped = None, None, ""
    try:
        longest, failing, stopped = _double_then_bisect(run, start, cap, resolution, began, budget)
    finally:  # a search cut short (the caller's time limit) leaves no worker holding the GPU
        if worker is not None:
            worker.close()
    if failing and failing.get("timeout"):
        stopped = "a trial's time limit"
    elif not failing and not stopped:
        stopped = f"the cap ({cap})"
    tail = open(log).read()[-1500:] if longest is None else ""
    return {
        "longest_seq": longest["seq"] if longest else None,
        "tokens_per_s_at_longest": longest["tokens_per_s"] if longest else None,
        "peak_gib_at_longest": longest["peak_gib"] if longest else None,
        "shortest_failing_seq": failing["seq"] if failing else None,
        "failing_because": (
            "out of memory" if failing and failing.get("oom") else (failing or {}).get("error") if failing else None
        ),
        "stopped_by": stopped or "bisection done",
        "seconds": round(time.monotonic() - began, 1),
        "trials": rows,
        **({"log_tail": tail} if tail else {}),
        "log": log,
    }


def env_with(site: str) -> dict:
    """This process's environment with `site` first on PYTHONPATH."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH", "")]))}


def _double_then_bisect(run, start: int, cap: int, resolution: int, began: float, budget: float) -> tuple:
    """The search itself: (the longest row that trained, the shortest that did not, what stopped it early)."""
    longest, failing, stopped = None, None, ""
    seq = start
    while seq <= cap:
        if time.monotonic() - began > budget:
            stopped = "time budget"
            break
        row = run(seq)
        if "tokens_per_s" in row:
            longest, seq = row, seq * 2
        else:
            failing = row
            break
    while longest and failing and not failing.get("timeout") and failing["seq"] - longest["seq"] > resolution:
        if time.monotonic() - began > budget:
            stopped = "time budget"
            break
        mid = (longest["seq"] + failing["seq"]) // 2 // resolution * resolution
        row = run(mid)
        if "tokens_per_s" in row:
            longest = row
        else:
            failing = row
            if row.get("timeout"):
                break
    return longest, failing, stopped
