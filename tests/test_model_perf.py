"""Tests of model.py's performance paths: the fused kernel's backward skips an entropy that is not in
the loss, generate prefills each distinct prompt once, activation checkpointing, and torch.compile.
Each compares against a plain computation (log_softmax, an uncached loop, the path without the option)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import model as M


class CountOps(TorchDispatchMode):
    """Counts the aten operations run inside it."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _inputs(N=40, V=230, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, d, generator=g), torch.randn(V, d, generator=g) * 0.3, torch.randint(0, V, (N,), generator=g)


def _grads(h, w, t, entropy, in_loss, fused=True, count=None):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    if fused:
        lp, ent = M.token_logprobs(h, w, t, 0.9, entropy=True, chunk_size=16) if entropy else \
            (M.token_logprobs(h, w, t, 0.9, chunk_size=16), None)
    else:
        lsm = torch.log_softmax((h @ w.T) / 0.9, -1)
        lp, ent = lsm.gather(1, t[:, None]).squeeze(1), -(lsm.exp() * lsm).sum(-1)
    c = torch.linspace(-1, 1, len(t))
    loss = (lp * c).sum() + (0.3 * (ent * c).sum() if in_loss else 0)
    if count is None:
        loss.backward()
    else:
        with count:
            loss.backward()
    return h.grad, w.grad


