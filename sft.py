"""
sft.py: supervised fine-tuning (SFT), with the loss on completion tokens only.

The first stage of instruction tuning (Ouyang et al. 2022, arXiv 2203.02155; the exposition follows
Patel, arXiv 2509.04501): maximise the likelihood of reference completions y given prompts x,

    L(θ) = − Σ_{(x,y) ∈ B} Σ_{t=1..|y|} log π_θ(y_t | x, y_<t)  /  Σ_{(x,y) ∈ B} |y|

Choices made here where the literature differs:
  1. Loss on completion tokens only: prompt tokens are masked; the EOS that ends a completion is a
     completion token and is in the loss (otherwise the model never learns to stop).
  2. Token-weighted mean over every completion token of the optimizer step (all micro-batches, all
     ranks): the gradient is the same however the batch is split. A mean per micro-batch would not
     be.
  3. AdamW (β = 0.9, 0.95; weight decay on matrices only), linear warmup then cosine decay to 10 %
     of the peak rate, gradient norm clipped. bf16 autocast on CUDA, fp32 on CPU.
  4. Data parallel under torchrun: each rank takes its share of the batch, gradients are summed with
     one all-reduce (gloo on CPU, NCCL on GPU) and, with choice 2, equal the one-process gradient.
  5. Step s always sees the same examples (a seeded permutation per epoch), so --resume ends exactly
     where the uninterrupted run ends.

Run:
  python sft.py                                                           # tiny model, `arith`, CPU
  python sft.py --model HuggingFaceTB/SmolLM2-135M-Instruct --task gsm8k --lr 2e-5 \\
      --batch-size 64 --micro-batch-size 16 --steps 500 --max-new-tokens 256   # one GPU, bf16
  torchrun --nproc_per_node=2 sft.py                                      # data parallel
"""

import argparse
import ast
import contextlib
import dataclasses
import gzip
import inspect
import json
import math
import os
import random
import re
import time
import typing
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from model import GPT, Tokenizer, tiny_config


@dataclass
class Args:
    model: str = "tiny"
    """starting checkpoint: `tiny` (from scratch), a Hugging Face directory, a hub id or a .gguf file"""
    task: Literal["arith", "gsm8k", "jsonl"] = "arith"
    """arith (built in) | gsm8k | jsonl"""
    data_path: str = ""
    """gsm8k: directory or URL prefix with train.jsonl and test.jsonl (default ../shared/data/gsm8k);
    jsonl: a file or URL of {"prompt", "completion"} lines, the last --eval-size held out"""
    train_size: int = 20000
    """arith: number of training problems"""
    eval_size: int = 500
    """held-out examples scored (greedy) before, during and after training"""
    run_name: str = ""
    """output directory runs/<run-name> (default: the script's name)"""
    seed: int = 0
    """seed of initialisation, data order and sampling: the same seed gives the same run on CPU"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto (cuda when available) | cpu | cuda"""
    steps: int = 1000
    """optimizer steps"""
    batch_size: int = 16
    """sequences per optimizer step, over all ranks"""
    micro_batch_size: int = 16
    """sequences per forward/backward on one rank (gradient accumulation when smaller)"""
    lr: float = 3e-3
    """peak learning rate"""
    warmup_steps: int = 20
    """linear warmup steps, then cosine decay to 10 % of --lr"""
    weight_decay: float = 0.1
    """AdamW weight decay of the matrices"""
    grad_clip: float = 1.0
    """clip the gradient norm to this (0: no clipping)"""
    max_new_tokens: int = 64
    """generation budget of one completion"""
    eval_every: int = 250
    """evaluate every this many steps (0: only before and after)"""
    save_every: int = 250
    """checkpoint every this many steps (and at the end)"""
    resume: bool = False
    """continue runs/<run-name> from its last checkpoint"""


# ----------------------------------------------------------------------------------------------
# SFT: the loss and the update


def sft_loss(logp, mask, n_tokens):
    """logp (B, T) log-probs of the targets, mask (B, T) 1 on completion tokens; n_tokens is the number
    of completion tokens in the whole optimizer step. Returns this micro-batch's share of the mean NLL."""
    return -(logp * mask).sum() / n_tokens


