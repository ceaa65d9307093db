"""
model.py: the one module the eight training scripts share.

A small decoder-only transformer in the spirit of nanoGPT, with the few switches that cover GPT-2
(learned positions, LayerNorm, GELU, biases) and the Llama family (RoPE with Llama-3 scaling,
RMSNorm, SwiGLU, grouped-query attention, optional q/k/v bias as in Qwen2), plus what the
scripts need around it:

    GPT(config), GPT.from_pretrained(path | hub id | .gguf), model.save_pretrained(dir, tokenizer)
    model(idx)                          -> logits (B, T, V)
    model(idx, targets, mask=...)       -> log p(targets) (B, T) [and entropy], via the fused kernel
    model.generate(prompts, n, ...)     -> completion tokens (B, n) and their mask, KV-cached
    token_logprobs(hidden, weight, targets, temperature)   the fused, chunked log-prob kernel
    Tokenizer.from_pretrained(...)      tiktoken over the checkpoint's own byte-level BPE, chat format

Sections: config and presets · modules · fused log-probs · generation · tokenizer ·
safetensors · Hugging Face loading and saving · hub download · GGUF.
"""

import contextlib
import json
import math
import mmap
import os
import re
import struct
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# Config and presets


@dataclass
class GPTConfig:
    arch: str = "llama"  # the Hugging Face family written by save_pretrained: gpt2 | llama | qwen2
    vocab_size: int = 258
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4  # < n_head: grouped-query attention
    n_embd: int = 256
    head_dim: int = 0  # 0: n_embd // n_head
    ffn_dim: int = 0  # 0: 4 * n_embd
    max_seq_len: int = 1024
    pos: str = "rope"  # rope | learned
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    mlp: str = "swiglu"  # swiglu | gelu
    bias: bool = False  # biases in every linear and norm (GPT-2)
    qkv_bias: bool = False  # bias on q, k, v only (Qwen2)
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", "factor": ..., ...}
    bos_token_id: int | None = None
    eos_token_id: list = field(default_factory=list)  # generation stops at any of these
    pad_token_id: int | None = None

    def __post_init__(self):
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        self.ffn_dim = self.ffn_dim or 4 * self.n_embd
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        assert self.n_head % self.n_kv_head == 0, "n_head must be a multiple of n_kv_head"
        assert (self.pos in ("rope", "learned") and self.norm in ("rmsnorm", "layernorm")
                and self.mlp in ("swiglu", "gelu"))


def tiny_config(**overrides):
    """The `tiny` preset: a Llama-style model of 0.9M parameters over the byte-level tokenizer
    (256 bytes + <|endoftext|> + <|pad|>) that trains from scratch on a laptop CPU in minutes. (A 2.7M
    variant learned the built-in task no faster per step and ran 1.6x slower per step on 2 cores.)"""
    cfg = dict(arch="llama", vocab_size=258, n_layer=4, n_head=4, n_kv_head=4, n_embd=128, ffn_dim=384,
               max_seq_len=512, tie_embeddings=True, bos_token_id=None, eos_token_id=[256], pad_token_id=257)
    cfg.update(overrides)
    return GPTConfig(**cfg)


# ----------------------------------------------------------------------------------------------
# Modules


class Norm(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(cfg.n_embd))
        self.bias = nn.Parameter(torch.zeros(cfg.n_embd)) if cfg.norm == "layernorm" else None

    def forward(self, x):
        if self.kind == "rmsnorm":
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same names) that can also hold its weight in oneDNN's packed layout (`packed`,
    set by `packed_weights` for generate's decode steps on the CPU). x W^T repacks the whole weight at every call,
    which bounds a product of a few rows: packed once per generate call, SmolLM2-135M's linears run 2-2.7x faster
    at 16 rows (docs/experiments.md). Results equal F.linear's up to float rounding (another summation order)."""

    packed = None

    def forward(self, x):
        rows = x.shape[:-1].numel()
        if self.packed is None or rows > 256 or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), self.packed, self.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], y.shape[-1])


@contextlib.contextmanager
def packed_weights(model, rows):
    """Inside: the model's Linear weights of 2^18 entries or more (fp32, CPU, no autocast) also in oneDNN's packed
    layout for products of `rows` rows: one more copy of them in memory, freed on exit. Small weights (all of `tiny`'s)
    are left as they are."""
    big = [m for m in model.modules() if isinstance(m, Linear) and m.weight.numel() >= 1 << 18
           and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")) \
            or torch.is_autocast_enabled("cpu") or rows > 256:
        big = []
    try:
        for m in big:
            m.packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), rows)
        yield
    finally:
        for m in big:
            m.packed = None


