"""One GRPO, DPO and SFT step: our scripts against TRL on the same weights, data and hyper-parameters.

Each (algorithm, side) runs in its own process, one after the other, never two at once: ours runs the
unmodified script (grpo.py, dpo.py, sft.py) in-process with timers wrapped around its step functions;
TRL runs GRPOTrainer / DPOTrainer (precomputed reference log-probs, as dpo.py) / SFTTrainer (completion-only
loss) with a callback that stamps every step. Step 0 is a warm-up; the table shows the median of the next
--steps steps (seconds per step), the generation seconds (GRPO), peak RSS (getrusage, whole process: model
loading and the reference included) and the ratios TRL / ours.

Setting (the real run): SmolLM2-135M-Instruct, one Hugging Face directory written once from the GGUF by our
save_pretrained and loaded by both sides, fp32, CPU. GRPO: 8 GSM8K prompts x 4 completions, 64 new tokens,
β = 0.04 (k3 KL in the loss), clip 0.2 / 0.28, per-sequence token-mean loss, one optimizer step per batch,
micro-batch 32. DPO: 16 pairs of ~256 tokens (prompt + completion) made from GSM8K (chosen: the reference
solution; rejected: the same with every digit shifted by one), β = 0.1, sigmoid loss. SFT: 16 GSM8K examples.
The prompts and completions are token for token those of our scripts (TRL gets them decoded to text and
re-tokenizes them; the result records whether the ids came back equal).

FLOP/s: N = all parameters (embedding included, tied: counted once); 6 N per trained token (forward +
backward), 2 N per scored token (forward only: the GRPO reference pass, and generation at 2 N per prompt and
generated token), real tokens only (no padding), over the step's wall time; against the best fp32 torch.matmul
of --peak-size measured in the same run (parent process, same threads).

    /tmp/benchvenv/bin/python bench/bench_trl.py            # the real comparison (minutes; run it alone)
    /tmp/benchvenv/bin/python bench/bench_trl.py --smoke    # tiny random model, tiny batches: does it work
    (venv: python3 -m venv /tmp/benchvenv && /tmp/benchvenv/bin/pip install torch==2.13.0
     -r requirements.txt -r requirements-bench.txt)

Writes bench/results/trl.json (--smoke: trl_smoke.json). What cannot be made equal is listed in NOT_EQUAL.
"""

import argparse
import importlib.util
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GGUF = ROOT / ".cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"
NOT_EQUAL = [
    "sampled completions: each side has its own RNG, so GRPO completions (and their lengths) differ; "
    "FLOP/s uses each side's own token counts",
    "GRPO generation: ours prefills each distinct prompt once for its group; transformers' generate "
    "prefills every row",
    "GRPO reference log-probs (no gradient): ours run each distinct prompt once for its group, then the "
    "completions; TRL runs every sequence whole. FLOP/s counts both as 2 N per scored token",
    "kernels: our attention / fused chunked log-probs vs transformers' sdpa LlamaForCausalLM + full logits",
    "optimizer: ours AdamW betas (0.9, 0.95), no decay on vectors; TRL AdamW betas (0.9, 0.999); lr is tiny "
    "on both sides and the schedule is constant (TRL) vs warmup 0 + cosine (ours): no effect on time",
    "data order: TRL gets exactly the examples our run sees, but its sampler shuffles them into other batches",
    "our scripts evaluate --eval-size 1 before and after training (outside the timed steps, inside peak RSS)",
    "activation checkpointing is off on both sides (TRL 1.16's configs turn it on by default)",
    "micro-batches: ours cut one of more than --micro-batch-tokens (its default, 2048) padded tokens into shorter "
    "ones of similar lengths; TRL runs each micro-batch of per_device_train_batch_size sequences whole",
]


def load_script(name):
    """Import grpo.py / dpo.py / sft.py as a module, without running main()."""
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    mod = sys.modules[name] = importlib.util.module_from_spec(spec)  # registered: its parser reads its source
    spec.loader.exec_module(mod)
    return mod


