"""reinforce.py: the baselines, whitening, the k1 KL and the policy-gradient loss against closed
forms, and a smoke run with resume."""
import json
import math

import pytest
import torch

import reinforce as R
from conftest import run_script
from model import read_safetensors

TINY = ["--batch-size", "2", "--group-size", "3", "--micro-batch-size", "4", "--max-new-tokens", "12",
        "--eval-size", "4", "--train-size", "16", "--eval-every", "0", "--warmup-steps", "1"]


def test_rloo_baseline_hand_worked():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
    torch.testing.assert_close(R.rloo_baseline(r), torch.tensor([[1 / 3, 2 / 3, 2 / 3, 1 / 3], [3.0, 3.0, 3.0, 3.0]]))
    adv = R.advantages(r, "rloo", None)
    torch.testing.assert_close(adv, torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3], [0.0, 0.0, 0.0, 0.0]]))
    # RLOO advantage = k/(k-1) (r - mean): the leave-one-out form of the group-mean baseline
    torch.testing.assert_close(adv, 4 / 3 * (r - r.mean(1, keepdim=True)))


def test_ema_baseline():
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    torch.testing.assert_close(R.advantages(r, "ema", None), r - 0.75)  # first batch: its own mean
    torch.testing.assert_close(R.advantages(r, "ema", 0.5), r - 0.5)
    assert R.ema_update(None, 0.75, 0.9) == 0.75
    assert R.ema_update(0.5, 1.0, 0.9) == pytest.approx(0.55)
    torch.testing.assert_close(R.advantages(r, "none", None), r)


def test_whiten():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])
    w = R.whiten(x, x.mean().item(), x.std(unbiased=False).item())
    assert w.mean().item() == pytest.approx(0.0, abs=1e-6) and \
        w.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)


def test_k1_is_unbiased_for_the_exact_kl():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.5, 0.3])
    exact = (p * (p / q).log()).sum()
    # the expectation of k1 under samples from p, computed exactly by summing over the support
    expected_k1 = (p * (p.log() - q.log())).sum()
    torch.testing.assert_close(expected_k1, exact)
    samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert (p.log()[samples] - q.log()[samples]).mean().item() == pytest.approx(exact.item(), abs=0.01)


def test_reinforce_loss_gradient_is_the_policy_gradient():
    """For a categorical policy softmax(θ) and one sampled action per sequence, the gradient of the
    loss is −mean_i A_i ∇ log π(a_i) = −mean_i A_i (onehot(a_i) − π)."""
    theta = torch.tensor([0.2, -0.1, 0.5], requires_grad=True)
    actions, adv = torch.tensor([0, 2, 2, 1]), torch.tensor([1.0, -0.5, 2.0, 0.0])
    logp = theta.log_softmax(0)[actions][:, None]  # (B, T=1)
    R.reinforce_loss(logp, torch.ones(4, 1), adv, 4).backward()
    pi = theta.detach().softmax(0)
    expected = -sum(a * (torch.nn.functional.one_hot(x, 3) - pi) for a, x in zip(adv, actions)) / 4
    torch.testing.assert_close(theta.grad, expected)


def test_reinforce_loss_sums_tokens_and_splits_over_micro_batches():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([2.0, -1.0])
    full = R.reinforce_loss(logp, mask, adv, 2)
    assert full.item() == pytest.approx(-(2 * -3.0 + -1 * -1.5) / 2)
    split = R.reinforce_loss(logp[:1], mask[:1], adv[:1], 2) + R.reinforce_loss(logp[1:], mask[1:], adv[1:], 2)
    assert split.item() == pytest.approx(full.item())


def test_missing_sft_checkpoint_message(monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match=r"runs/sft not found: run `python sft.py` first, or pass --model"):
        run_script(R, monkeypatch, tmp_path)


def test_smoke_and_resume(monkeypatch, tmp_path, tiny_ckpt):
    args = ["--model", str(tiny_ckpt), "--steps", "3", "--save-every", "2", *TINY]
    run_script(R, monkeypatch, tmp_path, *args, "--run-name", "full")
    rows = [json.loads(l) for l in (tmp_path / "runs/full/metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/reward" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        assert {"train/kl", "train/entropy", "perf/gen_seconds"} <= r.keys() and math.isfinite(r["train/loss"])
    assert train[0]["train/kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts at the reference

    real = R.lr_at
    monkeypatch.setattr(R, "lr_at", lambda s, a: (_ for _ in ()).throw(KeyboardInterrupt) if s == 2 else real(s, a))
    with pytest.raises(KeyboardInterrupt):
        run_script(R, monkeypatch, tmp_path, *args, "--run-name", "cut")
    monkeypatch.setattr(R, "lr_at", real)
    run_script(R, monkeypatch, tmp_path, *args, "--run-name", "cut", "--resume")
    a, b = (read_safetensors(tmp_path / f"runs/{n}/model.safetensors") for n in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same samples, the same updates


def test_beta_zero_loads_no_reference(monkeypatch, tmp_path, tiny_ckpt):
    loads = []
    real = R.load_model
    monkeypatch.setattr(R, "load_model", lambda *a: loads.append(a[0]) or real(*a))
    run_script(R, monkeypatch, tmp_path, "--model", str(tiny_ckpt), "--steps", "1", "--beta", "0", "--baseline", "ema",
               "--whiten", *TINY)
    assert loads == [str(tiny_ckpt)]
