"""Every script runs on a chat checkpoint (ChatML, a real BPE, pad <|endoftext|> != EOS <|im_end|>)
and writes a checkpoint that reloads with the same chat prompt, stop ids and pad."""

import json
import math

import pytest

import dpo
import grape
import grpo
import ppo
import reinforce
import rejection_sampling
import sft
import trpo
from conftest import run_script
from model import GPT, Tokenizer

COMMON = ["--steps", "1", "--batch-size", "2", "--micro-batch-size", "2", "--eval-size", "2", "--train-size", "8",
          "--max-new-tokens", "8", "--eval-every", "0", "--warmup-steps", "0"]
RL = ["--group-size", "2"]
FLAGS = {sft: [], rejection_sampling: ["--prompts-per-round", "4", *RL, "--threshold", "0"], dpo: RL,
         reinforce: RL, grpo: RL, grape: RL, ppo: [*RL, "--epochs", "1", "--mini-batches", "1"],
         trpo: [*RL, "--epochs", "1", "--mini-batches", "1", "--cg-iters", "2"]}


def text_parity(text, example):
    """A reward that a random model earns about half the time, so that dpo has pairs to learn from."""
    return float(len(text) % 2)


@pytest.mark.parametrize("script", list(FLAGS), ids=lambda m: m.__name__)
def test_script_runs_on_a_chat_checkpoint(script, chat_ckpt, monkeypatch, tmp_path):
    if script is dpo:
        monkeypatch.setattr(dpo, "reward_fn", text_parity)
    run_script(script, monkeypatch, tmp_path, "--model", str(chat_ckpt), *COMMON, *FLAGS[script], "--run-name", "chat")
    run = tmp_path / "runs" / "chat"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [v for r in rows if r["step"] >= 1 for k, v in r.items() if k.startswith("train/")]
    assert train and all(math.isfinite(v) for v in train)
    tok, back = Tokenizer.from_pretrained(chat_ckpt), Tokenizer.from_pretrained(run)
    model = GPT.from_pretrained(run)
    assert model.config.vocab_size == back.vocab_size == tok.vocab_size
    for q in ["Ann has 17 pens and gets 23 more. How many now?", "naïve 日本 👋"]:
        assert back.chat_prompt(q) == tok.chat_prompt(q)
        assert back.chat_prompt(q, system="Be brief.") == tok.chat_prompt(q, system="Be brief.")
    assert back.chat == "chatml" and back.special["<|im_end|>"] in back.stop_ids
    assert (back.eos_id, back.pad_id, back.stop_ids) == (tok.eos_id, tok.pad_id, tok.stop_ids) == (2, 0, [2])
    assert back.pad_id not in back.stop_ids
    assert (model.config.eos_token_id, model.config.pad_token_id) == ([2], 0)