def rope_inv_freq(cfg):
    """Inverse frequencies (head_dim/2,) with Llama-3 or linear scaling applied."""
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    s = cfg.rope_scaling
    if not s:
        return inv.float()
    if s["rope_type"] == "linear":
        return (inv / s["factor"]).float()
    # llama3: long wavelengths slowed down by `factor`, short ones kept, smooth ramp in between
    factor, lo, hi, old = (s["factor"], s["low_freq_factor"], s["high_freq_factor"],
                           s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    smooth = ((old / wavelen - lo) / (hi - lo)).clamp(0, 1)
    scaled = (1 - smooth) * inv / factor + smooth * inv
    scaled = torch.where(wavelen > old / lo, inv / factor, scaled)
    return torch.where(wavelen < old / hi, inv, scaled).float()


def apply_rope(x, cos, sin):
    # x (B, H, T, hd); cos, sin (B, 1, T, hd). Hugging Face's "rotate half" layout.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Preallocated keys and values, per layer (B, n_kv_head, max_len, head_dim); `len` positions filled.
    static: a call writes at the positions `slot` (a tensor) and attends over all max_len keys, the mask
    hiding the empty ones, so every decode step has the same shapes (torch.compile compiles it once)."""

    def __init__(self, cfg, batch, max_len, device, dtype, static=False):
        shape = (batch, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.len, self.static, self.slot = 0, static, None  # len: positions filled; slot: where static writes

    def update(self, layer, k, v):
        if self.static:
            self.k[layer].index_copy_(2, self.slot, k)
            self.v[layer].index_copy_(2, self.slot, v)
            return self.k[layer], self.v[layer]
        t0, t1 = self.len, self.len + k.shape[2]
        self.k[layer][:, :, t0:t1] = k
        self.v[layer][:, :, t0:t1] = v
        return self.k[layer][:, :, :t1], self.v[layer][:, :, :t1]

    def repeat_rows(self, reps):
        """Row i repeated reps[i] times: the samples of one prompt share its prefill."""
        self.k = [k.repeat_interleave(reps, 0) for k in self.k]
        self.v = [v.repeat_interleave(reps, 0) for v in self.v]


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        qkv_out = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
        self.c_attn = Linear(cfg.n_embd, qkv_out, bias=cfg.bias or cfg.qkv_bias)  # q, k, v stacked
        self.c_proj = Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)

    def forward(self, x, rope, attn_mask, cache):
        c = self.cfg
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split([c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.n_kv_head * c.head_dim], -1)
        q = q.view(B, T, c.n_head, c.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                           enable_gqa=c.n_kv_head != c.n_head)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, c.n_head * c.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.kind = cfg.mlp
        width = 2 * cfg.ffn_dim if cfg.mlp == "swiglu" else cfg.ffn_dim  # swiglu: gate and up stacked
        self.c_fc = Linear(cfg.n_embd, width, bias=cfg.bias)
        self.c_proj = Linear(cfg.ffn_dim, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        if self.kind == "swiglu":
            gate, up = self.c_fc(x).chunk(2, dim=-1)
            return self.c_proj(F.silu(gate) * up)
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = Norm(cfg), Attention(cfg, layer), Norm(cfg), MLP(cfg)

    def forward(self, x, rope, attn_mask, cache):
        x = x + self.attn(self.ln_1(x), rope, attn_mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    grad_checkpoint = False  # True: trunk recomputes each block in the backward (activation memory: one block)
    static_cache = False  # True (use_compile): generate's KV cache has static shapes (always on CUDA)
    prefill_tokens = 1024  # generate prefills its prompts in groups of at most this many padded tokens

    def __init__(self, config):
        super().__init__()
        self.config = cfg = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.max_seq_len, cfg.n_embd) if cfg.pos == "learned" else None,
            h=nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)]),
            ln_f=Norm(cfg),
        ))
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def use_compile(self):
        """torch.compile the trunk (the training forward, generate's prefill and decode steps) and make
        generate decode over a static KV cache: every step then has the same shapes and compiles once."""
        if self.lm_head.weight.device.type != "cuda":
            raise ValueError("--compile needs CUDA: on the CPU, torch.compile takes minutes for every new shape")
        self.trunk = torch.compile(self.trunk)  # an instance attribute: the state dict's names are unchanged
        self.static_cache = True
        return self

    def trunk(self, idx, positions=None, attn_mask=None, cache=None):
        """Token ids (B, T) -> final normalised hidden states (B, T, d). Without positions and mask:
        plain causal attention from position 0 (right padding needs no mask)."""
        B, T = idx.shape
        if positions is None:
            positions = torch.arange(T, device=idx.device).expand(B, T)
        if not torch.compiler.is_compiling() and positions.max() >= self.config.max_seq_len:
            raise ValueError(f"sequence of {int(positions.max()) + 1} tokens exceeds the context of "
                             f"{self.config.max_seq_len} tokens (max_seq_len)")
        x = self.transformer.wte(idx)
        rope = None
        if self.config.pos == "learned":
            x = x + self.transformer.wpe(positions)
        else:
            freqs = positions[:, None, :, None].float() * self.inv_freq  # (B, 1, T, hd/2)
            freqs = torch.cat((freqs, freqs), dim=-1)
            rope = (freqs.cos().to(x.dtype), freqs.sin().to(x.dtype))
        ckpt = self.grad_checkpoint and torch.is_grad_enabled() and cache is None
        for block in self.transformer.h:
            if ckpt:  # keep only the block's input; recompute its activations in the backward
                x = torch.utils.checkpoint.checkpoint(block, x, rope, attn_mask, None, use_reentrant=False)
            else:
                x = block(x, rope, attn_mask, cache)
        if cache is not None:
            cache.len += T
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, mask=None, temperature=1.0, entropy=False):
        """Without targets: logits (B, T, V). With targets (B, T), the token that follows each
        position: log p(target | prefix) (B, T) through the fused kernel, zero where mask == 0 (those
        positions are skipped, not computed), and with entropy=True also the entropy (B, T)."""
        h = self.trunk(idx)
        if targets is None:
            return self.lm_head(h)
        B, T, d = h.shape
        h, targets = h.reshape(B * T, d), targets.reshape(B * T)
        keep = None if mask is None else mask.reshape(B * T).nonzero().squeeze(1)
        if keep is not None:
            h, targets = h.index_select(0, keep), targets.index_select(0, keep)
        lp, ent = token_logprobs(h, self.lm_head.weight, targets, temperature, entropy=True) if entropy else \
            (token_logprobs(h, self.lm_head.weight, targets, temperature), None)
        if keep is not None:
            lp = lp.new_zeros(B * T).index_copy(0, keep, lp)
            ent = None if ent is None else ent.new_zeros(B * T).index_copy(0, keep, ent)
        lp = lp.view(B, T)
        return (lp, ent.view(B, T)) if entropy else lp

    def prefill(self, idx, ok, cache):
        """Left-padded prompts idx (B, P), ok (B, P) True on real tokens -> hidden states (B, P, d), keys and values
        into cache: each row's positions start at 0 at its first real token and the padding is hidden."""
        P, device = idx.shape[1], idx.device
        pos = (torch.arange(P, device=device) - (P - ok.sum(1))[:, None]).clamp(min=0)
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        eye = torch.eye(P, dtype=torch.bool, device=device)  # a pad query sees itself: no NaN
        mask = None if bool(ok.all()) else ((causal & ok[:, None, :]) | eye)[:, None]  # (B, 1, P, P)
        return self.trunk(idx, pos, mask, cache)

    @torch.no_grad()
    def shared_prefix_logprobs(self, idx, targets, mask, temperature=1.0):
        """forward(idx, targets, mask, temperature) without gradient, for right-padded rows (B, T) where
        consecutive rows share a prompt (the k samples of one prompt): a row's prompt is its columns before its
        first mask position; each distinct one runs once into a KV cache that its rows share, then each row runs
        from that position. Equal to forward up to float rounding; forward itself when no prompt repeats."""
        B, T = idx.shape
        device, cfg = idx.device, self.config
        scored = (mask != 0).int()
        start, end = scored.argmax(1).tolist(), (T - scored.flip(1).argmax(1)).tolist()  # (B,) [first, last + 1]
        for i, any_scored in enumerate(mask.any(1).tolist()):  # a row with nothing scored joins the row before
            if not any_scored:
                start[i], end[i] = (start[i - 1], start[i - 1]) if i else (0, 0)
        first = [i for i in range(B) if i == 0 or start[i] != start[i - 1]
                 or not torch.equal(idx[i, :start[i]], idx[i - 1, :start[i]])]
        if len(first) == B:
            return self(idx, targets, mask=mask, temperature=temperature)
        amp = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if amp else self.lm_head.weight.dtype
        P, S = max(start[i] for i in first), max(1, max(e - s for s, e in zip(start, end)))
        cache = KVCache(cfg, len(first), P + S, device, dtype)
        ok = torch.zeros(len(first), P, dtype=torch.bool, device=device)  # real prompt tokens, left-padded
        if P:
            pre = torch.zeros(len(first), P, dtype=torch.long, device=device)
            for j, i in enumerate(first):
                pre[j, P - start[i]:], ok[j, P - start[i]:] = idx[i, :start[i]], True
            self.prefill(pre, ok, cache)
        reps = torch.tensor([j - i for i, j in zip(first, first[1:] + [B])], device=device)
        cache.repeat_rows(reps)
        cols = torch.tensor(start, device=device)[:, None] + torch.arange(S, device=device)  # (B, S)
        inside, cols = cols < T, cols.clamp(max=T - 1)
        keys = torch.cat([ok.repeat_interleave(reps, 0)[:, None, :].expand(B, S, P),
                          torch.ones(S, S, dtype=torch.bool, device=device).tril().expand(B, S, S)], 2)
        h = self.trunk(idx.gather(1, cols), cols, keys[:, None], cache)  # (B, S, d)
        keep = ((mask.gather(1, cols) != 0) & inside).reshape(-1).nonzero().squeeze(1)
        lp = token_logprobs(h.reshape(B * S, -1).index_select(0, keep), self.lm_head.weight,
                            targets.gather(1, cols).reshape(-1).index_select(0, keep), temperature)
        rows = torch.arange(B, device=device)[:, None].expand(B, S).reshape(-1).index_select(0, keep)
        out = lp.new_zeros(B, T)
        out[rows, cols.reshape(-1).index_select(0, keep)] = lp
        return out

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, seed=None,
                 eos_id=None, pad_id=None):
        """Sample completions for a batch of prompts (a list of token-id lists, any lengths).

        Prompts are left-padded; each row's positions start at 0 at its first real token and a mask
        hides the padding, so every row sees exactly what it would see alone. One preallocated KV
        cache; equal consecutive prompts (the k samples of one prompt) are prefilled once and share
        its cache rows; the prefill computes logits only at the last position; each step then feeds
        one token per row. temperature 0 is greedy. A row stops at its first EOS (any id in eos_id, default the
        config's), which is part of its completion; the loop stops when every row has stopped.
        seed: an int (for the whole batch) or a list of one int per row: then a row's sample depends only on
        its prompt and its own seed, not on the other rows (so a batch split over ranks samples as one process).
        Returns tokens (B, n) with pad_id after the end, and mask (B, n), 1 on generated tokens."""
        cfg, device = self.config, self.lm_head.weight.device
        eos = eos_id if eos_id is not None else cfg.eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=device, dtype=torch.long)
        pad = pad_id if pad_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else 0)
        B, P = len(prompts), max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0:
            raise ValueError("generate: empty prompt")
        if P + max_new_tokens > cfg.max_seq_len:
            raise ValueError(f"generate: prompt of {P} tokens + {max_new_tokens} new tokens exceeds the "
                             f"context of {cfg.max_seq_len} tokens")
        # without a seed: one drawn from the global RNG (which is not re-seeded)
        noise = sampling_noise(seed if seed is not None else int(torch.randint(2**62, ())), B, max_new_tokens)
        noise = noise.to(device)  # (B, n): the uniform that picks row b's token t
        idx = torch.full((B, P), pad, dtype=torch.long, device=device)
        valid = torch.zeros(B, P + max_new_tokens, dtype=torch.bool, device=device)  # keys that are real tokens
        for i, p in enumerate(prompts):
            idx[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
            valid[i, P - len(p):P] = True
        n_pad = P - valid[:, :P].sum(1)  # (B,)
        amp = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if amp else self.lm_head.weight.dtype
        # the samples of one prompt come as equal consecutive prompts: prefill each distinct one once
        first = [i for i in range(B) if i == 0 or prompts[i] != prompts[i - 1]]
        # static cache: with torch.compile, and on CUDA, where cuDNN attention plans every new shape once
        L, static = P + max_new_tokens, self.static_cache or device.type == "cuda"
        cache = KVCache(cfg, len(first), L, device, dtype, static)
        out = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
        out_mask = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        # prefill: the distinct prompts longest first, in groups of at most prefill_tokens padded tokens, each
        # padded only to its own longest prompt (causal, padding hidden); a group's keys and values go to the
        # cache's last positions. Only the last position's hidden state is kept: it samples the first token
        order, done_rows, hs = sorted(range(len(first)), key=lambda j: -len(prompts[first[j]])), [], []
        while len(done_rows) < len(first):
            Pg = len(prompts[first[order[len(done_rows)]]])
            g = order[len(done_rows):len(done_rows) + max(1, self.prefill_tokens // Pg)]
            rows, j = torch.tensor([first[i] for i in g], device=device), torch.tensor(g, device=device)
            sub = KVCache(cfg, len(g), Pg, device, dtype)
            hs.append(self.prefill(idx[rows, P - Pg:], valid[rows, P - Pg:P], sub)[:, -1])  # (g, d)
            for layer in range(cfg.n_layer):
                cache.k[layer][j, :, P - Pg:P], cache.v[layer][j, :, P - Pg:P] = sub.k[layer], sub.v[layer]
            done_rows += g
        h = torch.cat(hs)[torch.tensor(done_rows, device=device).argsort()]  # (distinct prompts, d)
        cache.len = P
        reps = torch.tensor([j - i for i, j in zip(first, first[1:] + [B])], device=device)
        h = h.repeat_interleave(reps, 0)  # (B, d)
        if len(first) < B:
            cache.repeat_rows(reps)
        with packed_weights(self, B):  # the decode steps' products of B rows
            for t in range(max_new_tokens):
                logits = self.lm_head(h).float()  # (B, V)
                nxt = sample_next(logits, temperature, top_p, top_k, noise[:, t])
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                out[:, t], out_mask[:, t] = nxt, ~done
                done = done | torch.isin(nxt, eos)
                if bool(done.all()) or t == max_new_tokens - 1:
                    break
                valid[:, P + t] = True
                pos = (P + t - n_pad)[:, None]  # (B, 1)
                cache.slot = torch.full((1,), P + t, device=device) if static else None
                h = self.trunk(nxt[:, None], pos, valid[:, None, None, :L if static else P + t + 1], cache)[:, -1]
        return out, out_mask.long()


def sampling_noise(seed, n_rows, n):
    """(n_rows, n) uniforms in [0, 1), float64, drawn on the CPU (the same on every device): from one generator
    seeded by `seed` (an int), or row by row from generators seeded by seed[row] (a list of n_rows ints)."""
    if isinstance(seed, int):
        return torch.rand(n_rows, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if len(seed) != n_rows:
        raise ValueError(f"generate: {len(seed)} seeds for {n_rows} prompts")
    return torch.stack([torch.rand(n, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
                        for s in seed]) if n_rows else torch.zeros(0, n, dtype=torch.float64)


def sample_next(logits, temperature, top_p, top_k, u):
    """logits (B, V), uniforms u (B,) -> next token ids (B,): greedy at temperature 0, else top-k / top-p
    sampling by the inverse CDF: row b takes the first token whose cumulative probability exceeds u[b]."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        srt, order = logits.sort(dim=-1, descending=True)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum - srt.softmax(-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(1, order, srt.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1).double()
    cum = probs.cumsum(-1)  # (B, V)
    total = cum[:, -1:].contiguous()  # (B, 1)
    nxt = torch.searchsorted(cum, u.to(cum)[:, None] * total, right=True)
    last = torch.searchsorted(cum, total)  # the first token where cum reaches its total: p > 0 there
    return torch.minimum(nxt, last).squeeze(1)


# ----------------------------------------------------------------------------------------------
# Fused token log-probs: log p(target) and entropy from hidden states and the unembedding, in chunks
# of rows, so that no (tokens x vocabulary) tensor ever exists in full, forward or backward.


def _chunk_rows(n_rows, vocab, chunk_size):
    # 1024 rows (or 32 MB of fp32 logits, if that is more rows): large enough for full-speed matrix
    # products and few passes over the weight's gradient; one block is 1024 x V floats (600 MB at V = 152k)
    return chunk_size or max(1, min(n_rows, max(1024, (1 << 23) // vocab)))


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, want_entropy, chunk_size):
        # hidden (N, d), weight (V, d), targets (N,) -> logp (N,), entropy (N,) (empty unless asked)
        N, V = hidden.shape[0], weight.shape[0]
        dev = hidden.device.type
        mm = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # softmax precision
        logp = torch.empty(N, device=hidden.device, dtype=acc)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if want_entropy else logp.new_empty(0)
        rows = _chunk_rows(N, V, chunk_size)
        with torch.autocast(dev, enabled=False):
            w = weight.to(mm)
            for s in range(0, N, rows):
                h = hidden[s:s + rows].to(mm)
                z = ((h if temperature == 1 else h / temperature) @ w.T).to(acc)  # (n, V) logits / T
                lse[s:s + rows] = m = torch.logsumexp(z, dim=-1)
                logp[s:s + rows] = z.gather(1, targets[s:s + rows, None]).squeeze(1) - m
                if want_entropy:  # H = lse - sum_v p_v z_v
                    ent[s:s + rows] = m - z.sub(m[:, None]).exp_().mul_(z).sum(-1)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.mm, ctx.acc, ctx.rows, ctx.want_entropy = temperature, mm, acc, rows, want_entropy
        ctx.mark_non_differentiable(targets)
        ctx.set_materialize_grads(False)  # an output not in the loss gets None (not zeros): skip its work
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse = ctx.saved_tensors
        T, mm, acc, rows = ctx.temperature, ctx.mm, ctx.acc, ctx.rows
        use_ent = ctx.want_entropy and g_ent is not None  # None: entropy only logged, not in the loss
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=acc) if ctx.needs_input_grad[1] else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(mm)
            for s in range(0, hidden.shape[0], rows):
                h = hidden[s:s + rows].to(mm)
                h = h if T == 1 else h / T  # the temperature on the (n, d) side: cheaper than on (n, V)
                z = (h @ w.T).to(acc)  # recomputed (n, V)
                m, g = lse[s:s + rows, None], g_logp[s:s + rows, None].to(acc)
                if use_ent:  # dH/dz_v = -p_v (z_v - lse + H) = -p_v (z_v - sum_u p_u z_u)
                    p = (z - m).exp_()  # softmax
                    dz = p * -g - g_ent[s:s + rows, None].to(acc) * p * (z - (p * z).sum(-1, keepdim=True))
                else:
                    dz = z.sub_(m).exp_().mul_(-g)  # d logp / dz = onehot - p, in place
                dz = dz.scatter_add_(1, targets[s:s + rows, None], g).to(mm)  # d(loss)/d(logits / T)
                if grad_h is not None:
                    grad_h[s:s + rows] = ((dz @ w) / T).to(hidden.dtype)
                if grad_w is not None:
                    grad_w.addmm_(dz.T, h) if mm == acc else grad_w.add_(dz.T @ h)
        return grad_h, (None if grad_w is None else grad_w.to(weight.dtype)), None, None, None, None


def token_logprobs(hidden, weight, targets, temperature=1.0, entropy=False, chunk_size=None):
    """log p(targets | prefix) at a sampling temperature for hidden states (..., d), an unembedding
    weight (V, d) and targets (...). With entropy=True also returns the entropy of each position's
    distribution (same shape). Chunked over rows with its own backward: peak extra memory is one
    (chunk x V) block, and gradients flow to `hidden` and `weight` as if log_softmax had been used."""
    shape = targets.shape
    lp, ent = _TokenLogprobs.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                   float(temperature), bool(entropy), chunk_size)
    return (lp.view(shape), ent.view(shape)) if entropy else lp.view(shape)



# ----------------------------------------------------------------------------------------------
# Tokenizer: a thin class over a tiktoken.Encoding built from the checkpoint's own byte-level BPE

# Pre-tokenizer split patterns. Where a tokenizer first splits digits one by one and then applies
# GPT-2's pattern (SmolLM2, StarCoder), one regex does both: \p{N} first, and a run of spaces before a
# digit kept whole, as it is when the digits have been split off first.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
DIGITS_GPT2_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
GGUF_PRE_PATTERNS = {"gpt-2": GPT2_PATTERN, "default": GPT2_PATTERN, "smollm": DIGITS_GPT2_PATTERN,
                     "starcoder": DIGITS_GPT2_PATTERN, "llama-bpe": LLAMA3_PATTERN, "llama3": LLAMA3_PATTERN,
                     "qwen2": QWEN2_PATTERN}
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
# The chat template written for a checkpoint that has none: the user's text as it is, what chat_prompt uses then
PLAIN_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ message['content'] }}{% endif %}"
                  "{% endfor %}")


def _bytes_to_unicode():
    """GPT-2's reversible map from the 256 bytes to printable characters (byte-level BPE vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _pre_tokenizer_json(pattern):
    """The tokenizer.json pre_tokenizer that splits like `pattern` (for tokenizers we write ourselves)."""
    if pattern == GPT2_PATTERN:
        return BYTE_LEVEL
    if pattern == DIGITS_GPT2_PATTERN:
        return {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL]}
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        dict(BYTE_LEVEL, use_regex=False)]}


def _pattern_from_json(pre, where):
    """tokenizer.json's pre_tokenizer -> one tiktoken split pattern (the layouts of the supported families)."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return DIGITS_GPT2_PATTERN
    if (kinds == ["Split", "ByteLevel"] and "Regex" in steps[0].get("pattern", {})
            and not steps[1].get("use_regex", True) and steps[0].get("behavior") == "Isolated"
            and not steps[0].get("invert")):
        return steps[0]["pattern"]["Regex"]
    raise ValueError(f"{where}: pre_tokenizer {json.dumps(pre)[:200]} is not supported; model.py reads the "
                     "byte-level BPE layouts of GPT-2, Llama 3, Qwen2 and SmolLM2")


class Tokenizer:
    """Text <-> token ids with the checkpoint's own vocabulary, plus its chat format.

    encode(text) never turns text into special tokens (a prompt cannot inject <|im_end|>);
    chat_prompt(user) builds the model's prompt from ids, in ChatML (SmolLM2, Qwen2) or Llama-3
    headers, or plain text when the checkpoint has no chat template. eos_id ends a completion (the
    end-of-turn token in chat formats); stop_ids are every id that ends generation; pad_id is
    distinct from eos_id and only ever sits under a zero mask."""

    def __init__(self, enc, eos_id, pad_id, bos_id=None, add_bos=False, chat=None, system=None, nfc=False,
                 pre_tokenizer=None, merges=None, chat_template=None, source_files=None):
        self.enc, self.eos_id, self.pad_id, self.bos_id, self.add_bos = enc, eos_id, pad_id, bos_id, add_bos
        self.chat, self.system, self.nfc = chat, system, nfc
        self.pre_tokenizer, self.merges, self.chat_template = pre_tokenizer, merges, chat_template
        self.source_files = source_files or {}  # original tokenizer files, written back on save
        self.special = dict(enc._special_tokens)
        self.stop_ids = sorted({eos_id} | {self.special[s] for s in ("<|endoftext|>", "<|end_of_text|>")
                                           if s in self.special and self.special[s] != pad_id})
        self.vocab_size = enc.max_token_value + 1

    # -- encode / decode
    def encode(self, text):
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        return self.enc.encode_ordinary(text)

    def decode(self, ids, skip_special=True):
        ids = [i for i in ids if not (skip_special and i in self.special.values())]
        return self.enc.decode_bytes(ids).decode("utf-8", errors="replace")

    # -- chat format
    def chat_prompt(self, user, system=None):
        """Token ids of a one-turn conversation, ending where the assistant's reply starts."""
        system = system if system is not None else self.system
        sp, e = self.special, self.encode
        if self.chat == "chatml":
            ids = []
            if system:
                ids += [sp["<|im_start|>"]] + e(f"system\n{system}") + [sp["<|im_end|>"]] + e("\n")
            return ids + [sp["<|im_start|>"]] + e(f"user\n{user}") + [sp["<|im_end|>"]] + e("\n") + \
                [sp["<|im_start|>"]] + e("assistant\n")
        if self.chat == "llama3":
            head = lambda role: [sp["<|start_header_id|>"]] + e(role) + [sp["<|end_header_id|>"]] + e("\n\n")
            ids = [sp["<|begin_of_text|>"]]
            if system:
                ids += head("system") + e(system) + [sp["<|eot_id|>"]]
            return ids + head("user") + e(user) + [sp["<|eot_id|>"]] + head("assistant")
        return ([self.bos_id] if self.add_bos and self.bos_id is not None else []) + e(user)

    # -- construction
    @classmethod
    def byte_level(cls):
        """The `tiny` tokenizer: one token per byte, then <|endoftext|> (EOS) and <|pad|>."""
        enc = tiktoken.Encoding("bytes", pat_str=GPT2_PATTERN, mergeable_ranks={bytes([i]): i for i in range(256)},
                                special_tokens={"<|endoftext|>": 256, "<|pad|>": 257})
        return cls(enc, eos_id=256, pad_id=257, pre_tokenizer=BYTE_LEVEL, merges=[])

    @classmethod
    def from_pretrained(cls, name_or_path):
        path = resolve_checkpoint(name_or_path)
        if path.suffix == ".gguf":
            return cls.from_gguf(GGUFFile(path).metadata, str(path))
        return cls.from_dir(path)

    @classmethod
    def from_dir(cls, path):
        path = Path(path)
        tj_path = path / "tokenizer.json"
        if not tj_path.exists():
            raise FileNotFoundError(f"{path}: no tokenizer.json (model.py reads Hugging Face fast-tokenizer files)")
        source = {"tokenizer.json": tj_path.read_text(encoding="utf-8")}
        tj = _read_json(tj_path)
        tc_path = path / "tokenizer_config.json"
        tc = _read_json(tc_path) if tc_path.exists() else {}
        if tc_path.exists():
            source["tokenizer_config.json"] = tc_path.read_text(encoding="utf-8")
        where = str(tj_path)
        model = tj.get("model") or {}
        if not isinstance(model, dict):
            raise ValueError(f"{where}: \"model\" is {json.dumps(model)[:40]}, expected an object")
        if model.get("type") != "BPE":
            raise ValueError(f"{where}: tokenizer model {model.get('type')!r} is not supported; model.py reads "
                             "byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2)")
        norm = tj.get("normalizer")
        if norm not in (None, {"type": "NFC"}):
            raise ValueError(f"{where}: normalizer {json.dumps(norm)[:120]} is not supported (only none or NFC)")
        pattern = _pattern_from_json(tj.get("pre_tokenizer"), where)
        vocab, added_tokens, merges = model.get("vocab"), tj.get("added_tokens") or [], model.get("merges") or []
        is_id = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
        if not (isinstance(vocab, dict) and all(map(is_id, vocab.values()))):
            raise ValueError(f"{where}: model.vocab is missing or not an object of token: id")
        if not (isinstance(added_tokens, list) and all(isinstance(t, dict) and isinstance(t.get("content"), str)
                                                       and is_id(t.get("id")) for t in added_tokens)):
            raise ValueError(f"{where}: added_tokens is not a list of objects with a content string and an id")
        pair = lambda m: isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m)
        if not (isinstance(merges, list) and all(isinstance(m, str) or pair(m) for m in merges)):
            raise ValueError(f"{where}: model.merges is not a list of \"a b\" strings or [a, b] pairs")
        added = {t["content"]: t["id"] for t in added_tokens}
        merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
        enc = _bpe_encoding(vocab, added, merges, pattern, where)
        token = lambda v: (v.get("content") if isinstance(v, dict) else v)
        cfg = _read_json(path / "config.json") if (path / "config.json").exists() else {}
        eos = token(tc.get("eos_token"))
        eos_id = added.get(eos) if eos else None
        if eos_id is None:
            cfg_eos = cfg.get("eos_token_id")
            eos_id = cfg_eos[0] if isinstance(cfg_eos, list) else cfg_eos
        if eos_id is None:
            eos_id = added.get("<|endoftext|>", added.get("<|end_of_text|>"))
        if eos_id is None:
            raise ValueError(f"{path}: cannot tell the end-of-sequence token (no eos_token in tokenizer_config.json, "
                             "no eos_token_id in config.json, no <|endoftext|>)")
        bos = token(tc.get("bos_token"))
        template = tc.get("chat_template")
        if template is None and (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
            source["chat_template.jinja"] = template
        return cls._assemble(enc, eos_id, added.get(token(tc.get("pad_token"))), added.get(bos) if bos else None,
                             bool(tc.get("add_bos_token", False)), template, norm is not None,
                             tj.get("pre_tokenizer"), merges, source)

    @classmethod
    def from_gguf(cls, meta, where):
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"{where}: tokenizer.ggml.model = {kind!r} is not supported; model.py reads byte-level "
                             "BPE vocabularies (tokenizer.ggml.model = 'gpt2')")
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_PATTERNS:
            raise ValueError(f"{where}: tokenizer.ggml.pre = {pre!r} is not supported; "
                             f"known: {sorted(GGUF_PRE_PATTERNS)}")
        tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type",
                                                                [1] * len(meta["tokenizer.ggml.tokens"]))
        added = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)}  # control, user-defined
        vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 1}  # normal
        merges = list(meta.get("tokenizer.ggml.merges", []))
        pattern = GGUF_PRE_PATTERNS[pre]
        enc = _bpe_encoding(vocab, added, merges, pattern, where)
        return cls._assemble(enc, meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.padding_token_id"),
                             meta.get("tokenizer.ggml.bos_token_id"),
                             bool(meta.get("tokenizer.ggml.add_bos_token", False)), meta.get("tokenizer.chat_template"),
                             pre == "qwen2", _pre_tokenizer_json(pattern), merges, {})

    @classmethod
    def _assemble(cls, enc, eos_id, pad_id, bos_id, add_bos, template, nfc, pre_tokenizer, merges, source):
        special = dict(enc._special_tokens)
        if pad_id is None or pad_id == eos_id:  # a pad distinct from EOS: a spare special token, else id 0
            spare = [special[s] for s in ("<|pad|>", "<|endoftext|>", "<pad>", "<|finetune_right_pad_id|>")
                     if s in special and special[s] != eos_id]
            pad_id = spare[0] if spare else next((i for i in sorted(special.values()) if i != eos_id), 0)
        chat, system = None, None
        if template and "<|im_start|>" in template and "<|im_start|>" in special and "<|im_end|>" in special:
            chat, eos_id = "chatml", special["<|im_end|>"]
            m = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}<]+)<\|im_end\|>", template)
            system = m.group(1) if m else None
        elif template and "<|start_header_id|>" in template and "<|eot_id|>" in special:
            chat, eos_id = "llama3", special["<|eot_id|>"]
        return cls(enc, eos_id, pad_id, bos_id, add_bos, chat, system, nfc, pre_tokenizer, merges, template, source)

    # -- saving (Hugging Face layout)
    def save_files(self):
        """{filename: text} of tokenizer.json and tokenizer_config.json, the originals when we have them.
        tokenizer_config.json always names our EOS, pad and BOS (an original may name another pad,
        or the EOS that a chat format replaces), and a checkpoint without a chat template gets
        PLAIN_TEMPLATE, so that other tools build the prompts chat_prompt builds."""
        files = dict(self.source_files)
        names = {i: s for s, i in self.special.items()}
        if "tokenizer.json" not in files:
            b2u = _bytes_to_unicode()
            vocab = {"".join(b2u[b] for b in tok): i for tok, i in self.enc._mergeable_ranks.items()}
            vocab.update((s, i) for i, s in names.items())  # specials in the vocab too, or readers renumber them
            vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
            files["tokenizer.json"] = json.dumps({
                "version": "1.0", "truncation": None, "padding": None,
                "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                                  "normalized": False, "special": True} for i, s in sorted(names.items())],
                "normalizer": {"type": "NFC"} if self.nfc else None, "pre_tokenizer": self.pre_tokenizer,
                "post_processor": None, "decoder": dict(BYTE_LEVEL, add_prefix_space=True),
                "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                          "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                          "vocab": vocab, "merges": self.merges or []}}, ensure_ascii=False)
        if "tokenizer_config.json" in files:
            tc = json.loads(files["tokenizer_config.json"])
        else:
            tc = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self.add_bos,
                  "clean_up_tokenization_spaces": False}
            if self.chat_template:
                tc["chat_template"] = self.chat_template
        tc.update(eos_token=names.get(self.eos_id), pad_token=names.get(self.pad_id), bos_token=names.get(self.bos_id))
        if not self.chat_template:
            tc["chat_template"] = ("{{ bos_token }}" if self.add_bos and self.bos_id is not None
                                   else "") + PLAIN_TEMPLATE
        files["tokenizer_config.json"] = json.dumps(tc, indent=2, ensure_ascii=False)
        return files


