#!/bin/bash
# Issue #28's GPU round in pieces, each sized for one device call (a 600 s limit): run from the
# repository root of a device machine, with the wheels (../.whl) and Unsloth's tarball
# (../.usite.tgz, or USITE=path) carried beside the checkout as ../shared/bench/README.md says.
# Everything a piece prints goes to $OUT as well; the benchmarks' JSON lines to $OUT/*.jsonl as
# they come, so a piece cut short by its time limit keeps what it measured.
#
#   bash bench/gpu_families.sh tests         tests/test_gpu.py
#   bash bench/gpu_families.sh families-a    Qwen3-8B, Gemma-2-9B: plain recipe, Unsloth, qlora-flow auto
#   bash bench/gpu_families.sh families-b    Gemma-3-12B (text), Phi-3-mini: the same
#   bash bench/gpu_families.sh long-ours     longest context at batch 1, Llama-3.1-8B shape: auto, offload
#   bash bench/gpu_families.sh long-unsloth  the same for Unsloth, checkpointing on the GPU and offloaded
#
# SHAPES="..." replaces a families piece's shapes (bench/models.SHAPES: gemma3-4b, phi3-medium, ...);
# STEPS and WARMUP its timed and warm-up steps; LONG_START and LONG_CAP the long-context search's
# first and largest lengths; LIMIT the seconds a piece may run.
set -u
piece=${1:?"which piece: tests, families-a, families-b, long-ours or long-unsloth"}
case "$piece" in
  tests | families-a | families-b | long-ours | long-unsloth) ;;
  *)
    echo "unknown piece '$piece': tests, families-a, families-b, long-ours or long-unsloth" >&2
    exit 2
    ;;
esac
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
LIMIT=${LIMIT:-540}  # under the call's limit, with time left to copy $OUT back
deadline=$((SECONDS + LIMIT))
left() { echo $((deadline - SECONDS > 1 ? deadline - SECONDS : 1)); }

[ -d /tmp/site ] || bash bench/device_setup.sh  # once a machine: the wheels into /tmp/site
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
USITE=${USITE:-../.usite.tgz}
unsloth=()
if [ -f "$USITE" ]; then unsloth=(--unsloth "$USITE"); else echo "no Unsloth tarball at $USITE: Unsloth is left out" | tee -a "$OUT/$piece.log"; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$OUT/$piece.log"

families() {
  for shape in $1; do
    timeout -k 30 --signal=INT "$(left)" python3 bench/gpu_qlora_bench.py --shapes "$shape" --steps "${STEPS:-4}" \
      --warmup "${WARMUP:-2}" --variants auto ${unsloth[@]+"${unsloth[@]}"} --out "$OUT/bench_families" 2>&1 | tee -a "$OUT/$piece.log"
    rm -rf "/tmp/qlora-bench/$shape"  # the disk holds about three of these random checkpoints
  done
}

long() {
  # the recipes share the time left (--long-budget); a trial that has not finished within
  # --trial-timeout ends its recipe's search
  timeout -k 30 --signal=INT "$(left)" python3 bench/gpu_qlora_bench.py --long-context llama-8b --long-recipes "$1" \
    --long-start "${LONG_START:-32768}" --long-cap "${LONG_CAP:-131072}" --long-resolution 4096 \
    --trial-timeout 200 --long-budget "$(($(left) - 200))" ${unsloth[@]+"${unsloth[@]}"} --out "$OUT/long_context" 2>&1 |
    tee -a "$OUT/$piece.log"
}

case "$piece" in
  tests)
    timeout -k 30 --signal=INT "$(left)" python3 -m pytest -q -rA -p no:cacheprovider tests/test_gpu.py \
      --junitxml="$OUT/test_gpu.xml" 2>&1 | tee "$OUT/test_gpu.txt"
    ;;
  families-a) families "${SHAPES:-qwen3-8b gemma2-9b}" ;;
  families-b) families "${SHAPES:-gemma3-12b phi3-mini}" ;;
  long-ours) long auto,offload ;;
  long-unsloth) long "unsloth[gc=true],unsloth[gc=unsloth]" ;;
esac
