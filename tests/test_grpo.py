"""grpo.py: group advantages, the KL estimators, the clipped surrogate and the loss aggregations against
closed forms and hand-worked cases; the gradient unchanged by micro-batching; a smoke run with resume."""
import json
import math

import pytest
import torch

import grpo as G
from conftest import run_script
from model import read_safetensors

TINY = ["--batch-size", "2", "--group-size", "3", "--micro-batch-size", "4", "--max-new-tokens", "12",
        "--eval-size", "4", "--train-size", "16", "--eval-every", "0", "--warmup-steps", "1"]
AGGS = ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]


def metrics(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- advantages


def test_group_advantages_hand_worked():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 3.0, 3.0, 3.0], [1.0, 0.0, 0.0, 0.0]])
    # group 1: mean 1/2, unbiased std sqrt(1/3); group 3: mean 1/4, unbiased std 1/2
    expected = torch.tensor([[0.75 ** 0.5, -0.75 ** 0.5, -0.75 ** 0.5, 0.75 ** 0.5], [0.0] * 4,
                             [1.5, -0.5, -0.5, -0.5]])
    torch.testing.assert_close(G.group_advantages(r, "group", eps=0.0)[[0, 2]], expected[[0, 2]])
    adv = G.group_advantages(r, "group")
    torch.testing.assert_close(adv, expected, atol=1e-3, rtol=1e-3)
    assert torch.equal(adv[1], torch.zeros(4))  # all-equal group: exactly zero, not NaN
    torch.testing.assert_close(G.group_advantages(r, "none"), r - r.mean(1, keepdim=True))  # Dr. GRPO
    batch_std = r.std().item()
    torch.testing.assert_close(G.group_advantages(r, "batch", eps=0.0), (r - r.mean(1, keepdim=True)) / batch_std)
    torch.testing.assert_close(G.group_advantages(r, "batch", batch_std=2.0, eps=0.0),
                               (r - r.mean(1, keepdim=True)) / 2)


def test_group_advantages_are_invariant_to_each_groups_affine_rescaling():
    r = torch.rand(5, 8, generator=torch.Generator().manual_seed(0))
    a, b = torch.tensor([[2.0], [0.5], [10.0], [1.0], [3.0]]), torch.randn(5, 1)
    adv = G.group_advantages(r, "group", eps=0.0)
    torch.testing.assert_close(G.group_advantages(a * r + b, "group", eps=0.0), adv)
    torch.testing.assert_close(adv.mean(1), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(adv.std(1), torch.ones(5))
    # without the std the scale of each group's rewards is kept
    torch.testing.assert_close(G.group_advantages(a * r + b, "none"), a * G.group_advantages(r, "none"))


# ---------------------------------------------------------------------------------------------- KL estimators


def exact_expectation(p, q, kind):
    """E_{y~p}[k(y)] summed over the support, and the exact KL(p || q)."""
    return (p * G.kl_estimate(p.log(), q.log(), kind)).sum().item(), (p * (p / q).log()).sum().item()


def test_k1_and_k3_are_unbiased_for_the_exact_kl():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    for kind in ("k1", "k3"):
        est, exact = exact_expectation(p, q, kind)
        assert est == pytest.approx(exact, rel=1e-12), kind
    torch.testing.assert_close(G.kl_estimate(p.log(), q.log(), "k1"), p.log() - q.log())
    samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    k1, k3 = (G.kl_estimate(p.log()[samples], q.log()[samples], k) for k in ("k1", "k3"))
    exact = exact_expectation(p, q, "k1")[1]
    assert k1.mean().item() == pytest.approx(exact, abs=0.01) and k3.mean().item() == pytest.approx(exact, abs=0.01)
    assert k3.var().item() < k1.var().item()  # the point of k3: the same mean, less variance


def test_k2_bias_is_the_third_order_term():
    """With δ = log q/p: E_p[e^δ] = 1 gives KL = E[δ²]/2 + E[δ³]/6 + O(δ⁴), and k2 = δ²/2, so k2's bias
    E[k2] − KL = −E[δ³]/6 + O(δ⁴): small for nearby distributions, not for distant ones."""
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    for t in (0.05, 0.1):
        q = torch.softmax(p.log() + t * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), 0)
        est, exact = exact_expectation(p, q, "k2")
        delta = (q / p).log()
        third = -(p * delta ** 3).sum().item() / 6
        fourth = (p * delta ** 4).sum().item()
        assert est - exact == pytest.approx(third, abs=fourth)
        assert est == pytest.approx(0.5 * (p * delta ** 2).sum().item(), rel=1e-12)
    q = torch.tensor([0.05, 0.05, 0.9], dtype=torch.float64)
    est, exact = exact_expectation(p, q, "k2")
    assert abs(est - exact) > 0.1 * exact  # biased


