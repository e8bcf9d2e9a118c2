"""Chat data (tasks/data/chat.py, schemas/messages.py): the messages contract, rendering with the
model's chat template, and the loss on every assistant turn and nothing else, checked token by
token on the tiny Llama with a chat template set here."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from tasks import catalog, split, validate
from tasks.catalog import IGNORE_INDEX as IGNORE
from tasks.common import PipelineError
from tasks.config import Params
from tasks.data import chat
from tasks.data.arrowio import open_rows
from tasks.data.readers import read_raw
from tasks.tokenize import encode_instructions
from tests.conftest import ALPACA, SELF_INSTRUCT, repo_params
from tests.tiny_llm import CHAT_TEMPLATE, build_tiny_chat_llama

THREE_TURNS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Add two and two."},
    {"role": "assistant", "content": "Four."},
]


@pytest.fixture(scope="module")
def tiny_chat_llama(tmp_path_factory):
    return build_tiny_chat_llama(tmp_path_factory.mktemp("tiny-chat-llama"), ALPACA)


@pytest.fixture(scope="module")
def tok(tiny_chat_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_chat_llama)
    assert tok.chat_template == CHAT_TEMPLATE
    return tok


def expected_by_pieces(tok, messages):
    """The oracle, built without chat.py: the template's pieces tokenized one by one (each piece
    boundary is a pre-tokenizer boundary here), labelled by who wrote them: an assistant's content,
    its EOS and the newline that closes its turn carry the loss; headers, system and user text do not."""
    pieces = [(tok.bos_token, False)]
    for m in messages:
        mine = m["role"] == "assistant"
        pieces += [(f"<|{m['role']}|>\n", False), (m["content"], mine)]
        pieces += [(tok.eos_token, True)] if mine else []
        pieces += [("\n", mine)]
    ids, labels = [], []
    for text, mine in pieces:
        part = tok(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if mine else [IGNORE] * len(part)
    return ids, labels


def show(tok, ids, labels) -> str:
    """The label mask as text: [token] carries the loss, bare tokens do not."""
    return " ".join(
        f"[{tok.decode([i])}]" if lab != IGNORE else tok.decode([i]) for i, lab in zip(ids, labels)
    ).replace("\n", "\\n")


def test_three_turn_conversation_label_mask_token_by_token(tok):
    ids, labels, cut = chat.encode_conversation(tok, THREE_TURNS, 512, "model")
    print("\n" + show(tok, ids, labels))
    want_ids, want_labels = expected_by_pieces(tok, THREE_TURNS)
    assert not cut
    assert ids == want_ids  # and these are the template's own tokens:
    assert ids == list(tok.apply_chat_template(THREE_TURNS, tokenize=True, return_dict=True)["input_ids"])
    for k, (got, want) in enumerate(zip(labels, want_labels)):
        assert got == want, f"token {k} {tok.decode([ids[k]])!r}: label {got}, expected {want}"
    # the labelled tokens are exactly the three answers, each with the EOS that ends it
    runs, run = [], []
    for i, lab in zip(ids + [0], labels + [IGNORE]):
        if lab != IGNORE:
            run.append(i)
        elif run:
            runs.append(tok.decode(run))
            run = []
    assert runs == ["Blue.</s>\n", "Red.</s>\n", "Four.</s>\n"]


def test_self_instruct_seed_label_mask_token_by_token(tok):
    """Every Self-Instruct seed instance as a user + assistant conversation: mask as the oracle says."""
    df = read_raw(SELF_INSTRUCT)
    assert len(df) == 175  # one instance per seed task (rows named line.instance)
    for ins, inp, out, row in zip(df["instruction"], df["input"], df["output"], df["_row"]):
        msgs = chat.from_instruction(ins.strip(), (inp or "").strip(), out.strip())
        ids, labels, cut = chat.encode_conversation(tok, msgs, 4096, "model")
        want_ids, want_labels = expected_by_pieces(tok, msgs)
        assert (ids, labels) == (want_ids, want_labels), f"row {row}"
        assert tok.decode([i for i in labels if i != IGNORE]) == out.strip() + tok.eos_token + "\n"


@pytest.mark.parametrize("template", ["alpaca", "chatml", "plain"])
def test_hand_templates_match_the_instruction_path_and_label_every_turn(tok, template):
    row = {"instruction": ["Add two and two."], "input": [""], "output": ["Four."]}
    encoded = encode_instructions(row, tok, 256, template)
    ids, labels, _ = chat.encode_conversation(
        tok, chat.from_instruction("Add two and two.", "", "Four."), 256, template
    )
    assert ids == encoded["input_ids"][0] and labels == encoded["labels"][0]
    ids, labels, _ = chat.encode_conversation(tok, THREE_TURNS, 512, template)
    answers = tok.decode([i for i in labels if i != IGNORE])
    assert answers == "Blue.</s>Red.</s>Four.</s>"
    prompt_text = tok.decode([i for i, lab in zip(ids, labels) if lab == IGNORE])
    assert all(m["content"] in prompt_text for m in THREE_TURNS if m["role"] != "assistant")


def test_truncation_cuts_later_turns_and_says_so(tok):
    ids, labels, cut = chat.encode_conversation(tok, THREE_TURNS, 20, "model")
    assert cut and len(ids) == len(labels) == 20


def test_a_template_that_rewrites_earlier_turns_is_refused(tok):
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(tok.name_or_path)
    # renders only the last assistant turn's content in full: earlier turns change as the conversation grows
    other.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ '<|a|>x\n' }}"
        "{% else %}{{ '<|' + m['role'] + '|>' + m['content'] + '\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    with pytest.raises(PipelineError, match="chat_template_prefix"):
        chat.encode_conversation(other, THREE_TURNS, 512, "model")
    other.chat_template = None
    with pytest.raises(PipelineError, match="no chat template"):
        chat.encode_conversation(other, THREE_TURNS, 512, "model")


def chat_params(path, **data) -> Params:
    return Params.model_validate(
        repo_params(task="causal_lm", data={"path": str(path), "format": "auto", "label_names": None, **data})
    )


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_openai_sharegpt_and_nested_parquet_layouts_validate_to_the_same_rows(tmp_path):
    convs = [
        [("user", f"Question {i}?"), ("assistant", f"Answer {i}."), ("user", "And?"), ("assistant", "Done.")]
        for i in range(3)
    ]
    openai = _jsonl(
        tmp_path / "openai.jsonl", [{"messages": [{"role": r, "content": c} for r, c in conv]} for conv in convs]
    )
    sharegpt = _jsonl(
        tmp_path / "sharegpt.jsonl",
        [
            {"conversations": [{"from": {"user": "human", "assistant": "gpt"}[r], "value": c} for r, c in conv]}
            for conv in convs
        ],
    )
    # The same conversations as nested parquet (list<struct<role, content>>), as hub exports store them.
    nested = tmp_path / "openai.parquet"
    pd.DataFrame({"messages": [[{"role": r, "content": c} for r, c in conv] for conv in convs]}).to_parquet(nested)
    out = {}
    for name, path in (("openai", openai), ("sharegpt", sharegpt), ("parquet", nested)):
        validate.run(chat_params(path), tmp_path / name)
        out[name] = open_rows(tmp_path / name / catalog.VALIDATED_ROWS).to_pandas().drop(columns="source")
    assert out["openai"].to_dict("records") == out["sharegpt"].to_dict("records") == out["parquet"].to_dict("records")
    assert json.loads(out["openai"]["messages"][1])[0] == {"role": "user", "content": "Question 1?"}


def test_bad_conversations_are_named_by_row_and_rule(tmp_path):
    good = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    rows = [
        good,
        {"messages": [{"role": "robot", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
        {"messages": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "  "}]},
        {
            "messages": [
                {"role": "user", "content": "A?"},
                {"role": "user", "content": "B?"},
                {"role": "assistant", "content": "C."},
            ]
        },
        {"messages": [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Only a question?"}]},
        {"messages": "hello"},
        {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Another answer."}]},
    ]
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(PipelineError) as exc:
        validate.run(chat_params(path), tmp_path)
    report = json.loads((tmp_path / "reports/validation.json").read_text())
    found = {(e["row"], e["rule"]) for e in report["errors"]}
    assert found == {
        ("2", "roles_known"),
        ("3", "content_not_empty"),
        ("4", "turns_alternate"),
        ("5", "has_assistant_turn"),
        ("6", "messages_format"),
        ("7", "unique_rows"),
    }
    assert all(e["file"] == str(path) for e in report["errors"])
    assert "row 5, column messages: rule has_assistant_turn" in str(exc.value)
    assert not (tmp_path / "data/validated").exists()


def test_chat_rows_split_without_leaking_a_prompt(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]}
        for i in range(40)
    ]
    params = chat_params(_jsonl(tmp_path / "chat.jsonl", rows))
    validate.run(params, tmp_path)
    res = split.run(params, tmp_path)
    assert res.summary == {"train": 32, "validation": 4, "test": 4}
    parts = {s: open_rows(tmp_path / catalog.split_file(catalog.SPLIT_DIR, s)).to_pandas() for s in ("train", "test")}
    assert not set(parts["train"]["prompt_key"]) & set(parts["test"]["prompt_key"])
    # the hash split hashes the prompt too: rows never move as data grows
    hashed = chat_params(tmp_path / "chat.jsonl").model_copy(
        update={"split": Params().split.model_copy(update={"method": "hash"})}
    )
    res = split.run(hashed, tmp_path)
    assert sum(res.summary.values()) == 40


def test_packed_multi_turn_rows_give_the_unpacked_loss(tiny_chat_llama, tok):
    """Multi-turn rows packed into one row: the same loss as padded, over assistant tokens only."""
    from transformers import AutoModelForCausalLM

    from tasks.data.batching import collate, collate_packed, pack_bins

    convs = [THREE_TURNS, THREE_TURNS[1:3], THREE_TURNS[:5], THREE_TURNS[3:]]
    from datasets import Dataset

    enc = [chat.encode_conversation(tok, c, 256, "model") for c in convs]
    frame = Dataset.from_dict({"input_ids": [e[0] for e in enc], "labels": [e[1] for e in enc]})
    lengths = [len(e[0]) for e in enc]
    bins = pack_bins(list(range(len(convs))), lengths, max_length=sum(lengths))
    assert len(bins) == 1
    model = AutoModelForCausalLM.from_pretrained(
        tiny_chat_llama, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    with torch.no_grad():
        unpacked = model(**collate(frame[:], tok.pad_token_id, "causal_lm"), use_cache=False).loss
        batch, _ = collate_packed(frame, bins, tok.pad_token_id)
        packed = model(**batch, use_cache=False).loss
    assert abs(packed.item() - unpacked.item()) < 1e-4
    labelled = tok.decode([i for i in batch["labels"][0].tolist() if i != IGNORE])
    assert (
        labelled
        == "Blue.</s>\nRed.</s>\nFour.</s>\n" + "Blue.</s>\n" + "Blue.</s>\nRed.</s>\n" + "Red.</s>\nFour.</s>\n"
    )


def test_the_generation_prompt_of_a_multi_turn_row_ends_before_its_last_answer(tok):
    from tasks.model.generation import split_last_turn

    ids, labels, _ = chat.encode_conversation(tok, THREE_TURNS, 512, "model")
    prompt, reference = split_last_turn(ids, labels)
    assert tok.decode(reference) == "Four.</s>\n"
    # everything before it, the earlier answers included: what the model is given at inference
    assert prompt == chat.prompt_ids(tok, THREE_TURNS[:-1], "model")
    assert "Blue." in tok.decode(prompt) and "Red." in tok.decode(prompt)


def test_generation_scores_and_batched_equals_one_by_one(tiny_chat_llama, tok):
    from transformers import AutoModelForCausalLM

    from tasks.model.generation import evaluate_generation, exact_match, generate, rouge_l

    assert exact_match(" Four. ", "four.") == 1.0 and exact_match("Five.", "Four.") == 0.0
    assert rouge_l("the cat sat", "the cat sat down") == pytest.approx(2 * 1 * 0.75 / 1.75)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_llama, dtype=torch.float32).eval()
    convs = [THREE_TURNS, THREE_TURNS[1:3], THREE_TURNS[:5]]
    prompts = [chat.prompt_ids(tok, c[:-1], "model") for c in convs]
    batched = generate(model, tok, prompts, 6, 3, torch.device("cpu"))
    single = [generate(model, tok, [p], 6, 1, torch.device("cpu"))[0] for p in prompts]
    assert batched == single and all(len(g) <= 6 for g in batched)
    enc = [chat.encode_conversation(tok, c, 256, "model") for c in convs]
    rows = pd.DataFrame({"input_ids": [e[0] for e in enc], "labels": [e[1] for e in enc], "row": ["1", "2", "3"]})
    metrics, samples = evaluate_generation(model, tok, rows, 2, 6, 8, torch.device("cpu"))
    assert metrics["generated_rows"] == 2 and [s["reference"] for s in samples] == ["Four.", "Blue."]
    assert samples[0]["generated"] == tok.decode(single[0], skip_special_tokens=True).strip()
    assert metrics["rougeL"] == pytest.approx(sum(s["rougeL"] for s in samples) / 2)


@pytest.mark.slow
def test_messages_jsonl_trains_end_to_end(tmp_path, tiny_chat_llama):
    """Two-turn OpenAI-layout conversations (made of Alpaca rows) through the real flow with the
    model's chat template: validation curve, generation metrics, samples table in MLflow."""
    import mlflow

    from flows.pipeline import Project, qlora_pipeline
    from tests.conftest import make_project
    from tests.test_causal_lm import causal_params

    alpaca = [r for r in json.loads(ALPACA.read_text()) if len(r["instruction"] + r["input"] + r["output"]) < 300]
    convs = []
    for a, b in zip(alpaca[0::2], alpaca[1::2]):
        convs.append(
            {
                "messages": [{"role": "system", "content": "Answer briefly."}]
                + [
                    {"role": role, "content": text}
                    for r in (a, b)
                    for role, text in (
                        ("user", r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")),
                        ("assistant", r["output"]),
                    )
                ]
            }
        )
    data = _jsonl(tmp_path / "chat.jsonl", convs)
    raw = causal_params(tiny_chat_llama)
    raw["data"].update(path=str(data))
    raw["tokenize"].update(template="model", max_length=512)
    raw["train"].update(max_steps=4, eval_every=2, batch_size=4)
    raw["eval"].update(max_new_tokens=4, max_generate_rows=4)
    raw["tracking"].update(registered_model="tiny-chat")
    root = make_project(tmp_path / "project", raw)
    out = qlora_pipeline(Project(root=root))
    assert all(s.ran for s in out.stages.values())
    stats = json.loads((root / "data/tokenized/stats.json").read_text())
    assert sum(v["rows"] for v in stats["splits"].values()) == len(convs) >= 20
    assert all(v["truncated_rows"] == 0 and v["rows_without_answer_tokens"] == 0 for v in stats["splits"].values())
    curve = pd.read_csv(root / "reports/train/validation.csv")
    assert curve["step"].tolist() == [2, 4]
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert (
        metrics["generated_rows"] == min(4, stats["splits"]["test"]["rows"]) >= 2
        and 0 <= metrics["rougeL"] <= 1
        and 0 <= metrics["exact_match"] <= 1
    )
    samples = [json.loads(x) for x in (root / "reports/eval/samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all(s["prompt"].count("<|assistant|>") == 2 for s in samples)  # turn 1 answered
    mlflow.set_tracking_uri(out.mlflow["tracking_uri"])
    client = mlflow.tracking.MlflowClient()
    run_id = out.mlflow["run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [2, 4]
    assert "test_rougeL" in client.get_run(run_id).data.metrics
    assert "eval/samples_table.json" in {a.path for a in client.list_artifacts(run_id, "eval")}


def _sharegpt(conv: dict) -> dict:
    roles = {"user": "human", "assistant": "gpt"}
    return {
        "conversations": [{"from": roles.get(m["role"], m["role"]), "value": m["content"]} for m in conv["messages"]]
    }


def test_a_chat_drop_is_merged_in_the_datasets_layout_without_its_known_prompts(tmp_path):
    """Ingest of a JSONL chat drop: new conversations are appended as OpenAI messages lists (a
    ShareGPT file's rewritten so), and a conversation whose prompt the dataset has is skipped,
    whatever its answer (a chat row's identity is its prompt, as validate judges duplicates)."""
    from tasks.data.ingest import ingest

    def conv(i, answer=None):
        return {
            "messages": [
                {"role": "user", "content": f"Question {i}?"},
                {"role": "assistant", "content": answer or f"A{i}."},
            ]
        }

    data = tmp_path / "data/raw/chat/data.jsonl"
    data.parent.mkdir(parents=True)
    _jsonl(data, [conv(i) for i in range(6)])
    inbox = tmp_path / "data/inbox"
    inbox.mkdir(parents=True)
    _jsonl(inbox / "1-openai.jsonl", [conv(6), conv(2, "Another answer."), conv(7)])
    _jsonl(inbox / "2-sharegpt.jsonl", [_sharegpt(conv(8)), _sharegpt(conv(6))])
    params = chat_params("data/raw/chat/data.jsonl", format="jsonl", layout="messages").model_copy(
        update={"retrain": Params().retrain.model_copy(update={"settle_seconds": 0})}
    )
    got = ingest(params, tmp_path, inbox)
    assert got.status == "merged" and got.added_rows == 3
    assert {(Path(s["file"]).name, s["row"]) for s in got.skipped_duplicates} == {
        ("1-openai.jsonl", "2"),
        ("2-sharegpt.jsonl", "2"),
    }
    lines = [json.loads(x) for x in data.read_text().splitlines()]
    assert lines == [conv(i) for i in range(9)]


@pytest.mark.slow
def test_a_chat_drop_retrains_and_the_champion_is_decided_on_exact_match(tmp_path, tiny_chat_llama):
    """New conversations dropped in the inbox as JSONL (OpenAI messages; one file in ShareGPT's
    layout) go through `qlora retrain`'s flow as a CSV drop does: rows merged in the raw dataset's
    layout, duplicates of its prompts skipped, a new DVC data version committed, a model version
    registered with its exact match, and the champion decision made on that same score."""
    import mlflow
    import yaml

    from flows.retrain import retrain_flow
    from tests.conftest import git, make_project
    from tests.test_causal_lm import causal_params

    def conv(r):
        user = r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]}

    alpaca = [r for r in json.loads(ALPACA.read_text()) if len(r["instruction"] + r["input"] + r["output"]) < 200]
    seed, new = [conv(r) for r in alpaca[:26]], [conv(r) for r in alpaca[26:42]]
    data = "data/raw/chat/data.jsonl"
    raw = causal_params(tiny_chat_llama)
    raw["data"].update(path=data, format="jsonl", layout="messages")
    raw["split"]["method"] = "hash"
    raw["tokenize"].update(template="model", max_length=128)
    raw["train"].update(max_steps=2, batch_size=4)
    raw["eval"].update(max_new_tokens=4, max_generate_rows=4, num_samples=2)
    raw["tracking"].update(registered_model="tiny-chat-retrain", experiment="chat-retrain")
    raw["retrain"].update(metric="exact_match", settle_seconds=0)
    root = make_project(tmp_path / "project", raw)
    (root / data).parent.mkdir(parents=True)
    _jsonl(root / data, seed)
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "remote", "add", "-d", "local", "../remote"], cwd=root, check=True, capture_output=True)
    subprocess.run([*dvc, "add", "-q", "data/raw/chat"], cwd=root, check=True, capture_output=True)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "seed conversations")
    seed_md5 = yaml.safe_load((root / "data/raw/chat.dvc").read_text())["outs"][0]["md5"]
    inbox = root / "data/inbox"
    inbox.mkdir(parents=True)
    _jsonl(inbox / "1-openai.jsonl", new[:12] + seed[:3])  # 3 prompts the dataset has: skipped
    _jsonl(inbox / "2-sharegpt.jsonl", [_sharegpt(c) for c in new[12:]])

    out = retrain_flow(str(root))
    assert out["status"] == "trained", out
    assert out["ingest"]["added_rows"] == 16 and len(out["ingest"]["skipped_duplicates"]) == 3
    lines = [json.loads(x) for x in (root / data).read_text().splitlines()]
    assert (
        len(new) == 16 and len(lines) == 42 and lines[26:] == new
    )  # appended as OpenAI messages lists, ShareGPT rows rewritten
    assert out["data"]["md5"] != seed_md5 and out["data"]["git_commit"]
    assert git(root, "log", "-1", "--format=%H", "--", "data/raw/chat.dvc").strip() == out["data"]["git_commit"]
    metrics = json.loads((root / "reports/metrics.json").read_text())
    assert metrics["generated_rows"] >= 2 and 0 <= metrics["exact_match"] <= 1
    client = mlflow.tracking.MlflowClient(f"sqlite:///{root / 'mlruns.db'}")
    version = client.get_model_version("tiny-chat-retrain", out["pipeline"]["model_version"])
    test_em = client.get_run(version.run_id).data.metrics["test_exact_match"]
    d = out["decision"]
    assert d["metric"] == "exact_match" and d["challenger_version"] == str(version.version)
    assert d["challenger_score"] == test_em == pytest.approx(metrics["exact_match"])
    assert d["promoted"] and d["reason"] == "no champion yet"
    assert version.tags["champion_decision"] == "promoted"
    assert float(version.tags["test_exact_match_at_registration"]) == test_em
    assert client.get_model_version_by_alias("tiny-chat-retrain", "champion").version == version.version

    # a second drop: the new version is judged against the champion, both scored by exact match
    # on the same (grown) test split
    longer = [
        r for r in json.loads(ALPACA.read_text()) if 200 <= len(r["instruction"] + r["input"] + r["output"]) < 320
    ]
    more = [conv(r) for r in longer]
    _jsonl(inbox / "3-openai.jsonl", more)
    again = retrain_flow(str(root))
    assert again["status"] == "trained" and again["ingest"]["added_rows"] == len(more) == 12, again
    d2, v2 = again["decision"], str(again["pipeline"]["model_version"])
    assert d2["metric"] == "exact_match" and (d2["champion_version"], d2["challenger_version"]) == (
        str(version.version),
        v2,
    )
    v2_run = client.get_model_version("tiny-chat-retrain", v2).run_id
    assert d2["challenger_score"] == client.get_run(v2_run).data.metrics["test_exact_match"]
    assert 0 <= d2["champion_score"] <= 1 and d2["promoted"] == (d2["challenger_score"] > d2["champion_score"])
    assert f"champion v{version.version} exact_match=" in d2["reason"]
    champion = str(client.get_model_version_by_alias("tiny-chat-retrain", "champion").version)
    assert champion == (v2 if d2["promoted"] else str(version.version))
