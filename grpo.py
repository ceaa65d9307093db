"""
grpo.py: Group Relative Policy Optimization: group-relative advantages, a clipped ratio, a KL penalty.

Shao et al. 2024 (DeepSeekMath, arXiv 2402.03300), with the options of Dr. GRPO (arXiv 2503.20783) and
DAPO (arXiv 2503.14476); the exposition follows Patel, arXiv 2509.04501. Sample k completions of each
prompt x from the policy π_old about to be updated, give every token of y_i its group's advantage, and
take μ clipped steps on

    J(θ) = E [ 1/k Σ_i agg_t min(ρ_it A_i, clip(ρ_it, 1−ε_low, 1+ε_high) A_i) − β KL_t(π_θ ‖ π_ref) ],
    ρ_it = π_θ(y_it | x, y_i,<t) / π_old(y_it | x, y_i,<t),   A_i = (r_i − mean(r_1..r_k)) / (std(r_1..r_k) + ε)

Choices made here where the literature differs:
  1. Advantage: the group's mean subtracted and its std (unbiased, as TRL and verl) divided out;
     --scale-rewards none (Dr. GRPO) or batch (the batch's std). An all-equal group has advantage 0.
  2. KL per token in the loss, weight β, aggregated like the surrogate. k3 (default) follows in
     expectation the gradient of KL(π_ref ‖ π_θ), as DeepSeekMath and TRL; k2 that of KL(π_θ ‖ π_ref);
     k1 in the loss has zero expected gradient and is refused. --kl-in reward: β Σ_t k off the reward.
  3. --loss-agg: seq-mean-token-mean (the paper), token-mean (DAPO), seq-mean-token-sum-norm (Dr.
     GRPO: / --max-new-tokens); the normalisers count the whole batch over every rank.
  4. μ updates a batch, each one optimizer step on all of it; log π_old is the first update's own
     forward, detached, so μ = 1 is the on-policy gradient. ε_low 0.2, ε_high 0.28 (DAPO's clip-higher).
  5. Temperature: sampling is at --temperature T and the objective is that of the tempered policy
     π_θ/T (the softmax of the logits divided by T): every log-prob of a sampled token is taken at
     the same T, recomputed by the training forward pass (never the sampler's numbers).
  6. Truncated completions (no EOS) keep their reward (a failure) unless --mask-truncated drops them
     from the loss (DAPO); they still count in their group's statistics.

Run: python sft.py && python grpo.py   (real weights, GPUs, torchrun: README.md)
"""