@pytest.mark.parametrize("in_loss", [False, True])
def test_fused_entropy_grads_match_log_softmax(in_loss):
    h, w, t = _inputs()
    for a, b in zip(_grads(h, w, t, True, in_loss), _grads(h, w, t, True, in_loss, fused=False)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_fused_backward_skips_entropy_not_in_the_loss():
    """Entropy computed (logged) but not in the loss: the backward does exactly the work, and gives exactly
    the gradients, of the call without entropy. (Before, autograd passed zeros and the entropy branch ran.)"""
    h, w, t = _inputs()
    plain, logged = CountOps(), CountOps()
    g_plain = _grads(h, w, t, False, False, count=plain)
    g_logged = _grads(h, w, t, True, False, count=logged)
    assert logged.n == plain.n, (logged.n, plain.n)
    assert all(torch.equal(a, b) for a, b in zip(g_plain, g_logged))


# ----------------------------------------------------------------------------------------------
# generate and shared_prefix_logprobs: one prefill per distinct prompt, shared by its samples; the static cache
# of use_compile


def greedy_no_cache(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


GROUPED = [p for p in ([5, 17, 3, 44, 9, 2, 31], [7], [12, 8, 60, 1], [7]) for _ in range(3)]  # 3 samples each


def prefill_rows(model, monkeypatch):
    """Records the batch size of every trunk call of generate (the first one is the prefill)."""
    rows, trunk = [], model.trunk
    monkeypatch.setattr(model, "trunk", lambda idx, *a: rows.append(idx.shape[0]) or trunk(idx, *a))
    return rows


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("static", [False, True])
def test_generate_shared_prefill_greedy_equals_no_cache(fixture, static, request, monkeypatch):
    m = request.getfixturevalue(fixture)
    m.static_cache = static  # the static cache (use_compile's) runs eagerly here
    rows = prefill_rows(m, monkeypatch)
    out, mask = m.generate(GROUPED, 10, temperature=0, eos_id=[], pad_id=0)
    assert rows[0] == 4 and rows[1:] == [12] * 9  # 4 distinct consecutive prompts prefilled, 12 rows decoded
    for i, p in enumerate(GROUPED):
        assert out[i].tolist() == greedy_no_cache(m, p, 10), i
    assert (mask == 1).all()


def test_generate_grouped_prefill_greedy_equals_no_cache(tiny_llama, monkeypatch):
    """prefill_tokens = 8 cuts the distinct prompts (7, 1, 4, 1 tokens) into groups [7], [4, 1], [1], each
    padded only to its own longest prompt; greedy output still equals decoding without a cache."""
    m, rows = tiny_llama, prefill_rows(tiny_llama, monkeypatch)
    monkeypatch.setattr(m, "prefill_tokens", 8)
    out, mask = m.generate(GROUPED, 10, temperature=0, eos_id=[], pad_id=0)
    assert rows == [1, 2, 1] + [12] * 9
    for i, p in enumerate(GROUPED):
        assert out[i].tolist() == greedy_no_cache(m, p, 10), i
    assert (mask == 1).all()


@torch.no_grad()
def sample_full_prefill(model, prompts, n, temperature, seed, pad=0):
    """generate's sampling with no sharing: every row prefilled (the behaviour before the shared prefill)."""
    B, P = len(prompts), max(map(len, prompts))
    idx = torch.full((B, P), pad)
    valid = torch.zeros(B, P + n, dtype=torch.bool)
    for i, p in enumerate(prompts):
        idx[i, P - len(p):], valid[i, P - len(p):P] = torch.tensor(p), True
    n_pad = P - valid[:, :P].sum(1)
    cache = M.KVCache(model.config, B, P + n, "cpu", torch.float32)
    pos = (torch.arange(P) - n_pad[:, None]).clamp(min=0)
    mask = (torch.ones(P, P, dtype=torch.bool).tril()[None] & valid[:, None, :P])[:, None]
    mask = mask | torch.eye(P, dtype=torch.bool)
    h = model.trunk(idx, pos, mask, cache)[:, -1]
    noise, out = M.sampling_noise(seed, B, n), []
    for t in range(n):
        out.append(M.sample_next(model.lm_head(h).float(), temperature, 1.0, 0, noise[:, t]))
        valid[:, P + t] = True
        h = model.trunk(out[-1][:, None], (P + t - n_pad)[:, None], valid[:, None, None, :P + t + 1], cache)[:, -1]
    return torch.stack(out, 1)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_generate_shared_prefill_samples_as_before(fixture, request):
    """With a seed, the shared prefill samples the same tokens as prefilling every row (on this CPU the
    prefill's rows do not depend on the batch size), and the samples of one prompt differ."""
    m = request.getfixturevalue(fixture)
    out, _ = m.generate(GROUPED, 12, temperature=1.0, seed=3, eos_id=[], pad_id=0)
    assert torch.equal(out, sample_full_prefill(m, GROUPED, 12, 1.0, seed=3))
    assert torch.equal(out, m.generate(GROUPED, 12, temperature=1.0, seed=3, eos_id=[], pad_id=0)[0])
    assert len({tuple(r) for r in out[:3].tolist()}) > 1
    m.prefill_tokens = 8  # grouped prefill: the same samples
    try:
        assert torch.equal(out, m.generate(GROUPED, 12, temperature=1.0, seed=3, eos_id=[], pad_id=0)[0])
    finally:
        del m.prefill_tokens


def rollout_batch(prompts, completions, T, pad):
    """A collated RL batch (ids, targets, mask) (B, T), right-padded: mask 1 where the target is a completion
    token, as the scripts' collate makes it."""
    ids, targets, mask = torch.full((len(prompts), T), pad), torch.full((len(prompts), T), pad), torch.zeros(
        len(prompts), T)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        seq = torch.tensor(p + c)
        ids[i, :len(seq) - 1], targets[i, :len(seq) - 1], mask[i, len(p) - 1:len(seq) - 1] = seq[:-1], seq[1:], 1
    return ids, targets, mask


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shared_prefix_logprobs_equal_forward(fixture, temperature, request, monkeypatch):
    """The k completions of a prompt (of different lengths, one of them empty, one prompt of a single token)
    share one prefill of it, and score as forward does every row alone."""
    m = request.getfixturevalue(fixture)
    g = torch.Generator().manual_seed(0)
    lens = [[5, 1, 9], [3, 0, 12], [7, 7, 2], [4, 10, 6]]
    comps = [torch.randint(0, 80, (n,), generator=g).tolist() for ls in lens for n in ls]
    ids, targets, mask = rollout_batch(GROUPED, comps, 22, m.config.pad_token_id)
    rows = prefill_rows(m, monkeypatch)
    got = m.shared_prefix_logprobs(ids, targets, mask, temperature)
    assert rows == [4, 12]  # one prefill of the 4 prompts, then the 12 completions
    with torch.no_grad():
        want = m(ids, targets, mask=mask, temperature=temperature)
    assert got.shape == want.shape and (got[mask == 0] == 0).all()
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


def test_shared_prefix_logprobs_prompts_of_one_length(tiny_llama):
    """Prompts of one length: the prefill runs without a padding mask."""
    prompts = [p for p in ([5, 17, 3], [8, 9, 10]) for _ in range(3)]
    comps = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10], [11], [12, 13]]
    ids, targets, mask = rollout_batch(prompts, comps, 9, tiny_llama.config.pad_token_id)
    with torch.no_grad():
        want = tiny_llama(ids, targets, mask=mask)
    assert torch.allclose(tiny_llama.shared_prefix_logprobs(ids, targets, mask), want, atol=1e-5, rtol=0)


