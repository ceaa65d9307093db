"""trpo.py: conjugate gradient, the Fisher-vector product against the explicitly formed Fisher matrix,
the trust-region step size, the line search, and a smoke run with resume in which no accepted step
exceeds δ."""
import json

import pytest
import torch

import trpo as T
from conftest import run_script
from model import GPT, read_safetensors, tiny_config

TINY = ["--batch-size", "2", "--group-size", "3", "--micro-batch-size", "4", "--max-new-tokens", "12",
        "--eval-size", "4", "--train-size", "16", "--eval-every", "0", "--warmup-steps", "1",
        "--epochs", "2", "--mini-batches", "2", "--no-eos-penalty", "1", "--cg-iters", "4"]
NULL = torch.autocast("cpu", enabled=False)


def tiny_policy(seed=0):
    """A categorical policy over 11 tokens: a one-layer GPT small enough to form its Fisher matrix."""
    torch.manual_seed(seed)
    cfg = tiny_config(vocab_size=11, n_layer=1, n_head=2, n_kv_head=2, n_embd=8, ffn_dim=16, max_seq_len=16,
                      eos_token_id=[10], pad_token_id=9)
    model = GPT(cfg).double()
    with torch.no_grad():  # far from uniform, so the Fisher matrix is not trivial
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model


def tiny_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 9, (3, 6), generator=g)
    targets = torch.randint(0, 9, (3, 6), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0]])
    return ids, targets, mask


def explicit_fisher(policy, batch):
    """F = (1 / n) Σ_t Σ_y π(y | s_t) ∇ log π(y | s_t) ∇ log π(y | s_t)ᵀ over the n completion tokens:
    the Fisher information matrix, summed exactly over the vocabulary, one gradient per (token, y)."""
    ids, _, mask = batch
    params = list(policy.parameters())
    n_params = sum(p.numel() for p in params)
    F, n = torch.zeros(n_params, n_params, dtype=torch.float64), int(mask.sum())
    logp = policy(ids).log_softmax(-1)  # (B, T, V)
    for b, t in mask.nonzero().tolist():
        for y in range(logp.shape[-1]):
            grad = T.parameters_to_vector(torch.autograd.grad(logp[b, t, y], params, retain_graph=True))
            F += logp[b, t, y].exp().item() * torch.outer(grad, grad) / n
    return F


def test_conjugate_gradient_solves_a_small_spd_system():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(6, 6, generator=g, dtype=torch.float64)
    A = M @ M.T + 0.5 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    x, r, n = T.conjugate_gradient(lambda v: A @ v, b, 6)
    torch.testing.assert_close(x, torch.linalg.solve(A, b))  # exact in n steps (up to rounding)
    torch.testing.assert_close(r, b - A @ x, atol=1e-9, rtol=0)  # the tracked residual is the true one
    assert n == 6
    x3, r3, n3 = T.conjugate_gradient(lambda v: A @ v, b, 3)  # fewer steps: an approximation, honest residual
    assert n3 == 3 and r3.norm() > 1e-6
    torch.testing.assert_close(r3, b - A @ x3, atol=1e-9, rtol=0)
    x1, _, n1 = T.conjugate_gradient(lambda v: 2 * v, b, 10)  # A = 2I: done after one product
    assert n1 == 1 and torch.allclose(x1, b / 2)


def test_kl_exact():
    g = torch.Generator().manual_seed(0)
    old, new = torch.randn(4, 7, generator=g).log_softmax(-1), torch.randn(4, 7, generator=g).log_softmax(-1)
    ref = torch.nn.functional.kl_div(new, old, log_target=True, reduction="none").sum(-1)  # KL(old ‖ new)
    torch.testing.assert_close(T.kl_exact(old, new), ref)
    assert torch.allclose(T.kl_exact(old, old), torch.zeros(4))


