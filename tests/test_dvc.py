"""One DAG, one cache, one record: dvc.yaml is the rendering of flows/dvc/stages.py, and `qlora run`
and `dvc repro` agree on what is up to date because both go through DVC (dvc.lock)."""

import hashlib
import json
import modulefinder
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from flows.cli import main as qlora_main
from flows.dvc.dvc_ops import md5
from flows.dvc.stages import BY_NAME, STAGE_RUNNER, STAGE_SCRIPT, STAGES, render_dvc_yaml
from tasks import catalog
from tasks.config import Params, load_params
from tests.conftest import REPO, env, git, make_project, repo_params, small_cls_params, write_params


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
                "persist": all(o.persist for o in s.outs),
            }
    return view


def flow_view(params_path: Path) -> dict:
    params = load_params(params_path)
    return {
        s.name: {
            "cmd": f"bin/qlora stage {s.name}",
            "deps": s.data_deps(params) + s.code_deps(),
            "params": list(s.params),
            "outs": sorted(s.outs + s.metrics),
            "persist": True,
        }
        for s in STAGES
    }


def test_dvc_yaml_and_flow_agree_on_stages_deps_params_outs():
    assert dvc_view(REPO) == flow_view(REPO / "params.yaml")


def test_dvc_yaml_is_the_rendering_of_the_flow(capsys):
    qlora_main(["dvc-yaml"])
    assert capsys.readouterr().out == (REPO / "dvc.yaml").read_text()


def modules_a_stage_runs(root: Path, module: str) -> set[str]:
    """Every project module the stage's process can import, found by the standard library's
    modulefinder, which scans the bytecode of every function: an oracle that shares no code with
    flows/dvc/code_deps.py, which renders the deps."""
    finder = modulefinder.ModuleFinder(path=[str(root)])  # the project only: libraries are not walked
    for entry in (STAGE_RUNNER, module):
        finder.import_hook(entry)
    return {str(Path(m.__file__).relative_to(root)) for m in finder.modules.values() if m.__file__}