def test_shared_prefix_logprobs_no_repeat_is_forward(tiny_llama, monkeypatch):
    """With no prompt repeated (DPO's batches, a group size of 1), it is forward itself: one trunk call."""
    prompts, comps = [[5, 17, 3], [7], [12, 8, 60, 1]], [[4, 4], [9, 1, 2], [3]]
    ids, targets, mask = rollout_batch(prompts, comps, 8, tiny_llama.config.pad_token_id)
    rows = prefill_rows(tiny_llama, monkeypatch)
    with torch.no_grad():
        want = tiny_llama(ids, targets, mask=mask)
    assert torch.equal(tiny_llama.shared_prefix_logprobs(ids, targets, mask), want) and rows == [3, 3]


def test_generate_static_cache_stops_at_eos(tiny_llama):
    m = tiny_llama
    free, _ = m.generate(GROUPED, 10, temperature=0, eos_id=[], pad_id=0)
    eos = [int(free[0, 4]), int(free[-1, 6])]
    ref, ref_mask = m.generate(GROUPED, 10, temperature=0, eos_id=eos, pad_id=0)
    m.static_cache = True
    out, mask = m.generate(GROUPED, 10, temperature=0, eos_id=eos, pad_id=0)
    assert torch.equal(out, ref) and torch.equal(mask, ref_mask)
    assert mask[0].sum() == 5 and mask[-1].sum() <= 7 and (mask == 0).any()


def test_use_compile_needs_cuda_on_cpu(tiny_llama):
    with pytest.raises(ValueError, match="--compile needs CUDA"):
        tiny_llama.use_compile()
    assert not tiny_llama.static_cache


# ----------------------------------------------------------------------------------------------
# Activation checkpointing


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_grad_checkpoint_same_gradients(fixture, request):
    m = request.getfixturevalue(fixture)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, m.config.vocab_size - 2, (3, 12), generator=g)
    targets, mask = ids.roll(-1, 1), (torch.rand(3, 12, generator=g) > 0.3).long()
    calls = []
    m.transformer.h[0].register_forward_pre_hook(lambda *a: calls.append(1))  # (the recompute stops early)

    def grads(ckpt):
        m.grad_checkpoint, calls[:] = ckpt, []
        m.zero_grad()
        lp, ent = m(ids, targets, mask=mask, temperature=0.8, entropy=True)
        ((lp * 0.7).sum() + (ent * 0.1).sum()).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}, len(calls)

    (plain, n_plain), (ckpt, n_ckpt) = grads(False), grads(True)
    assert (n_plain, n_ckpt) == (1, 2)  # checkpointing ran block 0's forward again in the backward
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-6, msg=n)
    with torch.no_grad():  # no grad: no recomputation, the same forward
        calls[:] = []
        assert torch.equal(m(ids), m(ids)) and len(calls) == 2


