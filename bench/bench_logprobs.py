"""Fused, chunked token log-probs (model.token_logprobs) vs the naive log_softmax + gather.

Forward + backward (gradients for the hidden states and the unembedding) of log p(target) for
`--tokens` positions at two real vocabulary shapes: SmolLM2 (V=49152, d=576) and Qwen2.5-0.5B
(V=151936, d=896). Reports the extra peak memory of forward + backward (gradients included) and the
time, and the fused/naive ratios (goals: memory <= 0.15, time <= 1.3).

Peak memory on CPU: every (variant, shape) runs in a fresh subprocess, which warms the kernels up on a
tiny problem, allocates its inputs, resets the peak resident set size (Linux: /proc/self/clear_refs)
and reports peak RSS during forward + backward minus the RSS before it (elsewhere: the ru_maxrss
delta). On CUDA: torch.cuda.max_memory_allocated
over memory_allocated after the inputs, in fp32 and bf16, and optionally torch.compile of the naive
version (--compile).

    python bench/bench_logprobs.py                     # 8192 tokens, both shapes, CPU fp32
    python bench/bench_logprobs.py --quick             # 1024 tokens: a check that it runs
    python bench/bench_logprobs.py --tokens 4096 --repeat 3 --entropy
    python bench/bench_logprobs.py --entropy-cost --tokens 4096 --repeat 3   # fused only: entropy's cost

--entropy-cost times the fused kernel three ways: without entropy, with the entropy computed and logged
but not in the loss (its backward branch is skipped: goal <= 1.15x), and with the entropy in the loss.

Writes bench/results/logprobs.json. The naive version needs about 3 x tokens x V x 4 bytes
(15 GB at 8192 x 151936); shapes that would not fit in the available memory are skipped with a note.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import token_logprobs  # noqa: E402

SHAPES = {"smollm2": (49152, 576), "qwen2.5": (151936, 896)}
RESULTS = Path(__file__).resolve().parent / "results" / "logprobs.json"


def naive(hidden, weight, targets, temperature=1.0, entropy=False):
    z = hidden @ weight.T
    if temperature != 1.0:
        z = z / temperature
    lsm = torch.log_softmax(z.float(), dim=-1)
    lp = lsm.gather(-1, targets[:, None]).squeeze(1)
    if entropy:
        return lp, -(lsm.exp() * lsm).sum(-1)
    return lp, None


def fused(hidden, weight, targets, temperature=1.0, entropy=False):
    if entropy:
        return token_logprobs(hidden, weight, targets, temperature, entropy=True)
    return token_logprobs(hidden, weight, targets, temperature), None


def step(fn, h, w, t, entropy, in_loss=True):
    lp, ent = fn(h, w, t, 1.0, entropy)
    loss = lp.sum() + (ent.sum() if ent is not None and in_loss else 0)
    loss.backward()
    h.grad = w.grad = None


def inputs(n, V, d, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(V, d, generator=g) * 0.05).to(device, dtype).requires_grad_()
    t = torch.randint(0, V, (n,), generator=g).to(device)
    return h, w, t


def _status_kb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss():
    """Reset the peak RSS (Linux: VmHWM via /proc/self/clear_refs) and return the baseline to subtract.
    Elsewhere the baseline is the running peak (ru_maxrss), which the tiny warm-up keeps at the inputs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmRSS"), True
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024), False


def peak_rss(linux):
    if linux:
        return _status_kb("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def child(a):
    """One (variant, shape) on CPU in this fresh process: prints one JSON line."""
    if a.threads:
        torch.set_num_threads(a.threads)
    fn = fused if a.variant == "fused" else naive
    entropy, in_loss = a.entropy or a.entropy_logged, not a.entropy_logged
    step(fn, *inputs(16, 256, 64, "cpu", torch.float32, seed=1), entropy, in_loss)  # warm-up: kernels, threads
    h, w, t = inputs(a.tokens, a.vocab, a.dim, "cpu", torch.float32)
    base, linux = reset_peak_rss()
    times = []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        step(fn, h, w, t, entropy, in_loss)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"peak_extra_bytes": peak_rss(linux) - base, "seconds": times,
                      "method": "VmHWM - VmRSS" if linux else "ru_maxrss delta"}))


def run_child(a, name, variant, V, d, *flags):
    cmd = [sys.executable, __file__, "--child", "--variant", variant, "--vocab", str(V), "--dim", str(d),
           "--tokens", str(a.tokens), "--repeat", str(a.repeat), "--threads", str(a.threads or 0), *flags]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{name} {variant}: child failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_cpu(a, name, V, d):
    return {variant: run_child(a, name, variant, V, d, *(["--entropy"] if a.entropy else []))
            for variant in ("naive", "fused")}


def entropy_cost(a, name, V, d, device):
    """Fused forward + backward: no entropy, entropy logged (not in the loss), entropy in the loss."""
    modes = {"no_entropy": [], "entropy_logged": ["--entropy-logged"], "entropy_in_loss": ["--entropy"]}
    res = {}
    for mode, flags in modes.items():
        if device == "cpu":
            res[mode] = run_child(a, name, "fused", V, d, *flags)["seconds"]
        else:
            h, w, t = inputs(a.tokens, V, d, "cuda", torch.bfloat16)
            entropy, in_loss = bool(flags), flags != ["--entropy-logged"]
            step(fused, h, w, t, entropy, in_loss)  # warm-up
            res[mode] = []
            for _ in range(a.repeat):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                step(fused, h, w, t, entropy, in_loss)
                torch.cuda.synchronize()
                res[mode].append(time.perf_counter() - t0)
    base = statistics.median(res["no_entropy"])
    row = dict(device=device, shape=name, V=V, d=d, tokens=a.tokens, seconds=res,
               logged_over_none=statistics.median(res["entropy_logged"]) / base,
               in_loss_over_none=statistics.median(res["entropy_in_loss"]) / base)
    print(f"  {name}: no entropy {base:.3f} s | entropy logged / none {row['logged_over_none']:.3f}x "
          f"(goal <= 1.15) | entropy in the loss / none {row['in_loss_over_none']:.3f}x", flush=True)
    return row


