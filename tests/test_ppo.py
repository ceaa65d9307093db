"""ppo.py: GAE against a plain loop, the per-token rewards, whitening, the clipped policy and value
losses against hand-worked cases, mini-batches, the KL controller, the critic, and a smoke run with
resume."""
import json
import math

import pytest
import torch

import ppo as P
from conftest import run_script
from model import GPT, read_safetensors, tiny_config

TINY = ["--batch-size", "2", "--group-size", "3", "--micro-batch-size", "4", "--max-new-tokens", "12",
        "--eval-size", "4", "--train-size", "16", "--eval-every", "0", "--warmup-steps", "1",
        "--epochs", "2", "--mini-batches", "2", "--no-eos-penalty", "1"]


def gae_reference(rewards, values, gamma, lam):
    """GAE of one episode, as plain Python lists, straight from the definition: A_t = Σ_l (γλ)^l δ_t+l."""
    n = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)]
    adv = [sum((gamma * lam) ** l * deltas[t + l] for l in range(n - t)) for t in range(n)]
    return adv, [a + v for a, v in zip(adv, values)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_against_a_plain_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    # three sequences: prompt positions (mask 0), completion tokens (mask 1), right padding (mask 0)
    spans = [(2, 5), (1, 8), (3, 1)]  # (prompt length, completion length)
    T = 10
    mask = torch.zeros(3, T)
    for b, (p, n) in enumerate(spans):
        mask[b, p:p + n] = 1
    rewards = torch.randn(3, T, generator=g) * mask
    values = torch.randn(3, T, generator=g)  # garbage off the mask must not leak in
    adv, ret = P.gae(rewards, values, mask, gamma, lam)
    for b, (p, n) in enumerate(spans):
        a_ref, r_ref = gae_reference(rewards[b, p:p + n].tolist(), values[b, p:p + n].tolist(), gamma, lam)
        torch.testing.assert_close(adv[b, p:p + n], torch.tensor(a_ref))
        torch.testing.assert_close(ret[b, p:p + n], torch.tensor(r_ref))
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_special_cases():
    r, v, m = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.2, 0.5, 0.7]]), torch.ones(1, 3)
    # λ = 1, γ = 1: Monte Carlo return-to-go minus the value; returns are the returns-to-go
    adv, ret = P.gae(r, v, m, 1.0, 1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.8, 0.5, 0.3]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0]]))
    # λ = 0: one-step TD errors r_t + V(s_t+1) − V(s_t)
    adv, _ = P.gae(r, v, m, 1.0, 0.0)
    torch.testing.assert_close(adv, torch.tensor([[0.3, 0.2, 0.3]]))


def test_token_rewards():
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]])
    kl = torch.tensor([[9.0, 0.1, -0.2, 0.3, 9.0], [9.0, 9.0, 0.5, 9.0, 9.0]])
    r = P.token_rewards(torch.tensor([1.0, -1.0]), kl, mask, 0.5)
    torch.testing.assert_close(r, torch.tensor([[0.0, -0.05, 0.1, 1 - 0.15, 0.0], [0.0, 0.0, -1.25, 0.0, 0.0]]))


def test_whitening_over_the_masked_tokens():
    x = torch.tensor([[100.0, 1.0, 2.0], [3.0, 6.0, -100.0]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    mean, var = P.masked_mean_var(x, mask)
    assert mean == pytest.approx(3.0) and var == pytest.approx(3.5)  # of 1, 2, 3, 6
    w = (x - mean) / (math.sqrt(var) + 1e-8) * mask  # as ppo.py whitens
    kept = w[mask.bool()]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert kept.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)


def test_clipped_value_loss():
    old = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    ret = torch.tensor([[1.0, 1.0, -1.0, 1.0]])
    v = torch.tensor([[0.1, 0.5, 0.5, -0.5]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss = P.value_loss(v, old, ret, mask, 0.2, 3)
    # token 0 inside the clip range: ½ (0.9)²; token 1 moved past +0.2 towards the return: clipped
    # error ½ (0.8)² is the larger, so it counts and has no gradient; token 2 moved away from the
    # return: the unclipped ½ (1.5)² is the larger; token 3 is masked out
    assert loss.item() == pytest.approx((0.5 * 0.81 + 0.5 * 0.64 + 0.5 * 2.25) / 3)
    loss.backward()
    torch.testing.assert_close(v.grad, torch.tensor([[-0.9 / 3, 0.0, 1.5 / 3, 0.0]]))


def test_ppo_loss_clips_only_where_it_should():
    old = torch.zeros(1, 4)
    logp = torch.tensor([[math.log(1.5), math.log(1.5), math.log(0.5), math.log(1.1)]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 1.0, 2.0]])
    mask = torch.ones(1, 4)
    loss, clipped, k3 = P.ppo_loss(logp, old, adv, mask, 0.2, 4)
    # ρ = 1.5, A > 0: clipped at 1.2, no gradient; ρ = 1.5, A < 0: unclipped (pessimistic), −A ρ;
    # ρ = 0.5, A > 0: unclipped ρ A is the smaller; ρ = 1.1: inside
    assert loss.item() == pytest.approx(-(1.2 * 1 + 1.5 * -1 + 0.5 * 1 + 1.1 * 2) / 4)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 1.5 / 4, -0.5 / 4, -2.2 / 4]]))
    assert clipped.item() == 3
    ratios = torch.tensor([1.5, 1.5, 0.5, 1.1])
    assert k3.item() == pytest.approx(((ratios - 1) - ratios.log()).sum().item(), rel=1e-5)


