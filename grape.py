"""
grape.py: GRAPE, grpo.py with rubric rewards: checked and judged items weighted by importance × confidence.

Generalized Relative Advantage Policy Evolution (final section of Patel, arXiv 2509.04501; related: "Rubrics as
Rewards", arXiv 2507.17746). Each prompt x has a category c(x), each category a rubric of items k of importance
λ_k, *checked* (a program) or *judged* (a critic answers its question), giving completion y_i a score s_ik and a
confidence c_ik in [0, 1]. The reward r_i is their confidence-weighted mean; the rest is the GRPO of
Shao et al. 2024 (DeepSeekMath, arXiv 2402.03300), with the options of Dr. GRPO (arXiv 2503.20783) and
DAPO (arXiv 2503.14476); the exposition follows Patel, arXiv 2509.04501. Sample k completions of each
prompt x from the policy π_old about to be updated, give every token of y_i its group's advantage, and
take μ clipped steps on

    J(θ) = E [ 1/k Σ_i agg_t min(ρ_it A_i, clip(ρ_it, 1−ε_low, 1+ε_high) A_i) − β KL_t(π_θ ‖ π_ref) ],
    ρ_it = π_θ(y_it | x, y_i,<t) / π_old(y_it | x, y_i,<t),   A_i = (r_i − mean(r_1..r_k)) / (std(r_1..r_k) + ε)
    r_i = Σ_k w_k s_ik / Σ_k w_k over the items k of c(x),   w_k = λ_k · mean_j c_jk (j: the batch, where k applies)

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
  7. Rubric (7-10: the paper leaves them open): JSON {category: [items]} (--rubric, else DEFAULT_RUBRIC); an
     item {"name", "kind", "weight": λ > 0} and a "check" (checked: one of CHECKS, c = 1) or a "question" (judged).
  8. Judged: the local critic (the reference, or --judge-model) reads s = P(yes) / (P(yes) + P(no)), c = |2s − 1|;
     over HTTP (--judge-url, OpenAI chat completions) it replies {"score", "confidence", "reason"} in [0, 1].
  9. c is how decisive the critic is, not whether it is right: the policy can sway a judge, keep checked items heavy.
  10. --per-item-advantages (beyond the paper): group advantages of each item's scores, A_i = Σ_k w_k A_ik / Σ_k w_k.

Run: python sft.py && python grape.py   (real weights, GPUs, torchrun: README.md)
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
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
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
    # GRAPE
    rubric: str = ""
    """a rubric .json, {category: [items]} (see the docstring); empty: the built-in DEFAULT_RUBRIC"""
    category: str = "math"
    """the category of examples without a "category" field"""
    per_item_advantages: bool = False
    """group advantages of each item's scores, then their weighted mean (instead of those of the reward)"""
    judge_model: str = ""
    """local critic of the judged items (default: the frozen reference, i.e. --model)"""
    judge_url: str = ""
    """an OpenAI-compatible chat-completions endpoint as the critic instead (e.g. http://localhost:8000/v1)"""
    judge_name: str = ""
    """--judge-url: the model name sent with each request"""
    judge_key_env: str = "OPENAI_API_KEY"
    """--judge-url: the environment variable holding the API key (sent as a Bearer token when set)"""
    judge_retries: int = 4
    """--judge-url: tries per request before stopping with an error (waits 1, 2, 4 ... s between them)"""
    judge_timeout: float = 60.0
    """--judge-url: seconds to wait for one reply"""
    judge_workers: int = 8
    """--judge-url: requests in flight at once (per rank)"""


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
# GRAPE: rubrics of checked and judged items, the critics, confidence-weighted rewards

DEFAULT_RUBRIC = {"math": [  # the built-in task's rubric; --rubric a .json of the same shape replaces it
    {"name": "correct", "kind": "checked", "check": "correct", "weight": 1.0},
    {"name": "format", "kind": "checked", "check": "format", "weight": 0.25},
    {"name": "shows_work", "kind": "checked", "check": "shows_work", "weight": 0.25},
    {"name": "concise", "kind": "checked", "check": "length", "max_ratio": 1.5, "weight": 0.1},
    {"name": "stepwise", "kind": "judged", "weight": 0.25,
     "question": "Does the working lead step by step to the final answer? Answer yes or no."}]}
