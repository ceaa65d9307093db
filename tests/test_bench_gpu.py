"""bench/gpu.sh end to end in its CPU dry mode: every part runs and records what it measured."""

import json
import math
import os
import subprocess
import sys


def test_gpu_bench_dry_run(repo_root, tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["bash", str(repo_root / "bench" / "gpu.sh"), "--device", "cpu", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "wrote" in p.stdout and "grpo      step 2" in p.stdout  # the table at the end
    r = json.loads((tmp_path / "gpu_dry.json").read_text())
    assert r["env"]["torch"] and r["mode"] == "cpu dry run"
    parts = r["parts"]
    assert set(parts) == {"logprobs", "generate", "sft", "grpo"}
    for name, part in parts.items():
        assert part["status"] == "ok", (name, part.get("traceback"))

    lp = parts["logprobs"]  # the fused kernel agrees with log_softmax in fp32, values and gradients
    assert lp["fused"]["ms"] > 0 and lp["naive"]["ms"] > 0
    assert all(d < 1e-4 for d in lp["max_abs_diff"].values()), lp["max_abs_diff"]

    gen = parts["generate"]
    assert gen["tokens_per_s"]["ours_b2"] > 0 and gen["tokens_per_s"]["ours_b4"] > 0
    try:
        import transformers  # noqa: F401
        assert gen["tokens_per_s"]["transformers_b4"] > 0 and "ours_over_transformers_b4" in gen["speedups"]
        assert 0 <= gen["rows_identical_to_ours"]["transformers_b4"] <= 1
    except ImportError:
        assert gen["notes"]["transformers"].startswith("skipped")
    assert "ours_compiled_b2" not in gen["tokens_per_s"] and "compile" in gen["notes"]  # CUDA only

    sft = parts["sft"]
    plain = sft["variants"]["plain"]
    assert sft["matmul_peak_tflops"] > 0 and plain["tokens_per_s"] > 0
    assert math.isclose(plain["mfu_vs_matmul"], 6 * sft["params"] * plain["tokens_per_s"] / 1e12
                        / sft["matmul_peak_tflops"], rel_tol=1e-6)
    assert "grad_checkpoint" in sft["variants"] or "not available" in sft["notes"]["grad_checkpoint"]

    steps = parts["grpo"]["steps"]
    assert [s["step"] for s in steps] == [1, 2]
    assert all(s["perf/gen_seconds"] > 0 and s["perf/update_seconds"] > 0 for s in steps)


def test_gpu_bench_failing_part_is_recorded(repo_root, tmp_path):
    """A part that fails records its error and traceback, the others still run, and the exit status is 1."""
    empty = tmp_path / "not_a_checkpoint"
    empty.mkdir()
    p = subprocess.run([sys.executable, str(repo_root / "bench" / "bench_gpu.py"), "--device", "cpu", "--model",
                        str(empty), "--out", str(tmp_path), "--parts", "sft,logprobs"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    parts = json.loads((tmp_path / "gpu_dry.json").read_text())["parts"]
    assert parts["sft"]["status"] == "error" and "config.json" in parts["sft"]["error"]
    assert "Traceback" in parts["sft"]["traceback"]
    assert parts["logprobs"]["status"] == "ok"
    assert "sft       ERROR" in p.stdout