def peak_rss_mb():
    """This process's peak RSS. VmHWM (the high-water mark of this process's own memory map) where /proc has
    it: getrusage's ru_maxrss keeps the parent's high-water mark across fork + exec, which would hide ours."""
    for line in Path("/proc/self/status").read_text().splitlines() if Path("/proc/self/status").exists() else []:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def result(stamps, gen, tokens, n_params):
    """Medians over the steps after the warm-up (step 0): seconds, generation seconds, achieved FLOP/s.
    stamps: the end of every step; tokens[i] = (trained, scored) tokens of step i."""
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    flops = [n_params * (6 * t + 2 * s) for t, s in tokens[1:len(stamps)]]
    return {"step_seconds": statistics.median(steps), "steps": steps,
            "gen_seconds": statistics.median(gen[1:]) if gen else None, "tokens": tokens[1:len(stamps)],
            "flops_per_step": flops, "achieved_flops": statistics.median(f / dt for f, dt in zip(flops, steps)),
            "peak_rss_mb": peak_rss_mb()}


# ---------------------------------------------------------------------------------------------- our side


def child_ours(algo, cfg):
    mod, stamps, gen, tokens = load_script(algo), [], [], []
    end_step = mod.end_step

    def timed_end_step(model, tok, args, run_dir, rank, bar, step, metrics, state):
        stamps.append(time.perf_counter())
        if "perf/gen_seconds" in metrics:
            gen.append(metrics["perf/gen_seconds"])
        return end_step(model, tok, args, run_dir, rank, bar, step, metrics, state)
    mod.end_step = timed_end_step
    if algo == "grpo":  # policy forward + backward and reference forward on every token; generation
        rollout = mod.rollout

        def counted_rollout(*a, **k):
            out = rollout(*a, **k)
            n = sum(len(s) for s in out[0])
            tokens.append((n, 2 * n))
            return out
        mod.rollout = counted_rollout
    else:  # dpo: chosen and rejected sequences trained (the reference is precomputed); sft: every token
        step_fn, name = (mod.dpo_step, "dpo_step") if algo == "dpo" else (mod.sft_step, "sft_step")
        keys = ("chosen_ids", "rejected_ids") if algo == "dpo" else ("completion_ids",)

        def counted_step(model, opt, batch, *a):
            tokens.append((sum(len(p["prompt_ids"]) * len(keys) + sum(len(p[k]) for k in keys) for p in batch), 0))
            return step_fn(model, opt, batch, *a)
        setattr(mod, name, counted_step)
    sys.argv = [f"{algo}.py"] + cfg["ours_argv"]
    t0 = time.perf_counter()
    mod.main()
    return {**result(stamps, gen, tokens, cfg["n_params"]), "wall_seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------- TRL side


def child_trl(algo, cfg):
    import datasets
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from model import Tokenizer
    torch.manual_seed(0)
    g = load_script("grpo")  # the task block is the same in every script: prompts, tokenizing, reward
    ours_tok, hf_tok = Tokenizer.from_pretrained(cfg["model"]), AutoTokenizer.from_pretrained(cfg["model"])
    text = lambda ids: hf_tok.decode(ids, skip_special_tokens=False)
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    stamps, gen, tokens = [], [], []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())
    common = dict(output_dir=tempfile.mkdtemp(), max_steps=cfg["steps"] + 1, logging_steps=1, save_strategy="no",
                  report_to="none", use_cpu=True, bf16=False, fp16=False, seed=0, disable_tqdm=True,
                  lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, dataloader_num_workers=0,
                  gradient_checkpointing=False)  # TRL's configs default to True; ours to off: both off here
    examples = cfg["examples"]
    same_ids = all(hf_tok(text(ex["prompt_ids"]), add_special_tokens=False)["input_ids"] == ex["prompt_ids"]
                   for ex in examples)
    if algo == "grpo":
        rows = [{"prompt": text(ex["prompt_ids"]), "answer": ex["answer"]} for ex in examples]
        reward = lambda completions, answer, **kw: [g.reward_fn(c, {"answer": a}) for c, a in zip(completions, answer)]
        reward.__name__ = "gsm8k_correct"
        args = trl.GRPOConfig(**common, learning_rate=1e-6, per_device_train_batch_size=cfg["batch"] * cfg["group"],
                              gradient_accumulation_steps=1, num_generations=cfg["group"], num_iterations=1,
                              max_completion_length=cfg["new_tokens"], temperature=1.0, top_p=1.0, top_k=0,
                              beta=0.04, epsilon=0.2, epsilon_high=0.28, loss_type="grpo", scale_rewards="group")
        trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=hf_tok,
                                  train_dataset=datasets.Dataset.from_list(rows), callbacks=[Stamp()])
        generate, score = trainer._generate, trainer._generate_and_score_completions

        def timed_generate(*a, **k):
            t = time.perf_counter()
            out = generate(*a, **k)
            gen.append(time.perf_counter() - t)
            return out

        def counted(*a, **k):
            out = score(*a, **k)
            n = int(out["prompt_mask"].sum() + out["completion_mask"].sum())
            tokens.append((n, 2 * n))
            return out
        trainer._generate, trainer._generate_and_score_completions = timed_generate, counted
    elif algo == "dpo":
        rows = [{"prompt": text(p["prompt_ids"]), "chosen": ours_tok.decode(p["chosen_ids"]),
                 "rejected": ours_tok.decode(p["rejected_ids"])} for p in examples]
        args = trl.DPOConfig(**common, learning_rate=1e-6, per_device_train_batch_size=cfg["batch"], beta=0.1,
                             loss_type=["sigmoid"], precompute_ref_log_probs=True, max_length=None)
        trainer = trl.DPOTrainer(model=model, args=args, processing_class=hf_tok,
                                 train_dataset=datasets.Dataset.from_list(rows), callbacks=[Stamp()])
        ds = trainer.train_dataset
        same_ids = same_ids and [r["chosen_ids"] for r in ds] == [p["chosen_ids"] for p in examples] \
            and [r["rejected_ids"] for r in ds] == [p["rejected_ids"] for p in examples]
        n = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in ds)
        tokens = [(n * cfg["batch"] // len(ds), 0)] * (cfg["steps"] + 1)  # the mean pair, batch pairs a step
    else:
        rows = [{"input_ids": ex["prompt_ids"] + ex["completion_ids"],
                 "completion_mask": [0] * len(ex["prompt_ids"]) + [1] * len(ex["completion_ids"])} for ex in examples]
        args = trl.SFTConfig(**common, learning_rate=1e-5, per_device_train_batch_size=cfg["batch"],
                             completion_only_loss=True, max_length=None, packing=False)
        trainer = trl.SFTTrainer(model=model, args=args, processing_class=hf_tok,
                                 train_dataset=datasets.Dataset.from_list(rows), callbacks=[Stamp()])
        n = sum(len(r["input_ids"]) for r in rows)
        tokens = [(n * cfg["batch"] // len(rows), 0)] * (cfg["steps"] + 1)
    t0 = time.perf_counter()
    trainer.train()
    return {**result(stamps, gen, tokens, cfg["n_params"]), "wall_seconds": time.perf_counter() - t0,
            "same_ids": same_ids, "versions": {"trl": trl.__version__, "transformers": transformers.__version__}}


# ---------------------------------------------------------------------------------------------- parent


def matmul_peak(n):
    """Best fp32 FLOP/s of an n x n matmul in this process."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(5))
    return 2 * n ** 3 / best


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def prepare(o, work):
    """The HF directory both sides load, the per-algorithm data (token ids from our task block) and argv."""
    import model as M
    g = load_script("grpo")
    tok = M.Tokenizer.from_pretrained(str(o.model))
    if o.smoke:  # a random 2-layer model over SmolLM2's tokenizer: the same code paths, seconds per step
        c = M.GPT.from_pretrained(str(o.model)).config
        torch.manual_seed(0)
        net = M.GPT(M.GPTConfig(arch="llama", vocab_size=c.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                                ffn_dim=128, max_seq_len=2048, bos_token_id=c.bos_token_id,
                                eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id, rope_theta=c.rope_theta))
    else:
        net = M.GPT.from_pretrained(str(o.model))
    hf_dir = work / "model"
    net.save_pretrained(str(hf_dir), tok)
    n_params = sum(p.numel() for p in net.parameters())
    train = g.tokenize(g.load_task(argparse.Namespace(task="gsm8k", data_path=str(o.data), eval_size=1))[0],
                       tok, net.config.max_seq_len, 0, "train")
    b, k, new, steps = (2, 2, 8, o.steps) if o.smoke else (8, 4, 64, o.steps)
    sft_b = dpo_b = 4 if o.smoke else 16
    batches = lambda bs: [train[i] for s in range(steps + 1) for i in g.batch_indices(s, bs, len(train), 0)]
    # DPO pairs: GSM8K examples of 230-290 tokens (prompt + solution; smoke: 80-120); rejected = every digit
    # shifted by one; dpo.py --task jsonl holds out the last --eval-size (1) pair
    lo, hi = (80, 120) if o.smoke else (230, 290)
    shift = lambda s: "".join(str((int(ch) + 1) % 10) if ch.isdigit() else ch for ch in s)
    chosen = [ex for ex in train if lo <= len(ex["prompt_ids"]) + len(ex["completion_ids"]) <= hi][:dpo_b + 1]
    pairs_file = work / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps({"prompt": ex["prompt"], "chosen": ex["completion"],
                                              "rejected": shift(ex["completion"])}) + "\n" for ex in chosen))
    pairs = [{"prompt_ids": ex["prompt_ids"], "chosen_ids": ex["completion_ids"],
              "rejected_ids": tok.encode(shift(ex["completion"])) + [tok.eos_id]} for ex in chosen[:dpo_b]]
    run = ["--model", str(hf_dir), "--steps", str(steps + 1), "--eval-size", "1", "--eval-every", "0",
           "--save-every", "1000", "--device", "cpu", "--seed", "0", "--warmup-steps", "0", "--weight-decay", "0",
           "--grad-clip", "1.0"]
    cfgs = {
        "grpo": {"batch": b, "group": k, "new_tokens": new, "examples": batches(b)[: b * (steps + 1)],
                 "ours_argv": run + ["--task", "gsm8k", "--data-path", str(o.data), "--batch-size", str(b),
                                     "--group-size", str(k), "--max-new-tokens", str(new), "--micro-batch-size",
                                     str(b * k), "--beta", "0.04", "--lr", "1e-6", "--run-name", "grpo"]},
        "dpo": {"batch": dpo_b, "examples": pairs,
                "ours_argv": run + ["--task", "jsonl", "--data-path", str(pairs_file), "--batch-size", str(dpo_b),
                                    "--micro-batch-size", str(dpo_b), "--beta", "0.1", "--rpo-alpha", "0",
                                    "--lr", "1e-6", "--run-name", "dpo", "--max-new-tokens", "8"]},
        "sft": {"batch": sft_b, "examples": batches(sft_b),
                "ours_argv": run + ["--task", "gsm8k", "--data-path", str(o.data), "--batch-size", str(sft_b),
                                    "--micro-batch-size", str(sft_b), "--lr", "1e-5", "--run-name", "sft",
                                    "--max-new-tokens", "8"]},
    }
    for c in cfgs.values():
        c.update(model=str(hf_dir), steps=steps, n_params=n_params)
    return cfgs, n_params


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4, help="timed steps after one warm-up step")
    p.add_argument("--algos", default="grpo,dpo,sft")
    p.add_argument("--sides", default="ours,trl")
    p.add_argument("--model", type=Path, default=GGUF, help="the GGUF (or HF dir) both sides' weights come from")
    p.add_argument("--data", type=Path, default=GSM8K)
    p.add_argument("--peak-size", type=int, default=2048, help="n of the n x n fp32 matmul of the peak")
    p.add_argument("--smoke", action="store_true", help="tiny random model and batches, 2 steps: a check it runs")
    p.add_argument("--child", nargs=3, metavar=("SIDE", "ALGO", "CFG"), help=argparse.SUPPRESS)
    o = p.parse_args()
    if o.child:
        side, algo, cfg_path = o.child
        cfg = json.loads(Path(cfg_path).read_text())
        out = (child_ours if side == "ours" else child_trl)(algo, cfg)
        Path(cfg_path).with_suffix(".out.json").write_text(json.dumps(out))
        return
    if o.smoke:
        o.steps, o.peak_size = min(o.steps, 1), min(o.peak_size, 512)
    peak = matmul_peak(o.peak_size)
    work = Path(tempfile.mkdtemp(prefix="bench_trl_"))
    cfgs, n_params = prepare(o, work)
    results = {}
    for algo in o.algos.split(","):
        for side in o.sides.split(","):
            cfg_path = work / f"{side}_{algo}.json"
            cfg_path.write_text(json.dumps(cfgs[algo]))
            print(f"--- {algo} / {side}", flush=True)
            # cwd = work: our scripts write runs/<name> there, not into the repo
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", side, algo, str(cfg_path)],
                           cwd=work, check=True)
            results[f"{algo}/{side}"] = json.loads(cfg_path.with_suffix(".out.json").read_text())
    print(f"\nN = {n_params / 1e6:.1f}M parameters (all, embedding included); matmul peak {peak / 1e9:.1f} GFLOP/s "
          f"(fp32, {o.peak_size}^3, {torch.get_num_threads()} threads)")
    print(f"{'step':<6}{'side':<6}{'s/step':>9}{'gen s':>8}{'peak RSS MB':>13}{'GFLOP/s':>9}{'% peak':>8}")
    for key, r in results.items():
        algo, side = key.split("/")
        gen = f"{r['gen_seconds']:.2f}" if r["gen_seconds"] is not None else "-"
        print(f"{algo:<6}{side:<6}{r['step_seconds']:>9.2f}{gen:>8}{r['peak_rss_mb']:>13.0f}"
              f"{r['achieved_flops'] / 1e9:>9.3g}{100 * r['achieved_flops'] / peak:>8.1f}")
    ratios = {}
    for algo in o.algos.split(","):
        ours, theirs = results.get(f"{algo}/ours"), results.get(f"{algo}/trl")
        if ours and theirs:
            ratios[algo] = {k: theirs[k] / ours[k] for k in ("step_seconds", "gen_seconds", "peak_rss_mb")
                            if ours[k] and theirs[k]}
            print(f"{algo}: TRL / ours " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios[algo].items())
                  + f"; same token ids: {theirs['same_ids']}")
    print("not equal:\n  " + "\n  ".join(NOT_EQUAL))
    out = Path(__file__).resolve().parent / "results" / ("trl_smoke.json" if o.smoke else "trl.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "setting": {"steps": o.steps, "smoke": o.smoke, "model": str(o.model), "n_params": n_params,
                    "n_counts": "all parameters", "matmul_peak_flops": peak, "peak_size": o.peak_size,
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "cpu": platform.processor() or platform.machine(),
                    "argv": {a: cfgs[a]["ours_argv"] for a in cfgs}},
        "results": results, "ratios_trl_over_ours": ratios, "not_equal": NOT_EQUAL}, indent=1))
    print(f"wrote {out}")
    shutil.rmtree(work)  # the HF copy of the weights, the pairs file, the runs


if __name__ == "__main__":
    main()
