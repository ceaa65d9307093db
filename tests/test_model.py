"""Tests of model.py: fused log-probs, architecture parity with transformers, loading and saving
(safetensors, sharded, hub, GGUF), dequantizers, the tokenizer, generate, and clear errors.

Every check compares against an independent computation (naive PyTorch, transformers, tokenizers,
safetensors, gguf) rather than against model.py itself. Optional packages are skipped when absent."""

import http.server
import json
import math
import random
import re
import struct
import sys
import threading
import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import model as M
from conftest import randomize_

# ----------------------------------------------------------------------------------------------
# Fused token log-probs


def naive_logprobs(hidden, weight, targets, temperature=1.0):
    """log_softmax + gather, and entropy, with the full (N, V) logits."""
    z = (hidden @ weight.T) / temperature
    lsm = torch.log_softmax(z, dim=-1)
    lp = lsm.gather(-1, targets[..., None]).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    return lp, ent


def _inputs(N=50, V=300, d=64, seed=0, dtype=torch.float32, w_std=0.25):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(V, d, generator=g, dtype=torch.float64) * w_std).to(dtype)  # logits ~ N(0, 2^2)
    t = torch.randint(0, V, (N,), generator=g)
    return h, w, t


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64])
def test_token_logprobs_values_entropy_and_grads(temperature, chunk_size):
    h, w, t = _inputs()  # N = 50: chunk 7 does not divide it, 64 is larger than it
    logits = h @ w.T
    assert 1.0 < logits.std() < 5.0  # realistically scaled
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(50, generator=g), torch.randn(50, generator=g)

    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent = M.token_logprobs(h1, w1, t, temperature, entropy=True, chunk_size=chunk_size)
    ((lp * a).sum() + (ent * b).sum()).backward()

    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp_ref, ent_ref = naive_logprobs(h2, w2, t, temperature)
    ((lp_ref * a).sum() + (ent_ref * b).sum()).backward()

    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp, lp_ref, **tol)
    torch.testing.assert_close(ent, ent_ref, **tol)
    torch.testing.assert_close(h1.grad, h2.grad, **tol)
    torch.testing.assert_close(w1.grad, w2.grad, **tol)


@pytest.mark.parametrize("use", ["logp", "entropy"])
def test_token_logprobs_grads_of_one_output(use):
    """Gradients when only log p (entropy=False) or only the entropy feeds the loss."""
    h, w, t = _inputs(N=33, V=211, seed=3)
    g = torch.randn(33, generator=torch.Generator().manual_seed(4))
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp_ref, ent_ref = naive_logprobs(h2, w2, t, 0.9)
    if use == "logp":
        lp = M.token_logprobs(h1, w1, t, 0.9, chunk_size=10)
        assert isinstance(lp, torch.Tensor) and lp.shape == (33,)
        (lp * g).sum().backward()
        (lp_ref * g).sum().backward()
    else:
        lp, ent = M.token_logprobs(h1, w1, t, 0.9, entropy=True, chunk_size=10)
        (ent * g).sum().backward()
        (ent_ref * g).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("needs", ["hidden", "weight"])
def test_token_logprobs_grad_for_one_input(needs):
    """A frozen unembedding (or frozen hidden states) gets no gradient; the other one is right."""
    h, w, t = _inputs(N=21, V=130, seed=30)
    x = (h if needs == "hidden" else w).clone().requires_grad_()
    args = (x, w) if needs == "hidden" else (h, x)
    lp, ent = M.token_logprobs(*args, t, 1.1, entropy=True, chunk_size=8)
    g, = torch.autograd.grad(lp.sum() + 0.5 * ent.sum(), x)
    x2 = x.detach().clone().requires_grad_()
    args2 = (x2, w) if needs == "hidden" else (h, x2)
    lp2, ent2 = naive_logprobs(*args2, t, 1.1)
    g2, = torch.autograd.grad(lp2.sum() + 0.5 * ent2.sum(), x2)
    torch.testing.assert_close(g, g2, atol=1e-5, rtol=1e-5)


def test_token_logprobs_gradcheck_fp64():
    h, w, t = _inputs(N=5, V=7, d=3, seed=5, dtype=torch.float64, w_std=1.0)
    h.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda h, w: M.token_logprobs(h, w, t, 0.8, entropy=True, chunk_size=2), (h, w))
    assert torch.autograd.gradcheck(lambda h, w: M.token_logprobs(h, w, t, 1.3, chunk_size=3), (h, w))


def test_token_logprobs_leading_batch_dims():
    B, T, d, V = 3, 11, 64, 150
    g = torch.Generator().manual_seed(6)
    full = torch.randn(B, T + 1, d, generator=g, requires_grad=True)
    h = full[:, :-1]  # not contiguous, as when the last position is dropped
    assert not h.is_contiguous()
    w = (torch.randn(V, d, generator=g) * 0.25).requires_grad_()
    t = torch.randint(0, V, (B, T), generator=g)
    lp, ent = M.token_logprobs(h, w, t, entropy=True, chunk_size=4)
    assert lp.shape == ent.shape == (B, T)
    lp_ref, ent_ref = naive_logprobs(h, w, t)
    torch.testing.assert_close(lp, lp_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ent_ref, atol=1e-5, rtol=1e-5)
    gh, = torch.autograd.grad(lp.sum(), full)
    gh_ref, = torch.autograd.grad(lp_ref.sum(), full)
    assert gh.shape == (B, T + 1, d) and (gh[:, -1] == 0).all()
    torch.testing.assert_close(gh, gh_ref, atol=1e-5, rtol=1e-5)


def test_token_logprobs_bf16_autocast_close_to_fp32():
    """Under CPU autocast the matmuls run in bf16 but log p stays fp32 and close to the exact value."""
    h, w, t = _inputs(N=40, V=256, seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = M.token_logprobs(h, w, t)
    assert lp.dtype == torch.float32
    lp_ref, _ = naive_logprobs(h, w, t)
    torch.testing.assert_close(lp, lp_ref, atol=0.15, rtol=0.05)


class MaxTensor(TorchDispatchMode):
    """Records the largest tensor (elements) produced by any op, separately for each phase."""

    def __init__(self):
        super().__init__()
        self.phase, self.largest, self.ops = "fwd", {}, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in torch.utils._pytree.tree_leaves(out):
            if isinstance(x, torch.Tensor):
                self.ops[self.phase] = self.ops.get(self.phase, 0) + 1
                if x.numel() > self.largest.get(self.phase, 0):
                    self.largest[self.phase] = x.numel()
        return out


def _largest_tensors(fn, N, V, d, chunk_size):
    h, w, t = _inputs(N=N, V=V, d=d, seed=8)
    h.requires_grad_()
    w.requires_grad_()
    mode = MaxTensor()
    with mode:
        lp, ent = fn(h, w, t, chunk_size)
        loss = lp.sum() + ent.sum()
        mode.phase = "bwd"
        loss.backward()
    return mode


def test_no_tokens_by_vocab_tensor_is_allocated():
    N, V, d, chunk = 512, 1000, 64, 32
    fused = _largest_tensors(lambda h, w, t, c: M.token_logprobs(h, w, t, 0.9, entropy=True, chunk_size=c),
                             N, V, d, chunk)
    naive = _largest_tensors(lambda h, w, t, c: naive_logprobs(h, w, t, 0.9), N, V, d, chunk)
    # the harness sees (N, V) tensors when they exist, forward and backward
    assert naive.largest["fwd"] >= N * V and naive.largest["bwd"] >= N * V
    assert fused.ops.get("bwd", 0) > 0 and fused.largest["bwd"] >= chunk * V  # backward is observed
    assert max(fused.largest.values()) <= max(chunk * V, V * d) < N * V, fused.largest


def test_default_chunking_bounds_the_largest_tensor():
    """With no chunk_size, a (N, V) problem bigger than the default chunk is still split."""
    V, d = 4096, 16
    N = (1 << 23) // V + 300  # more rows than one default chunk of about 32 MB of fp32 logits
    mode = _largest_tensors(lambda h, w, t, c: M.token_logprobs(h, w, t, entropy=True), N, V, d, None)
    assert max(mode.largest.values()) < N * V
    assert max(mode.largest.values()) * 4 <= 40 * 2**20  # about 32 MB a chunk


def _naive_model_logprobs(model, idx, targets, temperature=1.0):
    lsm = torch.log_softmax(model(idx) / temperature, dim=-1)
    lp = lsm.gather(-1, targets[..., None]).squeeze(-1)
    return lp, -(lsm.exp() * lsm).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_model_forward_targets_mask_matches_naive(tiny_llama, temperature):
    m = tiny_llama
    g = torch.Generator().manual_seed(9)
    B, T, V = 3, 17, m.config.vocab_size
    idx = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) < 0.6).long()
    mask[2] = 0  # a row with nothing to score
    lp, ent = m(idx, targets, mask=mask, temperature=temperature, entropy=True)
    assert lp.shape == ent.shape == (B, T)
    lp_ref, ent_ref = _naive_model_logprobs(m, idx, targets, temperature)
    keep = mask.bool()
    torch.testing.assert_close(lp[keep], lp_ref[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent[keep], ent_ref[keep], atol=1e-5, rtol=1e-5)
    assert (lp[~keep] == 0).all() and (ent[~keep] == 0).all()
    # without a mask: every position
    torch.testing.assert_close(m(idx, targets, temperature=temperature), lp_ref, atol=1e-5, rtol=1e-5)


def test_model_forward_mask_gradients_match_naive(tiny_llama, tiny_gpt2):
    for m in (tiny_llama, tiny_gpt2):
        g = torch.Generator().manual_seed(10)
        B, T, V = 2, 13, m.config.vocab_size
        idx = torch.randint(0, V, (B, T), generator=g)
        targets = torch.randint(0, V, (B, T), generator=g)
        mask = (torch.rand(B, T, generator=g) < 0.5).long()
        coef, coef_e = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)

        m.zero_grad()
        lp, ent = m(idx, targets, mask=mask, entropy=True)
        ((lp * coef).sum() + (ent * coef_e * mask).sum()).backward()
        fused = {n: p.grad.clone() for n, p in m.named_parameters()}

        m.zero_grad()
        lp_ref, ent_ref = _naive_model_logprobs(m, idx, targets)
        ((lp_ref * coef * mask).sum() + (ent_ref * coef_e * mask).sum()).backward()
        for n, p in m.named_parameters():
            torch.testing.assert_close(fused[n], p.grad, atol=1e-5, rtol=1e-4, msg=lambda s: f"{n}: {s}")


