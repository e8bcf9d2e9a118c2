import pytest

from tasks.config import Params, ParamsError, load_params
from tests.conftest import REPO, repo_params, write_params


def test_repo_params_load_with_every_section():
    p = load_params(REPO / "params.yaml")
    assert p.task == "seq_cls"
    assert p.quant.quant_type == "nf4" and p.quant.double_quant and p.quant.compute_dtype == "bfloat16"
    assert "classifier" in p.quant.skip_modules
    assert p.lora.target_modules == "all-linear"


def test_override_parses_yaml_values(tmp_path):
    path = write_params(tmp_path, repo_params())
    p = load_params(path, ["train.lr=1e-4", "lora.target_modules=[query, value]", "merge.enabled=false"])
    assert p.train.lr == 1e-4
    assert p.lora.target_modules == ["query", "value"]
    assert p.merge.enabled is False


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("lora.rr=8", "lora.rr", "did you mean 'r'"),
        ("trian.lr=1", "trian", "did you mean 'train'"),
        ("lora.r=0", "lora.r", "greater than 0"),
        ("train.lr=-1", "train.lr", "greater than 0"),
        ("train.batch_size=0", "train.batch_size", "greater than 0"),
        ("quant.quant_type=int3", "quant.quant_type", "'nf4' or 'fp4'"),
        ("train.epochs=lots", "train.epochs", "valid number"),
    ],
)
def test_bad_params_name_the_key(tmp_path, override, key, words):
    path = write_params(tmp_path, repo_params())
    with pytest.raises(ParamsError) as exc:
        load_params(path, [override])
    msg = str(exc.value)
    assert f"{key}:" in msg and words in msg, msg


def test_params_yaml_and_the_typed_defaults_are_one_source():
    """params.yaml is the rendering of tasks/config.py's defaults (`qlora params --write`), with
    every field's help text as a comment: the two cannot disagree."""
    from tasks.config import render_params_yaml

    text = (REPO / "params.yaml").read_text()
    assert text == render_params_yaml()
    assert load_params(REPO / "params.yaml") == Params()
    for section, field in Params.model_fields.items():
        sub = field.annotation
        fields = (
            sub.model_fields.items() if isinstance(sub, type) and hasattr(sub, "model_fields") else [(section, field)]
        )
        for key, f in fields:
            assert f.description, f"{section}.{key} has no help text"
            assert f.description.split()[0] in text


def test_params_reference_page_is_the_rendering_of_the_typed_defaults():
    """docs/reference/params.md is rendered from tasks/config.py like params.yaml (`qlora params
    --write` writes both): every key is a row with its default and its help text."""
    from tasks.config import render_params_doc

    text = (REPO / "docs" / "reference" / "params.md").read_text()
    assert text == render_params_doc()
    defaults = Params().model_dump(mode="json")
    for section, field in Params.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and hasattr(sub, "model_fields"):
            assert f"\n## {section}\n" in text
            for key in sub.model_fields:
                assert f"| `{section}.{key}` |" in text, f"{section}.{key} has no row"
        else:
            assert f"| `{section}` | `{defaults[section]}` |" in text
    assert "| `lora.r` | `16` |" in text


def test_set_changes_only_the_values_it_sets_in_params_yaml(tmp_path):
    """`--set` writes params.yaml through a YAML round trip: the diff is the changed lines alone,
    comments, flow lists and `null` stay as written, and the file reads back to the new values."""
    import difflib
    import shutil

    from flows.dvc.dvc_ops import apply_params
    from tasks.config import load_params

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    before = (tmp_path / "params.yaml").read_text().splitlines()
    apply_params(tmp_path, ["model.name=does/not-exist", "train.lr=2e-4", "data.columns=[a, b, c]"])
    after = (tmp_path / "params.yaml").read_text().splitlines()
    changed = [line for line in difflib.unified_diff(before, after, n=0, lineterm="") if line[:1] in "+-"]
    assert changed == [
        "--- ",
        "+++ ",
        "-  columns: [label, title, description]",
        "+  columns: [a, b, c]",
        "-  name: sentence-transformers/all-MiniLM-L6-v2",
        "+  name: does/not-exist",
        "-  lr: 0.002",
        "+  lr: 2e-4",
    ], changed
    params = load_params(tmp_path / "params.yaml")
    assert (params.model.name, params.train.lr, params.data.columns) == ("does/not-exist", 2e-4, ["a", "b", "c"])
    with pytest.raises(Exception, match="'seed' is not a section"):
        apply_params(tmp_path, ["seed.x=1"])
    assert (tmp_path / "params.yaml").read_text().splitlines() == after  # a refused override writes nothing