def sft_step(model, opt, batch, tok, args, step, run_dir, amp):
    """One optimizer step of the mean completion-token NLL over `batch` (every rank's examples; this rank
    takes its share, micro-batch by micro-batch). Returns (loss, gradient norm), summed over ranks."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    n_tokens = sum(len(ex["completion_ids"]) for ex in batch)  # known on every rank: no communication
    mine, loss_sum, device = batch[rank::world], 0.0, next(model.parameters()).device
    for i in range(0, len(mine), args.micro_batch_size):
        micro = mine[i:i + args.micro_batch_size]
        ids, targets, mask = collate([ex["prompt_ids"] + ex["completion_ids"] for ex in micro],
                                     [[0] * len(ex["prompt_ids"]) + [1] * len(ex["completion_ids"]) for ex in micro],
                                     tok.pad_id, device)
        with amp:
            loss = sft_loss(model(ids, targets, mask=mask), mask, n_tokens)
        loss.backward()
        loss_sum += loss.item()
    return optimizer_step(model, opt, args, loss_sum, step, run_dir)


# ----------------------------------------------------------------------------------------------


def main():
    args = parse_args()
    rank, world, device = setup(args)
    run_dir, start, state = start_run(args, rank)
    model, tok = load_model(str(run_dir) if args.resume else args.model, device, args.seed)
    amp = autocast(device)
    train, evals = load_task(args)
    tokenize(train, tok, model.config.max_seq_len, 0, "train")
    tokenize(evals, tok, model.config.max_seq_len, args.max_new_tokens, "eval")
    opt = make_optimizer(model, args, state)
    per_rank = args.batch_size // world
    if per_rank * world != args.batch_size or per_rank % min(per_rank, args.micro_batch_size):
        raise SystemExit(f"error: --batch-size {args.batch_size} must split into {world} ranks x whole micro-batches "
                         f"of {args.micro_batch_size}")
    micro = min(per_rank, args.micro_batch_size)
    bar = begin(model, tok, evals, args, amp, run_dir, rank, start, f"batch {args.batch_size} = {world} ranks x "
                f"{per_rank // micro} micro-batches x {micro} | {len(train)} train, {len(evals)} eval examples")
    for step in bar:
        t0, lr = time.time(), set_lr(opt, step, args)
        batch = [train[i] for i in batch_indices(step, args.batch_size, len(train), args.seed)]
        loss, grad_norm = sft_step(model, opt, batch, tok, args, step, run_dir, amp)
        metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm, "perf/tokens_per_sec":
                   sum(len(ex["prompt_ids"]) + len(ex["completion_ids"]) for ex in batch) / (time.time() - t0)}
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            metrics |= evaluate(model, tok, evals, args, amp)
        end_step(model, tok, args, run_dir, rank, bar, step, metrics, {"optimizer": opt.state_dict()})
    finish(args, run_dir, rank, evaluate(model, tok, evals, args, amp))


# ==============================================================================================
# Everything below this line is the same, byte for byte, in every script (tests/test_family.py
# checks it): the task, the shared machinery and, in the scripts that sample, the rollouts.
# ----------------------------------------------------------------------------------------------
# Task: examples are {"prompt", "completion", "answer"}; the reward scores a completion's text

NAMES = ["Ann", "Ben", "Cal", "Dan", "Eva", "Fay", "Gus", "Hal", "Ivy", "Joe", "Kim", "Leo", "Mia", "Ned", "Oli",
         "Pam", "Ray", "Sam", "Tom", "Uma", "Val", "Wes", "Zoe"]
ITEMS = ["pens", "eggs", "cards", "coins", "books", "cups", "hats", "toys", "keys", "maps"]


def arith_problem(rng):
    """One `arith` word problem: add or subtract two-digit numbers, worked by place value."""
    name, item, a, b = rng.choice(NAMES), rng.choice(ITEMS), rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        q, (ta, ua), (tb, ub) = f"{name} has {a} {item} and gets {b} more. How many now?", divmod(a, 10), divmod(b, 10)
        work, ans = f"{ta}0 + {tb}0 + {ua} + {ub} = {ta + tb}0 + {ua + ub} = {a + b}", a + b
    else:
        a, b = max(a, b), min(a, b)
        q, (ta, ua), (tb, ub) = f"{name} has {a} {item} and gives away {b}. How many now?", divmod(a, 10), divmod(b, 10)
        units = f"+ {ua - ub}" if ua >= ub else f"- {ub - ua}"
        work, ans = f"{ta}0 - {tb}0 + {ua} - {ub} = {ta - tb}0 {units} = {a - b}", a - b
    return {"prompt": q, "completion": f"{work}\n#### {ans}", "answer": str(ans)}


def arith_split(n_train, n_eval, seed):
    """Train and eval problems from separate seeded streams; a train problem equal to an eval one is dropped."""
    rng = random.Random(f"arith-eval-{seed}")
    evals = [arith_problem(rng) for _ in range(n_eval)]
    held_out, rng, train = {e["prompt"] for e in evals}, random.Random(f"arith-train-{seed}"), []
    while len(train) < n_train:
        ex = arith_problem(rng)
        if ex["prompt"] not in held_out:
            train.append(ex)
    return train, evals


def read_jsonl(path, fields):
    """Records of a .jsonl (or .jsonl.gz) file or URL; a bad line is an error naming the file and line."""
    if str(path).startswith(("http://", "https://")):
        cache = Path.home() / ".cache" / "post-training" / re.sub(r"[^\w.-]", "_", str(path))
        if not cache.exists():
            cache.parent.mkdir(parents=True, exist_ok=True)
            urllib.request.urlretrieve(str(path), cache.with_suffix(".part"))
            os.replace(cache.with_suffix(".part"), cache)
        path = cache
    if not Path(path).exists():
        raise SystemExit(f"error: {path}: no such data file")
    rows = []
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path}:{i}: not valid JSON ({e.msg})") from None
            missing = [k for k in fields if not isinstance(row, dict) or not isinstance(row.get(k), str)]
            if missing:
                raise SystemExit(f"error: {path}:{i}: missing or non-string field {missing[0]!r} (expected {fields})")
            rows.append(row)
    return rows


def load_task(args):
    """(train, eval) lists of examples for --task."""
    if args.task == "arith":
        return arith_split(args.train_size, args.eval_size, args.seed)
    if args.task == "gsm8k":
        default = Path(__file__).resolve().parent.parent / "shared" / "data" / "gsm8k"
        root = (args.data_path or str(default)).rstrip("/")
        splits = [read_jsonl(f"{root}/{name}.jsonl", ["question", "answer"]) for name in ("train", "test")]
        clean = lambda a: re.sub(r"<<[^>]*>>", "", a).strip()  # drop the calculator annotations
        ex = lambda r: {"prompt": r["question"], "completion": clean(r["answer"]),
                        "answer": final_answer(r["answer"]) or ""}
        return [ex(r) for r in splits[0]], [ex(r) for r in splits[1]][:args.eval_size]
    if args.task == "jsonl":
        if not args.data_path:
            raise SystemExit('error: --task jsonl needs --data-path (a file or URL of {"prompt", "completion"} lines)')
        rows = [{**r, "answer": final_answer(r["completion"]) or r["completion"].strip()}
                for r in read_jsonl(args.data_path, ["prompt", "completion"])]
        return rows[:-args.eval_size], rows[-args.eval_size:]
    raise SystemExit(f"error: --task {args.task}: not a task of load_task (arith, gsm8k, jsonl)")


def final_answer(text):
    """The number on the last '#### N' line, commas dropped; None when there is no such line."""
    found = re.findall(r"^####\s*(-?[\d,]*\.?\d+)\s*$", text, flags=re.M)
    return found[-1].replace(",", "") if found else None


def score(completion, example):
    """correct: the '#### N' answer equals the reference (strict); format: such a line exists;
    lenient: the last number anywhere equals the reference. (jsonl without a number: exact text.)"""
    got, numbers = final_answer(completion), re.findall(r"-?\d[\d,]*\.?\d*", completion)
    lenient = bool(numbers) and numbers[-1].replace(",", "").rstrip(".") == example["answer"]
    correct = got == example["answer"] or completion.strip() == example["answer"]
    return {"correct": float(correct), "format": float(got is not None), "lenient": float(lenient or correct)}


def reward_fn(completion, example):
    """The reward of one completion: swap in your own here (training and evaluation both call it)."""
    return score(completion, example)["correct"]


def prompt_ids(tok, text):
    """Chat checkpoints get their chat format; plain ones (`tiny`) a plain Q/A layout."""
    if tok.chat:
        return tok.chat_prompt(f"{text}\nEnd with the final answer on its own line as: #### <number>")
    return tok.chat_prompt(f"Q: {text}\nA: ")


def tokenize(examples, tok, max_len, max_new_tokens, where):
    """Add prompt_ids and completion_ids (ending with EOS); a prompt that leaves no room is an error."""
    for i, ex in enumerate(examples):
        ex["prompt_ids"] = prompt_ids(tok, ex["prompt"])
        ex["completion_ids"] = tok.encode(ex["completion"]) + [tok.eos_id]
        need = len(ex["prompt_ids"]) + max(max_new_tokens, len(ex["completion_ids"]))
        if need > max_len:
            raise SystemExit(f"error: {where} example {i}: prompt of {len(ex['prompt_ids'])} tokens + up to "
                             f"{need - len(ex['prompt_ids'])} completion tokens exceeds the model's context "
                             f"of {max_len}")
    return examples


# ----------------------------------------------------------------------------------------------
# Shared machinery: the command line, devices and ranks, models, batches, the optimizer step,
# evaluation, logging and checkpoints


def parse_args(cls=Args):
    """The dataclass as a command line: one --kebab-case flag per field, the docstring under it as help;
    a Literal field accepts only its values."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {a.target.id: b.value.value for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        kind = dict(type=f.type)
        if f.type is bool:
            kind = dict(action=argparse.BooleanOptionalAction)
        elif typing.get_origin(f.type) is Literal:
            kind = dict(type=type(f.default), choices=typing.get_args(f.type))
        default = f" (default: {f.default})" if f.default not in ("", None) and f.type is not bool else ""
        parser.add_argument("--" + f.name.replace("_", "-"), default=f.default,
                            help=(" ".join(docs.get(f.name, "").split()) + default).replace("%", "%%"), **kind)
    return cls(**vars(parser.parse_args()))