def _bpe_encoding(vocab, added, merges, pattern, where):
    """A tiktoken.Encoding whose ranks are the vocabulary ids. tiktoken merges by rank, which equals
    the BPE merge order when ids are in merge order; we check that instead of assuming it."""
    u2b = {c: b for b, c in _bytes_to_unicode().items()}
    ranks = {}
    for tok, i in vocab.items():
        if tok in added:
            continue
        try:
            ranks[bytes(u2b[c] for c in tok)] = i
        except KeyError:
            raise ValueError(f"{where}: vocabulary entry {tok!r} is not byte-level BPE") from None
    last = -1
    for k, m in enumerate(merges):
        a, _, b = m.partition(" ")
        i = vocab.get(a + b)
        if i is None or i < max(vocab.get(a, -1), vocab.get(b, -1)) or i < last:
            raise ValueError(f"{where}: merge {k} ({m!r}) does not follow the vocabulary's id order; "
                             "model.py needs ids in merge order to use them as tiktoken ranks")
        last = i
    return tiktoken.Encoding(name=str(where), pat_str=pattern, mergeable_ranks=ranks, special_tokens=dict(added))


def _read_json(path):
    """A JSON object from a file (every JSON file model.py reads holds one object)."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(obj), "a number")
        raise ValueError(f"{path}: expected a JSON object, got {kind}")
    return obj


# ----------------------------------------------------------------------------------------------
# safetensors: an 8-byte header length, a JSON header, then the raw little-endian tensors

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


def read_safetensors(path):
    """{name: tensor} of one .safetensors file, memory-mapped (copy-on-write: the file is never written).
    The header is checked as the `safetensors` package checks it: the tensors tile the data section."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 0 or n > size - 8:
            raise ValueError(f"{path}: truncated or not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path}: corrupt safetensors header (not JSON)") from None
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise ValueError(f"{path}: corrupt safetensors header (expected a JSON object of tensors, "
                         "with __metadata__ an object)")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
    entries, data_size = [], size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise ValueError(f"{path}: tensor {name}: expected an object with dtype, shape and data_offsets")
        shape, offsets = info["shape"], info["data_offsets"]
        dtype = ST_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']!r}")
        if not (isinstance(shape, list) and all(map(is_int, shape))):
            raise ValueError(f"{path}: tensor {name}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(is_int, offsets))
                and offsets[0] <= offsets[1]):
            raise ValueError(f"{path}: tensor {name}: data_offsets {offsets!r} are not [begin, end], "
                             "integers with 0 <= begin <= end")
        entries.append((offsets[0], offsets[1], name, dtype, shape, info["dtype"]))
    tensors, pos = {}, 0
    for start, end, name, dtype, shape, kind in sorted(entries, key=lambda e: e[:2]):  # they must tile the data section
        if start != pos:
            where = "the first tensor starts at 0" if not tensors else f"the previous tensor ends at {pos}"
            raise ValueError(f"{path}: tensor {name}: data_offsets [{start}, {end}] "
                             f"{'overlap' if start < pos else 'leave a gap'}: {where} (corrupt header)")
        count = math.prod(shape)
        if end - start != count * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name}: {end - start} bytes for shape {shape} {kind}")
        if end > data_size:
            raise ValueError(f"{path}: truncated: tensor {name} ends at byte {8 + n + end}, the file has {size}")
        t = torch.frombuffer(buf, dtype=dtype, count=count,
                             offset=8 + n + start) if count else torch.empty(0, dtype=dtype)
        tensors[name], pos = t.view(shape), end
    if pos != data_size:
        raise ValueError(f"{path}: corrupt safetensors file: the tensors end at byte {8 + n + pos}, the file has "
                         f"{size} bytes (trailing data no tensor covers)")
    return tensors


