"""rejection_sampling.py: the filter (best of k vs all that pass, ties, threshold, cut-off samples,
prompts with nothing kept), dedup, the gathered kept set, and runs of the script: a smoke run with
resume, the fresh-from-base variant, and torchrun with 2 processes against 1."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rejection_sampling as RS
from conftest import run_script, torchrun_ended
from model import read_safetensors

ROOT = Path(__file__).resolve().parent.parent
T, F = True, False


def tiny(digits, *more):
    ckpt, data = digits
    return ["--model", str(ckpt), "--task", "jsonl", "--data-path", str(data), "--eval-size", "8",
            "--prompts-per-round", "8", "--group-size", "4", "--batch-size", "4", "--micro-batch-size", "4",
            "--max-new-tokens", "4", "--lr", "1e-3", *more]


def test_best_of_k_threshold_ties_and_empty_prompts():
    rewards = torch.tensor([[0.2, 0.9, 0.5],    # best passes
                            [1.0, 0.3, 1.0],    # a tie: the first sampled
                            [0.4, 0.1, 0.0],    # best below the threshold: nothing kept
                            [0.5, 0.5, 0.5]])   # exactly at the threshold passes; the first of the tie
    ended = torch.ones(4, 3, dtype=torch.bool)
    kept = RS.select(rewards, ended, "best", 0.5)
    assert kept.tolist() == [[F, T, F], [T, F, F], [F, F, F], [T, F, F]]
    assert kept.sum(1).le(1).all()  # at most one per prompt
    # a swapped-in reward_fn may return ints
    assert RS.select(torch.tensor([[0, 2, 2]]), torch.ones(1, 3, dtype=torch.bool), "best", 1).tolist() == [[F, T, F]]


def test_all_that_pass():
    rewards = torch.tensor([[0.2, 0.9, 0.5], [1.0, 0.3, 1.0], [0.4, 0.1, 0.0]])
    kept = RS.select(rewards, torch.ones(3, 3, dtype=torch.bool), "all", 0.5)
    assert kept.tolist() == [[F, T, T], [T, F, T], [F, F, F]]
    assert RS.select(rewards, torch.ones(3, 3, dtype=torch.bool), "all", -math.inf).all()  # no threshold: everything


def test_cut_off_samples_are_never_kept():
    rewards = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    ended = torch.tensor([[F, T, T], [F, F, F]])
    # the first best was cut off by --max-new-tokens: the next best that ended is kept instead
    assert RS.select(rewards, ended, "best", 1.0).tolist() == [[F, F, T], [F, F, F]]
    assert RS.select(rewards, ended, "all", 0.0).tolist() == [[F, T, T], [F, F, F]]
    assert RS.select(rewards, ended, "best", -math.inf).tolist() == [[F, F, T], [F, F, F]]


def test_unknown_keep_is_an_error(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["rejection_sampling.py", "--keep", "top"])
    with pytest.raises(SystemExit):  # the parser refuses it
        RS.parse_args()
    assert "--keep: invalid choice: 'top'" in capsys.readouterr().err


def test_dedup_within_a_prompt_only():
    a, b, c = [1, 2, 3], [1, 2, 4], [1, 2, 3]
    seqs = [a, b, c, a,   # prompt 0: c (= a) and the second a repeat the first kept a
            b, a, a, a]   # prompt 1: its own first a is kept although prompt 0 has one too
    kept = torch.tensor([[T, T, T, T], [T, F, T, T]])
    assert RS.dedup(kept, seqs).tolist() == [[T, T, F, F], [T, F, T, F]]
    # a repeat of a sample that was not kept is kept
    assert RS.dedup(torch.tensor([[F, T, T, F]]), [a, b, a, b]).tolist() == [[F, T, T, F]]


def test_gather_orders_by_prompt_then_sample():
    items = [((3, 0), "d"), ((0, 2), "b"), ((0, 1), "a"), ((1, 0), "c")]
    assert RS.gather(items) == ["a", "b", "c", "d"]


def test_sft_loss_is_sfts():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[0, 1, 1], [0, 0, 1]])
    assert RS.sft_loss(logp, mask, 3).item() == pytest.approx((2 + 3 + 6) / 3)


def test_missing_sft_checkpoint_message(monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match=r"runs/sft not found: run `python sft.py` first, or pass --model"):
        run_script(RS, monkeypatch, tmp_path)


def rows(tmp_path, run):
    return [json.loads(l) for l in (tmp_path / f"runs/{run}/metrics.jsonl").read_text().splitlines()]


def test_smoke_and_resume(monkeypatch, tmp_path, digits):
    args = [*tiny(digits, "--steps", "3", "--save-every", "2", "--threshold", "1"), "--keep", "all", "--no-dedup"]
    run_script(RS, monkeypatch, tmp_path, *args, "--run-name", "full")
    rounds = [r for r in rows(tmp_path, "full") if "train/kept" in r]
    assert [r["step"] for r in rounds] == [1, 2, 3]
    for r in rounds:
        assert {"train/acceptance_rate", "train/pass_rate", "train/reward", "train/loss",
                "perf/gen_seconds"} <= r.keys()
        # keep all without dedup and the 0/1 reward: every sample that passes is kept
        assert r["train/kept"] == round(r["train/pass_rate"] * 8 * 4) and r["train/pass_rate"] <= r["train/reward"]
        assert r["train/opt_steps"] == math.ceil(2 * r["train/kept"] / 4)
    assert sum(r["train/kept"] for r in rounds) > 0 and all(math.isfinite(r["train/loss"]) for r in rounds)
    assert "eval/accuracy" in rows(tmp_path, "full")[-1]

    real = RS.lr_at
    monkeypatch.setattr(RS, "lr_at", lambda s, a: (_ for _ in ()).throw(KeyboardInterrupt) if s == 2 else real(s, a))
    with pytest.raises(KeyboardInterrupt):
        run_script(RS, monkeypatch, tmp_path, *args, "--run-name", "cut")
    monkeypatch.setattr(RS, "lr_at", real)
    run_script(RS, monkeypatch, tmp_path, *args, "--run-name", "cut", "--resume")
    a, b = (read_safetensors(tmp_path / f"runs/{n}/model.safetensors") for n in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same samples, the same kept sets, the same updates
    drop_perf = lambda run: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows(tmp_path, run)]
    assert drop_perf("cut") == drop_perf("full")  # the same metrics, each round logged once


def test_best_keeps_one_per_prompt_and_from_base_reloads(monkeypatch, tmp_path, digits):
    loads = []
    real = RS.load_model
    monkeypatch.setattr(RS, "load_model", lambda *a: loads.append(a[0]) or real(*a))
    run_script(RS, monkeypatch, tmp_path, *tiny(digits, "--steps", "2", "--threshold", "0", "--from-base",
                                                "--eval-every", "0"))
    rounds = [r for r in rows(tmp_path, "rejection_sampling") if "train/kept" in r]
    for r in rounds:  # threshold 0 and a 0/1 reward: every prompt with a sample that ended keeps exactly one
        assert r["train/kept"] == round(r["train/acceptance_rate"] * 8) and r["train/acceptance_rate"] > 0
    assert loads == [str(digits[0])] * 3  # the start, then the base again before each round's fine-tune


def test_torchrun_two_processes_equal_one(tmp_path, digits):
    """Each sample has its own seed (round, prompt, sample), whatever rank draws it, so the kept set, and with
    it every update, must be the same with 1 and 2 processes, and with 2 processes under --fsdp."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [str(ROOT / "rejection_sampling.py"), *tiny(digits, "--steps", "2", "--threshold", "0", "--keep", "all",
                                                      "--eval-every", "0")]
    one = subprocess.run([sys.executable, *base, "--run-name", "one"], cwd=tmp_path, env=env, capture_output=True,
                         text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    two = subprocess.run([torchrun, "--nproc_per_node=2", "--standalone", *base, "--run-name", "two"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert torchrun_ended(two), two.stderr[-2000:]
    a = read_safetensors(tmp_path / "runs/one/model.safetensors")
    b = read_safetensors(tmp_path / "runs/two/model.safetensors")
    for k in a:  # Adam amplifies summation-order noise in near-zero gradients (see tests/test_sft.py)
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)
    fsdp = subprocess.run([torchrun, "--nproc_per_node=2", "--standalone", *base, "--run-name", "fsdp",
                           "--fsdp"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert torchrun_ended(fsdp), fsdp.stderr[-2000:]
    c = read_safetensors(tmp_path / "runs/fsdp/model.safetensors")  # sharded, then gathered into one checkpoint
    for k in a:
        torch.testing.assert_close(a[k], c[k], atol=1e-4, rtol=1e-4)
    r1, r2 = rows(tmp_path, "one"), rows(tmp_path, "two")
    assert [r.get("train/kept") for r in r2] == [r.get("train/kept") for r in rows(tmp_path, "fsdp")]
    for x, y in zip(r1[1:3], r2[1:3]):
        assert x["train/kept"] == y["train/kept"] > 0 and x["train/acceptance_rate"] == y["train/acceptance_rate"]
        assert x["train/loss"] == pytest.approx(y["train/loss"], rel=1e-5)
        assert x["train/grad_norm"] == pytest.approx(y["train/grad_norm"], rel=1e-5)  # the same gradients