CHECKS = {  # the programs of checked items: (completion text, example, item) -> score in [0, 1]
    "correct": lambda text, ex, item: reward_fn(text, ex),  # the task's reward: the final answer is right
    "format": lambda text, ex, item: float(bool(re.search(r"(^|\n)####\s*-?[\d,]*\.?\d+\s*$", text))),  # ends '#### N'
    "shows_work": lambda text, ex, item: float(bool(  # 'a + b = c' (or - * / ×) somewhere before the '####' line
        re.search(r"\d\s*[-+*/×]\s*\d[^\n]*=\s*-?\d", text.split("####")[0]))),
    "length": lambda text, ex, item: float(len(text) <= item.get("max_ratio", 2.0) * len(ex["completion"]))}
KINDS = ("checked", "judged")
number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
ITEM_FIELDS = {  # field: (what it must be, its test, the kinds of item that need it; (): any item may have it)
    "name": ("a unique name of letters, digits, _ . -",
             lambda v: isinstance(v, str) and re.fullmatch(r"[\w.-]+", v), KINDS),
    "kind": ("checked or judged", lambda v: v in KINDS, KINDS), "weight": ("a number > 0", number, KINDS),
    "check": (f"one of {', '.join(CHECKS)}", lambda v: isinstance(v, str) and v in CHECKS, ("checked",)),
    "question": ("a non-empty string", lambda v: isinstance(v, str) and v.strip(), ("judged",)),
    "max_ratio": ("a number > 0", number, ())}
JUDGE_TEXT = "Problem: {}\n\nResponse: {}\n\n{}"  # what the critic is shown: problem, completion, question
JUDGE_SYSTEM = ("You grade one response to a problem on one criterion. Reply with JSON only: {\"score\": <0 to 1: how "
                "well the response meets the criterion>, \"confidence\": <0 to 1: how sure you are>, \"reason\": "
                "\"<one short sentence>\"}")
JUDGE_PROBE = ("1 + 1 = ?", "1 + 1 = 2\n#### 2", "Is the answer right? Answer yes or no.")  # asked once at start


def check_item(item, where):
    """One rubric item, returned as it is, or one SystemExit naming `where`, the item and the field."""
    if not isinstance(item, dict):
        raise SystemExit(f"error: {where}: expected an object {{\"name\", \"kind\", \"weight\", ...}}")
    kind = item["kind"] if item.get("kind") in KINDS else None
    need = [f for f, rule in ITEM_FIELDS.items() if kind in rule[2]] or ["name", "kind"]  # no kind: say why first
    for field in need + sorted(set(item) - set(need)):
        must, test, kinds = ITEM_FIELDS.get(field, ("", None, ()))
        what = f"error: {where} ({item.get('name', '?')}): field {field!r}"
        if field not in item:
            raise SystemExit(f"{what} is missing ({must})")
        if test is None or kind and kinds and kind not in kinds:
            raise SystemExit(f"{what} is not a field of a {kind} item")
        if not test(item[field]):
            raise SystemExit(f"{what}: {item[field]!r} is not {must}")
    return item


