"""sft.py: the loss and its invariance under micro-batching, prompt masking, the task block, bad data,
resume and torchrun, and a smoke run of the script itself."""
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import sft  # noqa: E402
from model import GPT, Tokenizer, read_safetensors, tiny_config  # noqa: E402

SMALL = ["--train-size", "64", "--eval-size", "8", "--batch-size", "8", "--micro-batch-size", "4",
         "--max-new-tokens", "40", "--eval-every", "0", "--warmup-steps", "2"]


def run_main(monkeypatch, tmp_path, *argv):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["sft.py", *argv])
    sft.main()


def test_sft_loss_is_token_weighted_mean():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[0, 1, 1], [0, 0, 1]])
    assert sft.sft_loss(logp, mask, 3).item() == pytest.approx((2 + 3 + 6) / 3)


def test_prompt_masked_eos_in_loss():
    tok = Tokenizer.byte_level()
    ex = sft.tokenize([{"prompt": "2+2?", "completion": "#### 4", "answer": "4"}], tok, 512, 8, "t")[0]
    ids, targets, mask = sft.collate([ex["prompt_ids"] + ex["completion_ids"]],
                                     [[0] * len(ex["prompt_ids"]) + [1] * len(ex["completion_ids"])], tok.pad_id, "cpu")
    in_loss = targets[mask.bool()].tolist()
    assert in_loss == tok.encode("#### 4") + [tok.eos_id]  # exactly the completion, EOS included
    assert ids.shape == targets.shape == mask.shape


