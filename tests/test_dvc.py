"""dvc.yaml and the Prefect flow describe one DAG; `dvc repro` reproduces it, twice = no-op."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.cli import main as qlora_main
from flows.stages import STAGES
from tasks.config import load_params
from tests.conftest import REPO, small_cls_params, write_params


def dvc_view(repo_dir: Path) -> dict:
    """What DVC itself parses from dvc.yaml (templates resolved against params.yaml)."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo
    view = {}
    with Repo(str(repo_dir)) as repo:
        for s in repo.index.stages:
            if not getattr(s, "name", None):
                continue  # .dvc files (the raw dataset) are not pipeline stages
            view[s.name] = {
                "cmd": s.cmd,
                "deps": [d.def_path for d in s.deps if not isinstance(d, ParamsDependency)],
                "params": [p for d in s.deps if isinstance(d, ParamsDependency) for p in d.params],
                "outs": sorted(o.def_path for o in s.outs),
            }
    return view


def flow_view(params_path: Path) -> dict:
    params = load_params(params_path)
    return {s.name: {"cmd": f"qlora stage {s.name}", "deps": s.data_deps(params) + list(s.all_code()),
                     "params": list(s.params), "outs": sorted(s.outs + s.metrics)} for s in STAGES}


def test_dvc_yaml_and_flow_agree_on_stages_deps_params_outs():
    assert dvc_view(REPO) == flow_view(REPO / "params.yaml")


def test_dvc_yaml_is_the_rendering_of_the_flow(capsys):
    qlora_main(["dvc-yaml"])
    assert capsys.readouterr().out == (REPO / "dvc.yaml").read_text()


def test_raw_dataset_is_tracked_by_dvc():
    meta = yaml.safe_load((REPO / "data/raw/ag_news.dvc").read_text())
    assert meta["outs"][0]["path"] == "ag_news" and meta["outs"][0]["md5"].endswith(".dir")
    assert load_params(REPO / "params.yaml").data.path.startswith("data/raw/ag_news/")
    assert "/data/raw/ag_news" in (REPO / ".gitignore").read_text().split()


@pytest.mark.slow
def test_dvc_repro_runs_the_stages_then_does_nothing(tmp_path, agnews_small):
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, tmp_path / f)
    write_params(tmp_path, small_cls_params(agnews_small))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, env=env)

    def dvc(*args) -> str:
        p = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout + p.stderr

    first = dvc("repro")
    for s in STAGES:
        assert f"Running stage '{s.name}'" in first, first
    assert (tmp_path / "models/merged/model.safetensors").exists()
    assert (tmp_path / "dvc.lock").exists()
    second = dvc("repro")
    assert "Running stage" not in second, second
    assert "up to date" in dvc("status", "dvc.yaml")
    metrics = dvc("metrics", "show")
    assert "accuracy" in metrics