def load_rubric(path):
    """The items of the rubric in `path` (empty: DEFAULT_RUBRIC), each with its "category"; else SystemExit."""
    where, rubric = path or "the built-in rubric", DEFAULT_RUBRIC
    if path:
        try:
            rubric = json.loads(Path(path).read_text())
        except OSError as e:
            raise SystemExit(f"error: --rubric {path}: cannot read it ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: --rubric {path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(rubric, dict) or not rubric:
        raise SystemExit(f"error: {where}: expected an object {{category: [items]}} with at least one category")
    items = []
    for cat, entries in rubric.items():
        if not isinstance(entries, list) or not entries:
            raise SystemExit(f"error: {where}: category {cat!r}: expected a non-empty list of items")
        items += [check_item(it, f"{where}: category {cat!r} item {i}") | {"category": cat}
                  for i, it in enumerate(entries)]
    names = [it["name"] for it in items]
    if len(set(names)) < len(names):
        raise SystemExit(f"error: {where}: item name {next(n for n in names if names.count(n) > 1)!r} is used twice "
                         f"(names must be unique: they name the metrics)")
    return items


def check_categories(items, where, splits, default):
    """Every example's category ("category" field, else `default`) must have a rubric."""
    cats = sorted({it["category"] for it in items})
    for split, examples in splits.items():
        for i, ex in enumerate(examples):
            if ex.get("category", default) not in cats:
                raise SystemExit(f"error: {split} example {i}: category {ex.get('category', default)!r} is not in "
                                 f"{where or 'the built-in rubric'} (categories: {', '.join(cats)}; see --category)")


def score_items(items, texts, examples, default, judge):
    """-> scores s, confidences c, applies (N, K) of N completions under K items (applies: 1 where item k is in
    the category of completion n's example). Checked: their program, c = 1; judged: one judge(asks) call for all."""
    s, c, applies = (torch.zeros(len(texts), len(items)) for _ in range(3))
    asks, where = [], []
    for n, (text, ex) in enumerate(zip(texts, examples)):
        for k, item in enumerate(items):
            if item["category"] == ex.get("category", default):
                applies[n, k] = 1
                if item["kind"] == "checked":
                    s[n, k], c[n, k] = CHECKS[item["check"]](text, ex, item), 1.0
                else:
                    asks.append((ex["prompt"], text, item["question"]))
                    where.append((n, k))
    if judge is not None:  # called on every rank, with or without asks (under --fsdp it gathers the critic)
        for (n, k), score, confidence in zip(where, *(x.tolist() for x in judge(asks))):
            s[n, k], c[n, k] = score, confidence
    return s, c, applies


def item_weights(importance, conf_sum, count):
    """importance, conf_sum, count (K,), sums over every rank -> w (K,): importance × mean confidence (0: count 0)."""
    return importance * conf_sum / count.clamp(min=1)


def rubric_rewards(s, applies, w):
    """s, applies (N, K), w (K,) -> r (N,) = Σ_k w_k s_nk / Σ_k w_k over the items that apply (0 if those w are 0)."""
    wa = applies * w
    return (wa * s).sum(1) / torch.where(wa.sum(1) > 0, wa.sum(1), 1.0)


def per_item_advantages(s, applies, w, group_size, scale, batch_std):
    """s, applies (N, K), w, batch_std (K,) -> A (N,) = Σ_k w_k A_nk / Σ_k w_k, A_nk: item k's group advantages."""
    adv = torch.stack([group_advantages(s[:, k].view(-1, group_size), scale, batch_std[k]).reshape(-1)
                       for k in range(s.shape[1])], 1)  # (N, K)
    return rubric_rewards(adv, applies, w)


def judge_prompt(tok, problem, completion, question):
    """The local critic's prompt, ending where its verdict starts: its chat format, else prompt_ids' Q/A layout."""
    if tok.chat:
        return tok.chat_prompt(JUDGE_TEXT.format(problem, completion, question))
    return tok.chat_prompt(f"Q: {problem}\nA: {completion}\nQ: {question}\nA: ")


@torch.no_grad()
def judge_local(model, tok, asks, micro_batch_size, amp):
    """asks [(problem, completion, question)] -> s, c (N,): s = P(yes) / (P(yes) + P(no)) of the critic's next
    token after judge_prompt ("yes": the first token of "yes" or "Yes", a byte for `tiny`), c = |2s − 1|."""
    yes, no = (sorted({tok.encode(w)[0] for w in words}) for words in (("yes", "Yes"), ("no", "No")))
    if set(yes) & set(no):
        raise SystemExit("error: the critic's tokenizer starts 'yes' and 'no' with the same token")
    prompts = [judge_prompt(tok, *a)[-model.config.max_seq_len:] for a in asks]  # too long: keep the end
    device, out = model.lm_head.weight.device, [torch.zeros(0)]  # no asks: empty s, c
    for i in range(0, len(prompts), micro_batch_size):
        chunk = prompts[i:i + micro_batch_size]
        T = max(len(p) for p in chunk)
        ids = torch.tensor([p + [tok.pad_id] * (T - len(p)) for p in chunk], device=device)  # right padding: unseen
        with amp:
            h = model.trunk(ids)[range(len(chunk)), [len(p) - 1 for p in chunk]]  # (b, d) at each prompt's end
            logp = model.lm_head(h).float().log_softmax(-1)  # (b, V)
        out.append((logp[:, yes].logsumexp(-1) - logp[:, no].logsumexp(-1)).cpu())  # log P(yes) / P(no)
    s = torch.sigmoid(torch.cat(out))
    return s, (2 * s - 1).abs()


def parse_verdict(content):
    """A critic's reply, a JSON object among any text -> (score, confidence: in [0, 1], reason); else ValueError."""
    found = re.search(r"\{.*\}", content, flags=re.S)
    try:
        obj = json.loads(found.group(0) if found else content)
        score, confidence = float(obj["score"]), float(obj["confidence"])
        if not math.isfinite(score + confidence):
            raise ValueError
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"no JSON object with a finite score and confidence ({type(e).__name__}) "
                         f"in {content[:100]!r}") from None
    if not (0 <= score <= 1 and 0 <= confidence <= 1):
        raise ValueError(f"score {score} and confidence {confidence} must be in [0, 1], in {content[:100]!r}")
    return score, confidence, str(obj.get("reason", ""))


