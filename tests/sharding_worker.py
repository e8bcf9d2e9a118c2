"""One rank of a torchrun training for tests/test_sharding.py, without the flow's imports:
train.run on the project in the working directory, checkpoints named by a resume key.
`--keep-checkpoints` leaves them after the adapter is saved (a run to resume from)."""

import sys
from pathlib import Path

from tasks import train
from tasks.config import load_params
from tasks.training import checkpoint

if __name__ == "__main__":
    key = sys.argv[1]
    if "--keep-checkpoints" in sys.argv:
        checkpoint.clear = lambda ckpt_dir: None
    root = Path.cwd()
    res = train.run(load_params(root / "params.yaml"), root, resume_key=key)
    print("train:", res.summary, flush=True)