import argparse
import ast
import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import http.client
import importlib
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
    micro_batch_tokens: int = 2048
    """a micro-batch over this many tokens (rows x longest) is cut in shorter ones (0: off; GPU: raise it)"""
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
    grad_checkpoint: bool = False
    """recompute each transformer block's activations in the backward: less memory, about a third more compute"""
    compile: bool = False
    """torch.compile the model (CUDA only; the first steps are slow while it compiles)"""
    fsdp: bool = False
    """under torchrun: shard parameters, gradients and optimizer state over the processes (FSDP2)"""
    track: Literal["none", "tensorboard", "wandb"] = "none"
    """mirror runs/<run-name>/metrics.jsonl to tensorboard (event files in the run dir) or wandb (offline unless
    WANDB_MODE says otherwise)"""
    # GRPO
    group_size: int = 8
    """k: completions sampled per prompt"""
    temperature: float = 1.0
    """sampling temperature of the rollouts"""
    top_p: float = 1.0
    """nucleus sampling of the rollouts (1: off)"""
    beta: float = 0.04
    """KL penalty coefficient β; 0: no reference model"""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """divide the group-centred rewards by the std of the group | batch | none (Dr. GRPO)"""
    mu: int = 1
    """μ: optimizer steps on each batch of samples (the clip binds from the second on)"""
    clip_low: float = 0.2
    """ε_low: the ratio is clipped below at 1 − ε_low"""
    clip_high: float = 0.28
    """ε_high: the ratio is clipped above at 1 + ε_high"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """per-token KL estimate: k1 (log π/π_ref) | k2 (½ log² π/π_ref) | k3 (π_ref/π − log π_ref/π − 1)"""
    kl_in: Literal["loss", "reward"] = "loss"
    """loss (a per-token penalty aggregated like the surrogate) | reward (β Σ_t k subtracted from r)"""
    loss_agg: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] = "seq-mean-token-mean"
    """seq-mean-token-mean (the paper) | token-mean (DAPO) | seq-mean-token-sum-norm (Dr. GRPO)"""
    mask_truncated: bool = False
    """leave completions that hit --max-new-tokens out of the loss (DAPO's overlong filtering)"""


# ----------------------------------------------------------------------------------------------
# GRPO: group advantages, KL estimators, the clipped surrogate and the loss aggregation


def group_advantages(rewards, scale, batch_std=None, eps=1e-4):
    """rewards (P, k) -> advantages (P, k): r minus its group's mean, divided by the group's std (group), the
    batch's std (batch: `batch_std`, over every rank; None: that of `rewards`) or nothing (none)."""
    centred = rewards - rewards.mean(1, keepdim=True)
    if scale == "group":
        return centred / (rewards.std(1, keepdim=True) + eps)
    if scale == "batch":
        return centred / ((rewards.std() if batch_std is None else batch_std) + eps)
    return centred  # none


def kl_estimate(logp, ref_logp, kind):
    """Per-token estimates of KL(π || π_ref) on tokens sampled from π (Schulman 2020), log r = log π_ref −
    log π: k1 = −log r (unbiased), k2 = ½ (log r)² (biased, low variance), k3 = r − 1 − log r (unbiased, ≥ 0)."""
    log_r = ref_logp - logp
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r ** 2
    return torch.expm1(log_r) - log_r  # k3


def clipped_surrogate(logp, old_logp, adv, eps_low, eps_high):
    """logp, old_logp (B, T); adv (B,) -> per-token −min(ρ A, clip(ρ, 1 − ε_low, 1 + ε_high) A), ρ = exp(logp
    − old_logp), and the masks (B, T) where the clip binds: A < 0, ρ < 1 − ε_low (low); A > 0, ρ > 1 + ε_high."""
    ratio, adv = torch.exp(logp - old_logp), adv[:, None]
    loss = -torch.min(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    return loss, (adv < 0) & (ratio < 1 - eps_low), (adv > 0) & (ratio > 1 + eps_high)


def aggregate(per_token, mask, mode, n_seqs, n_tokens, max_len):
    """per_token, mask (B, T) -> this micro-batch's share of the batch loss. n_seqs and n_tokens count
    the whole batch over every rank; a sequence's own length comes from its row of the mask."""
    x = per_token * mask
    if mode == "seq-mean-token-mean":
        return (x.sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    if mode == "token-mean":
        return x.sum() / n_tokens
    return x.sum() / (n_seqs * max_len)  # seq-mean-token-sum-norm


# ----------------------------------------------------------------------------------------------


def main():
    args = parse_args()
    rank, world, device = setup(args)
    per_rank = args.batch_size // world
    if per_rank * world != args.batch_size or args.group_size < 2:
        raise SystemExit(f"error: --batch-size {args.batch_size} must split into {world} ranks; --group-size >= 2")
    if args.kl_estimator == "k1" and args.kl_in == "loss" and args.beta > 0:
        raise SystemExit("error: --kl-estimator k1 --kl-in loss: the k1 penalty's expected gradient is zero (it only "
                         "adds noise); use k3 or k2 in the loss, or k1 with --kl-in reward")
    run_dir, start, state = open_run(args)
    policy, tok = load_model(str(run_dir) if args.resume else args.model, device, args.seed)
    ref = load_model(args.model, device, args.seed)[0].requires_grad_(False) if args.beta > 0 else None
    policy, ref = prepare(policy, args), prepare(ref, args, trained=False)
    amp = autocast(device)
    train, evals = load_task(args)
    tokenize(train, tok, policy.config.max_seq_len, args.max_new_tokens, "train")
    tokenize(evals, tok, policy.config.max_seq_len, args.max_new_tokens, "eval")
    opt = make_optimizer(policy, args, state)
    bar = begin(policy, tok, evals, args, amp, run_dir, rank, start, f"batch {args.batch_size} prompts x "
                f"{args.group_size} completions = {world} ranks x {per_rank * args.group_size} sequences in "
                f"micro-batches of {args.micro_batch_size} | {len(train)} train, {len(evals)} eval")
    for step in bar:
        t0, lr = time.time(), set_lr(opt, step, args)
        rows = range(rank, args.batch_size, world)  # this rank's places in the step's batch of prompts
        prompts = [train[i] for i in batch_indices(step, args.batch_size, len(train), args.seed)][rank::world]
        seqs, masks, rewards, texts, ended = rollout(policy, tok, prompts, args, step, rows, amp)
        t_gen = time.time() - t0
        batch = collate(seqs, masks, tok.pad_id, device)
        mask, n_seqs = batch[2], args.batch_size * args.group_size
        # log π_old (the first update's own forward, unless --kl-in reward needs it first) and log π_ref
        old_logp = sequence_logprobs(policy, batch, args.micro_batch_size, amp, args.temperature) \
            if args.kl_in == "reward" else torch.zeros(mask.shape, device=device)
        ref_logp = sequence_logprobs(ref, batch, args.micro_batch_size, amp, args.temperature) \
            if ref is not None else None
        shaped = rewards.to(device)
        if ref is not None and args.kl_in == "reward":  # the reward with the KL penalty folded in
            shaped = shaped - args.beta * (kl_estimate(old_logp, ref_logp, args.kl_estimator) * mask).sum(1)
        s_sum, s_sq = all_sum(shaped.sum().item(), (shaped ** 2).sum().item())
        batch_std = math.sqrt(max(s_sq - s_sum ** 2 / n_seqs, 0.0) / (n_seqs - 1))  # over every rank
        adv = group_advantages(shaped.view(-1, args.group_size), args.scale_rewards, batch_std).reshape(-1)
        if args.mask_truncated:
            mask = mask * ended.to(device)[:, None]
        n_kept, n_tok = all_sum((mask.sum(1) > 0).sum().item(), mask.sum().item())
        loss_sum, totals = 0.0, np.zeros(4)  # entropy, clipped below, clipped above, grad norm: over the μ updates
        for update in range(args.mu):
            update_loss = 0.0
            for part, cols in micro_batches([len(s) - 1 for s in seqs], args):
                sl = (part, cols)
                ids, targets, m = batch[0][sl], batch[1][sl], mask[sl]
                with amp:
                    logp, ent = policy(ids, targets, mask=m, temperature=args.temperature, entropy=True)
                    if update == 0 and args.kl_in == "loss":
                        old_logp[sl] = logp.detach().float()
                    per_token, low, high = clipped_surrogate(logp, old_logp[sl], adv[part], args.clip_low,
                                                             args.clip_high)
                    if ref is not None and args.kl_in == "loss":
                        per_token = per_token + args.beta * kl_estimate(logp, ref_logp[sl], args.kl_estimator)
                    loss = aggregate(per_token, m, args.loss_agg, max(n_kept, 1), max(n_tok, 1), args.max_new_tokens)
                loss.backward()
                update_loss += loss.item()
                totals[:3] += [(ent.detach() * m).sum().item(), (low * m).sum().item(), (high * m).sum().item()]
            update_loss, grad_norm = optimizer_step(policy, opt, args, update_loss, step, run_dir)
            loss_sum, totals[3] = loss_sum + update_loss, totals[3] + grad_norm
        kl_seq = ((old_logp - ref_logp) * batch[2]).sum(1) if ref is not None else torch.zeros(1)  # Σ_t k1, logged
        ent_sum, low_sum, high_sum, kl_sum, n_equal = all_sum(*totals[:3], kl_seq.sum().item(), sum(
            bool((g == g[0]).all()) for g in rewards.view(-1, args.group_size)))
        n_all, loss_sum, grad_norm = args.mu * max(n_tok, 1), loss_sum / args.mu, totals[3] / args.mu  # per update
        metrics = rl_metrics(rewards, batch[2], ended, n_seqs, t0, t_gen) | {
            "train/loss": loss_sum, "train/lr": lr, "train/grad_norm": grad_norm, "train/kl": kl_sum / n_seqs,
            "train/entropy": ent_sum / n_all, "train/clipfrac": (low_sum + high_sum) / n_all,
            "train/clipfrac_low": low_sum / n_all, "train/clipfrac_high": high_sum / n_all,
            "train/groups_all_equal": n_equal / args.batch_size}
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            metrics |= evaluate(policy, tok, evals, args, amp)
        end_step(policy, tok, args, run_dir, rank, bar, step, metrics, {"optimizer": opt})
    finish(args, run_dir, rank, evaluate(policy, tok, evals, args, amp))


# ==============================================================================================
# Everything below this line is the same, byte for byte, in every script (tests/test_family.py
# checks it): the task, the shared machinery (sampling included) and, in the RL scripts, their own block.
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


def download(url):
    """The local copy of a data URL: ~/.cache/post-training/<hash of the whole URL>-<file name>, fetched once.
    Only a complete download of an HTTP 200 reply that is not an HTML page is kept."""
    name = hashlib.sha256(url.encode()).hexdigest()[:16] + "-" + re.sub(r"[^\w.-]", "_", url.rsplit("/", 1)[-1])[-60:]
    cache = Path.home() / ".cache" / "post-training" / name
    if cache.exists():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    part = cache.with_name(f".{cache.name}.part{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=60) as reply, open(part, "wb") as f:
            if "html" in reply.headers.get("Content-Type", ""):
                raise ValueError("the server sent an HTML page, not data")
            size = reply.headers.get("Content-Length")
            while block := reply.read(1 << 20):
                f.write(block)
        if size is not None and part.stat().st_size != int(size):
            raise ValueError(f"incomplete: {part.stat().st_size} of {size} bytes")
        os.replace(part, cache)
    except (OSError, ValueError, http.client.HTTPException) as e:
        part.unlink(missing_ok=True)
        raise SystemExit(f"error: {url}: download failed ({e})") from None
    return cache


def read_jsonl(path, fields):
    """Records of a .jsonl (or .jsonl.gz) file or URL, each with "where" = "<file>:<line>"; a bad line is an
    error naming the file and line."""
    if str(path).startswith(("http://", "https://")):
        path = download(str(path))
    if not Path(path).is_file():
        raise SystemExit(f"error: {path}: " + ("a directory, not a data file" if Path(path).is_dir()
                                               else "no such data file"))
    rows = []
    try:
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
                    raise SystemExit(f"error: {path}:{i}: missing or non-string field {missing[0]!r} "
                                     f"(expected {fields})")
                rows.append(row | {"where": f"{path}:{i}"})
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise SystemExit(f"error: {path}: cannot read it ({e})") from None
    if not rows:
        raise SystemExit(f"error: {path}: no records (the file is empty or has only blank lines)")
    return rows


def split_off(rows, n_eval, path):
    """(train, eval): the last n_eval records held out; an error when that leaves nothing to train on."""
    if len(rows) <= n_eval:
        raise SystemExit(f"error: {path}: {len(rows)} records, and --eval-size {n_eval} holds out the last "
                         f"{n_eval}: nothing is left to train on")
    return rows[:-n_eval], rows[-n_eval:]


def load_task(args):
    """(train, eval) lists of examples for --task."""
    if args.task == "arith":
        return arith_split(args.train_size, args.eval_size, args.seed)
    if args.task == "gsm8k":
        default = Path(__file__).resolve().parent.parent / "shared" / "data" / "gsm8k"
        root = (args.data_path or str(default)).rstrip("/")
        splits = [read_jsonl(f"{root}/{name}.jsonl", ["question", "answer"]) for name in ("train", "test")]
        for r in splits[0] + splits[1]:
            if final_answer(r["answer"]) is None:
                raise SystemExit(f"error: {r['where']}: the answer has no final '#### <number>' line")
        clean = lambda a: re.sub(r"<<[^>]*>>", "", a).strip()  # drop the calculator annotations
        ex = lambda r: {"prompt": r["question"], "completion": clean(r["answer"]),
                        "answer": final_answer(r["answer"]), "where": r["where"]}
        return [ex(r) for r in splits[0]], [ex(r) for r in splits[1]][:args.eval_size]
    if args.task == "jsonl":
        if not args.data_path:
            raise SystemExit('error: --task jsonl needs --data-path (a file or URL of {"prompt", "completion"} lines)')
        rows = [{**r, "answer": final_answer(r["completion"]) or r["completion"].strip()}
                for r in read_jsonl(args.data_path, ["prompt", "completion"])]
        return split_off(rows, args.eval_size, args.data_path)
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
            raise SystemExit(f"error: {ex.get('where', f'{where} example {i + 1}')}: prompt of "
                             f"{len(ex['prompt_ids'])} tokens + up to "
                             f"{need - len(ex['prompt_ids'])} completion tokens exceeds the model's context "
                             f"of {max_len}")
    return examples


# ----------------------------------------------------------------------------------------------
# Shared machinery: the command line, devices and ranks, models, batches, the optimizer step,
# evaluation, logging and checkpoints


RULES = {  # what each numeric flag must be, checked before any work (a script checks the flags it has)
    **dict.fromkeys(["train_size", "eval_size", "steps", "batch_size", "micro_batch_size", "max_new_tokens",
                     "save_every", "group_size", "mu", "prompts_per_round", "mini_batches", "kl_horizon",
                     "cg_iters", "fvp_subsample", "line_search_steps", "pairs_per_prompt", "judge_retries",
                     "judge_workers"], (lambda v: v >= 1, ">= 1")),
    **dict.fromkeys(["seed", "warmup_steps", "weight_decay", "grad_clip", "eval_every", "beta", "kl_target",
                     "cg_damping", "rpo_alpha", "max_len", "no_eos_penalty", "micro_batch_tokens"],
                    (lambda v: v >= 0, ">= 0")),
    **dict.fromkeys(["lr", "critic_lr", "epochs", "clip", "vf_clip", "max_kl", "judge_timeout"],
                    (lambda v: v > 0, "> 0")),
    # 0 (greedy) only in a script that takes no log-prob at the sampling temperature (rejection_sampling.py, dpo.py)
    "temperature": (lambda v: v > 0 or v == 0 and "sequence_logprobs" not in globals(), "> 0"),
    **dict.fromkeys(["ema_decay", "gamma", "lam"], (lambda v: 0 <= v <= 1, "in [0, 1]")),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    **dict.fromkeys(["clip_low", "label_smoothing"], (lambda v: 0 <= v < 0.5, "in [0, 0.5)")),
    "clip_high": (lambda v: v >= 0, ">= 0"),
}


def parse_args(cls=Args):
    """The dataclass as a command line: one --kebab-case flag per field, the docstring under it as help;
    a Literal field accepts only its values, a number must be finite and pass its RULES."""
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
    args = cls(**vars(parser.parse_args()))
    for f in dataclasses.fields(cls):
        v, (test, what) = getattr(args, f.name), RULES.get(f.name, (lambda v: True, ""))
        if f.type in (int, float) and not (math.isfinite(v) and test(v)):
            parser.error(f"--{f.name.replace('_', '-')} {v}: must be {what or 'a finite number'}")
    return args


def setup(args):
    """(rank, world, device); under torchrun one process per device, gloo on CPU and NCCL on GPU."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device is available (use --device cpu or auto)")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if args.fsdp and "LOCAL_RANK" not in os.environ:
        raise SystemExit(f"error: --fsdp shards the model over the processes of torchrun: run torchrun "
                         f"--nproc_per_node=<devices> {Path(__file__).name} --fsdp")
    if world > 1 or args.fsdp:
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
    by their global normaliser, so the sum is the gradient of the whole batch). Under --fsdp the backward
    has already summed them (a reduce-scatter: each rank holds the sum of its shard)."""
    if not dist.is_initialized() or is_sharded(model):
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
    if name.startswith("runs/") and not Path(name).exists():
        raise SystemExit(f"error: {name}: no such checkpoint directory")
    try:
        return GPT.from_pretrained(name).to(device), Tokenizer.from_pretrained(name)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: cannot load {name}: {e}") from None


def prepare(model, args, trained=True):
    """The model as the flags run it: --grad-checkpoint (a trained model), --compile (CUDA), --fsdp (under
    torchrun: each transformer block one unit of sharded parameters, gradients and optimizer state; the rest,
    the tied embedding and head among it, the root unit; gradients summed over ranks, as sync_grads does)."""
    if model is None:  # no reference model (--beta 0)
        return None
    for gpt in [m for m in model.modules() if isinstance(m, GPT)]:  # the model, or a critic's body
        gpt.grad_checkpoint = trained and args.grad_checkpoint
        try:
            gpt.use_compile() if args.compile else None
        except ValueError as e:  # not on CUDA
            raise SystemExit(f"error: {e}") from None
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard  # imported when used: it takes seconds
        units = [block for gpt in model.modules() if isinstance(gpt, GPT) for block in gpt.transformer.h]
        units = [fully_shard(m, reshard_after_forward=True) for m in units + [model]]
        for unit in units:
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
        with torch.no_grad():  # FSDP takes the module its first forward enters as the root: make it the root
            model(torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device))
    return model


def is_sharded(model):
    return hasattr(model, "unshard")  # fully_shard (--fsdp) makes the model an FSDPModule


@contextlib.contextmanager
def gathered(model):
    """Under --fsdp, every rank holds the whole model inside the block: one all-gather per unit, not one
    per generated token, and no collective while generating, so ranks may sample different lengths. Inside
    a block it does nothing (no collective either)."""
    if not is_sharded(model) or getattr(model, "is_gathered", False):
        yield
        return
    model.set_reshard_after_forward(False)
    units = [m for m in model.modules() if is_sharded(m)]
    for unit in units:
        unit.unshard()
    model.is_gathered = True
    try:
        yield
    finally:
        model.is_gathered = False
        for unit in units:
            unit.reshard()
        model.set_reshard_after_forward(True)


def collate(seqs, loss_masks, pad_id, device):
    """Right-padded (B, T) inputs, next-token targets and the mask of the targets in the loss."""
    T = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad_id] * (T - len(s)) for s in seqs], device=device)
    mask = torch.tensor([m + [0] * (T - len(m)) for m in loss_masks], device=device)
    return ids[:, :-1], ids[:, 1:], mask[:, 1:]