def ask_critic(url, name, key, ask, retries, timeout, backoff=1.0):
    """One judged item over HTTP (OpenAI chat completions) -> (score, confidence, reason). On an HTTP error, a
    malformed reply or none whole within `timeout` s: wait backoff · 2^try, retry; `retries` tries, then SystemExit."""
    body = json.dumps({"model": name, "temperature": 0, "messages": [
        {"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": JUDGE_TEXT.format(*ask)}]}).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    for attempt in range(retries):
        try:
            deadline, reply = time.monotonic() + timeout, b""
            with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=timeout) as r:
                while block := r.read1(1 << 16):
                    reply += block
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the reply took over {timeout:g} s")
            return parse_verdict(json.loads(reply)["choices"][0]["message"]["content"])
        except urllib.error.HTTPError as e:
            why = f"HTTP {e.code} {e.reason}"
        except (OSError, http.client.HTTPException) as e:  # refused, unreachable, timed out, cut off
            why = f"no reply ({getattr(e, 'reason', e)})"
        except (ValueError, KeyError, IndexError, TypeError) as e:
            why = f"malformed reply ({e})"
        if attempt + 1 < retries:
            time.sleep(backoff * 2 ** attempt)
    raise SystemExit(f"error: --judge-url {url}: {why} after {retries} tries")


