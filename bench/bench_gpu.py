"""GPU benchmark of model.py and the training scripts, in four independent parts.

  a. logprobs  fused, chunked token log-probs (model.token_logprobs) vs the naive
               F.log_softmax((hidden @ W.T).float() / T, -1).gather(...): forward + backward over
               N tokens x V vocab (SmolLM2's V and d), peak memory and median time.
  b. generate  model.generate tokens/s, greedy, equal work (an EOS list that never matches; for
               transformers min_new_tokens = max_new_tokens), batch 16 and 64, eager and after
               use_compile(), against transformers' generate on the same weights and prompts.
  c. sft       forward + backward + AdamW step under bf16 autocast on synthetic token ids with
               GSM8K-like lengths (random ids, right-padded, loss on every real token), with and
               without activation checkpointing; MFU = 6 N tokens/s over the bf16 matmul peak
               measured in this run (and over the datasheet peak where the GPU is known).
  d. grpo      `python grpo.py` for 2 steps on the built-in arith task in a temporary directory:
               perf/gen_seconds and perf/update_seconds of each step from its metrics.jsonl.

    bench/gpu.sh                          # CUDA, SmolLM2 GGUF at .cache/, writes bench/results/gpu.json
    bench/gpu.sh --device cpu --out /tmp  # dry mode: tiny sizes and a tiny random model, fp32; gpu_dry.json

Each part that fails records its error and traceback and the others still run; the JSON is
rewritten after every part, so a run stopped half way keeps what it measured. Times on CUDA come
from CUDA events (median of repeats after warm-up), memory from torch.cuda.max_memory_allocated
after a reset; on CPU times are wall-clock and memory is not measured.
"""

import argparse
import contextlib
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from model import GPT, Tokenizer, tiny_config, token_logprobs  # noqa: E402

DEFAULT_MODEL = ROOT / ".cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DATASHEET_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}  # dense, SXM
SIZES = {  # cuda: the real benchmark (about 6 minutes on an H200); cpu: the dry mode
    "cuda": dict(lp_shape=(16384, 49152, 576), warmup=2, repeats=5, gen_batches=(16, 64), gen_tokens=64, gen_repeats=3,
                 sft_batch=32, sft_lengths=(128, 320), sft_steps=10, matmul=8192,
                 grpo=["--batch-size", "16", "--group-size", "8", "--eval-size", "16"], grpo_timeout=300),
    "cpu": dict(lp_shape=(256, 512, 64), warmup=1, repeats=2, gen_batches=(2, 4), gen_tokens=8, gen_repeats=2,
                sft_batch=2, sft_lengths=(16, 48), sft_steps=2, matmul=256,
                grpo=["--batch-size", "2", "--group-size", "2", "--eval-size", "2", "--max-new-tokens", "8",
                      "--train-size", "8", "--micro-batch-size", "4"], grpo_timeout=120),
}