def not_dependencies(root: Path) -> dict[str, list[str]]:
    """Per stage of root's dvc.yaml: the modules it runs that no dependency covers (file or folder)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, entry in stages.items():
        deps = [d.rstrip("/") for d in entry["deps"]]
        uncovered = sorted(
            m
            for m in modules_a_stage_runs(root, BY_NAME[name].module) | {STAGE_SCRIPT}
            if not any(m == d or m.startswith(d + "/") for d in deps)
        )
        if uncovered:
            missing[name] = uncovered
    return missing


def test_every_module_a_stage_runs_is_a_dvc_dependency_of_that_stage():
    assert not_dependencies(REPO) == {}
    deps = {name: entry["deps"] for name, entry in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items()}
    # the modules the hand-written lists missed, as the record must now name them
    assert {
        "tasks/fast/ops/nf4_triton.py",
        "tasks/fast/ops/swiglu_lora.py",
        "tasks/fast/ops/layer_checkpoint.py",
        "tasks/training/flat_optim.py",
        "tasks/tokenize.py",
        "schemas/messages.py",
        "tasks/__init__.py",
    } <= set(deps["train"])
    assert {"tasks/serve/predict.py", "tasks/validate.py", "tasks/data/readers.py", "tasks/data/rowhash.py"} <= set(
        deps["evaluate"]
    )
    assert "tasks/fast/ops/nf4_triton.py" not in deps["evaluate"] + deps["tokenize"]  # never wider than it needs to be
    for entry in deps.values():
        assert "bin/qlora" in entry and "flows/dvc/stage_command.py" in entry and "flows/cli.py" not in entry


def _copy_code(dest: Path) -> Path:
    for folder in ("tasks", "flows", "schemas", "bin"):
        shutil.copytree(REPO / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("params.yaml", "dvc.yaml"):
        shutil.copy2(REPO / f, dest / f)
    return dest


def test_an_import_added_anywhere_fails_until_dvc_yaml_is_rendered_again(tmp_path):
    """The check walks the source: a new module imported inside a function of train, or an existing
    module newly imported by evaluate's code, is missing from the committed dvc.yaml until
    `qlora dvc-yaml --write` renders it again, and the stage refuses to run meanwhile."""
    root = _copy_code(tmp_path / "code")
    (root / "tasks/new_module.py").write_text("VALUE = 1\n")
    with open(root / "tasks/train.py", "a") as f:
        f.write("\n\ndef _uses_a_new_module():\n    from tasks import new_module\n    return new_module.VALUE\n")
    predict = next(root.glob("tasks/**/predict.py")).relative_to(root)
    with open(root / predict, "a") as f:
        f.write(
            "\n\ndef _uses_a_kernel():\n    import tasks.fast.ops.nf4_triton\n    return tasks.fast.ops.nf4_triton\n"
        )
    kernel = str(next(root.glob("tasks/**/nf4_triton.py")).relative_to(root))
    missing = not_dependencies(root)
    assert missing["train"] == ["tasks/new_module.py"] and kernel in missing["evaluate"]
    # with the kernel come the __init__.py files of its packages, which run before it, and the
    # kernel modules it imports itself
    kernels = str(Path(kernel).parent) + "/"
    assert all(m.startswith(kernels) or m.endswith("/__init__.py") for m in missing["evaluate"]), missing
    assert len(missing) == 2
    stage = subprocess.run(
        ["bin/qlora", "stage", "train"],
        cwd=root,
        env={**env(), "QLORA_PYTHON": sys.executable},
        capture_output=True,
        text=True,
    )
    assert stage.returncode == 2 and "qlora dvc-yaml --write" in stage.stderr, stage.stderr
    rendered = subprocess.run(
        [sys.executable, "-m", "flows.cli", "dvc-yaml", "--write"], cwd=root, env=env(), capture_output=True, text=True
    )
    assert rendered.returncode == 0, rendered.stderr
    assert not_dependencies(root) == {}
    assert "tasks/new_module.py" in yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["train"]["deps"]


def test_every_path_in_dvc_yaml_comes_from_the_catalog():
    names = {v for k, v in vars(catalog).items() if k.isupper() and isinstance(v, str)}
    for s in STAGES:
        for p in s.outs + s.metrics + tuple(d for d in s.deps if not d.startswith("${")):
            assert p in names, (s.name, p)


def test_a_local_base_model_directory_is_a_dvc_dependency(tmp_path):
    """model.name naming a local directory: tokenize and quantize depend on its files in
    dvc.yaml, and a stage refuses to run while dvc.yaml does not say so."""
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    params = Params.model_validate(repo_params(model={"name": str(model_dir)}))
    text = render_dvc_yaml(params)
    stages = yaml.safe_load(text)["stages"]
    assert "${model.name}" in stages["tokenize"]["deps"] and "${model.name}" in stages["quantize"]["deps"]
    assert "${model.name}" not in yaml.safe_load(render_dvc_yaml(Params()))["stages"]["quantize"]["deps"]
    project = tmp_path / "p"
    project.mkdir()
    write_params(project, repo_params(model={"name": str(model_dir)}))
    (project / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())  # rendered for the hub id
    p = subprocess.run(
        [sys.executable, "-m", "flows.cli", "stage", "quantize"], cwd=project, env=env(), capture_output=True, text=True
    )
    assert p.returncode == 2 and "qlora dvc-yaml --write" in p.stderr, p.stderr


def test_raw_dataset_is_tracked_by_dvc():
    meta = yaml.safe_load((REPO / "data/raw/ag_news.dvc").read_text())
    assert meta["outs"][0]["path"] == "ag_news" and meta["outs"][0]["md5"].endswith(".dir")
    assert load_params(REPO / "params.yaml").data.path.startswith("data/raw/ag_news/")
    assert "/data/raw/ag_news" in (REPO / ".gitignore").read_text().split()
    assert "/data/inbox/" in (REPO / ".gitignore").read_text().split()


def _run(cmd: list, cwd: Path, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, **kw)
    return p


@pytest.mark.slow
def test_dvc_repro_as_the_readme_says_then_qlora_run_runs_nothing(tmp_path, agnews_small):
    """A fresh clone after `make setup`: `.venv/bin/dvc repro` with nothing activated (PATH
    without the venv) runs every stage; then `qlora run` runs no stage and loads no model, and
    records the result in MLflow once; `dvc status` is up to date throughout."""
    root = make_project(tmp_path / "project", small_cls_params(agnews_small))
    first = _run([".venv/bin/dvc", "repro"], root)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for s in STAGES:
        assert f"Running stage '{s.name}'" in first.stdout, first.stdout
    assert (root / "models/merged/model.safetensors").exists()
    lock_before = (root / "dvc.lock").read_bytes()
    outputs_before = {str(p.relative_to(root)): p.stat().st_mtime_ns for p in (root / "models").rglob("*")}
    run = _run([".venv/bin/qlora", "run"], root)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for s in STAGES:
        assert f"  {s.name:<9} skipped" in run.stdout, run.stdout
    assert "Running stage" not in run.stdout + run.stderr  # no stage ran: no stage loaded a model
    assert (root / "dvc.lock").read_bytes() == lock_before
    assert {str(p.relative_to(root)): p.stat().st_mtime_ns for p in (root / "models").rglob("*")} == outputs_before
    # (Recording this first result registers a model version, and MLflow loads that model once to
    # check its input example serves: the only model load, and only the first time.)
    run_id = run.stdout.split("mlflow:   run ")[1].split()[0]
    again = _run([".venv/bin/qlora", "run"], root)
    assert f"run {run_id} at" in again.stdout and "already holds these outputs" in again.stdout, again.stdout
    assert "Loading weights" not in again.stderr and "Running stage" not in again.stdout + again.stderr
    status = _run([".venv/bin/dvc", "status"], root)
    assert "up to date" in status.stdout, status.stdout
    assert "accuracy" in _run([".venv/bin/dvc", "metrics", "show"], root).stdout


@pytest.mark.slow
def test_qlora_run_set_is_a_dvc_experiment(tmp_path, agnews_small):
    """`qlora run --set lora.r=8` follows `dvc exp run -S`: params.yaml keeps the value, the run is
    saved as an experiment that `dvc exp show` lists with its params and metrics, the MLflow run
    carries its name and commit, and `dvc exp apply` brings it back."""
    root = make_project(tmp_path / "project", small_cls_params(agnews_small))
    base = _run([".venv/bin/qlora", "run"], root)
    assert base.returncode == 0, base.stdout[-3000:] + base.stderr[-3000:]
    exp = _run([".venv/bin/qlora", "run", "--set", "lora.r=8", "--name", "rank8"], root)
    assert exp.returncode == 0, exp.stdout[-3000:] + exp.stderr[-3000:]
    assert "params.yaml: set lora.r=8" in exp.stdout and "dvc exp run -S" in exp.stdout
    assert yaml.safe_load((root / "params.yaml").read_text())["lora"]["r"] == 8
    ran = [line.split()[0] for line in exp.stdout.splitlines() if line.startswith("  ") and " ran " in line + " "]
    assert ran == ["train", "evaluate", "merge"], exp.stdout
    shown = json.loads(_run([".venv/bin/dvc", "exp", "show", "--json"], root).stdout)
    exps = [e for b in shown for e in (b.get("experiments") or [])]
    rank8 = [e for e in exps if e.get("name") == "rank8"]
    assert rank8, shown
    data = rank8[0]["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["lora"]["r"] == 8
    assert 0 <= data["metrics"][catalog.METRICS]["data"]["accuracy"] <= 1
    rev = data["rev"]
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlruns.db'}")
    run_id = exp.stdout.split("mlflow:   run ")[1].split()[0]
    tags = mlflow.tracking.MlflowClient().get_run(run_id).data.tags
    assert tags["dvc_experiment"] == "rank8" and tags["dvc_experiment_rev"] == rev
    assert "up to date" in _run([".venv/bin/dvc", "status"], root).stdout
    # back to the baseline params, then apply the experiment: params and outputs return
    subprocess.run(["git", "checkout", "params.yaml"], cwd=root, check=True)
    applied = _run([".venv/bin/dvc", "exp", "apply", "rank8"], root)
    assert applied.returncode == 0, applied.stderr
    assert yaml.safe_load((root / "params.yaml").read_text())["lora"]["r"] == 8
    assert json.loads((root / "models/adapter/adapter_config.json").read_text())["r"] == 8


@pytest.mark.slow
def test_an_edited_kernel_reruns_exactly_its_stages_and_the_record_names_the_new_code(tmp_path, agnews_small):
    """On a pipeline that has run: a one-line edit to the NF4 kernel module makes `dvc status`
    report exactly the stages that import it; committed and rerun, `qlora run` runs those (and
    whatever DVC finds downstream of a changed output), skips the rest, and the new run's
    git_commit, its dvc.lock digest and `qlora lineage --verify` agree with the code that trained it."""
    root = make_project(tmp_path / "project", small_cls_params(agnews_small))
    first = _run([".venv/bin/qlora", "run"], root)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    kernel = next(root.glob("tasks/**/nf4_triton.py"))
    kernel_path = str(kernel.relative_to(root))
    kernel.write_text(kernel.read_text() + "\n# a comment: the code differs, its behaviour does not\n")
    importers = {s.name for s in STAGES if kernel_path in s.code_deps()}
    assert importers == {"train"}
    status = _run([".venv/bin/dvc", "status", "--json"], root)
    assert set(json.loads(status.stdout)) == importers, status.stdout
    dry = _run([".venv/bin/dvc", "repro", "--dry"], root).stdout
    would_run = {s.name for s in STAGES if f"Running stage '{s.name}'" in dry}
    assert importers <= would_run and not would_run & {"validate", "split", "tokenize", "quantize"}, dry

    git(root, "commit", "-qam", "kernel: a comment")
    head = git(root, "rev-parse", "HEAD").strip()
    rerun = _run([".venv/bin/qlora", "run"], root)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    for name in ("validate", "split", "tokenize", "quantize"):
        assert f"  {name:<9} skipped" in rerun.stdout, rerun.stdout
    assert "  train     ran" in rerun.stdout, rerun.stdout
    assert "up to date" in _run([".venv/bin/dvc", "status"], root).stdout

    locked = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["train"]["deps"]
    assert {d["path"]: d["md5"] for d in locked}[kernel_path] == hashlib.md5(kernel.read_bytes()).hexdigest()
    committed_kernel = subprocess.run(
        ["git", "show", f"{head}:{kernel_path}"], cwd=root, capture_output=True, check=True
    ).stdout
    assert committed_kernel == kernel.read_bytes()
    run_id = rerun.stdout.split("mlflow:   run ")[1].split()[0]
    assert run_id != first.stdout.split("mlflow:   run ")[1].split()[0]
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlruns.db'}")
    tags = mlflow.tracking.MlflowClient().get_run(run_id).data.tags
    assert tags["git_commit"] == head and tags["git_dirty"] == "False", tags
    assert tags["dvc_lock_sha256"] == hashlib.sha256((root / "dvc.lock").read_bytes()).hexdigest()
    version = rerun.stdout.split("(model version ")[1].split(")")[0]
    verify = _run([".venv/bin/qlora", "lineage", f"qlora-flow-agnews/{version}", "--verify", "--json"], root)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    record = json.loads(verify.stdout)
    # a comment changes no weight: the run names the version that already holds these weights (one
    # version per weights), whose own lineage names the run and commit that first produced them
    assert record["verify"]["ok"] and tags["registered_model_version"] == f"qlora-flow-agnews/{version}"
    assert record["lineage"]["git_commit"] in (head, git(root, "rev-parse", "HEAD~1").strip())
    assert (
        md5(root / catalog.ADAPTER_DIR)
        == {o["path"]: o["md5"] for o in yaml.safe_load((root / "dvc.lock").read_text())["stages"]["train"]["outs"]}[
            catalog.ADAPTER_DIR
        ]
    )
