"""
reinforce.py: REINFORCE with a baseline, on policy, with a KL penalty to the reference model.

Williams (1992), as revisited for LLMs by Ahmadian et al. 2024 (RLOO, arXiv 2402.14740); the
exposition follows Patel, arXiv 2509.04501. Sample k completions y_1..y_k of each prompt x from the
policy, score them, and follow the policy gradient of the expected reward with a baseline b:

    ∇J(θ) = E_x E_{y~π_θ} [ (R(x,y) − b) ∇ Σ_t log π_θ(y_t | x, y_<t) ],
    R(x,y) = r(x,y) − β Σ_t (log π_θ(y_t | ·) − log π_ref(y_t | ·))   (k1 KL folded into the reward)

Choices made here where the literature differs:
  1. Baseline: leave-one-out (RLOO): b_i = mean of the other k − 1 rewards of the same prompt, which
     keeps the gradient unbiased; or an exponential moving average of past batch rewards (--baseline
     ema); or none. Optional whitening of the advantages over the batch (--whiten).
  2. KL: the per-token k1 estimate log π_θ − log π_ref on the sampled tokens, summed over the
     completion and subtracted from the reward (not a separate loss term), as in RLOO and the RLHF
     recipe. With β = 0 no reference model is loaded.
  3. Loss: −Σ_t A_i log π_θ(y_t) summed over each completion's tokens (the gradient of the sequence
     log-probability, as REINFORCE has it) and averaged over the batch's sequences; the EOS is one
     of the completion's tokens.
  4. On policy: one gradient step per batch of fresh samples, so no importance ratio is needed.
  5. Temperature: sampling is at --temperature T and the objective is that of the tempered policy
     π_θ/T (the softmax of the logits divided by T): every log-prob of a sampled token is taken at
     the same T, recomputed by the training forward pass (never the sampler's numbers); here those
     of the policy and the reference.

Run:
  python sft.py && python reinforce.py                                   # tiny model, `arith`, CPU
  python reinforce.py --model HuggingFaceTB/SmolLM2-135M-Instruct --task gsm8k --lr 1e-6 \\
      --batch-size 32 --micro-batch-size 16 --max-new-tokens 256          # one GPU, bf16
  torchrun --nproc_per_node=2 reinforce.py                               # data parallel
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
    model: str = "runs/sft"
    """starting checkpoint (and reference): a Hugging Face directory, a hub id or a .gguf file"""
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
    steps: int = 100
    """optimizer steps"""
    batch_size: int = 16
    """prompts per optimizer step, over all ranks (each with --group-size completions)"""
    micro_batch_size: int = 64
    """sequences per forward/backward on one rank (gradient accumulation when smaller)"""
    lr: float = 1e-4
    """peak learning rate"""
    warmup_steps: int = 5
    """linear warmup steps, then cosine decay to 10 % of --lr"""
    weight_decay: float = 0.0
    """AdamW weight decay of the matrices"""
    grad_clip: float = 1.0
    """clip the gradient norm to this (0: no clipping)"""
    max_new_tokens: int = 64
    """generation budget of one completion"""
    eval_every: int = 25
    """evaluate every this many steps (0: only before and after)"""
    save_every: int = 50
    """checkpoint every this many steps (and at the end)"""
    resume: bool = False
    """continue runs/<run-name> from its last checkpoint"""
    # REINFORCE
    group_size: int = 8
    """k: completions sampled per prompt"""
    temperature: float = 1.0
    """sampling temperature of the rollouts"""
    top_p: float = 1.0
    """nucleus sampling of the rollouts (1: off)"""
    baseline: Literal["rloo", "ema", "none"] = "rloo"
    """rloo (mean reward of the prompt's other k−1 completions) | ema | none"""
    ema_decay: float = 0.9
    """--baseline ema: weight of the old value in the moving average"""
    whiten: bool = False
    """normalise the advantages to mean 0, std 1 over the batch"""
    beta: float = 0.02
    """KL penalty coefficient (k1 per token, folded into the reward); 0: no reference model"""


# ----------------------------------------------------------------------------------------------
# REINFORCE: baselines, advantages and the loss


def rloo_baseline(rewards):
    """rewards (P, k) -> (P, k): each completion's baseline is the mean reward of the prompt's other k − 1."""
    return (rewards.sum(1, keepdim=True) - rewards) / (rewards.shape[1] - 1)


def advantages(rewards, kind, ema):
    """rewards (P, k) -> advantages (P, k). `ema` is the moving-average baseline before this batch
    (None before the first batch, which then uses its own mean)."""
    if kind == "rloo":
        return rewards - rloo_baseline(rewards)
    if kind == "ema":
        return rewards - (rewards.mean() if ema is None else ema)
    return rewards  # none


def ema_update(ema, batch_mean, decay):
    return batch_mean if ema is None else decay * ema + (1 - decay) * batch_mean


def whiten(x, mean, std, eps=1e-8):
    """(x − mean) / std with the batch's statistics (over every rank)."""
    return (x - mean) / (std + eps)


def reinforce_loss(logp, mask, adv, n_seqs):
    """logp, mask (B, T); adv (B,). −Σ_i A_i Σ_t log π(y_it) / n_seqs: this micro-batch's share of the
    batch mean over sequences of the advantage-weighted sequence log-probability."""
    return -(adv[:, None] * logp * mask).sum() / n_seqs


# ----------------------------------------------------------------------------------------------


def main():
    args = parse_args()
    rank, world, device = setup(args)
    run_dir, start, state = start_run(args, rank)
    policy, tok = load_model(str(run_dir) if args.resume else args.model, device, args.seed)
    ref = load_model(args.model, device, args.seed)[0].requires_grad_(False) if args.beta > 0 else None
    amp = autocast(device)
    train, evals = load_task(args)
    tokenize(train, tok, policy.config.max_seq_len, args.max_new_tokens, "train")
    tokenize(evals, tok, policy.config.max_seq_len, args.max_new_tokens, "eval")
    opt, ema = make_optimizer(policy, args, state), state["ema"] if state else None
    per_rank = args.batch_size // world
    if per_rank * world != args.batch_size or args.group_size < 2 and args.baseline == "rloo":
        raise SystemExit(f"error: --batch-size {args.batch_size} must split into {world} ranks; "
                         "rloo needs --group-size >= 2")
    bar = begin(policy, tok, evals, args, amp, run_dir, rank, start, f"batch {args.batch_size} prompts x "
                f"{args.group_size} completions = {world} ranks x {per_rank * args.group_size} sequences in "
                f"micro-batches of {args.micro_batch_size} | {len(train)} train, {len(evals)} eval")
    for step in bar:
        t0, lr = time.time(), set_lr(opt, step, args)
        prompts = [train[i] for i in batch_indices(step, args.batch_size, len(train), args.seed)][rank::world]
        seqs, masks, rewards, texts, ended = rollout(policy, tok, prompts, args, step, rank, amp)
        t_gen = time.time() - t0
        batch = collate(seqs, masks, tok.pad_id, device)
        mask, n_seqs = batch[2], args.batch_size * args.group_size
        kl_seq = torch.zeros(len(seqs), device=device)  # Σ_t k1 = Σ_t log π/π_ref per sequence
        if ref is not None:
            kl_seq = ((sequence_logprobs(policy, batch, args.micro_batch_size, amp)
                       - sequence_logprobs(ref, batch, args.micro_batch_size, amp)) * mask).sum(1)
        shaped = rewards.to(device) - args.beta * kl_seq  # the reward with the KL penalty folded in
        (shaped_sum,) = all_sum(shaped.sum().item())
        adv = advantages(shaped.view(-1, args.group_size), args.baseline, ema).reshape(-1)
        ema = ema_update(ema, shaped_sum / n_seqs, args.ema_decay) if args.baseline == "ema" else ema
        if args.whiten:
            a_sum, a_sq = all_sum(adv.sum().item(), (adv ** 2).sum().item())
            adv = whiten(adv, a_sum / n_seqs, math.sqrt(max(a_sq / n_seqs - (a_sum / n_seqs) ** 2, 0.0)))
        loss_sum, ent_sum = 0.0, 0.0
        for i in range(0, len(seqs), args.micro_batch_size):
            ids, targets, m = (x[i:i + args.micro_batch_size] for x in batch)
            with amp:
                logp, ent = policy(ids, targets, mask=m, entropy=True)
                loss = reinforce_loss(logp, m, adv[i:i + args.micro_batch_size], n_seqs)
            loss.backward()
            loss_sum, ent_sum = loss_sum + loss.item(), ent_sum + (ent.detach() * m).sum().item()
        loss_sum, grad_norm = optimizer_step(policy, opt, args, loss_sum, step, run_dir)
        ent_sum, n_tok, kl_sum = all_sum(ent_sum, mask.sum().item(), kl_seq.sum().item())
        metrics = rl_metrics(rewards, batch[2], ended, n_seqs, t0, t_gen) | {
            "train/loss": loss_sum, "train/lr": lr, "train/grad_norm": grad_norm, "train/kl": kl_sum / n_seqs,
            "train/entropy": ent_sum / n_tok}
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            metrics |= evaluate(policy, tok, evals, args, amp)
        end_step(policy, tok, args, run_dir, rank, bar, step, metrics, {"optimizer": opt.state_dict(), "ema": ema})
    finish(args, run_dir, rank, evaluate(policy, tok, evals, args, amp))


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
# Rollouts: sample k completions of each prompt and score them; log-probs of what was sampled; the
# metrics of every RL step (each script holds the functions it uses)


@torch.no_grad()
def rollout(model, tok, examples, args, step, rank, amp):
    """k completions of each prompt, sampled with a seed fixed by (seed, step, rank). Returns the
    sequences (prompt + completion ids), loss masks (1 on completion tokens), rewards (P*k,), the
    completion texts, and whether each completion ended with EOS (else it hit --max-new-tokens)."""
    prompts = [ex["prompt_ids"] for ex in examples for _ in range(args.group_size)]
    seed = int(np.random.SeedSequence([args.seed, step, rank]).generate_state(1)[0])
    with amp:
        out, mask = model.generate(prompts, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                   seed=seed, eos_id=tok.stop_ids, pad_id=tok.pad_id)
    seqs, masks, rewards, texts, ended = [], [], [], [], []
    for j, (p, o, n) in enumerate(zip(prompts, out.tolist(), mask.sum(1).tolist())):
        texts.append(tok.decode(o[:n]))
        seqs.append(p + o[:n])
        masks.append([0] * len(p) + [1] * n)
        rewards.append(reward_fn(texts[-1], examples[j // args.group_size]))
        ended.append(o[n - 1] in tok.stop_ids)
    return seqs, masks, torch.tensor(rewards), texts, torch.tensor(ended)


@torch.no_grad()
def sequence_logprobs(model, batch, micro_batch_size, amp):
    """log π(target) (B, T) of a collated batch, micro-batch by micro-batch; zero off the mask."""
    ids, targets, mask = batch
    out = []
    for i in range(0, len(ids), micro_batch_size):
        sl = slice(i, i + micro_batch_size)
        with amp:
            out.append(model(ids[sl], targets[sl], mask=mask[sl]).float())
    return torch.cat(out)


def rl_metrics(rewards, gen_mask, ended, n_seqs, t0, t_gen):
    """The metrics every RL step logs (the script adds its own): rewards (this rank's), the mask of the
    generated tokens and whether each completion ended with EOS, summed over ranks; timings."""
    reward_sum, n_gen, n_ended = all_sum(rewards.sum().item(), gen_mask.sum().item(), ended.sum().item())
    return {"train/reward": reward_sum / n_seqs, "train/completion_len": n_gen / n_seqs,
            "train/ended_with_eos": n_ended / n_seqs,
            "perf/gen_seconds": t_gen, "perf/update_seconds": time.time() - t0 - t_gen,
            "perf/tokens_per_sec": n_gen / (time.time() - t0)}


# ----------------------------------------------------------------------------------------------
if __name__ == "__main__":
    main()