def write_safetensors(path, tensors, metadata=None):
    """Write {name: tensor} as one .safetensors file (the caller renames it into place)."""
    header, offset = {}, 0
    rev = {v: k for k, v in ST_DTYPES.items()}
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": rev[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            f.write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------
# Hugging Face layout: config.json <-> GPTConfig, and an explicit map of weight names

HF_ARCHS = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


def _int_field(c, key, where, default=None):
    """c[key], a positive integer; default when the key is absent or null (required when default is None)."""
    v = c.get(key)
    if v is None and default is not None:
        return default
    if v is None:
        raise ValueError(f"{where}: missing required key {key!r} (a positive integer)")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{where}: {key} is {json.dumps(v)}, expected a positive integer")
    return v


def _check_heads(where, n_embd, n_head, n_kv_head, head_dim, names):
    """The attention sizes agree: the kv heads divide the heads, the heads divide the width (no head_dim)."""
    embd_key, head_key, kv_key = names
    if n_head % n_kv_head:
        raise ValueError(f"{where}: {kv_key} = {n_kv_head} does not divide {head_key} = {n_head}")
    if not head_dim and n_embd % n_head:
        raise ValueError(f"{where}: {embd_key} = {n_embd} is not divisible by {head_key} = {n_head} (and no head_dim)")