def test_model_forward_all_masked_is_zero_with_zero_grad(tiny_llama):
    idx = torch.randint(0, 97, (2, 6))
    lp = tiny_llama(idx, idx, mask=torch.zeros(2, 6, dtype=torch.long))
    assert lp.shape == (2, 6) and (lp == 0).all()
    lp.sum().backward()
    assert all(p.grad is None or (p.grad == 0).all() for p in tiny_llama.parameters())


def test_model_forward_saves_no_tokens_by_vocab_tensor():
    cfg = M.tiny_config(n_layer=2, n_embd=32, n_head=4, n_kv_head=4, ffn_dim=64, max_seq_len=64)
    m = randomize_(M.GPT(cfg), seed=11)
    B, T, V = 2, 40, cfg.vocab_size
    idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(12))

    def saved_sizes(fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: sizes.append(x.numel()) or x, lambda x: x):
            out = fn()
        out.sum().backward()
        return sizes

    naive = saved_sizes(lambda: _naive_model_logprobs(m, idx[:, :-1], idx[:, 1:])[0])
    fused = saved_sizes(lambda: m(idx[:, :-1], idx[:, 1:], mask=torch.ones(B, T - 1)))
    N = B * (T - 1)
    assert max(naive) >= N * V  # the naive path keeps the logits for backward
    assert max(fused) < N * V


# ----------------------------------------------------------------------------------------------
# Architecture parity with transformers (both directions)


def _hf_logits(hf_model, idx):
    with torch.no_grad():
        return hf_model(idx).logits


def _our_logits(model, idx):
    with torch.no_grad():
        return model(idx)


def _idx(V, B=2, T=20, seed=13):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


def _hf_configs():
    tr = pytest.importorskip("transformers")
    common = dict(num_hidden_layers=2, max_position_embeddings=64, attn_implementation="eager")
    return {
        "gpt2": lambda: tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=97, n_positions=64, n_embd=48, n_layer=2, n_head=4,
                                                          attn_implementation="eager")),
        "gpt2-inner": lambda: tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=97, n_positions=64, n_embd=48, n_layer=2,
                                                                n_head=4, n_inner=72, attn_implementation="eager")),
        "llama-gqa-untied-llama3": lambda: tr.LlamaForCausalLM(tr.LlamaConfig(
            vocab_size=101, hidden_size=48, intermediate_size=72, num_attention_heads=6, num_key_value_heads=2,
            tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=dict(LLAMA3_SCALING),
            **common)),
        "llama-tied-headdim": lambda: tr.LlamaForCausalLM(tr.LlamaConfig(
            vocab_size=101, hidden_size=48, intermediate_size=72, num_attention_heads=4, num_key_value_heads=4,
            head_dim=16, tie_word_embeddings=True, rope_theta=500000.0, **common)),
        "qwen2-bias-tied": lambda: tr.Qwen2ForCausalLM(tr.Qwen2Config(
            vocab_size=103, hidden_size=48, intermediate_size=80, num_attention_heads=6, num_key_value_heads=2,
            tie_word_embeddings=True, rope_theta=1000000.0, **common)),
        "qwen2-bias-untied": lambda: tr.Qwen2ForCausalLM(tr.Qwen2Config(
            vocab_size=103, hidden_size=48, intermediate_size=80, num_attention_heads=4, num_key_value_heads=4,
            tie_word_embeddings=False, **common)),
    }


@pytest.mark.parametrize("name", ["gpt2", "gpt2-inner", "llama-gqa-untied-llama3", "llama-tied-headdim",
                                  "qwen2-bias-tied", "qwen2-bias-untied"])
def test_logits_parity_hf_to_ours(name, tmp_path):
    hf = randomize_(_hf_configs()[name](), seed=14).eval()
    if name.startswith("qwen2"):  # the q/k/v biases exist and are non-zero
        assert hf.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    hf.save_pretrained(tmp_path)
    ours = M.GPT.from_pretrained(tmp_path)
    idx = _idx(hf.config.vocab_size)
    ref = _hf_logits(hf, idx)
    assert ref.std() > 0.3  # not a degenerate model
    torch.testing.assert_close(_our_logits(ours, idx), ref, atol=2e-5, rtol=1e-5)


def _our_configs():
    return {
        "gpt2": M.GPTConfig(arch="gpt2", vocab_size=97, n_layer=2, n_head=4, n_kv_head=4, n_embd=48, ffn_dim=72,
                            max_seq_len=64, pos="learned", norm="layernorm", mlp="gelu", bias=True,
                            tie_embeddings=True),
        "llama-gqa-untied-llama3": M.GPTConfig(arch="llama", vocab_size=101, n_layer=2, n_head=6, n_kv_head=2,
                                               n_embd=48, ffn_dim=72, max_seq_len=64, tie_embeddings=False,
                                               norm_eps=1e-5, rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING)),
        "llama-headdim": M.GPTConfig(arch="llama", vocab_size=101, n_layer=2, n_head=6, n_kv_head=3, n_embd=48,
                                     head_dim=16, ffn_dim=72, max_seq_len=64, tie_embeddings=True),
        "qwen2-bias-tied": M.GPTConfig(arch="qwen2", vocab_size=103, n_layer=2, n_head=6, n_kv_head=2, n_embd=48,
                                       ffn_dim=80, max_seq_len=64, qkv_bias=True, tie_embeddings=True, norm_eps=1e-6,
                                       rope_theta=1000000.0),
        "qwen2-bias-untied": M.GPTConfig(arch="qwen2", vocab_size=103, n_layer=2, n_head=4, n_kv_head=4, n_embd=48,
                                         ffn_dim=80, max_seq_len=64, qkv_bias=True, tie_embeddings=False),
        "tiny": M.tiny_config(n_layer=2),
    }


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-untied-llama3", "llama-headdim", "qwen2-bias-tied",
                                  "qwen2-bias-untied", "tiny"])
def test_logits_parity_ours_to_hf(name, tmp_path):
    tr = pytest.importorskip("transformers")
    ours = randomize_(M.GPT(_our_configs()[name]), seed=15).eval()
    ours.save_pretrained(tmp_path)
    hf, info = tr.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    idx = _idx(ours.config.vocab_size)
    torch.testing.assert_close(_hf_logits(hf.eval(), idx), _our_logits(ours, idx), atol=2e-5, rtol=1e-5)
    # and back into model.py
    torch.testing.assert_close(_our_logits(M.GPT.from_pretrained(tmp_path), idx), _our_logits(ours, idx),
                               atol=0, rtol=0)


def test_sharded_checkpoint_from_transformers(tmp_path):
    hf = randomize_(_hf_configs()["llama-gqa-untied-llama3"](), seed=16).eval()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "model.safetensors.index.json").exists()
    assert not (tmp_path / "model.safetensors").exists()
    idx = _idx(hf.config.vocab_size)
    torch.testing.assert_close(_our_logits(M.GPT.from_pretrained(tmp_path), idx), _hf_logits(hf, idx),
                               atol=2e-5, rtol=1e-5)