@pytest.mark.parametrize("micro_batch_size", [3, 1])
def test_fisher_vector_product_matches_the_explicit_fisher_matrix(micro_batch_size):
    policy, batch = tiny_policy(), tiny_batch()
    F = explicit_fisher(policy, batch)
    n_params = F.shape[0]
    v = torch.randn(n_params, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    Fv = T.fisher_vector_product(policy, batch, int(batch[2].sum()), micro_batch_size, NULL, 1.0)(v)
    torch.testing.assert_close(Fv, F @ v, rtol=1e-4, atol=1e-5)  # the logits are taken in float32
    assert (F @ v).norm() > 1e-3  # not trivially zero


def test_natural_gradient_step_meets_the_trust_region():
    """With no damping, the step scaled to ½ sᵀF s = δ has a measured KL close to δ when δ is small
    (the quadratic model of the KL is right to second order), and the line search accepts it."""
    policy, batch = tiny_policy(), tiny_batch()
    old, theta_old = T.old_vocab_logprobs(policy, batch, 3, NULL, 1.0), \
        T.parameters_to_vector(policy.parameters()).detach()
    n_tok, delta = int(batch[2].sum()), 1e-5
    adv = torch.randn(3, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * batch[2]
    ids, targets, mask = batch
    old_logp = policy(ids, targets, mask=mask).detach()
    T.surrogate_loss(policy(ids, targets, mask=mask), old_logp, adv, mask, n_tok).backward()
    g = -T.parameters_to_vector([p.grad for p in policy.parameters()])
    policy.zero_grad(set_to_none=True)
    fvp = T.fisher_vector_product(policy, batch, n_tok, 3, NULL, 1.0)
    x, r, _ = T.conjugate_gradient(fvp, g, 10)
    s = (2 * delta / (x @ (g - r))).sqrt() * x
    assert (0.5 * s @ fvp(s)).item() == pytest.approx(delta, rel=1e-3)
    measure = lambda: T.kl_and_gain(policy, old, batch, adv, n_tok, 3, NULL, 1.0)
    accepted, kl, gain, tries = T.line_search(policy, theta_old, s, measure, 1.5 * delta, 1)
    assert accepted and kl == pytest.approx(delta, rel=0.05) and gain > 0
    assert gain == pytest.approx((g @ s).item(), rel=0.05)  # and the surrogate's gain the linear model's


def test_line_search_rejects_a_step_that_breaks_the_kl_bound():
    policy, batch = tiny_policy(), tiny_batch()
    old, theta_old = T.old_vocab_logprobs(policy, batch, 3, NULL, 1.0), \
        T.parameters_to_vector(policy.parameters()).detach()
    adv = torch.randn(3, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * batch[2]
    n_tok = int(batch[2].sum())
    step = torch.randn(theta_old.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    measure = lambda: T.kl_and_gain(policy, old, batch, adv, n_tok, 3, NULL, 1.0)
    T.vector_to_parameters(theta_old + step, policy.parameters())
    assert measure()[0] > 0.1  # this step moves the policy a lot
    accepted, kl, gain, tries = T.line_search(policy, theta_old, step, measure, 1e-3, 3)  # and so do 1/2 and 1/4 of it
    assert not accepted and (kl, gain, tries) == (0.0, 0.0, 3)
    assert torch.equal(T.parameters_to_vector(policy.parameters()), theta_old)  # the old parameters are back
    # a step that makes the surrogate worse is rejected too, however small its KL
    T.vector_to_parameters(theta_old + 1e-3 * step, policy.parameters())
    worse = 1e-3 * (step if measure()[1] < 0 else -step)
    assert not T.line_search(policy, theta_old, worse, measure, 1.0, 1)[0]
    assert torch.equal(T.parameters_to_vector(policy.parameters()), theta_old)


def test_line_search_backtracks_to_the_first_step_inside_the_bound():
    policy = tiny_policy()
    theta_old = T.parameters_to_vector(policy.parameters()).detach()
    step = torch.ones_like(theta_old)
    kls = iter([0.5, 0.2, 0.05, 0.01])
    accepted, kl, gain, tries = T.line_search(policy, theta_old, step, lambda: (next(kls), 1.0), 0.1, 10)
    assert accepted and (kl, tries) == (0.05, 3)
    torch.testing.assert_close(T.parameters_to_vector(policy.parameters()), theta_old + 0.25 * step)


def test_smoke_and_resume_and_the_kl_bound(monkeypatch, tmp_path, tiny_ckpt):
    args = ["--model", str(tiny_ckpt), "--steps", "3", "--save-every", "2", "--max-kl", "0.005", *TINY]
    run_script(T, monkeypatch, tmp_path, *args, "--run-name", "full")
    rows = [json.loads(l) for l in (tmp_path / "runs/full/metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/reward" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        assert {"train/kl_step", "train/step_accepted", "train/line_search_steps", "train/cg_residual", "perf/fvps",
                "train/step_cos_gradient", "train/value_loss", "train/explained_variance", "train/entropy",
                "train/kl"} <= r.keys()
        assert 0 <= r["train/kl_step"] <= r["train/max_kl"] and r["perf/fvps"] <= 4 and \
            -1 <= r["train/step_cos_gradient"] <= 1
        lr_t = T.lr_at(r["step"] - 1, T.Args(steps=3, warmup_steps=1))  # δ_t = δ (lr_t / lr)²
        assert r["train/max_kl"] == pytest.approx(0.005 * (lr_t / T.Args.lr) ** 2, abs=1e-6)
    assert sum(r["train/step_accepted"] for r in train) >= 1 and max(r["train/kl_step"] for r in train) > 0

    real = T.lr_at
    monkeypatch.setattr(T, "lr_at", lambda s, a: (_ for _ in ()).throw(KeyboardInterrupt) if s == 2 else real(s, a))
    with pytest.raises(KeyboardInterrupt):
        run_script(T, monkeypatch, tmp_path, *args, "--run-name", "cut")
    monkeypatch.setattr(T, "lr_at", real)
    run_script(T, monkeypatch, tmp_path, *args, "--run-name", "cut", "--resume")
    a, b = (read_safetensors(tmp_path / f"runs/{n}/model.safetensors") for n in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same samples, the same steps
    sa, sb = (torch.load(tmp_path / f"runs/{n}/trainer_state.pt", weights_only=True) for n in ("full", "cut"))
    assert all(torch.equal(sa["critic"][k], sb["critic"][k]) for k in sa["critic"])