def test_k3_is_nonnegative_and_its_gradients():
    logp = torch.linspace(-6, 0, 25, dtype=torch.float64)[:, None].expand(25, 25).clone().requires_grad_()
    ref = torch.linspace(-6, 0, 25, dtype=torch.float64)[None, :].expand(25, 25)
    k3 = G.kl_estimate(logp, ref, "k3")
    assert (k3 >= 0).all() and torch.equal(k3.diagonal(), torch.zeros(25, dtype=torch.float64))
    k3.sum().backward()  # d k3 / d log π = 1 − π_ref/π
    torch.testing.assert_close(logp.grad, 1 - (ref - logp.detach()).exp())
    logp.grad = None
    G.kl_estimate(logp, ref, "k2").sum().backward()  # d k2 / d log π = log π − log π_ref
    torch.testing.assert_close(logp.grad, logp.detach() - ref)


# ---------------------------------------------------------------------------------------------- clipped surrogate


@pytest.mark.parametrize("adv", [2.0, -2.0])
def test_clipped_surrogate_on_both_sides_of_the_clip_edges(adv):
    """ρ below, at both sides of, and above [1 − ε_low, 1 + ε_high] = [0.8, 1.28]: the gradient in log π is
    −ρA where min() takes the unclipped term and 0 where the clip binds (A > 0 above, A < 0 below)."""
    eps_low, eps_high = 0.2, 0.28
    ratio = torch.tensor([0.5, 0.79, 0.81, 1.0, 1.27, 1.29, 2.0], dtype=torch.float64)
    old = torch.full((1, 7), -1.5, dtype=torch.float64)
    logp = (old + ratio.log()).requires_grad_()
    loss, low, high = G.clipped_surrogate(logp, old, torch.tensor([adv], dtype=torch.float64), eps_low, eps_high)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    torch.testing.assert_close(loss[0], -torch.minimum(ratio * adv, clipped * adv))
    below, above = [True, True] + [False] * 5, [False] * 5 + [True, True]  # written out: outside [0.8, 1.28]
    assert low[0].tolist() == (below if adv < 0 else [False] * 7)
    assert high[0].tolist() == (above if adv > 0 else [False] * 7)
    binds = torch.tensor(above if adv > 0 else below)
    loss.sum().backward()
    torch.testing.assert_close(logp.grad[0], torch.where(binds, torch.zeros_like(ratio), -ratio * adv))


def test_clipped_surrogate_at_ratio_one_is_the_policy_gradient():
    """With π_old = π (the first of the μ updates), the surrogate's gradient for a softmax policy is
    −A (onehot(a) − π): REINFORCE's, whatever the clip range."""
    theta = torch.tensor([0.2, -0.1, 0.5], requires_grad=True)
    actions, adv = torch.tensor([0, 2, 2, 1]), torch.tensor([1.0, -0.5, 2.0, 0.0])
    logp = theta.log_softmax(0)[actions][:, None]
    loss, low, high = G.clipped_surrogate(logp, logp.detach(), adv, 0.01, 0.01)
    loss.mean().backward()
    pi = theta.detach().softmax(0)
    expected = -sum(a * (torch.nn.functional.one_hot(x, 3) - pi) for a, x in zip(adv, actions)) / 4
    torch.testing.assert_close(theta.grad, expected)
    assert not low.any() and not high.any()


# ---------------------------------------------------------------------------------------------- aggregation