def run_cuda(a, V, d, dtype, compile_naive):
    out = {}
    variants = [("naive", naive), ("fused", fused)]
    if compile_naive:
        variants.append(("naive_compiled", torch.compile(naive)))
    for variant, fn in variants:
        h, w, t = inputs(a.tokens, V, d, "cuda", dtype)
        step(fn, *inputs(16, V, d, "cuda", dtype, seed=1), a.entropy)  # warm-up (and compile)
        if compile_naive and variant == "naive_compiled":
            step(fn, h, w, t, a.entropy)  # compile for the real shape outside the measurement
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(a.repeat):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(fn, h, w, t, a.entropy)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[variant] = {"peak_extra_bytes": torch.cuda.max_memory_allocated() - base, "seconds": times}
        del h, w, t
        torch.cuda.empty_cache()
    return out


def mem_available():
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def summarize(rows):
    print(f"{'device':6} {'dtype':8} {'shape':9} {'V':>7} {'d':>4} {'tokens':>6} {'variant':15} {'peak MB':>9} "
          f"{'seconds':>8} {'mem ratio':>9} {'time ratio':>10}")
    for r in rows:
        print(f"{r['device']:6} {r['dtype']:8} {r['shape']:9} {r['V']:7d} {r['d']:4d} {r['tokens']:6d} "
              f"{r['variant']:15} "
              f"{r['peak_extra_bytes'] / 2**20:9.1f} {r['seconds_median']:8.3f} "
              f"{r.get('mem_ratio', float('nan')):9.3f} {r.get('time_ratio', float('nan')):10.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192, help="positions scored (rows of the hidden states)")
    p.add_argument("--repeat", type=int, default=1, help="timed forward+backward passes per variant (median reported)")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {list(SHAPES)}")
    p.add_argument("--entropy", action="store_true", help="also compute the entropy and backpropagate through it")
    p.add_argument("--entropy-cost", action="store_true",
                   help="fused only: time no entropy / entropy logged, not in the loss / entropy in the loss")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--compile", action="store_true", help="CUDA: also torch.compile the naive version")
    p.add_argument("--cpu", action="store_true", help="CPU even when CUDA is available")
    p.add_argument("--quick", action="store_true", help="1024 tokens, one pass: check that it runs")
    p.add_argument("--out", default=str(RESULTS), help="JSON results file")
    # internal: one CPU measurement in a fresh process
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    p.add_argument("--entropy-logged", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    if a.quick:
        a.tokens, a.repeat = 1024, 1
    cuda = torch.cuda.is_available() and not a.cpu
    rows, notes = [], []
    if a.entropy_cost:
        print(f"entropy cost of the fused kernel, {a.tokens} tokens, median of {a.repeat}:")
        for name in a.shapes.split(","):
            rows.append(entropy_cost(a, name, *SHAPES[name], "cuda" if cuda else "cpu"))
    for name in ([] if a.entropy_cost else a.shapes.split(",")):
        V, d = SHAPES[name]
        runs = [("cuda", "fp32", torch.float32), ("cuda", "bf16", torch.bfloat16)] if cuda else \
            [("cpu", "fp32", torch.float32)]
        for device, dname, dtype in runs:
            need = 3 * a.tokens * V * 4 + 2 * V * d * 4
            avail = mem_available() if device == "cpu" else torch.cuda.mem_get_info()[0]
            if avail is not None and need > 0.8 * avail:
                notes.append(f"skipped {name} {device} {dname}: the naive version needs about {need / 2**30:.1f} GB, "
                             f"{avail / 2**30:.1f} GB available; use fewer --tokens")
                print(notes[-1])
                continue
            print(f"{name} (V={V}, d={d}) {device} {dname}, {a.tokens} tokens ...", flush=True)
            res = run_cpu(a, name, V, d) if device == "cpu" else run_cuda(a, V, d, dtype, a.compile)
            base = res["naive"]
            for variant, r in res.items():
                row = dict(device=device, dtype=dname, shape=name, V=V, d=d, tokens=a.tokens, variant=variant,
                           entropy=a.entropy, peak_extra_bytes=r["peak_extra_bytes"], seconds=r["seconds"],
                           seconds_median=statistics.median(r["seconds"]))
                if variant != "naive":
                    row["mem_ratio"] = r["peak_extra_bytes"] / max(base["peak_extra_bytes"], 1)
                    row["time_ratio"] = row["seconds_median"] / statistics.median(base["seconds"])
                rows.append(row)
    if rows and not a.entropy_cost:
        print()
        summarize(rows)
        print("\ngoals: fused/naive peak memory <= 0.15, time <= 1.3")
    meta = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                processor=platform.processor(), threads=torch.get_num_threads() if not a.threads else a.threads,
                cpus=os.cpu_count(), cuda=torch.cuda.get_device_name() if cuda else None,
                time=time.strftime("%Y-%m-%d %H:%M:%S"), args=vars(a), notes=notes)
    out = RESULTS.with_name("logprobs_entropy.json") if a.entropy_cost and a.out == str(RESULTS) else Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