def config_from_hf(c, where):
    if not isinstance(c, dict):
        raise ValueError(f"{where}: expected a JSON object")
    archs = c.get("architectures") or [c.get("model_type")]
    name = archs[0] if isinstance(archs, list) and isinstance(archs[0], str) else archs
    families = {"gpt2": "gpt2", "llama": "llama", "qwen2": "qwen2"}
    arch = (HF_ARCHS.get(name) or families.get(name)) if isinstance(name, str) else None
    if arch is None:
        raise ValueError(f"{where}: architecture {name!r} is not supported; model.py loads {', '.join(HF_ARCHS)}")
    eos = c.get("eos_token_id")
    ids = dict(bos_token_id=c.get("bos_token_id"), eos_token_id=[] if eos is None else eos,
               pad_token_id=c.get("pad_token_id"))
    size = lambda key, default=None: _int_field(c, key, where, default)
    if arch == "gpt2":
        if c.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise ValueError(f"{where}: activation_function {c['activation_function']!r} is not supported (gelu_new)")
        if (c.get("scale_attn_by_inverse_layer_idx") or c.get("reorder_and_upcast_attn")
                or c.get("scale_attn_weights") is False):
            raise ValueError(f"{where}: GPT-2 attention variants (scale_attn_*, reorder_and_upcast_attn) "
                             "are not supported")
        n_embd, n_head = size("n_embd"), size("n_head")
        _check_heads(where, n_embd, n_head, n_head, 0, ("n_embd", "n_head", "n_head"))
        return GPTConfig(arch="gpt2", vocab_size=size("vocab_size"), n_layer=size("n_layer"), n_head=n_head,
                         n_kv_head=n_head, n_embd=n_embd, ffn_dim=size("n_inner", 4 * n_embd),
                         max_seq_len=size("n_positions"),
                         pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True,
                         norm_eps=c.get("layer_norm_epsilon", 1e-5), **ids)
    if c.get("hidden_act", "silu") != "silu" or c.get("mlp_bias"):
        raise ValueError(f"{where}: hidden_act {c.get('hidden_act')!r} / mlp_bias are not supported (silu, no bias)")
    if arch == "llama" and c.get("attention_bias"):
        raise ValueError(f"{where}: attention_bias = true is not supported for Llama")
    if arch == "qwen2" and c.get("use_sliding_window"):
        raise ValueError(f"{where}: use_sliding_window = true is not supported")
    n_embd, n_head, head_dim = size("hidden_size"), size("num_attention_heads"), size("head_dim", 0)
    n_kv_head = size("num_key_value_heads", n_head)
    _check_heads(where, n_embd, n_head, n_kv_head, head_dim,
                 ("hidden_size", "num_attention_heads", "num_key_value_heads"))
    if (head_dim or n_embd // n_head) % 2:
        raise ValueError(f"{where}: head size {head_dim or n_embd // n_head} is odd; rotary embeddings need it even")
    rp = c.get("rope_parameters") or {}  # transformers 5 keeps theta and scaling here
    scaling = c.get("rope_scaling") or (rp if isinstance(rp, dict) and rp.get("rope_type", "default") != "default"
                                        else None)
    if not isinstance(rp, dict) or not isinstance(scaling or {}, dict):
        raise ValueError(f"{where}: rope_scaling / rope_parameters is not an object")
    theta = c.get("rope_theta") or rp.get("rope_theta") or 10000.0
    if scaling:
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind not in ("llama3", "linear"):
            raise ValueError(f"{where}: rope scaling {kind!r} is not supported (llama3, linear)")
        need = ["factor"] + (["low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]
                             if kind == "llama3" else [])
        if bad := [k for k in need if not isinstance(scaling.get(k), (int, float)) or isinstance(scaling.get(k), bool)]:
            raise ValueError(f"{where}: rope scaling {kind} needs numbers for {', '.join(bad)}")
        scaling = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta")} | {"rope_type": kind}
    return GPTConfig(arch=arch, vocab_size=size("vocab_size"), n_layer=size("num_hidden_layers"), n_head=n_head,
                     n_kv_head=n_kv_head, n_embd=n_embd, head_dim=head_dim, ffn_dim=size("intermediate_size"),
                     max_seq_len=size("max_position_embeddings", 2048), qkv_bias=arch == "qwen2",
                     tie_embeddings=c.get("tie_word_embeddings", False), norm_eps=c.get("rms_norm_eps", 1e-6),
                     rope_theta=theta, rope_scaling=scaling, **ids)


def config_to_hf(cfg):
    eos = cfg.eos_token_id[0] if len(cfg.eos_token_id) == 1 else (list(cfg.eos_token_id) or None)
    ids = dict(bos_token_id=cfg.bos_token_id, eos_token_id=eos, pad_token_id=cfg.pad_token_id, torch_dtype="float32")
    if cfg.arch == "gpt2":
        return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=cfg.vocab_size,
                    n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_inner=cfg.ffn_dim,
                    n_positions=cfg.max_seq_len, n_ctx=cfg.max_seq_len, activation_function="gelu_new",
                    layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=True, **ids)
    c = dict(architectures=["Qwen2ForCausalLM" if cfg.arch == "qwen2" else "LlamaForCausalLM"], model_type=cfg.arch,
             vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_dim,
             num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
             head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
             rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
             tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False, **ids)
    if cfg.arch == "qwen2":
        c.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
        del c["attention_bias"], c["mlp_bias"]
    return c


def weight_sources(cfg, fmt):
    """Our parameter name -> the checkpoint tensors it is made of, as (name, transform) pairs; several
    are stacked along dim 0 (q, k, v into c_attn; gate, up into c_fc). fmt is "hf" or "gguf"."""
    T = lambda w: w.t()  # GPT-2's Conv1D stores weights (in, out)
    same = None
    # llama.cpp stores q and k rows interleaved for its rotary layout; this undoes it
    unperm = lambda heads: (lambda w: w.reshape(heads, cfg.head_dim // 2, 2, *w.shape[1:])
                            .transpose(1, 2).reshape(w.shape))
    m = {}
    if cfg.arch == "gpt2":
        assert fmt == "hf", "GGUF files of GPT-2 are not supported"
        m["transformer.wte.weight"] = [("wte.weight", same)]
        m["transformer.wpe.weight"] = [("wpe.weight", same)]
        for i in range(cfg.n_layer):
            for ours, kind in [("ln_1", "norm"), ("attn.c_attn", "conv"), ("attn.c_proj", "conv"), ("ln_2", "norm"),
                               ("mlp.c_fc", "conv"), ("mlp.c_proj", "conv")]:
                m[f"transformer.h.{i}.{ours}.weight"] = [(f"h.{i}.{ours}.weight", T if kind == "conv" else same)]
                m[f"transformer.h.{i}.{ours}.bias"] = [(f"h.{i}.{ours}.bias", same)]
        m["transformer.ln_f.weight"], m["transformer.ln_f.bias"] = [("ln_f.weight", same)], [("ln_f.bias", same)]
        return m
    hf = fmt == "hf"
    m["transformer.wte.weight"] = [("model.embed_tokens.weight" if hf else "token_embd.weight", same)]
    for i in range(cfg.n_layer):
        a, g = f"model.layers.{i}.self_attn.", f"blk.{i}."
        h = f"transformer.h.{i}."
        uq = unperm(cfg.n_head) if cfg.arch == "llama" and not hf else same
        uk = unperm(cfg.n_kv_head) if cfg.arch == "llama" and not hf else same
        m[h + "ln_1.weight"] = [(f"model.layers.{i}.input_layernorm.weight" if hf else g + "attn_norm.weight", same)]
        m[h + "attn.c_attn.weight"] = [(a + "q_proj.weight", same), (a + "k_proj.weight", same),
                                       (a + "v_proj.weight", same)] if hf \
            else [(g + "attn_q.weight", uq), (g + "attn_k.weight", uk), (g + "attn_v.weight", same)]
        if cfg.qkv_bias:
            m[h + "attn.c_attn.bias"] = [(a + "q_proj.bias", same), (a + "k_proj.bias", same),
                                         (a + "v_proj.bias", same)] if hf \
                else [(g + "attn_q.bias", same), (g + "attn_k.bias", same), (g + "attn_v.bias", same)]
        m[h + "attn.c_proj.weight"] = [(a + "o_proj.weight" if hf else g + "attn_output.weight", same)]
        m[h + "ln_2.weight"] = [(f"model.layers.{i}.post_attention_layernorm.weight" if hf
                                 else g + "ffn_norm.weight", same)]
        mlp = f"model.layers.{i}.mlp."
        m[h + "mlp.c_fc.weight"] = [(mlp + "gate_proj.weight", same), (mlp + "up_proj.weight", same)] if hf \
            else [(g + "ffn_gate.weight", same), (g + "ffn_up.weight", same)]
        m[h + "mlp.c_proj.weight"] = [(mlp + "down_proj.weight" if hf else g + "ffn_down.weight", same)]
    m["transformer.ln_f.weight"] = [("model.norm.weight" if hf else "output_norm.weight", same)]
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = [("lm_head.weight" if hf else "output.weight", same)]
    return m


IGNORED_TENSORS = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq)$|^rope_freqs\.weight$")


def _load_weights(model, get, names, where, fmt):
    """Copy every parameter from the checkpoint, checking each name and shape; `get(name)` returns
    a tensor, `names` is every tensor the checkpoint holds."""
    params = dict(model.named_parameters())
    used = set()
    for ours, parts in weight_sources(model.config, fmt).items():
        for name, _ in parts:
            if name not in names:
                raise ValueError(f"{where}: missing tensor {name!r} (for {ours})")
        ts = [(f(get(n)) if f else get(n)) for n, f in parts]
        t = ts[0] if len(ts) == 1 else torch.cat(ts, 0)
        if tuple(t.shape) != tuple(params[ours].shape):
            got = ", ".join(f"{n} {tuple(x.shape)}" for (n, _), x in zip(parts, ts))
            raise ValueError(f"{where}: wrong shape: {got}; the config gives {tuple(params[ours].shape)} for {ours}")
        if bad := [n for (n, _), x in zip(parts, ts) if x.is_floating_point() and not torch.isfinite(x).all()]:
            raise ValueError(f"{where}: tensor {bad[0]} holds NaN or infinite values (a corrupt file?)")
        with torch.no_grad():
            params[ours].copy_(t)
        used |= {n for n, _ in parts}
    tied_head = {"lm_head.weight", "output.weight"} if model.config.tie_embeddings else set()
    extra = sorted(n for n in names if n not in used and n not in tied_head and not IGNORED_TENSORS.search(n))
    if extra:
        raise ValueError(f"{where}: unexpected tensors the config does not use: "
                         f"{extra[:5]}{' ...' if len(extra) > 5 else ''}")


def hf_state_dict(model):
    """Our parameters under their Hugging Face names, split back where we stacked them."""
    cfg, params, out = model.config, dict(model.named_parameters()), {}
    qkv = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
    for ours, parts in weight_sources(cfg, "hf").items():
        t = params[ours].detach()
        sizes = qkv if len(parts) == 3 else [cfg.ffn_dim, cfg.ffn_dim] if len(parts) == 2 else [t.shape[0]]
        for (name, f), piece in zip(parts, t.split(sizes, 0)):
            out[("transformer." if cfg.arch == "gpt2" else "") + name] = (f(piece) if f else piece).contiguous()
    return out


def _file_in(root, name, where):
    """root / name for a file name read from a checkpoint or the hub (a shard in an index), refused
    unless it is a relative path that stays inside root (no absolute path, no `..`)."""
    if (not isinstance(name, str) or not name or name.startswith("/") or name.endswith("/") or "\\" in name
            or "\0" in name or ".." in name.split("/")):
        raise ValueError(f"{where}: file name {json.dumps(name)} is not a relative path inside {root}")
    return Path(root) / name


def _index_shards(index, root):
    """The shard files a model.safetensors.index.json names (its weight_map values), sorted."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: no \"weight_map\" object (tensor name -> shard file)")
    for f in weight_map.values():
        _file_in(root, f, index)
    return sorted(set(weight_map.values()))


def resolve_checkpoint(name_or_path):
    """A local directory or .gguf file as it is; otherwise a hub id (org/name), downloaded once.
    A name that looks like a local path (./x, /x, ~/x, x.gguf, or its parent directory exists) is one."""
    name = str(name_or_path)
    p = Path(name).expanduser()
    if p.exists():
        if p.is_dir() or p.suffix == ".gguf":
            return p
        raise ValueError(f"{p}: not a checkpoint directory or a .gguf file")
    local = (not isinstance(name_or_path, str) or name.startswith((".", "/", "~"))
             or name.endswith((".gguf", ".json", ".safetensors")) or (str(p.parent) != "." and p.parent.is_dir()))
    if not local and re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        try:
            return hub_download(name)
        except OSError as e:
            raise OSError(f"{e} (and no local path {name} exists)") from None
    raise FileNotFoundError(f"{name}: no such checkpoint directory or .gguf file "
                            f"(no such file or directory: {p.absolute()})")


def load_pretrained(name_or_path, dtype=torch.float32):
    """GPT from a Hugging Face directory (config.json + safetensors, sharded or not), a hub id or a
    .gguf file. Every weight name is mapped explicitly and every shape checked."""
    path = resolve_checkpoint(name_or_path)
    if path.suffix == ".gguf":
        return _load_gguf(path, dtype)
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face checkpoint directory)")
    cfg = config_from_hf(_read_json(cfg_path), str(cfg_path))
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = _index_shards(index, path)
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for f in files:
        if not (path / f).exists():
            raise FileNotFoundError(f"{path / f}: shard listed in {index.name} is missing")
        tensors.update(read_safetensors(path / f))
    if cfg.arch == "gpt2":  # GPT-2 checkpoints come with or without the "transformer." prefix
        tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    return _build(cfg, lambda n: tensors[n], set(tensors), str(path), "hf", dtype)


def _build(cfg, get, names, where, fmt, dtype):
    with torch.device("meta"):
        model = GPT(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    if cfg.tie_embeddings:  # to_empty gives the two modules separate tensors: tie them again
        model.lm_head.weight = model.transformer.wte.weight
    model.inv_freq = rope_inv_freq(cfg)
    _load_weights(model, get, names, where, fmt)
    return model


def save_pretrained(model, out_dir, tokenizer=None, state=None):
    """Write config.json, model.safetensors and the tokenizer files (and `state`, the training state,
    as trainer_state.pt) in the Hugging Face layout. Every file is written under a temporary name
    first and renamed into place only when all are complete, so an earlier checkpoint in out_dir
    survives a crash or a full disk."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = lambda name: out / f".{name}.tmp{os.getpid()}"
    for orphan in out.glob(".*.tmp*"):  # left by a save that was killed: its process is gone
        pid = orphan.name.rsplit(".tmp", 1)[1]
        if not pid.isdigit() or not Path(f"/proc/{pid}").exists():
            orphan.unlink(missing_ok=True)
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ValueError(f"not saving {out}: non-finite values in {bad[0]} (and {len(bad) - 1} more)")
    # weights and training state of one save carry the same id, so that a mix of two saves (a crash between
    # the renames below) is detected on --resume
    checkpoint = os.urandom(8).hex()
    state = None if state is None else {**state, "checkpoint": checkpoint}
    config = config_to_hf(model.config)
    if tokenizer is not None:  # the tokenizer's ids are the ones training used: one EOS and one pad everywhere
        config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    files = {"config.json": json.dumps(config, indent=2)}
    if tokenizer is not None:
        files.update(tokenizer.save_files())
    written = []
    try:
        write_safetensors(tmp("model.safetensors"), hf_state_dict(model), {"format": "pt", "checkpoint": checkpoint})
        written.append("model.safetensors")
        if state is not None:
            torch.save(state, tmp("trainer_state.pt"))
            written.append("trainer_state.pt")
        for name, text in files.items():
            tmp(name).write_text(text, encoding="utf-8")
            written.append(name)
    except BaseException:
        for name in written + ["model.safetensors", "trainer_state.pt"]:
            tmp(name).unlink(missing_ok=True)
        raise
    for name in written:
        os.replace(tmp(name), out / name)
    if state is None:  # a training state left from an earlier save would not match these weights
        (out / "trainer_state.pt").unlink(missing_ok=True)
    index = out / "model.safetensors.index.json"
    if index.exists():  # an earlier sharded checkpoint here would shadow the new weights
        try:
            shards = _index_shards(index, out)  # only files inside out
        except ValueError:
            shards = []
        for shard in shards:
            (out / shard).unlink(missing_ok=True)
        index.unlink()


GPT.from_pretrained = staticmethod(load_pretrained)
GPT.save_pretrained = save_pretrained


# ----------------------------------------------------------------------------------------------
# Hub download with the standard library (HF_HOME, HF_ENDPOINT, HF_TOKEN honoured)


class _AuthRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but send Authorization (HF_TOKEN) only to the scheme and host it was set
    for: urllib would forward it to any host, e.g. the CDN the hub redirects downloads to."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        old_url, new_url = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(newurl)
        if new is not None and (old_url.scheme, old_url.netloc) != (new_url.scheme, new_url.netloc):
            new.remove_header("Authorization")
        return new


def hub_download(repo_id, revision="main"):
    """Download a model's config, safetensors (sharded or not) and tokenizer files once into
    $HF_HOME/model.py/<org>--<name>/<revision>/ and return that directory."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id) or {".", ".."} & {*repo_id.split("/"), *revision.split("/")}:
        raise ValueError(f"{repo_id}: not a hub id (org/name) or revision {revision!r} is not valid")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    dest = home / "model.py" / repo_id.replace("/", "--") / revision
    dest.mkdir(parents=True, exist_ok=True)
    complete = dest / ".complete"
    if complete.exists():  # downloaded before: no network needed
        return dest
    token = os.environ.get("HF_TOKEN")

    def fetch(name, required=True):
        target = _file_in(dest, name, f"{repo_id}: model.safetensors.index.json")
        if target.exists():
            return True
        url = f"{endpoint}/{repo_id}/resolve/{revision}/{urllib.parse.quote(name)}"
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.build_opener(_AuthRedirectHandler).open(req, timeout=60) as r:
                target.parent.mkdir(parents=True, exist_ok=True)
                part = target.with_name(f".{target.name}.part{os.getpid()}")
                with open(part, "wb") as f:
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
                os.replace(part, target)
            return True
        except urllib.error.HTTPError as e:
            if e.code == 404 and not required:
                return False
            hint = " (set HF_TOKEN for a gated or private model)" if e.code in (401, 403) else ""
            raise OSError(f"{repo_id}: cannot download {url}: HTTP {e.code}{hint}") from None
        except urllib.error.URLError as e:
            raise OSError(f"{repo_id}: cannot download {url}: {e.reason} "
                          "(no network? set HF_ENDPOINT, or pass a local path)") from None

    fetch("config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        fetch(name, required=False)
    if fetch("model.safetensors.index.json", required=False):
        for shard in _index_shards(dest / "model.safetensors.index.json", dest):
            fetch(shard)
    else:
        fetch("model.safetensors")
    complete.touch()
    return dest


# ----------------------------------------------------------------------------------------------
# GGUF (llama.cpp): a header of metadata and tensor records, then aligned tensor data

# ggml type id -> (name, elements per block, bytes per block)
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
              7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84),
              11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
              15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
              19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
              23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
              28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
              35: ("TQ2_0", 256, 66)}
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class GGUFFile:
    """Metadata and tensors of a .gguf file (versions 2 and 3), memory-mapped read-only."""

    def __init__(self, path):
        self.path = Path(path)
        self.size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            self.buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b""
        self.pos = 0
        try:
            if bytes(self.buf[:4]) != b"GGUF":
                raise ValueError(f"{self.path}: not a GGUF file (bad magic {bytes(self.buf[:4])!r})")
            self.pos = 4
            version = self._scalar(4)
            if version not in (2, 3):
                raise ValueError(f"{self.path}: GGUF version {version} is not supported (2, 3)")
            n_tensors, n_kv = self._scalar(10), self._scalar(10)
            self.metadata = {}
            for _ in range(n_kv):
                key = self._string()
                self.metadata[key] = self._value(self._scalar(4))
            self.tensors = {}
            for _ in range(n_tensors):
                name = self._string()
                n_dims = self._scalar(4)
                if n_dims > 4:  # GGML_MAX_DIMS
                    raise ValueError(f"{self.path}: corrupt GGUF header: tensor {name} has {n_dims} dimensions (max 4)")
                dims = [self._scalar(10) for _ in range(n_dims)]
                self.tensors[name] = (dims, self._scalar(4), self._scalar(10))
        except (struct.error, IndexError, UnicodeDecodeError):
            raise ValueError(f"{self.path}: truncated or corrupt GGUF header (at byte {self.pos})") from None
        align = self.metadata.get("general.alignment", 32)
        if not isinstance(align, int) or isinstance(align, bool) or align < 1:
            raise ValueError(f"{self.path}: general.alignment is {align!r}, expected a positive integer")
        self.data_start = (self.pos + align - 1) // align * align

    def _scalar(self, t):
        fmt = _GGUF_SCALARS[t]
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def _string(self):
        n = self._scalar(10)
        if self.pos + n > self.size:
            raise IndexError
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8")
        self.pos += n
        return s

    def _value(self, t):
        if t == 8:
            return self._string()
        if t == 9:
            item, n = self._scalar(4), self._scalar(10)
            if item in _GGUF_SCALARS and item != 7:  # numeric arrays in one read
                fmt = _GGUF_SCALARS[item]
                if self.pos + n * struct.calcsize(fmt) > self.size:
                    raise IndexError
                arr = np.frombuffer(self.buf, dtype=np.dtype(fmt), count=n, offset=self.pos)
                self.pos += n * arr.itemsize
                return arr.tolist()
            return [self._value(item) for _ in range(n)]
        if t not in _GGUF_SCALARS:
            raise ValueError(f"{self.path}: unknown GGUF metadata type {t}")
        return self._scalar(t)

    def tensor(self, name):
        """The tensor dequantized to float32, in PyTorch's (rows, columns) order."""
        dims, t, offset = self.tensors[name]
        kind, block, block_bytes = GGML_TYPES.get(t, (f"type {t}", 1, 0))
        n = math.prod(dims)
        if n % block:
            raise ValueError(f"{self.path}: tensor {name}: {n} values are not whole blocks of {block} ({kind})")
        nbytes = n // block * block_bytes
        start = self.data_start + offset
        if start + nbytes > self.size:
            raise ValueError(f"{self.path}: truncated: tensor {name} needs bytes up to {start + nbytes}, "
                             f"the file has {self.size}")
        raw = np.frombuffer(self.buf, dtype=np.uint8, count=nbytes, offset=start)
        return torch.from_numpy(dequantize(raw, t, n, f"{self.path}: tensor {name}").reshape(dims[::-1]))


def dequantize(raw, t, n, where):
    """Bytes of ggml type t -> n float32 values. F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K,
    Q5_K and Q6_K here; other types through the `gguf` package when it is installed."""
    kind = GGML_TYPES.get(t, (f"type {t}",))[0]
    f16 = lambda b: np.ascontiguousarray(b).view(np.float16).astype(np.float32)
    if kind == "F32":
        return raw.view(np.float32).copy()
    if kind == "F16":
        return raw.view(np.float16).astype(np.float32)
    if kind == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if kind == "Q8_0":  # d (f16), 32 x int8
        b = raw.reshape(-1, 34)
        return (f16(b[:, :2]) * b[:, 2:].view(np.int8).astype(np.float32)).reshape(-1)
    if kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):  # d [, m] [, 32 high bits], 16 bytes of nibbles
        # (low: 0-15, high: 16-31)
        has_m, five = kind.endswith("_1"), kind.startswith("Q5")
        b = raw.reshape(-1, GGML_TYPES[t][2])
        d = f16(b[:, :2])
        m = f16(b[:, 2:4]) if has_m else 0.0
        o = 4 if has_m else 2
        q = b[:, o + 4 * five:]
        q = np.concatenate([q & 15, q >> 4], axis=1).astype(np.int32)
        if five:
            qh = np.ascontiguousarray(b[:, o:o + 4]).view(np.uint32)  # (blocks, 1)
            q |= ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int32) << 4
        offset = 0 if has_m else (16 if five else 8)
        return (d * (q - offset) + m).astype(np.float32).reshape(-1)
    if kind in ("Q4_K", "Q5_K"):  # d, dmin, 12 bytes of 6-bit scales and mins, [32 bytes high bits], 128 bytes nibbles
        b = raw.reshape(-1, GGML_TYPES[t][2])
        d, dmin, s = f16(b[:, :2]), f16(b[:, 2:4]), b[:, 4:16].astype(np.int32)
        sc = np.concatenate([s[:, :4] & 63, (s[:, 8:] & 15) | ((s[:, :4] >> 6) << 4)], axis=1)  # (blocks, 8)
        mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
        qs = b[:, -128:].reshape(-1, 4, 32).astype(np.int32)
        q = np.stack([qs & 15, qs >> 4], axis=2).reshape(-1, 8, 32)  # sub-block 2i: low nibbles, 2i+1: high
        if kind == "Q5_K":
            qh = b[:, 16:48].astype(np.int32)[:, None, :]  # bit j of qh[l] is the 5th bit of sub-block j
            q = q + (((qh >> np.arange(8)[None, :, None]) & 1) << 4)
        return (d[:, :, None] * sc[:, :, None] * q - dmin[:, :, None] * mn[:, :, None]).astype(np.float32).reshape(-1)
    if kind == "Q6_K":  # 128 bytes low 4 bits, 64 bytes high 2 bits, 16 int8 scales, d
        b = raw.reshape(-1, 210)
        ql, qh = b[:, :128].reshape(-1, 2, 64).astype(np.int32), b[:, 128:192].reshape(-1, 2, 32).astype(np.int32)
        sc, d = b[:, 192:208].view(np.int8).astype(np.float32).reshape(-1, 2, 4, 2), f16(b[:, 208:210])
        lo, hi = ql[:, :, :32], ql[:, :, 32:]
        q = np.stack([(lo & 15) | ((qh & 3) << 4), (hi & 15) | (((qh >> 2) & 3) << 4),
                      (lo >> 4) | (((qh >> 4) & 3) << 4),
                      (hi >> 4) | (((qh >> 6) & 3) << 4)], axis=2) - 32  # (blocks, 2, 4, 32)
        return (d[:, :, None, None, None] * sc[..., None] * q.reshape(-1, 2, 4, 2, 16)).astype(np.float32).reshape(-1)
    try:
        from gguf.quants import dequantize as gguf_dequantize
        from gguf import GGMLQuantizationType
    except ImportError:
        raise ValueError(f"{where}: quantization {kind} is not supported by model.py; "
                         "`pip install gguf` adds it") from None
    try:
        return gguf_dequantize(raw.reshape(1, -1), GGMLQuantizationType(t)).astype(np.float32).reshape(-1)[:n]
    except (NotImplementedError, ValueError) as e:
        raise ValueError(f"{where}: quantization {kind} is not supported ({e})") from None