def setup(args):
    """(rank, world, device); under torchrun one process per device, gloo on CPU and NCCL on GPU."""
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    return rank, world, device


def autocast(device):
    """bf16 autocast on CUDA; fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def all_sum(*values):
    """Sum numbers over ranks (one all-reduce); returns floats."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        t = t.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
    return t.tolist()


def sync_grads(model):
    """Sum gradients over ranks with one all-reduce of a flat buffer (the losses are already divided
    by their global normaliser, so the sum is the gradient of the whole batch)."""
    if not dist.is_initialized():
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def load_model(name, device, seed):
    """(model, tokenizer) for `tiny` (random, from `seed`: the same model every time) or a checkpoint;
    a missing or bad checkpoint is one clear error."""
    if name == "tiny":
        torch.manual_seed(seed)
        return GPT(tiny_config()).to(device), Tokenizer.byte_level()
    if name == "runs/sft" and not Path(name).exists():
        raise SystemExit("error: runs/sft not found: run `python sft.py` first, or pass --model")
    try:
        return GPT.from_pretrained(name).to(device), Tokenizer.from_pretrained(name)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: cannot load {name}: {e}") from None


def collate(seqs, loss_masks, pad_id, device):
    """Right-padded (B, T) inputs, next-token targets and the mask of the targets in the loss."""
    T = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad_id] * (T - len(s)) for s in seqs], device=device)
    mask = torch.tensor([m + [0] * (T - len(m)) for m in loss_masks], device=device)
    return ids[:, :-1], ids[:, 1:], mask[:, 1:]


