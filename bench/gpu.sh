#!/usr/bin/env bash
# GPU benchmark: fused vs naive log-probs, generate vs transformers (eager and compiled), SFT tokens/s and
# MFU, a 2-step GRPO run's time split. Writes DIR/gpu.json and prints a table; see bench/bench_gpu.py.
#
#   bench/gpu.sh [--device cuda|cpu] [--model PATH] [--out DIR] [--parts logprobs,generate,sft,grpo]
#
# --device cpu is a dry mode (tiny sizes, a tiny random model, fp32) writing DIR/gpu_dry.json.
# --model: a .gguf file or a Hugging Face directory (default .cache/SmolLM2-135M-Instruct.Q4_1.gguf).
# About 6 minutes on an H200. PYTHON overrides the interpreter (default python3).
set -euo pipefail
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" "$(dirname "$0")/bench_gpu.py" "$@"