def test_aggregate_hand_worked():
    x = torch.tensor([[1.0, 2.0, 9.0], [3.0, 3.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert G.aggregate(x, mask, "seq-mean-token-mean", 2, 5, 4).item() == pytest.approx((1.5 + 4.0) / 2)
    assert G.aggregate(x, mask, "token-mean", 2, 5, 4).item() == pytest.approx(15 / 5)
    assert G.aggregate(x, mask, "seq-mean-token-sum-norm", 2, 5, 4).item() == pytest.approx((3 + 12) / (2 * 4))


@pytest.mark.parametrize("mode", AGGS)
def test_aggregate_is_unchanged_by_micro_batching(mode):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 10, generator=g)
    lengths = torch.tensor([10, 3, 1, 7, 0, 5, 9])  # one sequence left out of the loss entirely
    mask = (torch.arange(10)[None] < lengths[:, None]).long()
    n_seqs, n_tok = int((lengths > 0).sum()), int(lengths.sum())
    full = G.aggregate(x, mask, mode, n_seqs, n_tok, 10)
    for mb in (1, 2, 3, 4):
        split = sum(G.aggregate(x[i:i + mb], mask[i:i + mb], mode, n_seqs, n_tok, 10) for i in range(0, 7, mb))
        assert split.item() == pytest.approx(full.item(), abs=1e-6), mb
    # and against the definitions written out
    per_seq = [(x[i, :l].sum() / l).item() for i, l in enumerate(lengths.tolist()) if l]
    expected = {"seq-mean-token-mean": sum(per_seq) / n_seqs, "token-mean": (x * mask).sum().item() / n_tok,
                "seq-mean-token-sum-norm": (x * mask).sum().item() / (n_seqs * 10)}[mode]
    assert full.item() == pytest.approx(expected, abs=1e-6)


def some_reward(text, example):
    """A reward that varies between completions of the random tiny model (the task's would be all 0)."""
    return sum(text.encode()) % 5 / 4


def first_gradient(monkeypatch, tmp_path, tiny_ckpt, name, *flags):
    """The flat gradient of the first optimizer step of a one-step run (before clipping)."""
    grads, real = [], torch.nn.utils.clip_grad_norm_

    def record(params, *a, **k):
        params = list(params)
        if not grads:
            grads.append(torch.cat([p.grad.reshape(-1).clone() for p in params if p.grad is not None]))
        return real(params, *a, **k)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record)
    run_script(G, monkeypatch, tmp_path, "--model", str(tiny_ckpt), "--steps", "1", *TINY, "--run-name", name, *flags)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real)
    return grads[0]


def perturbed_reference(monkeypatch):
    """Every run's reference (its second load_model) a little away from the policy, so that the KL term has a
    gradient at the first step (at π = π_ref the k3 and k2 gradients are zero, and k1 in the loss is refused)."""
    real, calls = G.load_model, []

    def load(*a):
        model, tok = real(*a)
        calls.append(a[0])
        if len(calls) % 2 == 0:
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        return model, tok
    monkeypatch.setattr(G, "load_model", load)


@pytest.mark.parametrize("mode", AGGS)
def test_gradient_is_unchanged_by_micro_batching(monkeypatch, tmp_path, tiny_ckpt, mode):
    """The whole loop: the same batch split into micro-batches of 6 (all), 4 (uneven) or 1 gives the same
    gradient. The reference is perturbed, so that the k3 term's aggregation is checked too."""
    monkeypatch.setattr(G, "reward_fn", some_reward)
    perturbed_reference(monkeypatch)
    flags = ["--loss-agg", mode, "--kl-estimator", "k3", "--beta", "0.5"]
    grads = [first_gradient(monkeypatch, tmp_path, tiny_ckpt, f"mb{mb}", *flags, "--micro-batch-size", str(mb))
             for mb in (6, 4, 1)]
    assert grads[0].abs().max() > 1e-4
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------- runs


def test_missing_sft_checkpoint_message(monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match=r"runs/sft not found: run `python sft.py` first, or pass --model"):
        run_script(G, monkeypatch, tmp_path)


def test_bad_choice_is_one_clear_error(monkeypatch, tmp_path, tiny_ckpt, capsys):
    with pytest.raises(SystemExit) as e:  # the parser refuses it, before anything is loaded or written
        run_script(G, monkeypatch, tmp_path, "--model", str(tiny_ckpt), *TINY, "--loss-agg", "sum")
    assert e.value.code == 2 and not (tmp_path / "runs").exists()
    assert "--loss-agg: invalid choice: 'sum' (choose from" in capsys.readouterr().err