# ----------------------------------------------------------------------------------------------
# torch.compile (CUDA only: on the CPU, inductor takes minutes per shape and use_compile refuses)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="use_compile needs CUDA")
def test_use_compile_cuda_greedy_and_grads(tiny_llama):
    from torch._dynamo.utils import counters

    m = tiny_llama.cuda()
    kw = dict(temperature=0, eos_id=[], pad_id=0)
    ref = m.generate(GROUPED, 10, **kw)[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 90, (3, 12), generator=g).cuda()
    targets, mask = ids.roll(-1, 1), (torch.rand(3, 12, generator=g) > 0.3).long().cuda()

    def grads():
        m.zero_grad()
        lp, ent = m(ids, targets, mask=mask, entropy=True)
        (lp.sum() + 0.1 * ent.sum()).backward()
        return [p.grad.clone() for p in m.parameters()]

    plain = grads()
    m.use_compile()
    assert m.static_cache and "trunk" not in dict(m.named_parameters()) and set(m.state_dict()) == set(
        tiny_llama.state_dict())
    assert torch.equal(m.generate(GROUPED, 10, **kw)[0], ref)
    graphs = counters["stats"]["unique_graphs"]
    assert torch.equal(m.generate(GROUPED, 10, **kw)[0], ref)  # the same shapes again: nothing recompiled
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(m.generate(GROUPED[3:], 6, **kw)[0], ref[3:, :6])  # other shapes
    for ckpt in (False, True):
        m.grad_checkpoint = ckpt
        for a, b in zip(grads(), plain):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)



def test_packed_weights_for_the_decode_steps():
    """model.packed_weights: inside, large Linear weights are also held packed and a few rows without autograd go
    through them (equal to F.linear up to rounding); small weights, autograd, many rows and the exit: F.linear."""
    torch.manual_seed(0)
    big, small = M.Linear(512, 600), M.Linear(24, 40, bias=False)
    net = torch.nn.ModuleList([big, small])
    assert list(big.state_dict()) == ["weight", "bias"]
    x = torch.randn(3, 5, 512)
    with M.packed_weights(net, 15):
        if not torch.backends.mkldnn.is_available():
            pytest.skip("torch built without oneDNN: nothing is packed")
        assert big.packed is not None and small.packed is None
        with torch.no_grad():
            y = big(x)
            torch.testing.assert_close(y, torch.nn.functional.linear(x, big.weight, big.bias), rtol=1e-5, atol=1e-5)
            assert y.shape == (3, 5, 600)
            many = torch.randn(300, 512)
            assert torch.equal(big(many), torch.nn.functional.linear(many, big.weight, big.bias))
        y = big(x)
        assert y.requires_grad and torch.equal(y, torch.nn.functional.linear(x, big.weight, big.bias))
    assert big.packed is None


def test_generate_with_packed_weights_is_greedy_equal_to_the_uncached_loop():
    """A model whose linears are packed in the decode steps (weights of 2^18+ entries) decodes greedily what the
    uncached loop decodes (no packing there: only generate packs)."""
    torch.manual_seed(0)
    cfg = M.GPTConfig(arch="llama", vocab_size=600, n_layer=2, n_head=8, n_kv_head=4, n_embd=512, ffn_dim=512,
                      max_seq_len=64, tie_embeddings=False, eos_token_id=[0], pad_token_id=1)
    model = M.GPT(cfg).eval()
    for p in model.parameters():  # larger weights than the init's: logits far apart, so rounding cannot flip an argmax
        p.data.mul_(4)
    packed = [m for m in model.modules() if isinstance(m, M.Linear) and m.weight.numel() >= 1 << 18]
    assert len(packed) >= 3
    prompts = [[5, 9, 7, 3], [8, 2], [4, 4, 4, 6, 2, 9]]
    out, _ = model.generate(prompts, 12, temperature=0, eos_id=[-1])
    for prompt, row in zip(prompts, out.tolist()):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert row == ids[len(prompt):]