# ----------------------------------------------------------------------------------------------
# Timing and memory


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, dev, warmup, repeats):
    """Median time of fn() after warm-up: CUDA events on a GPU, wall clock on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(dev)
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory(fn, dev):
    """(peak MiB allocated during fn(), MiB of it above what was allocated before) on CUDA, else Nones."""
    if dev.type != "cuda":
        return None, None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak / 2**20, (peak - before) / 2**20


def free(dev):
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# The four parts


def part_logprobs(dev, dtype, s, model_path, tmp):
    N, V, d = s["lp_shape"]
    T = 0.7  # a sampling temperature != 1, so both versions divide by it
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(N, d, device=dev, generator=g).to(dtype).requires_grad_()
    weight = (0.02 * torch.randn(V, d, device=dev, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(V, (N,), device=dev, generator=g)
    variants = {
        "naive": lambda: F.log_softmax((hidden @ weight.T).float() / T, -1).gather(1, targets[:, None]).squeeze(1),
        "fused": lambda: token_logprobs(hidden, weight, targets, T),
    }
    out, diff = {}, None

    def fwd_bwd(name):
        hidden.grad = weight.grad = None
        lp = variants[name]()
        lp.sum().backward()
        return lp.detach()

    for name in variants:  # naive first: its values are the reference of the fused ones
        vals = (fwd_bwd(name).float(), hidden.grad.float(), weight.grad.float())  # (also a warm-up)
        if name == "naive":
            ref = vals
        else:
            diff = [float((a - b).abs().max()) for a, b in zip(vals, ref)]
        del vals
        hidden.grad = weight.grad = None
        peak, extra = peak_memory(lambda: fwd_bwd(name), dev)
        sec = median_seconds(lambda: fwd_bwd(name), dev, s["warmup"], s["repeats"])
        out[name] = dict(peak_mib=peak, extra_mib=extra, ms=sec * 1e3, tokens_per_s=N / sec)
        free(dev)
    del ref
    ratio = lambda k: None if out["naive"][k] is None else out["fused"][k] / out["naive"][k]
    return dict(N=N, V=V, d=d, temperature=T, dtype=str(dtype), **out,
                fused_over_naive=dict(extra_mib=ratio("extra_mib"), ms=ratio("ms")),
                max_abs_diff=dict(logp=diff[0], grad_hidden=diff[1], grad_weight=diff[2]))


def make_prompts(tok, n, seed=0):
    """n chat prompts of GSM8K-like arithmetic questions of varied lengths (left-padded by generate)."""
    rng = random.Random(seed)
    items = ["apples", "pencils", "marbles", "tickets", "cookies", "books"]
    prompts = []
    for i in range(n):
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
        q = f"Sam has {a} {items[i % 6]}. He buys {b} more and then gives {c} of them away. " * (1 + i % 3)
        prompts.append(tok.chat_prompt(q + "How many are left? Think step by step."))
    return prompts


def hf_generate(hf, prompts, n, pad, dev):
    import transformers

    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad, dtype=torch.long)
    att = torch.zeros(B, P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):], att[i, P - len(p):] = torch.tensor(p), 1
    gc_ = transformers.GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=pad)
    with torch.no_grad():
        return hf.generate(input_ids=ids.to(dev), attention_mask=att.to(dev), generation_config=gc_)[:, P:]


def part_generate(dev, dtype, s, model_path, tmp):
    model, tok = GPT.from_pretrained(model_path), Tokenizer.from_pretrained(model_path)
    hf_dir = tmp / "hf_for_transformers"
    model.save_pretrained(hf_dir, tok)  # fp32 on disk; transformers casts it to `dtype` when loading
    model = model.to(dev, dtype).eval()
    n, batches = s["gen_tokens"], s["gen_batches"]
    prompts = make_prompts(tok, max(batches))
    res = dict(new_tokens=n, dtype=str(dtype), prompt_tokens=[len(p) for p in prompts], tokens_per_s={}, notes={})
    tokens = {}

    def measure(variant, generate):
        for B in batches:
            P = prompts[:B]
            out = generate(P)  # warm-up (and compilation), kept for the agreement check
            assert out.shape == (B, n), (variant, tuple(out.shape))
            tokens[variant, B] = out.cpu()
            sec = median_seconds(lambda: generate(P), dev, 0, s["gen_repeats"])
            res["tokens_per_s"][f"{variant}_b{B}"] = B * n / sec

    def ours(P):
        out, mask = model.generate(P, n, temperature=0, eos_id=[], pad_id=tok.pad_id)
        assert bool(mask.all()), "a row stopped early"
        return out

    measure("ours", ours)
    try:
        import transformers
    except ImportError as e:
        res["notes"]["transformers"] = f"skipped: transformers not installed ({e})"
    else:
        try:
            hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(dev).eval()
            res["transformers"] = transformers.__version__
            measure("transformers", lambda P: hf_generate(hf, P, n, tok.pad_id, dev))
            del hf
        except Exception as e:  # noqa: BLE001 -- recorded; the compiled variant still runs
            res["notes"]["transformers"] = f"error: {type(e).__name__}: {e}"[:500]
            res["transformers_traceback"] = traceback.format_exc()
        free(dev)
    if not hasattr(model, "use_compile"):
        res["notes"]["compile"] = "not available: model.py has no GPT.use_compile"
    elif dev.type != "cuda":
        res["notes"]["compile"] = "skipped: the dry mode does not compile (CPU inductor builds take minutes)"
    else:
        t0 = time.perf_counter()
        try:
            model.use_compile()
            measure("ours_compiled", ours)
        except Exception as e:  # noqa: BLE001
            res["notes"]["compile"] = f"error: {type(e).__name__}: {e}"[:500]
            res["compile_traceback"] = traceback.format_exc()
        res["compile_and_measure_seconds"] = time.perf_counter() - t0
    res["rows_identical_to_ours"] = {f"{v}_b{B}": float((t == tokens["ours", B]).all(1).float().mean())
                                     for (v, B), t in tokens.items() if v != "ours"}
    tps = res["tokens_per_s"]
    res["speedups"] = {f"{v}_over_transformers_b{B}": tps[f"{v}_b{B}"] / tps[f"transformers_b{B}"]
                       for v in ("ours", "ours_compiled") for B in batches
                       if f"{v}_b{B}" in tps and f"transformers_b{B}" in tps}
    return res


def matmul_tflops(dev, dtype, n, s):
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    sec = median_seconds(lambda: a @ b, dev, 3, 10 if dev.type == "cuda" else 2)
    return 2 * n**3 / sec / 1e12


def part_sft(dev, dtype, s, model_path, tmp):
    model = GPT.from_pretrained(model_path).to(dev).train()  # fp32 weights, `dtype` autocast
    amp = torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev.type == "cuda")
    B, (lo, hi) = s["sft_batch"], s["sft_lengths"]
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(lo, hi + 1, (B,), generator=g)
    ids = torch.randint(model.config.vocab_size, (B, hi), generator=g).to(dev)
    x, y = ids[:, :-1], ids[:, 1:]
    mask = (torch.arange(hi - 1)[None] < lengths[:, None] - 1).to(dev)  # right padding: real tokens only
    n_tok = int(mask.sum())

    def step():
        with amp:
            loss = -(model(x, y, mask=mask) * mask).sum() / n_tok
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    peak_tflops = matmul_tflops(dev, dtype, s["matmul"], s)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else ""
    sheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in gpu), None)
    n_params = model.num_params()
    res = dict(params=n_params, batch=B, lengths=[lo, hi], tokens_per_step=n_tok, padded_tokens_per_step=B * (hi - 1),
               data="synthetic random ids, GSM8K-like lengths; loss on every real token", dtype=str(dtype),
               matmul_peak_tflops=peak_tflops, datasheet_peak_tflops=sheet, variants={}, notes={},
               mfu_formula="6 N tokens/s / peak, N = all parameters (a tied embedding once), attention FLOPs "
                           "and checkpointing's recomputation not counted")
    for ckpt in (False, True):
        name = "grad_checkpoint" if ckpt else "plain"
        if ckpt and not hasattr(model, "grad_checkpoint"):
            res["notes"]["grad_checkpoint"] = "not available: model.py has no GPT.grad_checkpoint"
            continue
        if hasattr(model, "grad_checkpoint"):
            model.grad_checkpoint = ckpt
        step()  # warm-up (optimizer state allocated)
        peak, _ = peak_memory(step, dev)
        sec = median_seconds(step, dev, 1, s["sft_steps"])
        achieved = 6 * n_params * n_tok / sec / 1e12
        res["variants"][name] = dict(step_ms=sec * 1e3, tokens_per_s=n_tok / sec, peak_mib=peak,
                                     model_tflops=achieved, mfu_vs_matmul=achieved / peak_tflops,
                                     mfu_vs_datasheet=achieved / sheet if sheet else None)
        free(dev)
    return res


def part_grpo(dev, dtype, s, model_path, tmp):
    work = tmp / "grpo"
    work.mkdir()
    cmd = [sys.executable, str(ROOT / "grpo.py"), "--model", str(Path(model_path).resolve()), "--task", "arith",
           "--steps", "2", "--eval-every", "0", "--device", dev.type, "--run-name", "gpu-grpo", *s["grpo"]]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=s["grpo_timeout"],
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"grpo.py exited with {p.returncode}:\n{(p.stdout + p.stderr)[-3000:]}")
    rows = [json.loads(line) for line in (work / "runs/gpu-grpo/metrics.jsonl").read_text().splitlines()]
    steps = [{k: r[k] for k in ("step", "perf/gen_seconds", "perf/update_seconds", "perf/tokens_per_sec",
                                "train/completion_len")} for r in rows if "perf/gen_seconds" in r]
    if len(steps) != 2:
        raise RuntimeError(f"expected 2 training steps in metrics.jsonl, found {len(steps)}")
    return dict(command=" ".join(cmd[1:]), wall_seconds_total=wall, steps=steps,
                note="step 1 includes one-time warm-up; the whole run also loads the model twice and evaluates twice")


PARTS = {"logprobs": part_logprobs, "generate": part_generate, "sft": part_sft, "grpo": part_grpo}


# ----------------------------------------------------------------------------------------------
# Environment, summary table, main


def environment(dev):
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
    try:
        commit, dirty = git("rev-parse", "HEAD").strip() or None, bool(git("status", "--porcelain").strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return dict(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
                git_commit=commit or os.environ.get("GIT_COMMIT"), git_uncommitted_changes=dirty,
                time=time.strftime("%Y-%m-%d %H:%M:%S"), cpus=os.cpu_count())


def fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def summary(parts):
    lines = []
    for name, r in parts.items():
        if r["status"] != "ok":
            lines.append(f"{name:9} ERROR {r['error']}")
        elif name == "logprobs":
            for v in ("naive", "fused"):
                lines.append(f"{name:9} {v:22} {fmt(r[v]['ms'], '.2f'):>9} ms  peak {fmt(r[v]['peak_mib'], '.0f')} MiB")
        elif name == "generate":
            lines += [f"{name:9} {k:22} {v:9.0f} tokens/s" for k, v in r["tokens_per_s"].items()]
            lines += [f"{name:9} {k:22} {v:9.2f}x" for k, v in r["speedups"].items()]
        elif name == "sft":
            lines.append(f"{name:9} matmul peak {r['matmul_peak_tflops']:.3g} TFLOP/s (datasheet "
                         f"{fmt(r['datasheet_peak_tflops'], '.0f')})")
            for k, v in r["variants"].items():
                sheet = "" if v["mfu_vs_datasheet"] is None else f", {v['mfu_vs_datasheet']:.1%} of datasheet"
                lines.append(f"{name:9} {k:22} {v['tokens_per_s']:9.0f} tokens/s  MFU {v['mfu_vs_matmul']:.1%} of "
                             f"matmul peak{sheet}  peak {fmt(v['peak_mib'], '.0f')} MiB")
        elif name == "grpo":
            lines += [f"{name:9} step {st['step']:<17} gen {st['perf/gen_seconds']:7.2f} s  update "
                      f"{st['perf/update_seconds']:7.2f} s" for st in r["steps"]]
        for k, v in r.get("notes", {}).items():
            lines.append(f"{name:9} {k}: {v}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the dry mode")
    p.add_argument("--model", default=None, help=f"a .gguf or Hugging Face directory (default: {DEFAULT_MODEL} on "
                                                 "cuda, a tiny random Llama on cpu)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="directory of gpu.json (gpu_dry.json on cpu)")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    a = p.parse_args()
    parts = a.parts.split(",")
    if unknown := [x for x in parts if x not in PARTS]:
        p.error(f"unknown --parts {unknown}")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here: use --device cpu for the dry run")
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    s = SIZES[dev.type]
    out_path = Path(a.out) / ("gpu.json" if dev.type == "cuda" else "gpu_dry.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        tmp = Path(tmp)
        model_path = a.model or (str(DEFAULT_MODEL) if dev.type == "cuda" else None)
        if model_path is None:  # the dry mode's tiny random Llama, through the Hugging Face layout
            torch.manual_seed(0)
            model_path = str(tmp / "tiny")
            GPT(tiny_config(n_layer=2, n_embd=64, ffn_dim=128)).save_pretrained(model_path, Tokenizer.byte_level())
        if not Path(model_path).exists():
            p.error(f"--model {model_path}: not found")
        result = dict(env=environment(dev), model=model_path, mode="cuda" if dev.type == "cuda" else "cpu dry run",
                      sizes={k: v for k, v in s.items()}, parts={})
        for name in parts:
            print(f"== {name}", flush=True)
            t0 = time.perf_counter()
            try:
                r = dict(status="ok", **PARTS[name](dev, dtype, s, model_path, tmp))
            except Exception as e:  # noqa: BLE001 -- one part's failure must not stop the others
                traceback.print_exc()
                r = dict(status="error", error=f"{type(e).__name__}: {e}"[:500], traceback=traceback.format_exc())
            r["part_seconds"] = time.perf_counter() - t0
            result["parts"][name] = r
            print(json.dumps({k: v for k, v in r.items() if k != "traceback"}), flush=True)
            free(dev)
            tmp_out = out_path.with_name(out_path.name + ".tmp")
            tmp_out.write_text(json.dumps(result, indent=2))
            os.replace(tmp_out, out_path)
    print(f"\n{result['env']['device']} | torch {result['env']['torch']} | commit {result['env']['git_commit']}")
    print(summary(result["parts"]))
    print(f"wrote {out_path}")
    failed = [name for name, r in result["parts"].items() if r["status"] != "ok"]
    if failed:
        sys.exit(f"failed parts: {', '.join(failed)} (errors and tracebacks in {out_path})")


if __name__ == "__main__":
    main()