def make_optimizer(model, args, state=None, key="optimizer"):
    """AdamW with weight decay on the matrices only; its state restored from `state[key]` on --resume."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    if state is not None:
        opt.load_state_dict(state[key])
    return opt


def lr_at(step, args):
    """Linear warmup over --warmup-steps, then cosine decay to 10 % of --lr at --steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def set_lr(opt, step, args):
    for group in opt.param_groups:
        group["lr"] = lr_at(step, args)
    return lr_at(step, args)


def optimizer_step(model, opt, args, loss_sum, step, run_dir):
    """After the backward passes: sum the gradients over ranks, stop on a non-finite loss, clip the
    gradient norm, step and zero. Returns (the loss summed over ranks, the gradient norm)."""
    sync_grads(model)
    (loss_sum,) = all_sum(loss_sum)
    check_finite(loss_sum, step, run_dir)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf")).item()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


def check_finite(loss, step, run_dir):
    if not math.isfinite(loss):
        raise SystemExit(f"error: step {step}: the loss is {loss}; stopping without saving "
                         f"(the last checkpoint in {run_dir} is intact). Try a lower --lr.")


def batch_indices(step, batch_size, n, seed):
    """The examples of optimizer step `step`: consecutive slices of a seeded permutation per epoch."""
    out, pos = [], step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = perm[offset:offset + batch_size - len(out)].tolist()
        out, pos = out + take, pos + len(take)
    return out