def test_smoke_and_resume(monkeypatch, tmp_path, tiny_ckpt):
    monkeypatch.setattr(G, "reward_fn", some_reward)
    args = ["--model", str(tiny_ckpt), "--steps", "3", "--save-every", "2", "--mu", "2", *TINY]
    run_script(G, monkeypatch, tmp_path, *args, "--run-name", "full")
    train = [r for r in metrics(tmp_path / "runs/full/metrics.jsonl") if "train/reward" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        assert {"train/kl", "train/entropy", "train/clipfrac_low", "train/clipfrac_high", "train/groups_all_equal",
                "train/completion_len", "perf/gen_seconds", "perf/update_seconds"} <= r.keys()
        assert math.isfinite(r["train/loss"]) and 0 <= r["train/groups_all_equal"] <= 1
        assert r["train/clipfrac"] == pytest.approx(r["train/clipfrac_low"] + r["train/clipfrac_high"])
    assert train[0]["train/kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts at the reference
    assert train[1]["train/kl"] != 0.0

    real = G.lr_at
    monkeypatch.setattr(G, "lr_at", lambda s, a: (_ for _ in ()).throw(KeyboardInterrupt) if s == 2 else real(s, a))
    with pytest.raises(KeyboardInterrupt):
        run_script(G, monkeypatch, tmp_path, *args, "--run-name", "cut")
    monkeypatch.setattr(G, "lr_at", real)
    run_script(G, monkeypatch, tmp_path, *args, "--run-name", "cut", "--resume")
    a, b = (read_safetensors(tmp_path / f"runs/{n}/model.safetensors") for n in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same samples, the same updates


def test_the_clip_binds_on_the_second_update(monkeypatch, tmp_path, tiny_ckpt):
    """μ = 1: ρ = 1 at the only update, nothing is clipped. μ = 4 with a large step: the later updates clip."""
    monkeypatch.setattr(G, "reward_fn", some_reward)
    for mu, name in ((1, "one"), (4, "four")):
        run_script(G, monkeypatch, tmp_path, "--model", str(tiny_ckpt), "--steps", "1", *TINY, "--warmup-steps", "0",
                   "--lr", "3e-3", "--mu", str(mu), "--run-name", name)
    one, four = (metrics(tmp_path / f"runs/{n}/metrics.jsonl")[1] for n in ("one", "four"))
    assert one["train/clipfrac"] == 0.0 and four["train/clipfrac"] > 0.0


def test_equal_rewards_give_no_policy_gradient(monkeypatch, tmp_path, tiny_ckpt):
    """Every group all right: zero advantages, so with β = 0 the gradient is exactly zero; the KL term in
    the loss adds its own."""
    monkeypatch.setattr(G, "reward_fn", lambda text, ex: 1.0)
    g = first_gradient(monkeypatch, tmp_path, tiny_ckpt, "equal", "--beta", "0")
    assert torch.equal(g, torch.zeros_like(g))
    row = metrics(tmp_path / "runs/equal/metrics.jsonl")[1]
    assert row["train/groups_all_equal"] == 1.0 and row["train/reward"] == 1.0
    # what is left with β > 0 is the KL term's gradient, linear in β (the reference perturbed: not zero)
    perturbed_reference(monkeypatch)
    g1, g2 = (first_gradient(monkeypatch, tmp_path, tiny_ckpt, f"kl{b}", "--beta", b) for b in ("0.25", "0.5"))
    assert g1.abs().max() > 1e-4
    torch.testing.assert_close(g2, 2 * g1)


def test_mask_truncated_leaves_them_out_of_the_loss(monkeypatch, tmp_path, tiny_ckpt):
    """Mark every completion truncated: with --mask-truncated nothing is left in the loss (zero gradient);
    without it the same batch has a gradient."""
    monkeypatch.setattr(G, "reward_fn", some_reward)
    real = G.rollout

    def truncated(*a, **k):
        seqs, masks, rewards, texts, ended = real(*a, **k)
        return seqs, masks, rewards, texts, torch.zeros_like(ended)
    monkeypatch.setattr(G, "rollout", truncated)
    masked = first_gradient(monkeypatch, tmp_path, tiny_ckpt, "masked", "--mask-truncated")
    kept = first_gradient(monkeypatch, tmp_path, tiny_ckpt, "kept")
    assert torch.equal(masked, torch.zeros_like(masked)) and kept.abs().max() > 1e-4


def test_beta_zero_loads_no_reference(monkeypatch, tmp_path, tiny_ckpt):
    loads = []
    real = G.load_model
    monkeypatch.setattr(G, "load_model", lambda *a: loads.append(a[0]) or real(*a))
    run_script(G, monkeypatch, tmp_path, "--model", str(tiny_ckpt), "--steps", "1", "--beta", "0", "--scale-rewards",
               "batch", "--kl-in", "reward", "--loss-agg", "token-mean", *TINY)
    assert loads == [str(tiny_ckpt)]