def micro_batched_grads(model, seqs, masks, micro, pad):
    model.zero_grad()
    n_tokens = sum(sum(m) for m in masks)
    for i in range(0, len(seqs), micro):
        ids, targets, mask = sft.collate(seqs[i:i + micro], masks[i:i + micro], pad, "cpu")
        sft.sft_loss(model(ids, targets, mask=mask), mask, n_tokens).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_loss_invariant_under_micro_batching():
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=2, n_embd=64, ffn_dim=128))
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 256, (int(n),), generator=g).tolist() for n in torch.randint(5, 30, (8,), generator=g)]
    masks = [[0] * (len(s) // 2) + [1] * (len(s) - len(s) // 2) for s in seqs]  # completions of different lengths
    full = micro_batched_grads(model, seqs, masks, 8, 257)
    for micro in (1, 3, 4):
        split = micro_batched_grads(model, seqs, masks, micro, 257)
        for a, b in zip(full, split):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_arith_deterministic_and_disjoint():
    a_train, a_eval = sft.arith_split(3000, 500, seed=0)
    b_train, b_eval = sft.arith_split(3000, 500, seed=0)
    assert a_train == b_train and a_eval == b_eval
    assert not {e["prompt"] for e in a_train} & {e["prompt"] for e in a_eval}
    assert sft.arith_split(10, 10, seed=1)[1] != a_eval[:10]
    for ex in a_train[:200] + a_eval[:200]:  # the worked answer ends in the reference and scores 1
        assert sft.final_answer(ex["completion"]) == ex["answer"]
        assert sft.reward_fn(ex["completion"], ex) == 1.0
        a, b = map(int, re.findall(r"\d+", ex["prompt"]))  # the question's two numbers
        assert (a + b if "gets" in ex["prompt"] else a - b) == int(ex["answer"]) >= 0


def test_score_strict_lenient_format():
    ex = {"answer": "42"}
    assert sft.score("6 * 7 = 42\n#### 42", ex) == {"correct": 1.0, "format": 1.0, "lenient": 1.0}
    assert sft.score("6 * 7 = 42\n#### 41", ex) == {"correct": 0.0, "format": 1.0, "lenient": 0.0}
    assert sft.score("so the answer is 42.", ex) == {"correct": 0.0, "format": 0.0, "lenient": 1.0}
    assert sft.score("#### 1,042", {"answer": "1042"})["correct"] == 1.0
    assert sft.score("####42 extra", ex)["format"] == 0.0  # the answer line must stand alone


def test_bad_data_lines_named(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(SystemExit, match=r"d\.jsonl:2: missing or non-string field 'completion'"):
        sft.read_jsonl(p, ["prompt", "completion"])
    p.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": oops}\n')
    with pytest.raises(SystemExit, match=r"d\.jsonl:3: not valid JSON"):
        sft.read_jsonl(p, ["prompt", "completion"])
    with pytest.raises(SystemExit, match="no such data file"):
        sft.read_jsonl(tmp_path / "missing.jsonl", ["prompt"])


def test_gsm8k_loader(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"3 + 4 = <<3+4=7>>7\n#### {i},000"} for i in range(5)]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = sft.Args(task="gsm8k", data_path=str(tmp_path), eval_size=2)
    train, evals = sft.load_task(args)
    assert len(train) == 5 and len(evals) == 2
    assert train[1] == {"prompt": "q1", "completion": "3 + 4 = 7\n#### 1,000", "answer": "1000",
                        "where": f"{tmp_path}/train.jsonl:2"}


def test_prompt_too_long_is_an_error():
    tok = Tokenizer.byte_level()
    with pytest.raises(SystemExit, match="eval example 1: prompt of .* exceeds the model's context of 64"):
        sft.tokenize([{"prompt": "x" * 80, "completion": "1", "answer": "1"}], tok, 64, 8, "eval")


def test_evaluation_is_a_greedy_rollout():
    """evaluate() scores rollout(..., greedy=True): one completion a prompt, the argmax at every step whatever the
    seed and step, rewarded by its text; sft's Args have no --group-size or --temperature for it to read."""
    torch.manual_seed(0)
    model, tok = GPT(tiny_config()).eval(), Tokenizer.byte_level()
    evals = sft.arith_split(1, 5, seed=0)[1]
    sft.tokenize(evals, tok, model.config.max_seq_len, 8, "eval")
    seqs, masks, rewards, texts, ended = sft.rollout(model, tok, evals, sft.Args(max_new_tokens=8), 0, None,
                                                     contextlib.nullcontext(), greedy=True)
    ids, mask = model.generate([ex["prompt_ids"] for ex in evals], 8, temperature=0, eos_id=tok.stop_ids,
                               pad_id=tok.pad_id)
    assert texts == [tok.decode(o[:n]) for o, n in zip(ids.tolist(), mask.sum(1).tolist())]
    assert len(seqs) == len(masks) == len(ended) == 5
    assert rewards.tolist() == [sft.reward_fn(text, ex) for text, ex in zip(texts, evals)]
    again = sft.rollout(model, tok, evals, sft.Args(max_new_tokens=8, seed=7), 3, None, contextlib.nullcontext(),
                        greedy=True)
    assert again[3] == texts


def test_help_lists_every_field():
    out = subprocess.run([sys.executable, str(ROOT / "sft.py"), "--help"], capture_output=True, text=True,
                         check=True).stdout
    for f in sft.Args.__dataclass_fields__:
        assert "--" + f.replace("_", "-") in out
    assert "micro-batch" in out and "(default: 16)" in out


def test_smoke_and_resume_equals_uninterrupted(monkeypatch, tmp_path):
    common = ["--steps", "4", "--save-every", "2", *SMALL]
    run_main(monkeypatch, tmp_path, *common, "--run-name", "full")
    metrics = [json.loads(l) for l in (tmp_path / "runs/full/metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 0 and "eval/accuracy" in metrics[0]
    assert all("train/loss" in m for m in metrics[1:5]) and "eval/accuracy" in metrics[-1]
    assert json.loads((tmp_path / "runs/full/args.json").read_text())["steps"] == 4
    GPT.from_pretrained(tmp_path / "runs/full")  # the checkpoint loads back

    real_lr_at = sft.lr_at

    def crash_at_step_3(step, args):
        if step == 3:
            raise KeyboardInterrupt
        return real_lr_at(step, args)

    monkeypatch.setattr(sft, "lr_at", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_main(monkeypatch, tmp_path, *common, "--run-name", "cut")
    monkeypatch.setattr(sft, "lr_at", real_lr_at)
    run_main(monkeypatch, tmp_path, *common, "--run-name", "cut", "--resume")
    a = read_safetensors(tmp_path / "runs/full/model.safetensors")
    b = read_safetensors(tmp_path / "runs/cut/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(l)["step"] for l in (tmp_path / "runs/cut/metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(l)["step"] for l in (tmp_path / "runs/full/metrics.jsonl").read_text().splitlines()]


def test_torchrun_two_processes_equal_one(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [str(ROOT / "sft.py"), "--steps", "2", "--save-every", "2", *SMALL]
    subprocess.run([sys.executable, *base, "--run-name", "one"], cwd=tmp_path, env=env, check=True, capture_output=True)
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    r = subprocess.run([torchrun, "--nproc_per_node=2", "--standalone", *base, "--run-name", "two"],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a = read_safetensors(tmp_path / "runs/one/model.safetensors")
    b = read_safetensors(tmp_path / "runs/two/model.safetensors")
    for k in a:  # Adam divides by sqrt(v): near-zero gradients amplify summation-order noise, so allow
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)  # ~3 % of one step at lr 3e-3
    first = lambda run: json.loads((tmp_path / f"runs/{run}/metrics.jsonl").read_text().splitlines()[1])
    assert first("one")["train/loss"] == pytest.approx(first("two")["train/loss"], rel=1e-5)
    assert first("one")["train/grad_norm"] == pytest.approx(first("two")["train/grad_norm"], rel=1e-5)  # same gradient