def test_ppo_loss_splits_over_micro_batches():
    g = torch.Generator().manual_seed(1)
    logp, old, adv = (torch.randn(4, 5, generator=g) * 0.3 for _ in range(3))
    mask = (torch.rand(4, 5, generator=g) > 0.3).float()
    full = P.ppo_loss(logp, old, adv, mask, 0.2, mask.sum())[0]
    split = sum(P.ppo_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], 0.2, mask.sum())[0]
                for i in (0, 2))
    assert split.item() == pytest.approx(full.item())


def test_adaptive_beta():
    assert P.adaptive_beta(0.1, 6.0, 3.0, 100, 1000) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # clipped at +0.2
    assert P.adaptive_beta(0.1, 2.7, 3.0, 100, 1000) == pytest.approx(0.1 * (1 - 0.1 * 0.1))
    assert P.adaptive_beta(0.1, 0.0, 3.0, 100, 1000) == pytest.approx(0.1 * (1 - 0.2 * 0.1))  # clipped at −0.2


def test_minibatches_partition_and_reproduce():
    parts = P.minibatches(10, 3, seed=0, step=5, epoch=1, rank=0)
    assert [len(p) for p in parts] == [4, 3, 3]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    again = P.minibatches(10, 3, seed=0, step=5, epoch=1, rank=0)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    other = P.minibatches(10, 3, seed=0, step=5, epoch=2, rank=0)
    assert not all(torch.equal(a, b) for a, b in zip(parts, other))


def test_critic_is_causal_and_starts_at_zero():
    torch.manual_seed(0)
    critic = P.Critic(GPT(tiny_config(n_layer=1, n_embd=32, ffn_dim=64)))
    ids = torch.randint(0, 256, (2, 7))
    assert torch.equal(critic(ids), torch.zeros(2, 7))
    torch.nn.init.normal_(critic.head.weight)
    v = critic(ids)
    changed = ids.clone()
    changed[:, 4] = (changed[:, 4] + 1) % 256
    w = critic(changed)
    torch.testing.assert_close(v[:, :4], w[:, :4])  # V(s_t) sees only ids[:, :t + 1]
    assert not torch.allclose(v[:, 4:], w[:, 4:])


def test_missing_sft_checkpoint_message(monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match=r"runs/sft not found: run `python sft.py` first, or pass --model"):
        run_script(P, monkeypatch, tmp_path)


def test_smoke_and_resume(monkeypatch, tmp_path, tiny_ckpt):
    args = ["--model", str(tiny_ckpt), "--steps", "3", "--save-every", "2", "--kl-target", "0.5", *TINY]
    run_script(P, monkeypatch, tmp_path, *args, "--run-name", "full")
    rows = [json.loads(l) for l in (tmp_path / "runs/full/metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/reward" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        assert {"train/value_loss", "train/approx_kl", "train/clipfrac", "train/explained_variance", "train/entropy",
                "train/kl", "train/beta"} <= r.keys() and math.isfinite(r["train/loss"])
    assert train[0]["train/kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts at the reference
    assert train[0]["train/value_loss"] > 0 and train[0]["train/approx_kl"] > 0  # it learned something
    assert train[1]["train/beta"] != train[0]["train/beta"]  # the controller moved β

    real = P.lr_at
    monkeypatch.setattr(P, "lr_at", lambda s, a: (_ for _ in ()).throw(KeyboardInterrupt) if s == 2 else real(s, a))
    with pytest.raises(KeyboardInterrupt):
        run_script(P, monkeypatch, tmp_path, *args, "--run-name", "cut")
    monkeypatch.setattr(P, "lr_at", real)
    run_script(P, monkeypatch, tmp_path, *args, "--run-name", "cut", "--resume")
    a, b = (read_safetensors(tmp_path / f"runs/{n}/model.safetensors") for n in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same samples, the same updates
    sa, sb = (torch.load(tmp_path / f"runs/{n}/trainer_state.pt", weights_only=True) for n in ("full", "cut"))
    assert all(torch.equal(sa["critic"][k], sb["critic"][k]) for k in sa["critic"]) and sa["beta"] == sb["beta"]


def test_bad_mini_batches(monkeypatch, tmp_path, tiny_ckpt):
    with pytest.raises(SystemExit, match="--mini-batches 7 must be between 1 and the 6 sequences"):
        run_script(P, monkeypatch, tmp_path, "--model", str(tiny_ckpt), *TINY, "--mini-batches", "7")