def judge_http(asks, url, name, key, retries, timeout, workers, backoff=1.0):
    """asks -> scores, confidences (N,) from the server, `workers` requests at a time."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        verdicts = list(pool.map(lambda a: ask_critic(url, name, key, a, retries, timeout, backoff), asks))
    return torch.tensor([v[0] for v in verdicts]), torch.tensor([v[1] for v in verdicts])


def make_judge(args, items, ref, tok, device, amp):
    """judge(asks) -> (s, c): the --judge-url server, else --judge-model, else the reference; None: no judged item."""
    if not any(it["kind"] == "judged" for it in items):
        return None
    if args.judge_url:
        if not args.judge_name:
            raise SystemExit("error: --judge-url needs --judge-name (the model the server serves)")
        url = args.judge_url.rstrip("/").removesuffix("/chat/completions") + "/chat/completions"
        if urllib.parse.urlsplit(url).scheme not in ("http", "https") or not urllib.parse.urlsplit(url).netloc:
            raise SystemExit(f"error: --judge-url {args.judge_url}: not an http:// or https:// URL")
        key = os.environ.get(args.judge_key_env)
        ask_critic(url, args.judge_name, key, JUDGE_PROBE, args.judge_retries, args.judge_timeout)  # reachable?
        return lambda asks: judge_http(asks, url, args.judge_name, key, args.judge_retries, args.judge_timeout,
                                       args.judge_workers)
    critic, ctok = load_model(args.judge_model, device, args.seed) if args.judge_model else \
        (ref if ref is not None else load_model(args.model, device, args.seed)[0], tok)
    critic.requires_grad_(False)

    def judge(asks):  # under --fsdp (the reference as critic) every rank holds it whole while it judges
        with gathered(critic):
            return judge_local(critic, ctok, asks, args.micro_batch_size, amp)
    return judge


def evaluate_rubric(model, tok, examples, args, amp, items):
    """evaluate() plus eval/rubric/<name>: each checked item's held-out mean in its category, same completions."""
    pairs, checked = eval_completions(model, tok, examples, args, amp), [it for it in items if it["kind"] == "checked"]
    s, _, applies = score_items(checked, [t for _, t in pairs], [ex for ex, _ in pairs], args.category, None)
    sums, counts = torch.tensor(all_sum(*(applies * s).sum(0).tolist(), *applies.sum(0).tolist())).view(2, -1)
    return eval_metrics(pairs, len(examples)) | {f"eval/rubric/{it['name']}": (sums[k] / counts[k]).item()
                                                 for k, it in enumerate(checked) if counts[k] > 0}


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
    if args.per_item_advantages and args.kl_in == "reward":
        raise SystemExit("error: --per-item-advantages needs --kl-in loss (the KL has no item to join)")
    run_dir, start, state = open_run(args)
    policy, tok = load_model(str(run_dir) if args.resume else args.model, device, args.seed)
    ref = load_model(args.model, device, args.seed)[0].requires_grad_(False) if args.beta > 0 else None
    policy, ref = prepare(policy, args), prepare(ref, args, trained=False)
    amp = autocast(device)
    train, evals = load_task(args)
    tokenize(train, tok, policy.config.max_seq_len, args.max_new_tokens, "train")
    tokenize(evals, tok, policy.config.max_seq_len, args.max_new_tokens, "eval")
    opt = make_optimizer(policy, args, state)
    items = load_rubric(args.rubric)
    check_categories(items, args.rubric, {"train": train, "eval": evals}, args.category)
    evaluate = lambda *a: evaluate_rubric(*a, items)  # evaluate() plus eval/rubric/<name>
    judge, importance = make_judge(args, items, ref, tok, device, amp), torch.tensor([it["weight"] for it in items])
    bar = begin(policy, tok, evals, args, amp, run_dir, rank, start, f"batch {args.batch_size} prompts x "
                f"{args.group_size} completions = {world} ranks x {per_rank * args.group_size} sequences in "
                f"micro-batches of {args.micro_batch_size} | {len(train)} train, {len(evals)} eval", evaluate)
    for step in bar:
        t0, lr = time.time(), set_lr(opt, step, args)
        rows = range(rank, args.batch_size, world)  # this rank's places in the step's batch of prompts
        prompts = [train[i] for i in batch_indices(step, args.batch_size, len(train), args.seed)][rank::world]
        seqs, masks, rewards, texts, ended = rollout(policy, tok, prompts, args, step, rows, amp)
        t_gen = time.time() - t0
        s, c, applies = score_items(items, texts, [ex for ex in prompts for _ in range(args.group_size)],
                                    args.category, judge)
        sums = torch.stack([applies * s, applies * s ** 2, applies * c, applies]).sum(1)  # (4, K) over my completions
        score_sum, score_sq, conf_sum, count = torch.tensor(all_sum(*sums.reshape(-1).tolist())).float().view(4, -1)
        weight = item_weights(importance, conf_sum, count)
        rewards = rubric_rewards(s, applies, weight)  # replaces the task reward of rollout()
        t_judge = time.time() - t0 - t_gen
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
        if args.per_item_advantages:
            item_std = ((score_sq - score_sum ** 2 / count.clamp(min=1)).clamp(min=0) / (count - 1).clamp(min=1)).sqrt()
            adv = per_item_advantages(s, applies, weight, args.group_size, args.scale_rewards, item_std).to(device)
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
            "train/groups_all_equal": n_equal / args.batch_size,
            "perf/judge_seconds": t_judge, "perf/update_seconds": time.time() - t0 - t_gen - t_judge}
        for k, it in enumerate(items):
            if count[k] > 0:  # an item of a category this batch has
                metrics |= {f"rubric/{it['name']}/score": (score_sum[k] / count[k]).item(),
                            f"rubric/{it['name']}/weight": weight[k].item(),
                            f"rubric/{it['name']}/confidence": (conf_sum[k] / count[k]).item()}
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