@torch.no_grad()
def eval_completions(model, tok, examples, args, amp):
    """Greedy completions of this rank's share of the held-out examples: [(example, text)]."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine, out = examples[rank::world], []
    for i in range(0, len(mine), 256):
        batch = mine[i:i + 256]
        with amp:
            ids, mask = model.generate([ex["prompt_ids"] for ex in batch], args.max_new_tokens, temperature=0,
                                       eos_id=tok.stop_ids, pad_id=tok.pad_id)
        out += [(ex, tok.decode(o[:n])) for ex, o, n in zip(batch, ids.tolist(), mask.sum(1).tolist())]
    return out


def eval_metrics(completions, n_examples):
    """eval/reward (the training reward), eval/accuracy, eval/format and eval/lenient of every rank's
    (example, completion) pairs, averaged over the n_examples held out."""
    totals = np.zeros(4)
    for ex, text in completions:
        s = score(text, ex)
        totals += [reward_fn(text, ex), s["correct"], s["format"], s["lenient"]]
    totals = all_sum(*totals)
    return {f"eval/{k}": v / n_examples for k, v in zip(["reward", "accuracy", "format", "lenient"], totals)}


def evaluate(model, tok, examples, args, amp):
    """The held-out metrics of greedy completions, split over ranks."""
    return eval_metrics(eval_completions(model, tok, examples, args, amp), len(examples))


def start_run(args, rank):
    """(run_dir, first step, trainer state or None): runs/<name>/ with args.json; on --resume the state of
    its last checkpoint, and the metrics logged after that checkpoint are dropped."""
    run_dir, step, state = Path("runs") / (args.run_name or Path(__file__).stem), 0, None
    if args.resume:
        if not (run_dir / "trainer_state.pt").exists():
            raise SystemExit(f"error: --resume: no checkpoint in {run_dir}")
        state = torch.load(run_dir / "trainer_state.pt", weights_only=True)
        step = state["step"]
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
        metrics = run_dir / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if args.resume and metrics.exists() else []
        metrics.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= step))
    return run_dir, step, state


def log(run_dir, step, metrics, rank):
    if rank == 0:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **{k: round(v, 6) for k, v in metrics.items()}}) + "\n")


def begin(model, tok, evals, args, amp, run_dir, rank, start, what, evaluate=evaluate, data=None):
    """Print what runs where, evaluate before training (not on --resume; logged as step 0 with the `data`
    counts), and return the steps' progress bar."""
    if rank == 0:
        device = next(model.parameters()).device
        print(f"{model.num_params() / 1e6:.2f}M parameters | {device} | "
              f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'} | {what} | {run_dir}")
    if start == 0:
        metrics = evaluate(model, tok, evals, args, amp)
        log(run_dir, 0, metrics | (data or {}), rank)
        if rank == 0:
            print("before training: " + " | ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return tqdm(range(start, args.steps), initial=start, total=args.steps, disable=rank != 0)


def end_step(model, tok, args, run_dir, rank, bar, step, metrics, state):
    """Log the step's metrics, show the main ones, and checkpoint every --save-every steps and at the end
    (weights, tokenizer and the trainer state: the step, `state` and what the script adds to it)."""
    log(run_dir, step + 1, metrics, rank)
    bar.set_postfix({k.split("/")[1]: f"{v:.3g}" for k, v in metrics.items() if k in
                     ("train/loss", "train/reward", "train/kl", "eval/accuracy", "eval/preference_accuracy")})
    if rank == 0 and ((step + 1) % args.save_every == 0 or step + 1 == args.steps):
        model.save_pretrained(run_dir, tok, state={"step": step + 1, **state})


def finish(args, run_dir, rank, metrics):
    """Log and print the final held-out metrics; leave the process group."""
    log(run_dir, args.steps, metrics, rank)
    if rank == 0:
        print(f"after {args.steps} steps: " + " | ".join(f"{k} {v:.3f}" for k, v in metrics.items())
              + f" | saved to {run_dir}")
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
if __name__ == "__main__":
    main()