def _load_gguf(path, dtype):
    g = GGUFFile(path)
    meta, where = g.metadata, str(path)
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"{where}: GGUF architecture {arch!r} is not supported (llama, qwen2)")
    key = lambda k, default=None: meta.get(f"{arch}.{k}", default)
    size = lambda k, default=None: _int_field(meta, f"{arch}.{k}", where, default)  # checked: a positive integer
    n_embd, n_head, head_dim = size("embedding_length"), size("attention.head_count"), size("attention.key_length", 0)
    n_kv_head = size("attention.head_count_kv", n_head)
    _check_heads(where, n_embd, n_head, n_kv_head, head_dim,
                 [f"{arch}.{k}" for k in ("embedding_length", "attention.head_count", "attention.head_count_kv")])
    if "token_embd.weight" not in g.tensors or len(g.tensors["token_embd.weight"][0]) != 2:
        raise ValueError(f"{where}: no 2-d tensor token_embd.weight (the token embeddings)")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    cfg = GPTConfig(arch=arch, vocab_size=g.tensors["token_embd.weight"][0][1], n_layer=size("block_count"),
                    n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd, head_dim=head_dim or n_embd // n_head,
                    ffn_dim=size("feed_forward_length"), max_seq_len=size("context_length", 2048),
                    norm_eps=key("attention.layer_norm_rms_epsilon", 1e-5), rope_theta=key("rope.freq_base", 10000.0),
                    qkv_bias=arch == "qwen2", tie_embeddings="output.weight" not in g.tensors,
                    bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=[] if eos is None else [eos],
                    pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))
    if key("rope.scaling.type") == "linear":
        cfg.rope_scaling = {"rope_type": "linear", "factor": key("rope.scaling.factor")}
    if "rope_freqs.weight" in g.tensors:  # Llama 3.1+: per-frequency divisors; recover the llama3 parameters
        cfg.rope_scaling = _llama3_scaling_from_factors(cfg, g.tensor("rope_freqs.weight"), where)
    return _build(cfg, g.tensor, set(g.tensors), where, "gguf", dtype)


def _llama3_scaling_from_factors(cfg, factors, where):
    base = GPTConfig(**{**asdict(cfg), "rope_scaling": None})
    for orig in (8192, 4096, 16384, 32768):
        for lo, hi in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)):
            s = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": lo, "high_freq_factor": hi,
                 "original_max_position_embeddings": orig}
            scaled = rope_inv_freq(GPTConfig(**{**asdict(cfg), "rope_scaling": s}))
            if torch.allclose(scaled, rope_inv_freq(base) / factors, rtol=1e-4):
                return s
    raise ValueError(f"{where}: rope_freqs.weight does not match Llama-3 rope scaling with any usual parameters")