def micro_batches(lengths, args):
    """One rank's rows, of these lengths (the columns each needs), as the micro-batches of its forward and
    backward passes, [(rows, cols)]: runs of --micro-batch-size rows in order, all columns; a run whose padded
    tokens (rows x its longest) pass --micro-batch-tokens is sorted longest first and cut into groups that fit,
    each with the columns its longest row needs (the rest are padding). Every loss here is normalised by counts
    over the whole batch, so the gradient does not depend on the cut."""
    out = []
    for i in range(0, len(lengths), args.micro_batch_size):
        run = list(range(i, min(i + args.micro_batch_size, len(lengths))))
        if not args.micro_batch_tokens or len(run) * max(lengths[r] for r in run) <= args.micro_batch_tokens:
            out.append((run, slice(None)))
            continue
        run.sort(key=lambda r: -lengths[r])  # similar lengths together: little padding
        while run:
            n = max(1, args.micro_batch_tokens // lengths[run[0]])
            out.append((run[:n], slice(0, lengths[run[0]])))
            run = run[n:]
    return out


def make_optimizer(model, args, state=None, key="optimizer"):
    """AdamW with weight decay on the matrices only; its state restored from `state[key]` on --resume."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    if state is not None and is_sharded(model):  # saved whole, keyed by parameter name: each rank takes its shard
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, opt, state[key], options=StateDictOptions(full_state_dict=True))
    elif state is not None:
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
    """After the backward passes: sum the gradients over ranks, clip the gradient norm, step and zero;
    stop without saving when the loss, the gradient or the new weights are not finite. Returns (the loss
    summed over ranks, the gradient norm)."""
    sync_grads(model)
    (loss_sum,) = all_sum(loss_sum)
    check_finite(loss_sum, "the loss", step, run_dir)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf")).item()
    check_finite(grad_norm, "the gradient norm", step, run_dir)
    opt.step()
    opt.zero_grad(set_to_none=True)
    check_finite(torch.stack([p.detach().float().abs().sum() for p in model.parameters()]).sum().item(),
                 "the sum of the weights' magnitudes", step, run_dir)
    return loss_sum, grad_norm


def check_finite(value, what, step, run_dir):
    """Stop before anything non-finite reaches a checkpoint: the last one on disk (if any) stays as it is."""
    if not math.isfinite(value):
        state = run_dir / "trainer_state.pt"
        last = (f"the last checkpoint in {run_dir}, of step {torch.load(state, weights_only=True)['step']}, "
                "is intact" if state.exists() else f"no checkpoint in {run_dir}")
        raise SystemExit(f"error: step {step + 1}: {what} is {value}; stopping without saving ({last}). "
                         "Try a lower --lr.")


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
def rollout(model, tok, examples, args, step, rows, amp, greedy=False):
    """k = --group-size completions of each prompt (greedy: one, at temperature 0), completion j of the prompt at
    place rows[i] of the batch seeded by (seed, step, rows[i], j) however ranks split it -> sequences (prompt +
    completion ids), loss masks (1 on completion tokens), rewards (P*k,), completion texts, whether each ended
    with EOS (else it hit --max-new-tokens)."""
    k = 1 if greedy else args.group_size
    prompts = [ex["prompt_ids"] for ex in examples for _ in range(k)]
    seed = None if greedy else [int(np.random.SeedSequence([args.seed, step, r, j]).generate_state(1)[0])
                                for r in rows for j in range(k)]
    temperature, top_p = (0.0, 1.0) if greedy else (args.temperature, args.top_p)
    with amp, gathered(model):
        out, mask = model.generate(prompts, args.max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                   eos_id=tok.stop_ids, pad_id=tok.pad_id)
    seqs, masks, rewards, texts, ended = [], [], [], [], []
    for j, (p, o, n) in enumerate(zip(prompts, out.tolist(), mask.sum(1).tolist())):
        texts.append(tok.decode(o[:n]))
        seqs.append(p + o[:n])
        masks.append([0] * len(p) + [1] * n)
        rewards.append(reward_fn(texts[-1], examples[j // k]))
        ended.append(o[n - 1] in tok.stop_ids)
    return seqs, masks, torch.tensor(rewards), texts, torch.tensor(ended)


def eval_completions(model, tok, examples, args, amp):
    """Greedy completions of this rank's share of the held-out examples: [(example, text)]."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine, out = examples[rank::world], []
    for i in range(0, len(mine), 256):
        batch = mine[i:i + 256]
        out += zip(batch, rollout(model, tok, batch, args, 0, None, amp, greedy=True)[3])  # texts
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


MAY_CHANGE = {"steps", "eval_every", "save_every", "resume", "device", "micro_batch_size", "micro_batch_tokens",
              "grad_checkpoint", "compile", "track", "judge_url", "judge_name", "judge_key_env", "judge_retries",
              "judge_timeout", "judge_workers"}  # on --resume


def open_run(args):
    """(run_dir, first step, trainer state or None), reading only: on --resume the state of the last
    checkpoint, which must be whole (weights and state of the same save) and of a run with the same
    flags, but for those in MAY_CHANGE (logged) and more --steps."""
    run_dir = Path("runs") / (args.run_name or Path(__file__).stem)
    if not args.resume:
        return run_dir, 0, None
    if not (run_dir / "trainer_state.pt").exists():
        raise SystemExit(f"error: --resume: no checkpoint in {run_dir}")
    try:
        state = torch.load(run_dir / "trainer_state.pt", weights_only=True)
        saved = json.loads((run_dir / "args.json").read_text())
        weights = read_checkpoint_id(run_dir / "model.safetensors")
    except Exception as e:  # a truncated or foreign file: torch, json and the reader raise many kinds
        raise SystemExit(f"error: --resume: the checkpoint in {run_dir} is incomplete or corrupt "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    if state.get("checkpoint") != weights:
        raise SystemExit(f"error: --resume: in {run_dir} the weights and trainer_state.pt come from different saves "
                         "(a save was interrupted); start again from another checkpoint")
    now = dataclasses.asdict(args) | {"script": Path(__file__).name}
    differ = sorted(k for k in now.keys() & saved.keys() if now[k] != saved[k] and k not in MAY_CHANGE)
    if differ:
        raise SystemExit(f"error: --resume: {run_dir} was run with other flags: " + ", ".join(
            f"--{k.replace('_', '-')} {saved.get(k)!r} (now {now.get(k)!r})" for k in differ))
    if state["step"] >= args.steps:
        raise SystemExit(f"error: --resume: {run_dir} is at step {state['step']}: ask for more --steps")
    changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {now[k]!r}" for k in sorted(MAY_CHANGE)
               if k != "resume" and k in saved and saved[k] != now.get(k)]
    if changed and int(os.environ.get("RANK", 0)) == 0:
        print(f"resuming {run_dir} at step {state['step']} with " + ", ".join(changed))
    return run_dir, state["step"], state


def read_checkpoint_id(path):
    """The id that save_pretrained writes into the weights' header (and into the trainer state)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)).get("__metadata__", {}).get("checkpoint")


def start_run(args, run_dir, step, rank):
    """Take the run dir (a lock: one run at a time; a dead process leaves none), remove the temporary files of
    an interrupted save, write args.json, on --resume drop the metrics logged after the checkpoint, and open
    the --track mirror."""
    global RUN_LOCK, TRACKER
    if RUN_LOCK is not None:  # an earlier run of this process (tests call main() more than once)
        RUN_LOCK.close()
    TRACKER = None
    if args.track != "none":
        try:
            importlib.import_module(args.track)
        except ImportError:
            raise SystemExit(f"error: --track {args.track}: the {args.track} package is not installed "
                             f"(pip install {args.track})") from None
    if rank == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            RUN_LOCK = open(run_dir / ".lock", "a+")
        except OSError as e:
            raise SystemExit(f"error: cannot write to {run_dir} ({e.strerror})") from None
        try:
            fcntl.flock(RUN_LOCK, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            RUN_LOCK.seek(0)
            raise SystemExit(f"error: {run_dir} is in use by another run (process {RUN_LOCK.read().strip() or '?'})"
                             "; wait for it or pass another --run-name") from None
        RUN_LOCK.truncate(0)
        RUN_LOCK.write(str(os.getpid()))
        RUN_LOCK.flush()
        for tmp in run_dir.glob(".*.tmp*"):
            tmp.unlink(missing_ok=True)
        (run_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args) | {"script": Path(__file__).name},
                                                      indent=2))
        metrics, kept = run_dir / "metrics.jsonl", []
        for line in metrics.read_text().splitlines() if args.resume and metrics.exists() else []:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                print(f"warning: {metrics}: dropped a line that is not a whole record: {line[:80]!r}")
        metrics.write_text("".join(line + "\n" for line in kept))
        TRACKER = open_tracker(args, run_dir, step)


RUN_LOCK = None  # the open lock file of this process's run dir
TRACKER = None  # --track: (step, metrics) -> None, the mirror of metrics.jsonl (rank 0)


def open_tracker(args, run_dir, step):
    """--track tensorboard: event files in the run dir (on --resume, the events after `step` dropped, as in
    metrics.jsonl); wandb: a run in the run dir, offline unless WANDB_MODE says otherwise, config = the flags."""
    if args.track == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(run_dir), purge_step=step + 1 if args.resume else None)

        def write(step, metrics):
            for k, v in metrics.items():
                writer.add_scalar(k, v, step)
            writer.flush()
        return write
    if args.track == "wandb":
        import wandb
        run = wandb.init(dir=str(run_dir), name=run_dir.name, config=dataclasses.asdict(args),
                         mode=os.environ.get("WANDB_MODE", "offline"))
        return lambda step, metrics: run.log(metrics, step=step)
    return None


def log(run_dir, step, metrics, rank):
    if rank == 0:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **{k: round(v, 6) for k, v in metrics.items()}}) + "\n")
        if TRACKER is not None:  # the same numbers under the same names
            TRACKER(step, metrics)


def begin(model, tok, evals, args, amp, run_dir, rank, start, what, evaluate=evaluate, data=None):
    """Once every flag and input is checked: take the run dir, print what runs where, evaluate before training
    (not on --resume; logged as step 0 with the `data` counts), and return the steps' progress bar."""
    start_run(args, run_dir, start, rank)
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
    (weights, tokenizer and the trainer state: the step, and `state`, as save() takes it)."""
    log(run_dir, step + 1, metrics, rank)
    bar.set_postfix({k.split("/")[1]: f"{v:.3g}" for k, v in metrics.items() if k in
                     ("train/loss", "train/reward", "train/kl", "eval/accuracy", "eval/preference_accuracy")})
    if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
        save(model, tok, run_dir, rank, {"step": step + 1, **state})


def save(model, tok, run_dir, rank, state):
    """Rank 0 writes the checkpoint: the model's weights, the tokenizer and `state`, in which a module stands for
    its weights and an optimizer for its state (of the model's parameters; a (module, optimizer) pair: of that
    module's). Under --fsdp every rank first takes part in gathering each of them whole into rank 0's memory (one
    tensor at a time on the device), and the weights are saved from a CPU copy of the model."""
    def whole(v):  # a module, an optimizer or a (module, optimizer) pair -> its state dict, whole
        module, v = v if isinstance(v, tuple) else (v if isinstance(v, torch.nn.Module) else model, v)
        if not is_sharded(module):
            return v.state_dict()
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(module, options=options) if v is module else \
            get_optimizer_state_dict(module, v, options=options)  # empty but on rank 0
    state = {k: whole(v) if isinstance(v, (tuple, torch.nn.Module, torch.optim.Optimizer)) else v
             for k, v in state.items()}
    if is_sharded(model):
        weights = whole(model)
        if rank == 0:
            with torch.device("meta"):
                model = GPT(model.config)
            model.load_state_dict(weights, assign=True)
    if rank == 0:
        model.save_pretrained(run_dir, tok, state=state)


def finish(args, run_dir, rank, metrics):
    """Log and print the final held-out metrics; leave the process group."""
    global TRACKER
    log(run_dir, args.steps, metrics, rank)
    if rank == 0:
        print(f"after {args.steps} steps: " + " | ".join(f"{k} {v:.3f}" for k, v in metrics.items())
              + f" | saved to {run_dir}")
    if args.track == "wandb" and TRACKER is not None:
        import wandb
        wandb.finish()
    TRACKER = None
    if dist.is_initialized():  # every rank done before any tears down (gloo can abort a rank that exits early)
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# RL: the log-probs of sampled sequences and each RL step's metrics (in the scripts that use them)


@torch.no_grad()
def sequence_logprobs(model, batch, micro_batch_size, amp, temperature=1.0):
    """log π(target) (B, T) of a collated batch at the sampling temperature (logits / T), micro-batch by
    micro-batch; zero off the mask."""
    ids, targets, mask = batch
    out = []
    for i in range(0, len(ids), micro_batch_size):
        sl = slice(i, i + micro_batch_size)
        with amp, gathered(model):  # the k completions of a prompt share its prefill
            out.append(model.shared_prefix_logprobs(ids[sl], targets[sl], mask[sl], temperature).float())
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