def test_sharded_checkpoint_written_by_hand(tmp_path, tiny_llama):
    """Shards written with model.write_safetensors and an index.json, independent of transformers."""
    (tmp_path / "config.json").write_text(json.dumps(M.config_to_hf(tiny_llama.config)))
    sd = M.hf_state_dict(tiny_llama)
    names = sorted(sd)
    weight_map = {}
    for k, part in enumerate((names[0::3], names[1::3], names[2::3])):
        fname = f"model-{k + 1:05d}-of-00003.safetensors"
        M.write_safetensors(tmp_path / fname, {n: sd[n] for n in part})
        weight_map.update({n: fname for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    idx = _idx(97)
    torch.testing.assert_close(_our_logits(M.GPT.from_pretrained(tmp_path), idx), _our_logits(tiny_llama, idx),
                               atol=0, rtol=0)


def test_gpt2_checkpoint_without_transformer_prefix(tmp_path):
    """The original GPT-2 checkpoints name tensors h.0.attn... without "transformer."."""
    hf = randomize_(_hf_configs()["gpt2"](), seed=31).eval()
    hf.save_pretrained(tmp_path)
    ts = {k.removeprefix("transformer."): v.clone()
          for k, v in M.read_safetensors(tmp_path / "model.safetensors").items()}
    assert "h.0.attn.c_attn.weight" in ts
    M.write_safetensors(tmp_path / "model.safetensors", ts)
    idx = _idx(97)
    torch.testing.assert_close(_our_logits(M.GPT.from_pretrained(tmp_path), idx), _hf_logits(hf, idx),
                               atol=2e-5, rtol=1e-5)


def test_hf_config_fields_round_trip(tmp_path):
    """config.json written by save_pretrained carries the ids and switches transformers reads."""
    cfg = M.GPTConfig(arch="qwen2", vocab_size=103, n_layer=1, n_head=4, n_kv_head=2, n_embd=32, ffn_dim=48,
                      max_seq_len=128, qkv_bias=True, tie_embeddings=False, norm_eps=1e-6, rope_theta=12345.0,
                      bos_token_id=100, eos_token_id=[101], pad_token_id=102)
    M.GPT(cfg).save_pretrained(tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    assert c["architectures"] == ["Qwen2ForCausalLM"] and c["eos_token_id"] == 101 and c["pad_token_id"] == 102
    assert c["bos_token_id"] == 100 and c["tie_word_embeddings"] is False and c["num_key_value_heads"] == 2
    back = M.GPT.from_pretrained(tmp_path).config
    for k in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "head_dim", "ffn_dim", "max_seq_len",
              "qkv_bias", "tie_embeddings", "norm_eps", "rope_theta", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(back, k) == getattr(cfg, k), k


def test_eos_token_id_zero_survives_load_and_save(tmp_path):
    """SmolLM2-135M (base) and others use id 0 (<|endoftext|>) as EOS."""
    c = M.config_from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "hidden_size": 8, "intermediate_size": 8, "eos_token_id": 0}, "x")
    assert c.eos_token_id == [0]
    assert M.config_to_hf(M.tiny_config(eos_token_id=[0]))["eos_token_id"] == 0


# ----------------------------------------------------------------------------------------------
# safetensors


def _st_tensors():
    g = torch.Generator().manual_seed(17)
    return {"a.f32": torch.randn(3, 5, generator=g), "b.f16": torch.randn(7, generator=g).half(),
            "c.bf16": torch.randn(2, 3, 4, generator=g).bfloat16(), "d.i64": torch.arange(6).view(2, 3),
            "e.scalar": torch.tensor(2.5), "f.empty": torch.zeros(0, 4), "g.u8": torch.arange(9, dtype=torch.uint8)}


def test_read_safetensors_matches_package(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    ts = _st_tensors()
    st.save_file(ts, tmp_path / "x.safetensors", metadata={"format": "pt"})
    got = M.read_safetensors(tmp_path / "x.safetensors")
    assert set(got) == set(ts)
    for k, v in ts.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k


def test_write_safetensors_read_by_package(tmp_path):
    st = pytest.importorskip("safetensors")
    ts = _st_tensors()
    ts["h.transposed"] = torch.randn(4, 6).t()  # not contiguous
    M.write_safetensors(tmp_path / "y.safetensors", ts, {"format": "pt", "step": 3})
    got = st.torch.load_file(tmp_path / "y.safetensors")
    for k, v in ts.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    with st.safe_open(tmp_path / "y.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "step": "3"}


def test_read_safetensors_never_writes_the_file(tmp_path):
    ts = {"w": torch.arange(8, dtype=torch.float32)}
    M.write_safetensors(tmp_path / "z.safetensors", ts)
    before = (tmp_path / "z.safetensors").read_bytes()
    M.read_safetensors(tmp_path / "z.safetensors")["w"].add_(1)
    assert (tmp_path / "z.safetensors").read_bytes() == before
    assert torch.equal(M.read_safetensors(tmp_path / "z.safetensors")["w"], ts["w"])


# ----------------------------------------------------------------------------------------------
# Errors: one clear message naming what and where


@pytest.fixture
def saved_llama(tmp_path, tiny_llama):
    d = tmp_path / "ckpt"
    tiny_llama.save_pretrained(d)
    return d


def test_error_unknown_architecture(saved_llama):
    c = json.loads((saved_llama / "config.json").read_text())
    c["architectures"], c["model_type"] = ["MistralForCausalLM"], "mistral"
    (saved_llama / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match=r"config\.json.*'MistralForCausalLM' is not supported"):
        M.GPT.from_pretrained(saved_llama)


def test_error_invalid_json(saved_llama):
    (saved_llama / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        M.GPT.from_pretrained(saved_llama)


def test_error_missing_tensor(saved_llama):
    ts = dict(M.read_safetensors(saved_llama / "model.safetensors"))
    del ts["model.layers.1.mlp.up_proj.weight"]
    M.write_safetensors(saved_llama / "model.safetensors", {k: v.clone() for k, v in ts.items()})
    with pytest.raises(ValueError, match=r"ckpt: missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        M.GPT.from_pretrained(saved_llama)


def test_error_wrong_shape(saved_llama):
    ts = {k: v.clone() for k, v in M.read_safetensors(saved_llama / "model.safetensors").items()}
    ts["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(24, 32)  # config: 2 kv heads x 8 = 16 rows
    M.write_safetensors(saved_llama / "model.safetensors", ts)
    with pytest.raises(ValueError, match=r"ckpt: wrong shape: .*k_proj\.weight \(24, 32\)"):
        M.GPT.from_pretrained(saved_llama)


def test_error_unexpected_tensor(saved_llama):
    ts = {k: v.clone() for k, v in M.read_safetensors(saved_llama / "model.safetensors").items()}
    ts["model.layers.7.mlp.up_proj.weight"] = torch.zeros(2, 2)
    M.write_safetensors(saved_llama / "model.safetensors", ts)
    with pytest.raises(ValueError, match=r"unexpected tensors.*model\.layers\.7\.mlp\.up_proj\.weight"):
        M.GPT.from_pretrained(saved_llama)


def test_error_truncated_safetensors(saved_llama):
    f = saved_llama / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated: tensor \S+ ends at byte"):
        M.GPT.from_pretrained(saved_llama)
    f.write_bytes(data[:100])  # inside the header
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated or not a safetensors file"):
        M.read_safetensors(f)
    f.write_bytes(data[:5])
    with pytest.raises(ValueError, match=r"model\.safetensors: truncated or not a safetensors file"):
        M.read_safetensors(f)


def test_error_corrupt_safetensors_header(saved_llama):
    f = saved_llama / "model.safetensors"
    data = bytearray(f.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    data[8:8 + n] = b"\xff" * n
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors: corrupt safetensors header"):
        M.GPT.from_pretrained(saved_llama)


def test_error_missing_config_and_weights_and_shard(tmp_path, saved_llama):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no config\.json"):
        M.GPT.from_pretrained(tmp_path / "empty")
    (saved_llama / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"ckpt: no model\.safetensors"):
        M.GPT.from_pretrained(saved_llama)
    (saved_llama / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-1.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=r"model-1\.safetensors: shard listed in "
                                                r"model\.safetensors\.index\.json"):
        M.GPT.from_pretrained(saved_llama)


def test_error_nonexistent_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no-such-dir: no such checkpoint"):
        M.GPT.from_pretrained(tmp_path / "no-such-dir")
    with pytest.raises(FileNotFoundError, match=r"no such checkpoint"):
        M.Tokenizer.from_pretrained(str(tmp_path / "nope.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"weights\.bin: not a checkpoint directory or a \.gguf file"):
        M.GPT.from_pretrained(tmp_path / "weights.bin")


def test_error_prompt_longer_than_context(tiny_llama):
    with pytest.raises(ValueError, match=r"prompt of 60 tokens \+ 10 new tokens exceeds the context of 64"):
        tiny_llama.generate([[1] * 60, [2]], 10)
    with pytest.raises(ValueError, match=r"exceeds the context of 64 tokens"):
        tiny_llama(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match=r"empty prompt"):
        tiny_llama.generate([[1, 2], []], 3)


def test_error_unsupported_safetensors_dtype(tmp_path):
    f = tmp_path / "x.safetensors"
    header = json.dumps({"w": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}).encode()
    f.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    with pytest.raises(ValueError, match=r"x\.safetensors: tensor w has unsupported dtype 'F8_E4M3'"):
        M.read_safetensors(f)


def test_error_unsupported_tokenizer(tmp_path):
    d = write_tokenizer_dir(tmp_path / "tok", "gpt2")
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁"}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ValueError, match=r"tokenizer\.json: pre_tokenizer .*Metaspace.* is not supported"):
        M.Tokenizer.from_dir(d)
    tj["model"]["type"] = "Unigram"
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ValueError, match=r"tokenizer\.json: tokenizer model 'Unigram' is not supported"):
        M.Tokenizer.from_dir(d)


def test_error_missing_tokenizer(saved_llama):
    with pytest.raises(FileNotFoundError, match=r"ckpt: no tokenizer\.json"):
        M.Tokenizer.from_pretrained(saved_llama)


# ----------------------------------------------------------------------------------------------
# GGUF: files written with the gguf package, llama.cpp's layout


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute: q/k rows reordered for llama.cpp's rotary layout."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_unpermute(w, n_head):
    """The inverse, computed from the permutation of row indices (independent of model.py's reshape)."""
    perm = llama_cpp_permute(np.arange(w.shape[0]), n_head)
    return w[np.argsort(perm)]


GGUF_DIMS = dict(V=128, d=64, n_head=4, n_kv=2, ffn=96, n_layer=2, ctx=64)


def _hf_layout_weights(arch, tied, seed):
    D = GGUF_DIMS
    hd = D["d"] // D["n_head"]
    rng = np.random.default_rng(seed)
    r = lambda *s: (0.2 * rng.standard_normal(s)).astype(np.float32)
    w = {"model.embed_tokens.weight": r(D["V"], D["d"]), "model.norm.weight": 1 + 0.5 * r(D["d"])}
    if not tied:
        w["lm_head.weight"] = r(D["V"], D["d"])
    for i in range(D["n_layer"]):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": 1 + 0.5 * r(D["d"]),
              p + "post_attention_layernorm.weight": 1 + 0.5 * r(D["d"]),
              p + "self_attn.q_proj.weight": r(D["n_head"] * hd, D["d"]),
              p + "self_attn.k_proj.weight": r(D["n_kv"] * hd, D["d"]),
              p + "self_attn.v_proj.weight": r(D["n_kv"] * hd, D["d"]),
              p + "self_attn.o_proj.weight": r(D["d"], D["n_head"] * hd),
              p + "mlp.gate_proj.weight": r(D["ffn"], D["d"]), p + "mlp.up_proj.weight": r(D["ffn"], D["d"]),
              p + "mlp.down_proj.weight": r(D["d"], D["ffn"])}
        if arch == "qwen2":
            w |= {p + "self_attn.q_proj.bias": r(D["n_head"] * hd), p + "self_attn.k_proj.bias": r(D["n_kv"] * hd),
                  p + "self_attn.v_proj.bias": r(D["n_kv"] * hd)}
    return w


def _gguf_name(hf_name):
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, i, rest = hf_name.split(".", 3)
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    mod, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{names[mod]}.{kind}"


def _add_gguf_tokenizer(writer, tk):
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tk["pre"])
    writer.add_token_list(tk["tokens"])
    writer.add_token_types(tk["types"])
    writer.add_token_merges(tk["merges"])
    writer.add_bos_token_id(tk["bos"])
    writer.add_eos_token_id(tk["eos"])
    writer.add_pad_token_id(tk["pad"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(tk["chat_template"])


def write_tiny_gguf(path, arch="llama", tied=False, types=None, seed=0, tokenizer=None, rope_freqs=None,
                    rope_theta=10000.0, weights=None, override_type=None):
    """Write a random tiny llama/qwen2 GGUF as llama.cpp's converter would (q/k permuted for llama).
    Returns {gguf tensor name: float32 values as stored (dequantized with gguf.quants)} in HF row order
    and the HF-layout weights of those values (q/k un-permuted)."""
    gguf = pytest.importorskip("gguf")
    Q = gguf.GGMLQuantizationType
    types = types or [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]
    D = GGUF_DIMS
    hd = D["d"] // D["n_head"]
    weights = weights or _hf_layout_weights(arch, tied, seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(D["n_layer"])
    writer.add_context_length(D["ctx"])
    writer.add_embedding_length(D["d"])
    writer.add_feed_forward_length(D["ffn"])
    writer.add_head_count(D["n_head"])
    writer.add_head_count_kv(D["n_kv"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(rope_theta)
    writer.add_rope_dimension_count(hd)
    writer.add_vocab_size(D["V"])
    if tokenizer:
        _add_gguf_tokenizer(writer, tokenizer)
    stored, hf_dequant, k = {}, {}, 0
    for hf_name, w in weights.items():
        name = _gguf_name(hf_name)
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            w = llama_cpp_permute(w, D["n_head"] if "attn_q" in name else D["n_kv"])
        qtype = Q.F32
        if w.ndim == 2:
            qtype, k = types[k % len(types)], k + 1
        if override_type and name in override_type:
            qtype = override_type[name]
        if qtype == Q.F32:
            writer.add_tensor(name, w)
            deq = w
        elif qtype == Q.F16:
            writer.add_tensor(name, w.astype(np.float16))
            deq = w.astype(np.float16).astype(np.float32)
        else:
            data = gguf.quants.quantize(w, qtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
            deq = gguf.quants.dequantize(data, qtype).astype(np.float32).reshape(w.shape)
        stored[name] = deq
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            deq = llama_cpp_unpermute(deq, D["n_head"] if "attn_q" in name else D["n_kv"])
        hf_dequant[hf_name] = deq
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored, hf_dequant


def _hf_reference(arch, hf_weights, tied, **extra):
    tr = pytest.importorskip("transformers")
    D = GGUF_DIMS
    kw = dict(vocab_size=D["V"], hidden_size=D["d"], intermediate_size=D["ffn"], num_hidden_layers=D["n_layer"],
              num_attention_heads=D["n_head"], num_key_value_heads=D["n_kv"], max_position_embeddings=D["ctx"],
              rms_norm_eps=1e-5, tie_word_embeddings=tied, attn_implementation="eager") | extra
    model = tr.Qwen2ForCausalLM(tr.Qwen2Config(**kw)) if arch == "qwen2" else tr.LlamaForCausalLM(tr.LlamaConfig(**kw))
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in hf_weights.items()}, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    return model.eval()


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_gguf_weights_and_logits(tmp_path, arch, tied):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / f"tiny-{arch}.gguf"
    stored, hf_w = write_tiny_gguf(path, arch=arch, tied=tied, seed=18)
    g = M.GGUFFile(path)
    Q = gguf.GGMLQuantizationType
    seen = {t for _, t, _ in g.tensors.values()}
    assert {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1} <= seen
    for name, ref in stored.items():  # our reader == gguf.quants.dequantize of the same bytes
        np.testing.assert_array_equal(g.tensor(name).numpy(), ref, err_msg=name)
    ours = M.GPT.from_pretrained(path)
    assert ours.config.arch == arch and ours.config.tie_embeddings == tied and ours.config.qkv_bias == (arch == "qwen2")
    hf = _hf_reference(arch, hf_w, tied)
    idx = _idx(GGUF_DIMS["V"])
    ref = _hf_logits(hf, idx)
    assert ref.std() > 0.3
    torch.testing.assert_close(_our_logits(ours, idx), ref, atol=2e-5, rtol=1e-5)


def test_gguf_llama3_rope_freqs(tmp_path):
    """Llama 3.1 GGUFs carry rope_freqs.weight (llama.cpp's per-frequency factors) instead of parameters."""
    pytest.importorskip("gguf")
    theta, hd = 500000.0, GGUF_DIMS["d"] // GGUF_DIMS["n_head"]
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    # convert_hf_to_gguf.py LlamaModel.generate_extra_tensors
    freqs = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    lo_wl, hi_wl = 8192 / 1.0, 8192 / 4.0
    factors = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < hi_wl:
            factors.append(1.0)
        elif wl > lo_wl:
            factors.append(8.0)
        else:
            s = (8192 / wl - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - s) / 8.0 + s))
    factors = np.array(factors, dtype=np.float32)
    assert factors.min() == 1.0 and factors.max() == 8.0 and ((factors > 1) & (factors < 8)).any()  # all 3 regimes
    path = tmp_path / "l31.gguf"
    _, hf_w = write_tiny_gguf(path, types=[pytest.importorskip("gguf").GGMLQuantizationType.F32], seed=19,
                              rope_freqs=factors, rope_theta=theta)
    ours = M.GPT.from_pretrained(path)
    assert ours.config.rope_scaling == scaling
    hf = _hf_reference("llama", hf_w, False, rope_theta=theta, rope_scaling=dict(scaling))
    idx = _idx(GGUF_DIMS["V"], T=40)
    torch.testing.assert_close(_our_logits(ours, idx), _hf_logits(hf, idx), atol=2e-5, rtol=1e-5)


def test_error_truncated_gguf(tmp_path):
    pytest.importorskip("gguf")
    path = tmp_path / "t.gguf"
    write_tiny_gguf(path, seed=20)
    data = path.read_bytes()
    g = M.GGUFFile(path)
    last = max(g.tensors, key=lambda n: g.tensors[n][2])
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 10])  # inside the last tensor's data
    with pytest.raises(ValueError, match=rf"cut\.gguf: truncated: tensor {re.escape(last)} needs bytes up to"):
        M.GPT.from_pretrained(cut)
    for n in (3, 30, g.data_start - 40):  # inside the magic, the metadata, the tensor records
        cut.write_bytes(data[:n])
        with pytest.raises(ValueError, match=r"cut\.gguf: (not a GGUF file|truncated or corrupt GGUF header)"):
            M.GPT.from_pretrained(cut)


def test_error_gguf_truncated_inside_numeric_array(tmp_path):
    pytest.importorskip("gguf")
    tk = gguf_tokenizer_meta("gpt-2")
    path = tmp_path / "tok.gguf"
    write_tiny_gguf(path, seed=21, tokenizer=tk)
    data = path.read_bytes()
    # token_type is a uint32/int32 array of len(tokens): cut in its middle
    needle = b"tokenizer.ggml.token_type"
    start = data.index(needle) + len(needle) + 4 + 4 + 8  # key, value type, item type, count
    (tmp_path / "cut.gguf").write_bytes(data[: start + 4 * (len(tk["tokens"]) // 2)])
    with pytest.raises(ValueError, match=r"cut\.gguf: truncated or corrupt GGUF header"):
        M.Tokenizer.from_pretrained(tmp_path / "cut.gguf")


def test_error_unsupported_gguf_quantization(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    Q = gguf.GGMLQuantizationType
    path = tmp_path / "q81.gguf"
    write_tiny_gguf(path, types=[Q.F32], seed=22)
    # rewrite one tensor record's type to Q8_1, which neither model.py nor the gguf package dequantizes
    data = bytearray(path.read_bytes())
    name = "blk.0.ffn_up.weight"
    rec = data.index(name.encode() + struct.pack("<I", 2))  # name, then n_dims = 2
    type_at = rec + len(name) + 4 + 16
    assert struct.unpack_from("<I", data, type_at)[0] == 0  # F32
    struct.pack_into("<I", data, type_at, 9)  # Q8_1: 36 bytes per 32 values, fewer than F32's 128
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"q81\.gguf: tensor blk\.0\.ffn_up\.weight: "
                                         r"quantization Q8_1 is not supported"):
        M.GPT.from_pretrained(path)
    # without the gguf package: the message says so
    monkeypatch.setitem(sys.modules, "gguf", None)
    monkeypatch.setitem(sys.modules, "gguf.quants", None)
    with pytest.raises(ValueError, match=r"ffn_up\.weight: quantization Q8_1 is not supported by model\.py; "
                                         r"`pip install gguf`"):
        M.GPT.from_pretrained(path)


def test_dequantize_without_gguf_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    monkeypatch.setitem(sys.modules, "gguf.quants", None)
    with pytest.raises(ValueError, match=r"where: quantization Q2_K is not supported by model\.py; `pip install gguf`"):
        M.dequantize(np.zeros(84, dtype=np.uint8), 10, 256, "where")
    # the types model.py implements need no package
    raw = np.zeros(34, dtype=np.uint8)
    raw[:2] = np.array([0.5], dtype=np.float16).view(np.uint8)
    raw[2:] = np.arange(-16, 16, dtype=np.int8).view(np.uint8)
    np.testing.assert_array_equal(M.dequantize(raw, 8, 32, "where"), 0.5 * np.arange(-16, 16, dtype=np.float32))


def test_error_gguf_type_unknown_to_model_py(tmp_path):
    """A ggml type model.py's table lacks (MXFP4 = 39): the error still names the file, tensor and type."""
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "mx.gguf"
    write_tiny_gguf(path, types=[gguf.GGMLQuantizationType.F32], seed=23)
    data = bytearray(path.read_bytes())
    name = "blk.0.ffn_up.weight"
    type_at = data.index(name.encode() + struct.pack("<I", 2)) + len(name) + 4 + 16
    struct.pack_into("<I", data, type_at, 39)  # MXFP4
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"mx\.gguf.*ffn_up\.weight.*(39|MXFP4)"):
        M.GPT.from_pretrained(path)


# ----------------------------------------------------------------------------------------------
# Dequantizers vs gguf.quants

# (ggml type id, byte offsets of the float16 scale fields in a block)
QUANT_CASES = {"Q4_0": (2, [0]), "Q4_1": (3, [0, 2]), "Q5_0": (6, [0]), "Q5_1": (7, [0, 2]), "Q8_0": (8, [0]),
               "Q4_K": (12, [0, 2]), "Q5_K": (13, [0, 2]), "Q6_K": (14, [208])}


@pytest.mark.parametrize("kind", list(QUANT_CASES))
def test_dequantize_matches_gguf(kind):
    gguf = pytest.importorskip("gguf")
    t, f16_at = QUANT_CASES[kind]
    _, block, block_bytes = M.GGML_TYPES[t]
    assert (block, block_bytes) == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t)]
    rng = np.random.default_rng(t)
    n_blocks = 12
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for off in f16_at:
        scales = (rng.uniform(0.01, 0.2, n_blocks) * rng.choice([-1, 1], n_blocks)).astype(np.float16)
        raw[:, off:off + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(t)).reshape(-1).astype(np.float32)
    got = M.dequantize(raw.reshape(-1), t, n_blocks * block, "test")
    assert got.dtype == np.float32 and got.shape == (n_blocks * block,)
    assert np.isfinite(ref).all() and np.abs(ref).max() > 0
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_dequantize_float_types_and_fallback():
    x = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    np.testing.assert_array_equal(M.dequantize(x.view(np.uint8), 0, 64, "w"), x)
    np.testing.assert_array_equal(M.dequantize(x.astype(np.float16).view(np.uint8), 1, 64, "w"),
                                  x.astype(np.float16).astype(np.float32))
    bf = torch.from_numpy(x).bfloat16()
    np.testing.assert_array_equal(M.dequantize(bf.view(torch.uint8).numpy(), 30, 64, "w"), bf.float().numpy())
    gguf = pytest.importorskip("gguf")
    Q = gguf.GGMLQuantizationType
    for q in (Q.Q2_K, Q.Q3_K):  # not implemented in model.py: through the gguf package
        raw = np.random.default_rng(int(q)).integers(0, 256, size=(2, gguf.GGML_QUANT_SIZES[q][1]), dtype=np.uint8)
        raw[:, -4:] = np.array([0.05, 0.01], dtype=np.float16).view(np.uint8)  # d, dmin / d at the end
        ref = gguf.quants.dequantize(raw, q).reshape(-1)
        np.testing.assert_array_equal(M.dequantize(raw.reshape(-1), int(q), 512, "w"), ref.astype(np.float32))


# ----------------------------------------------------------------------------------------------
# Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 12:45 and we'll have 3 apples, 250 pears and 1,000,000 grapes.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? #### 72",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "def f(x):\n    return x ** 2  # square\n\n\nprint(f(3.14159))",
    "naïve café, résumé; Übermäßig größer — “quotes” and ‘single’ … 日本語のテキスト。 Привет, мир! 👋🏽",
    "They'd said I'M sure you've seen it; she's done, he'll go, we're in.",
    "   leading spaces and trailing spaces   \n\n\ttabs\tand\r\nwindows lines",
] * 20


def _tricky_strings():
    s = ["a  5", "x\n\n 3 4", "  12  ab", "12345678901234", "3.14159", "$1,000.50", "1+1=2", "x=-5", "a 5b", " -5",
         "hello world", "Hello  World", "  ", " ", "\n", "\n\n\n", "\t\t x", "trailing   ", "   leading", "a\r\nb",
         "it's", "IT'S", "we'll they'd I'm you've", "don't 5's", "naïve café", "e\u0301 vs é", "Å Å", "x\u00a0y",
         "日本語のテキスト", "Привет, мир!", "١٢٣ and ²³ and ⅕", "👋🏽 hi 🙂🙂", "```python\nprint(1)\n```",
         "a\n\n\n  b", "... !!! ???", "tab\t5", "5\n6", " \n5", "x  \n5", "2,500 + 1,000 = 3,500", "0.5*x^2",
         "The answer is #### 42", "<|im_start|> is text here", "end."]
    rng = random.Random(0)
    alphabet = "ab 12\n\t.,'sé日👋"
    s += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 25))) for _ in range(200)]
    return s


def _pre_tokenizer(variant):
    from tokenizers import Regex, normalizers, pre_tokenizers as pt

    if variant == "gpt2":
        return None, pt.ByteLevel(add_prefix_space=False)
    if variant == "digits":
        return None, pt.Sequence([pt.Digits(individual_digits=True),
                                  pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    # Llama 3: no normalizer; Qwen2: NFC; llama3-nfc: the Llama-3 split with NFC
    pattern = M.QWEN2_PATTERN if variant == "qwen2" else M.LLAMA3_PATTERN
    return None if variant == "llama3" else normalizers.NFC(), \
        pt.Sequence([pt.Split(Regex(pattern), behavior="isolated", invert=False),
                     pt.ByteLevel(add_prefix_space=False, use_regex=False)])


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]


@lru_cache(maxsize=None)
def trained_tokenizer_json(variant):
    """A small byte-level BPE trained with the `tokenizers` package; its tokenizer.json text."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    norm, pre = _pre_tokenizer(variant)
    if norm is not None:
        tok.normalizer = norm
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


CHATML_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                   "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                   "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                   "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                   "{% endif %}")
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                   "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def write_tokenizer_dir(path, variant, template=CHATML_TEMPLATE, eos="<|im_end|>", pad="<|im_end|>", bos=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(trained_tokenizer_json(variant), encoding="utf-8")
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": pad, "bos_token": bos,
          "add_bos_token": False, "chat_template": template}
    (path / "tokenizer_config.json").write_text(json.dumps(tc), encoding="utf-8")
    return path


def _hf_ids(tj_text, strings):
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_str(tj_text)
    return [hf.encode(s, add_special_tokens=False).ids for s in strings]


@pytest.mark.parametrize("variant", ["gpt2", "digits", "llama3", "llama3-nfc", "qwen2"])
def test_tokenizer_from_dir_matches_tokenizers(tmp_path, variant):
    d = write_tokenizer_dir(tmp_path / "tok", variant)
    ours = M.Tokenizer.from_dir(d)
    strings = [s for s in _tricky_strings() if "<|" not in s] + CORPUS[:8]
    ref = _hf_ids(trained_tokenizer_json(variant), strings)
    for s, r in zip(strings, ref):
        assert ours.encode(s) == r, repr(s)
        norm = unicodedata.normalize("NFC", s) if variant in ("llama3-nfc", "qwen2") else s
        assert ours.decode(ours.encode(s)) == norm, repr(s)
    assert ours.nfc == (variant in ("llama3-nfc", "qwen2"))


def test_tokenizer_never_emits_special_ids_from_text(tmp_path):
    ours = M.Tokenizer.from_dir(write_tokenizer_dir(tmp_path / "tok", "gpt2"))
    ids = ours.encode("<|im_start|>user\nhi<|im_end|><|endoftext|>")
    assert not set(ids) & set(ours.special.values())


@pytest.mark.parametrize("variant", ["digits", "llama3-nfc"])
def test_tokenizer_save_files_round_trip(tmp_path, variant):
    d = write_tokenizer_dir(tmp_path / "a", variant)
    a = M.Tokenizer.from_dir(d)
    out = tmp_path / "b"
    out.mkdir()
    for name, text in a.save_files().items():
        (out / name).write_text(text, encoding="utf-8")
    b = M.Tokenizer.from_dir(out)
    for s in _tricky_strings():
        assert a.encode(s) == b.encode(s), repr(s)
    assert (a.eos_id, a.pad_id, a.bos_id, a.chat, a.system, a.stop_ids) == \
        (b.eos_id, b.pad_id, b.bos_id, b.chat, b.system, b.stop_ids)
    assert a.chat_prompt("What is 2+2?") == b.chat_prompt("What is 2+2?")


def test_tokenizer_generated_files_read_by_tokenizers(tmp_path):
    """save_files() of a tokenizer with no original files (byte-level) is a tokenizer.json that the
    `tokenizers` package reads and encodes identically."""
    pytest.importorskip("tokenizers")
    tok = M.Tokenizer.byte_level()
    tj = tok.save_files()["tokenizer.json"]
    strings = [s for s in _tricky_strings() if "<|" not in s]
    assert _hf_ids(tj, strings) == [tok.encode(s) for s in strings]
    tc = json.loads(tok.save_files()["tokenizer_config.json"])
    assert tc["eos_token"] == "<|endoftext|>" and tc["pad_token"] == "<|pad|>"


@pytest.mark.parametrize("newline", ["escaped", "real"])
def test_chat_prompt_chatml_matches_transformers(tmp_path, newline):
    tr = pytest.importorskip("transformers")
    template = CHATML_TEMPLATE if newline == "escaped" else CHATML_TEMPLATE.replace("\\n", "\n")
    d = write_tokenizer_dir(tmp_path / "tok", "digits", template=template)
    ours = M.Tokenizer.from_dir(d)
    assert ours.chat == "chatml" and \
        ours.system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    hf = tr.AutoTokenizer.from_pretrained(d)

    def hf_ids(messages):
        r = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(r["input_ids"] if hasattr(r, "keys") else r)

    for q in ["What is 12 + 35?", "  spaced  question\n\nwith lines ", "naïve 日本 👋"]:
        assert ours.chat_prompt(q) == hf_ids([{"role": "user", "content": q}]), repr(q)
        assert ours.chat_prompt(q, system="Be brief.") == hf_ids(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]), repr(q)
    assert ours.eos_id == hf.convert_tokens_to_ids("<|im_end|>")


def test_chat_prompt_llama3_matches_transformers(tmp_path):
    tr = pytest.importorskip("transformers")
    d = write_tokenizer_dir(tmp_path / "tok", "llama3", template=LLAMA3_TEMPLATE, eos="<|endoftext|>", pad=None,
                            bos="<|begin_of_text|>")
    ours = M.Tokenizer.from_dir(d)
    assert ours.chat == "llama3" and ours.eos_id == ours.special["<|eot_id|>"]
    hf = tr.AutoTokenizer.from_pretrained(d)
    for q in ["What is 12 + 35?", "naïve 日本 👋"]:
        r = hf.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        assert ours.chat_prompt(q) == list(r["input_ids"] if hasattr(r, "keys") else r)


def test_tokenizer_eos_and_pad_distinct(tmp_path):
    ours = M.Tokenizer.from_dir(write_tokenizer_dir(tmp_path / "tok", "gpt2", eos="<|im_end|>", pad="<|im_end|>"))
    assert ours.eos_id == ours.special["<|im_end|>"]
    assert ours.pad_id != ours.eos_id and ours.pad_id in ours.special.values()
    assert ours.eos_id in ours.stop_ids and ours.pad_id not in ours.stop_ids
    plain = M.Tokenizer.from_dir(write_tokenizer_dir(tmp_path / "plain", "gpt2", template=None, eos="<|endoftext|>",
                                                     pad=None))
    assert plain.chat is None and plain.eos_id == plain.special["<|endoftext|>"] and plain.pad_id != plain.eos_id
    assert plain.chat_prompt("hi 5") == plain.encode("hi 5")


def test_byte_level_tokenizer_round_trips_unicode():
    tok = M.Tokenizer.byte_level()
    rng = random.Random(1)
    ranges = [(0x20, 0x7E), (0x0A, 0x0D), (0xA0, 0x24F), (0x370, 0x3FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F),
              (0x10000, 0x10FFF)]
    for _ in range(100):
        s = "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(0, 40)))
        ids = tok.encode(s)
        assert ids == list(s.encode("utf-8"))
        assert tok.decode(ids) == s
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (256, 257, 258)
    assert tok.decode([104, 105, 256, 257]) == "hi" and tok.decode([104, 256], skip_special=False) == "h<|endoftext|>"


# -- tokenizer from GGUF metadata


@lru_cache(maxsize=None)
def _gguf_tokenizer_meta_cached(pre):
    variant = {"smollm": "digits", "gpt-2": "gpt2", "llama-bpe": "llama3", "qwen2": "qwen2"}[pre]
    tj = json.loads(trained_tokenizer_json(variant))
    vocab = tj["model"]["vocab"]
    for t in tj["added_tokens"]:
        vocab[t["content"]] = t["id"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    specials = {t["content"] for t in tj["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    return dict(pre=pre, tokens=tokens, types=[3 if t in specials else 1 for t in tokens], merges=merges,
                bos=vocab["<|im_start|>"], eos=vocab["<|im_end|>"], pad=vocab["<|endoftext|>"],
                chat_template=CHATML_TEMPLATE.replace("\\n", "\n"), variant=variant)


def gguf_tokenizer_meta(pre):
    return dict(_gguf_tokenizer_meta_cached(pre))


@pytest.mark.parametrize("pre", ["smollm", "gpt-2", "llama-bpe", "qwen2"])
def test_tokenizer_from_gguf(tmp_path, pre):
    gguf = pytest.importorskip("gguf")
    tk = gguf_tokenizer_meta(pre)
    path = tmp_path / "tok.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    _add_gguf_tokenizer(w, tk)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = M.Tokenizer.from_pretrained(path)
    strings = [s for s in _tricky_strings() if "<|" not in s]
    ref = _hf_ids(trained_tokenizer_json(tk["variant"]), strings)
    for s, r in zip(strings, ref):
        assert ours.encode(s) == r, repr(s)
        assert ours.decode(r) == (unicodedata.normalize("NFC", s) if pre == "qwen2" else s), repr(s)
    assert ours.chat == "chatml" and ours.eos_id == tk["eos"] and ours.pad_id == tk["pad"] and ours.bos_id == tk["bos"]
    assert ours.system.startswith("You are a helpful AI assistant")
    # save_files() writes a tokenizer.json that `tokenizers` reads and that encodes the same
    files = ours.save_files()
    assert _hf_ids(files["tokenizer.json"], strings) == ref
    out = tmp_path / "saved"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    back = M.Tokenizer.from_dir(out)
    assert back.chat_prompt("Hi 12") == ours.chat_prompt("Hi 12") and back.eos_id == ours.eos_id
    assert back.pad_id == ours.pad_id


def test_gguf_model_and_tokenizer_in_one_file(tmp_path):
    pytest.importorskip("gguf")
    path = tmp_path / "both.gguf"
    tk = gguf_tokenizer_meta("smollm")
    write_tiny_gguf(path, seed=24, tokenizer=tk)
    m = M.GPT.from_pretrained(path)
    tok = M.Tokenizer.from_pretrained(path)
    assert m.config.eos_token_id == [tk["eos"]] and m.config.bos_token_id == tk["bos"]
    assert tok.decode(tok.encode("Natalia sold 48 clips.")) == "Natalia sold 48 clips."


# -- the real SmolLM2 tokenizer and model


@pytest.fixture(scope="module")
def smollm2_hf_tokenizer(smollm2_gguf):
    """transformers' conversion of the GGUF vocabulary (slow: it parses the whole file), once per module."""
    tr = pytest.importorskip("transformers")
    return tr.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


def test_smollm2_tokenizer_matches_on_gsm8k(smollm2_gguf, smollm2_hf_tokenizer, shared_data):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer as HFTokenizer

    test_file = shared_data / "gsm8k" / "test.jsonl"
    if not test_file.exists():
        pytest.skip(f"{test_file} not present")
    tj = json.loads(smollm2_hf_tokenizer.backend_tokenizer.to_str())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [  # SmolLM2's own tokenizer.json
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    tj["normalizer"] = None
    tj["post_processor"] = None
    ref = HFTokenizer.from_str(json.dumps(tj))
    ours = M.Tokenizer.from_pretrained(smollm2_gguf)
    texts = []
    for line in test_file.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts += [row["question"], row["answer"]]
    texts += [s for s in _tricky_strings() if "<|" not in s]
    mismatches = [t for t, r in zip(texts, ref.encode_batch(texts, add_special_tokens=False))
                  if ours.encode(t) != r.ids]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, e.g. {mismatches[:3]!r}"
    assert ours.chat == "chatml" and ours.eos_id == 2 and ours.pad_id not in (2, None)
    # the chat prompt as transformers renders SmolLM2's template
    r = smollm2_hf_tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 35?"}],
                                                 add_generation_prompt=True, tokenize=True)
    assert ours.chat_prompt("What is 12 + 35?") == list(r["input_ids"] if hasattr(r, "keys") else r)


def test_smollm2_gguf_logits_match_transformers(smollm2_gguf):
    tr = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    pytest.importorskip("gguf")
    ours = M.GPT.from_pretrained(smollm2_gguf).eval()
    hf = tr.AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                 dtype=torch.float32).eval()
    tok = M.Tokenizer.from_pretrained(smollm2_gguf)
    idx = torch.tensor([tok.chat_prompt("Natalia sold clips to 48 of her friends. How many?")])
    a, b = _our_logits(ours, idx), _hf_logits(hf, idx)
    assert b.abs().max() > 10
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)
    assert (a.argmax(-1) == b.argmax(-1)).all()


# ----------------------------------------------------------------------------------------------
# Hub download against a local server


class _Hub:
    def __init__(self, root):
        self.root, self.requests = root, []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hub.requests.append((self.path, self.headers.get("Authorization")))
                parts = self.path.split("/")  # /<org>/<name>/resolve/<rev>/<file>
                f = hub.root / parts[1] / parts[2] / parts[5] if len(parts) == 6 and parts[3] == "resolve" else None
                if f is None or not f.is_file():
                    self.send_error(404)
                    return
                data = f.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    root = tmp_path / "hub"
    root.mkdir()
    server = _Hub(root)
    for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_TOKEN", "hf_secret123")
    yield server
    server.close()


def test_hub_download_and_cache(hub, tiny_llama, tmp_path):
    tiny_llama.save_pretrained(hub.root / "org" / "tiny", tokenizer=M.Tokenizer.byte_level())
    m = M.GPT.from_pretrained("org/tiny")
    idx = _idx(97)
    torch.testing.assert_close(_our_logits(m, idx), _our_logits(tiny_llama, idx), atol=0, rtol=0)
    assert hub.requests and all(auth == "Bearer hf_secret123" for _, auth in hub.requests)
    got = {p.rsplit("/", 1)[1] for p, _ in hub.requests}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= got
    assert all(p.startswith("/org/tiny/resolve/main/") for p, _ in hub.requests)
    cache = tmp_path / "hf_home" / "model.py" / "org--tiny" / "main"
    assert (cache / "model.safetensors").is_file() and (cache / "config.json").is_file()
    assert not [p.name for p in cache.iterdir() if ".part" in p.name]  # no partial downloads left
    # the second load downloads nothing again
    n = len(hub.requests)
    M.GPT.from_pretrained("org/tiny")
    tok = M.Tokenizer.from_pretrained("org/tiny")
    again = [p for p, _ in hub.requests[n:]]
    assert not [p for p in again if (hub.root / "org" / "tiny" / p.rsplit("/", 1)[1]).exists()], again
    assert tok.encode("hé") == [104, 195, 169]


def test_hub_second_load_needs_no_network(hub, tiny_llama, monkeypatch):
    tiny_llama.save_pretrained(hub.root / "org" / "tiny", tokenizer=M.Tokenizer.byte_level())
    M.GPT.from_pretrained("org/tiny")
    n = len(hub.requests)
    hub.close()  # offline now
    M.GPT.from_pretrained("org/tiny")
    assert len(hub.requests) == n


def test_hub_token_absent_sends_no_authorization(hub, tiny_llama, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    tiny_llama.save_pretrained(hub.root / "org" / "tiny")
    M.GPT.from_pretrained("org/tiny")
    assert hub.requests and all(auth is None for _, auth in hub.requests)


def test_hub_sharded_checkpoint(hub):
    hf = randomize_(_hf_configs()["qwen2-bias-untied"](), seed=25).eval()
    hf.save_pretrained(hub.root / "org" / "sharded", max_shard_size="20KB")
    m = M.GPT.from_pretrained("org/sharded")
    idx = _idx(hf.config.vocab_size)
    torch.testing.assert_close(_our_logits(m, idx), _hf_logits(hf, idx), atol=2e-5, rtol=1e-5)
    shards = {p.rsplit("/", 1)[1] for p, _ in hub.requests if "-of-" in p}
    assert len(shards) >= 3 and shards == {p.name for p in (hub.root / "org" / "sharded").glob("model-*.safetensors")}


def test_hub_missing_weights_is_a_clear_error(hub, tiny_llama):
    d = hub.root / "org" / "noweights"
    tiny_llama.save_pretrained(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(OSError, match=r"org/noweights: cannot download "
                                      r".*/org/noweights/resolve/main/model\.safetensors: HTTP 404"):
        M.GPT.from_pretrained("org/noweights")
    with pytest.raises(OSError, match=r"org/missing: cannot download .*config\.json: HTTP 404"):
        M.GPT.from_pretrained("org/missing")


# ----------------------------------------------------------------------------------------------
# generate


def greedy_no_cache(model, prompt, n):
    """Greedy decoding with a plain loop over the full, growing sequence (no cache, no padding)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


PROMPTS = [[5, 17, 3, 44, 9, 2, 31], [7], [12, 8, 60, 1]]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_generate_greedy_equals_no_cache_loop(fixture, request):
    m = request.getfixturevalue(fixture)
    n = 12
    out, mask = m.generate(PROMPTS, n, temperature=0, eos_id=[], pad_id=0)
    assert out.shape == mask.shape == (3, n) and out.dtype == mask.dtype == torch.long
    for i, p in enumerate(PROMPTS):
        assert out[i].tolist() == greedy_no_cache(m, p, n), i
    assert (mask == 1).all()
    assert len({tuple(r) for r in out.tolist()}) == 3  # rows differ: the prompts matter


def test_generate_stops_each_row_at_eos(tiny_llama):
    m, n, pad = tiny_llama, 10, 0
    refs = [greedy_no_cache(m, p, n) for p in PROMPTS]
    k = next(k for k in range(2, n) if refs[0][k] not in refs[0][:k])
    eos = refs[0][k]
    assert eos != pad
    out, mask = m.generate(PROMPTS, n, temperature=0, eos_id=eos, pad_id=pad)
    for i, ref in enumerate(refs):
        j = ref.index(eos) if eos in ref else n - 1
        assert out[i].tolist() == ref[:j + 1] + [pad] * (n - j - 1), i
        assert mask[i].tolist() == [1] * (j + 1) + [0] * (n - j - 1), i
    assert mask[0, k] == 1 and out[0, k] == eos  # EOS itself is generated and unmasked
    # the config's eos list is the default
    m.config.eos_token_id = [eos]
    out2, mask2 = m.generate(PROMPTS, n, temperature=0, pad_id=pad)
    assert torch.equal(out2, out) and torch.equal(mask2, mask)


def test_generate_all_rows_stop_early_keeps_shape(tiny_llama):
    refs = [greedy_no_cache(tiny_llama, p, 3) for p in PROMPTS]
    out, mask = tiny_llama.generate(PROMPTS, 20, temperature=0, eos_id=[r[0] for r in refs], pad_id=1)
    assert out.shape == mask.shape == (3, 20)
    assert mask[:, 0].tolist() == [1, 1, 1] and (mask[:, 1:] == 0).all() and (out[:, 1:] == 1).all()


def test_generate_seeds_top_k_top_p(tiny_llama):
    m = tiny_llama
    kw = dict(eos_id=[], pad_id=0)
    a = m.generate(PROMPTS, 16, temperature=1.0, seed=123, **kw)[0]
    b = m.generate(PROMPTS, 16, temperature=1.0, seed=123, **kw)[0]
    c = m.generate(PROMPTS, 16, temperature=1.0, seed=124, **kw)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = m.generate(PROMPTS, 16, temperature=0, **kw)[0]
    assert not torch.equal(a, greedy)
    assert torch.equal(m.generate(PROMPTS, 16, temperature=1.0, top_k=1, seed=5, **kw)[0], greedy)
    assert torch.equal(m.generate(PROMPTS, 16, temperature=1.0, top_p=1e-6, seed=5, **kw)[0], greedy)


def test_generate_per_row_seeds_do_not_depend_on_the_batch(tiny_llama):
    """With one seed per row, a row samples the same completion alone, in another order, or with other rows
    (another padding): a batch split over ranks samples as one process does."""
    m, P4, kw = tiny_llama, PROMPTS + [[9, 4]], dict(temperature=1.0, eos_id=[], pad_id=0)
    seeds = [11, 12, 13, 14]
    whole = m.generate(P4, 12, seed=seeds, **kw)[0]
    halves = [m.generate(P4[i::2], 12, seed=seeds[i::2], **kw)[0] for i in (0, 1)]
    assert torch.equal(whole[0::2], halves[0]) and torch.equal(whole[1::2], halves[1])
    for i in range(4):
        assert torch.equal(m.generate([P4[i]], 12, seed=[seeds[i]], **kw)[0][0], whole[i])
    assert not torch.equal(whole, m.generate(P4, 12, seed=[21, 22, 23, 24], **kw)[0])
    with pytest.raises(ValueError, match="3 seeds for 4 prompts"):
        m.generate(P4, 2, seed=seeds[:3], **kw)


def test_sample_next_inverse_cdf_edges():
    """u = 0 takes the first token that can be drawn, u -> 1 the last one, never a token top-k removed."""
    logits = torch.tensor([[-50.0, 3.0, 1.0, 2.0, -50.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    pick = lambda u, k=0: M.sample_next(logits, 1.0, 1.0, k, torch.tensor(u, dtype=torch.float64)).tolist()
    assert pick([0.0, 0.0]) == [0, 0]
    assert pick([1.0, 1.0]) == [3, 4]  # u = 1 only as an edge (u is in [0, 1)); token 4's 1e-23 is below 1 + ulp
    assert pick([0.0, 0.5], k=3) == [1, 2] and pick([1.0, 0.99], k=3) == [3, 4]
    assert pick([0.0, 0.3]) == [0, 1]  # 0.3 of five equal tokens: the second


def test_generate_samples_from_the_right_distribution(tiny_llama):
    """The first sampled token follows softmax(logits / T), and top-k / top-p restrict it to the right set."""
    m, prompt, n = tiny_llama, [5, 17, 3], 3000
    with torch.no_grad():
        logits = m(torch.tensor([prompt]))[0, -1].double()
    T = 0.8
    p = torch.softmax(logits / T, -1)
    out = m.generate([prompt] * n, 1, temperature=T, seed=0, eos_id=[], pad_id=0)[0][:, 0]
    obs = torch.bincount(out, minlength=p.numel()).double()
    exp = n * p
    big = exp >= 5
    chi2 = float((((obs[big] - exp[big]) ** 2) / exp[big]).sum()
                 + (obs[~big].sum() - exp[~big].sum()) ** 2 / max(exp[~big].sum(), 1))
    df = int(big.sum())
    assert chi2 < df + 6 * math.sqrt(2 * df) + 10, (chi2, df)
    # top-k: only the k most likely tokens
    topk = set(logits.topk(5).indices.tolist())
    got = set(m.generate([prompt] * 500, 1, temperature=1.0, top_k=5, seed=1, eos_id=[])[0][:, 0].tolist())
    assert got <= topk and len(got) >= 3
    # top-p: the smallest set of most likely tokens whose mass reaches p
    probs = torch.softmax(logits, -1)
    srt, order = probs.sort(descending=True)
    n_keep = int((srt.cumsum(0) < 0.6).sum()) + 1
    nucleus = set(order[:n_keep].tolist())
    got = set(m.generate([prompt] * 500, 1, temperature=1.0, top_p=0.6, seed=2, eos_id=[])[0][:, 0].tolist())
    assert got <= nucleus and len(nucleus) >= 2
    assert got >= {t for t in nucleus if probs[t] / probs[list(nucleus)].sum() > 0.03}


def test_generate_without_seed_keeps_global_rng_deterministic(tiny_llama):
    def run():
        torch.manual_seed(0)
        out = tiny_llama.generate(PROMPTS, 4, temperature=1.0, eos_id=[])[0]
        return out, torch.rand(3)

    (a, ra), (b, rb) = run(), run()
    assert torch.equal(a, b) and torch.equal(ra, rb)


# ----------------------------------------------------------------------------------------------
# save_pretrained: atomic, and the training state


def _snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())}


@pytest.mark.parametrize("fail_in", ["write_safetensors", "torch.save", "tokenizer"])
def test_save_pretrained_is_atomic(tmp_path, tiny_llama, monkeypatch, fail_in):
    d = tmp_path / "ckpt"
    tok = M.Tokenizer.byte_level()
    tiny_llama.save_pretrained(d, tokenizer=tok, state={"step": 1})
    before = _snapshot(d)
    other = randomize_(M.GPT(tiny_llama.config), seed=99)

    def boom(*args, **kwargs):
        raise OSError("No space left on device")

    if fail_in == "write_safetensors":
        def partial_write(path, tensors, metadata=None):
            Path(path).write_bytes(b"partial")
            boom()
        monkeypatch.setattr(M, "write_safetensors", partial_write)
    elif fail_in == "torch.save":
        monkeypatch.setattr(torch, "save", boom)
    else:
        monkeypatch.setattr(M.Tokenizer, "save_files",
                            lambda self: {"tokenizer.json": "{}", "tokenizer_config.json": object()})
    with pytest.raises((OSError, TypeError)):
        other.save_pretrained(d, tokenizer=tok, state={"step": 2})
    assert _snapshot(d) == before  # the earlier checkpoint is untouched, and nothing else is there
    monkeypatch.undo()
    idx = _idx(97)
    torch.testing.assert_close(_our_logits(M.GPT.from_pretrained(d), idx), _our_logits(tiny_llama, idx), atol=0, rtol=0)


def test_save_pretrained_over_a_sharded_checkpoint(tmp_path):
    tr = pytest.importorskip("transformers")
    hf = tr.LlamaForCausalLM(tr.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    randomize_(hf, seed=32).save_pretrained(tmp_path, max_shard_size="20KB")
    ours = M.GPT.from_pretrained(tmp_path)
    randomize_(ours, seed=33)  # "fine-tuned"
    ours.save_pretrained(tmp_path)
    idx = _idx(97)
    torch.testing.assert_close(_our_logits(M.GPT.from_pretrained(tmp_path), idx), _our_logits(ours, idx),
                               atol=0, rtol=0)


def test_save_pretrained_state_round_trip(tmp_path, tiny_llama):
    opt = torch.optim.AdamW(tiny_llama.parameters(), lr=1e-3)
    tiny_llama(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]])).sum().backward()
    opt.step()
    state = {"step": 7, "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "args": {"lr": 1e-3, "name": "x"}}
    tiny_llama.save_pretrained(tmp_path, tokenizer=M.Tokenizer.byte_level(), state=state)
    got = torch.load(tmp_path / "trainer_state.pt", weights_only=True)
    assert got["step"] == 7 and got["args"] == {"lr": 1e-3, "name": "x"} and torch.equal(got["rng"], state["rng"])
    opt2 = torch.optim.AdamW(tiny_llama.parameters(), lr=1e-3)
    opt2.load_state_dict(got["optimizer"])
    for k, v in opt.state_dict()["state"].items():
        assert torch.equal(opt2.state_dict()["state"][k]["exp_avg"], v["exp_avg"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                          "tokenizer_config.json", "trainer_state.pt"]
    tok = M.Tokenizer.from_pretrained(tmp_path)
    assert tok.encode("héllo") == list("héllo".encode()) and (tok.eos_id, tok.pad_id) == (256, 257)


# ----------------------------------------------------------------------------------------------
# The tiny preset


def test_tiny_preset():
    cfg = M.tiny_config()
    m = M.GPT(cfg)
    assert 500_000 < m.num_params() < 5_000_000  # ~0.9M: see tiny_config
    tok = M.Tokenizer.byte_level()
    assert cfg.vocab_size == tok.vocab_size == 258
    assert cfg.eos_token_id == [tok.eos_id] and cfg.pad_token_id == tok.pad_id != tok.eos_id
    assert tok.encode("Hi 5!") == [72, 105, 32, 53, 33]
    assert tok.chat is None and tok.chat_prompt("ab") == [97, 98]
    assert m.lm_head.weight is m.transformer.wte.weight
    assert M.tiny_config(n_layer=2).n_layer == 2
