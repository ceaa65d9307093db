"""dpo.py: every loss against hand-worked values, label smoothing 0 = DPO, rDPO's unbiasedness, the
gradient's direction on a real model, the pair sampler's choice rule, the HH prompt split, truncation,
bad data named by file and line, and smoke runs (arith with resume, hh, jsonl)."""
import gzip
import json
import math
import types

import pytest
import torch

import dpo as D
from conftest import run_script, torchrun_ended
from model import GPT, Tokenizer, read_safetensors

TINY = ["--batch-size", "4", "--micro-batch-size", "2", "--group-size", "4", "--max-new-tokens", "12",
        "--eval-size", "6", "--train-size", "12", "--eval-every", "0", "--warmup-steps", "1"]
LOG_SIG = lambda x: -math.log1p(math.exp(-x))  # log σ(x)


def test_sigmoid_loss_hand_worked():
    ratios = torch.tensor([[1.0, -1.0], [0.0, 0.0], [-0.5, 0.5]])  # h = 2, 0, -1
    out = D.dpo_loss(ratios, beta=0.5)  # βh = 1, 0, -0.5
    torch.testing.assert_close(out, torch.tensor([-LOG_SIG(1.0), math.log(2), -LOG_SIG(-0.5)]))
    assert out[0].item() == pytest.approx(0.3132617, abs=1e-6)


def test_conservative_dpo_is_cross_entropy_with_soft_labels():
    ratios = torch.tensor([[1.0, -1.0], [-0.5, 0.5]])
    out = D.dpo_loss(ratios, beta=0.5, kind="sigmoid", eps=0.1)
    assert out[0].item() == pytest.approx(0.9 * 0.3132617 + 0.1 * 1.3132617, abs=1e-6)  # −0.9 log σ(1) − 0.1 log σ(−1)
    logits = 0.5 * (ratios[:, 0] - ratios[:, 1])
    torch.testing.assert_close(out, torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.full((2,), 0.9),
                                                                                          reduction="none"))


def test_robust_loss_hand_worked_and_unbiased_under_flips():
    ratios = torch.tensor([[1.0, -1.0]])
    out = D.dpo_loss(ratios, beta=0.5, kind="robust", eps=0.1)
    assert out.item() == pytest.approx((0.9 * 0.3132617 - 0.1 * 1.3132617) / 0.8, abs=1e-6)
    # labels flipped with probability ε: the expected rDPO loss is the clean DPO loss (Chowdhury et al.)
    h = torch.linspace(-3, 3, 7)
    pairs, flipped = torch.stack([h, torch.zeros(7)], 1), torch.stack([torch.zeros(7), h], 1)
    for eps in (0.1, 0.3):
        expected = (1 - eps) * D.dpo_loss(pairs, 0.7, "robust", eps) + eps * D.dpo_loss(flipped, 0.7, "robust", eps)
        torch.testing.assert_close(expected, D.dpo_loss(pairs, 0.7, "sigmoid"))


def test_ipo_and_hinge_hand_worked():
    ratios = torch.tensor([[1.0, -1.0], [0.0, 0.0], [0.25, 0.0]])  # h = 2, 0, 0.25
    torch.testing.assert_close(D.dpo_loss(ratios, 0.5, "ipo"), torch.tensor([1.0, 1.0, 0.5625]))  # (h − 1)²
    torch.testing.assert_close(D.dpo_loss(ratios, 0.5, "hinge"), torch.tensor([0.0, 1.0, 0.875]))  # max(0, 1 − h/2)


def test_label_smoothing_zero_is_plain_dpo():
    ratios = torch.randn(16, 2, generator=torch.Generator().manual_seed(0)) * 3
    plain = -torch.nn.functional.logsigmoid(0.2 * (ratios[:, 0] - ratios[:, 1]))
    for kind in ("sigmoid", "robust"):
        r = ratios.clone().requires_grad_(True)
        out = D.dpo_loss(r, 0.2, kind, 0.0)
        out.sum().backward()
        torch.testing.assert_close(out, plain)
        expected = (0.2 * torch.sigmoid(-0.2 * (ratios[:, 0] - ratios[:, 1])))[:, None] * torch.tensor([-1.0, 1.0])
        torch.testing.assert_close(r.grad, expected)  # dL/dh = −β σ(−βh)


@pytest.mark.parametrize("kind,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.2), ("ipo", 0.0),
                                      ("hinge", 0.0)])
def test_gradient_raises_chosen_lowers_rejected(kind, eps):
    """On a real model: one gradient step on one pair raises the chosen completion's log-ratio and lowers
    the rejected one's (from the reference, where both are 0)."""
    torch.manual_seed(0)
    model, tok = GPT(D.tiny_config(n_layer=2, n_embd=64, ffn_dim=128)), Tokenizer.byte_level()
    pair = {"prompt_ids": tok.encode("Q: 2 + 2?\nA: "), "chosen_ids": tok.encode("#### 4") + [tok.eos_id],
            "rejected_ids": tok.encode("#### 5") + [tok.eos_id]}
    batch = D.collate_pairs([pair], tok.pad_id, "cpu")
    seq = lambda: (model(*batch[:2], mask=batch[2]).sum(1)).view(2, -1).T  # (1, 2) summed log-probs
    with torch.no_grad():
        ref = seq()
    D.dpo_loss(D.log_ratios(seq(), ref, None, False), 0.1, kind, eps).sum().backward()
    norm = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.01 * p.grad / norm  # a small step along the gradient, of the same length for every loss
        ratios = seq() - ref
    assert ratios[0, 0] > 0 > ratios[0, 1]


def test_length_norm_and_stats():
    pi, ref = torch.tensor([[-2.0, -6.0], [-4.0, -1.0], [-3.0, -3.0]]), \
        torch.tensor([[-3.0, -3.0], [-3.0, -3.0], [-3.0, -3.0]])
    lengths = torch.tensor([[2, 4], [4, 2], [1, 1]])
    torch.testing.assert_close(D.log_ratios(pi, ref, lengths, True),
                               torch.tensor([[0.5, -0.75], [-0.25, 1.0], [0.0, 0.0]]))
    s = D.pair_stats(pi, D.log_ratios(pi, ref, lengths, False), beta=0.5)  # ratios (1, −3), (−1, 2), (0, 0)
    assert s["reward_chosen"] == pytest.approx(0.0) and s["reward_rejected"] == pytest.approx(-0.5)
    assert s["reward_margin"] == pytest.approx(2.0 - 1.5 + 0.0)
    assert s["pref_accuracy"] == 1.5  # one win, one loss, one tie (1/2)
    assert s["logp_chosen"] == -9.0 and s["logp_rejected"] == -10.0 and s["logp_accuracy"] == 1


def test_sample_pairs_choice_rule(monkeypatch):
    """Chosen: one of the highest-reward samples; rejected: one of the lowest; all-equal groups skipped."""
    rewards = [[1, 0, 0, 1], [0, 0, 0, 0], [0.5, 1, 0.2, 0.2], [1, 1, 1, 1], [0, 1, 0, 0]]
    examples = [{"prompt_ids": [100 + i]} for i in range(5)]

    def fake_rollout(model, tok, chunk, args, step, rows, amp):
        seqs = [ex["prompt_ids"] + [r, j] for ex, r in zip(chunk, rows) for j in range(4)]  # names its sample
        return seqs, None, torch.tensor([r for ex in chunk for r in rewards[ex["prompt_ids"][0] - 100]]), None, None

    monkeypatch.setattr(D, "rollout", fake_rollout)
    args = D.Args(group_size=4, batch_size=2, pairs_per_prompt=1)
    pairs = D.sample_pairs(None, None, examples, args, None)
    assert [p["index"] for p in pairs] == [0, 2, 4]  # prompts 1 and 3 (all rewards equal) give none
    for p in pairs:
        r = rewards[p["index"]]
        assert p["prompt_ids"] == [100 + p["index"]] and p["chosen_ids"][0] == p["index"]  # its place
        assert r[p["chosen_ids"][1]] == max(r) and r[p["rejected_ids"][1]] == min(r)
    assert pairs == D.sample_pairs(None, None, examples, args, None)  # seeded
    many = D.sample_pairs(None, None, examples, D.Args(group_size=4, batch_size=2, pairs_per_prompt=4), None)
    assert [p["index"] for p in many] == [0, 0, 2, 2, 4, 4, 4]  # one pair per distinct worst sample
    for p in many:
        r = rewards[p["index"]]
        assert r[p["chosen_ids"][1]] == max(r) and r[p["rejected_ids"][1]] == min(r)
    assert len({(p["index"], p["rejected_ids"][1]) for p in many}) == len(many)  # each rejected once


def test_load_pairs_counts_skipped_prompts(monkeypatch):
    """data/skipped_*_prompts count prompts without a pair, also when one prompt gives several pairs."""
    rewards = [[1, 0, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]]  # 3 train, 2 eval prompts

    def fake_rollout(model, tok, chunk, args, step, rows, amp):
        seqs = [ex["prompt_ids"] + [j] for ex in chunk for j in range(4)]
        return seqs, None, torch.tensor([r for ex in chunk for r in rewards[ex["prompt_ids"][0] - 100]]), None, None

    examples = [{"prompt_ids": [100 + i]} for i in range(5)]
    monkeypatch.setattr(D, "rollout", fake_rollout)
    monkeypatch.setattr(D, "load_task", lambda args: (examples[:3], examples[3:]))
    monkeypatch.setattr(D, "tokenize", lambda ex, *a: ex)
    ref = types.SimpleNamespace(config=types.SimpleNamespace(max_seq_len=64))
    for k, n_train, n_eval in [(1, 2, 1), (4, 5, 3)]:
        tr, ev, evals, skipped = D.load_pairs(D.Args(group_size=4, batch_size=2, pairs_per_prompt=k), ref, None, None)
        assert (len(tr), len(ev)) == (n_train, n_eval) and evals == examples[3:]
        assert skipped == {"data/skipped_train_prompts": 1, "data/skipped_eval_prompts": 1}


def test_hh_prompt_split(tmp_path):
    d = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How do I pick a lock?\n\nAssistant:"
    assert D.split_hh(d + " I can't help with that.") == (d, " I can't help with that.")
    assert D.split_hh("\n\nHuman: no answer") is None
    rows = [{"chosen": d + " No.", "rejected": d + " Sure: first..."},
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: x\n\nAssistant: y"},  # prompts differ
            {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5"}]
    path = tmp_path / "hh.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    pairs, mismatched = D.read_pairs(D.Args(task="hh", data_path=str(path)))
    assert mismatched == 1
    assert pairs == [{"prompt": d, "chosen": " No.", "rejected": " Sure: first..."},
                     {"prompt": "\n\nHuman: 2+2?\n\nAssistant:", "chosen": " 4", "rejected": " 5"}]


def test_shared_hh_data_parses(shared_data):
    path = shared_data / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    if not path.exists():
        pytest.skip("no ../shared/data/hh-rlhf")
    pairs, mismatched = D.read_pairs(D.Args(task="hh"))
    assert len(pairs) + mismatched == 2312 and mismatched == 5
    assert all(p["prompt"].endswith("\n\nAssistant:") and p["prompt"].startswith("\n\nHuman:") for p in pairs)


def test_truncation_keeps_the_end_of_the_prompt_and_the_start_of_the_completions():
    tok = Tokenizer.byte_level()
    rows = [{"prompt": "0123456789" * 3, "chosen": "abc", "rejected": "de"},  # 30 + 4 > 16: prompt cut to 16 − 4
            {"prompt": "0123456789", "chosen": "x" * 10, "rejected": "y"},  # chosen cut to 8 (no EOS), prompt to 8
            {"prompt": "short", "chosen": "ok", "rejected": "no"}]  # fits: unchanged
    pairs, cut = D.tokenize_pairs(rows, tok, 16, raw=True)
    assert cut == 2 and len(pairs) == 3
    assert pairs[0]["prompt_ids"] == tok.encode("890123456789") and \
        pairs[0]["chosen_ids"] == tok.encode("abc") + [tok.eos_id]
    assert pairs[1]["chosen_ids"] == tok.encode("x" * 8) and pairs[1]["rejected_ids"] == tok.encode("y") + [tok.eos_id]
    assert pairs[1]["prompt_ids"] == tok.encode("23456789")
    assert pairs[2] == {"prompt_ids": tok.encode("short"), "chosen_ids": tok.encode("ok") + [tok.eos_id],
                        "rejected_ids": tok.encode("no") + [tok.eos_id]}
    jl, _ = D.tokenize_pairs(rows[2:], tok, 64, raw=False)  # jsonl: prompts laid out as in sft.py
    assert jl[0]["prompt_ids"] == D.prompt_ids(tok, "short")


def test_bad_lines_named_by_file_and_line(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(SystemExit, match=r"pairs\.jsonl:2: missing or non-string field 'rejected'"):
        D.read_pairs(D.Args(task="jsonl", data_path=str(p)))
    p.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b", "rejected": 3}\n')
    with pytest.raises(SystemExit, match=r"pairs\.jsonl:2: missing or non-string field 'rejected'"):
        D.read_pairs(D.Args(task="jsonl", data_path=str(p)))
    h = tmp_path / "hh.jsonl"
    h.write_text('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", '
                 '"rejected": "\\n\\nHuman: a\\n\\nAssistant: c"}\n{oops\n')
    with pytest.raises(SystemExit, match=r"hh\.jsonl:2: not valid JSON"):
        D.read_pairs(D.Args(task="hh", data_path=str(h)))
    h.write_text('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: a\\n\\nAssistant: c"}\n'
                 '{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: a, no reply"}\n')
    with pytest.raises(SystemExit, match=r"hh\.jsonl: record 2: the rejected dialogue has no '\\n\\nAssistant:' turn"):
        D.read_pairs(D.Args(task="hh", data_path=str(h)))
    with pytest.raises(SystemExit, match="--task jsonl needs --data-path"):
        D.read_pairs(D.Args(task="jsonl"))


def test_missing_sft_checkpoint_message(monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match=r"runs/sft not found: run `python sft.py` first, or pass --model"):
        run_script(D, monkeypatch, tmp_path)


def test_bad_flags(monkeypatch, tmp_path, tiny_ckpt):
    for flags, msg in [(["--loss", "ipo", "--label-smoothing", "0.1"], "--label-smoothing goes with"),
                       (["--task", "csv"], "2")]:  # the parser's exit status
        with pytest.raises(SystemExit, match=msg):
            run_script(D, monkeypatch, tmp_path, "--model", str(tiny_ckpt), *TINY, *flags)


def text_parity(text, example):
    """A reward that a random model earns half the time (it never answers arith right): pairs exist."""
    return float(len(text) % 2)


def test_smoke_and_resume(monkeypatch, tmp_path, tiny_ckpt):
    monkeypatch.setattr(D, "reward_fn", text_parity)
    args = ["--model", str(tiny_ckpt), "--steps", "3", "--save-every", "2", "--rpo-alpha", "0.5", "--temperature", "2",
            *TINY]
    run_script(D, monkeypatch, tmp_path, *args, "--run-name", "full")
    rows = [json.loads(l) for l in (tmp_path / "runs/full/metrics.jsonl").read_text().splitlines()]
    first, train = rows[0], [r for r in rows if "train/loss" in r]
    assert first["eval/pref_accuracy"] == 0.5 and first["eval/reward_margin"] == 0.0  # the policy is the reference
    assert first["data/train_pairs"] > 0 and "eval/accuracy" in first
    assert [r["step"] for r in train] == [1, 2, 3] and "eval/pref_accuracy" in rows[-1]
    for r in train:
        assert {"train/reward_chosen", "train/reward_margin", "train/logp_rejected"} <= r.keys() and \
            math.isfinite(r["train/loss"])

    real = D.lr_at
    monkeypatch.setattr(D, "lr_at", lambda s, a: (_ for _ in ()).throw(KeyboardInterrupt) if s == 2 else real(s, a))
    with pytest.raises(KeyboardInterrupt):
        run_script(D, monkeypatch, tmp_path, *args, "--run-name", "cut")
    monkeypatch.setattr(D, "lr_at", real)
    run_script(D, monkeypatch, tmp_path, *args, "--run-name", "cut", "--resume")
    a, b = (read_safetensors(tmp_path / f"runs/{n}/model.safetensors") for n in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same pairs, the same updates


def test_micro_batching_does_not_change_the_gradient(monkeypatch, tmp_path, tiny_ckpt):
    monkeypatch.setattr(D, "reward_fn", text_parity)
    common = ["--model", str(tiny_ckpt), "--steps", "1", "--rpo-alpha", "1", "--length-norm", "on",
              "--temperature", "2", *TINY]
    run_script(D, monkeypatch, tmp_path, *common, "--run-name", "m2")
    run_script(D, monkeypatch, tmp_path, *common, "--micro-batch-size", "1", "--run-name", "m1")
    real, cuts = D.micro_batches, []
    monkeypatch.setattr(D, "micro_batches", lambda lengths, args: cuts.append(real(lengths, args)) or cuts[-1])
    run_script(D, monkeypatch, tmp_path, *common, "--micro-batch-tokens", "40", "--run-name", "t40")
    assert any(cols != slice(None) for c in cuts for _, cols in c)  # pairs of 2 x 20+ tokens: the budget cut
    first = lambda n: json.loads((tmp_path / f"runs/{n}/metrics.jsonl").read_text().splitlines()[1])
    for n in ("m1", "t40"):
        assert first(n)["train/loss"] == pytest.approx(first("m2")["train/loss"], rel=1e-5)
        assert first(n)["train/grad_norm"] == pytest.approx(first("m2")["train/grad_norm"],
                                                            rel=1e-5)  # the same gradient


def test_smoke_hh_and_jsonl(monkeypatch, tmp_path, tiny_ckpt):
    rows = [{"chosen": f"\n\nHuman: q{i}?\n\nAssistant: fine {i}", "rejected": f"\n\nHuman: q{i}?\n\nAssistant: no"}
            for i in range(10)]
    (tmp_path / "hh.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}) + "\n"
                                              for i in range(10)))
    for task, path in (("hh", "hh.jsonl"), ("jsonl", "p.jsonl")):
        run_script(D, monkeypatch, tmp_path, "--model", str(tiny_ckpt), "--task", task,
                   "--data-path", str(tmp_path / path),
                   "--steps", "2", "--eval-size", "3", "--batch-size", "4", "--micro-batch-size", "2", "--lr", "1e-2",
                   "--max-len", "40", "--run-name", task)
        rows_ = [json.loads(l) for l in (tmp_path / f"runs/{task}/metrics.jsonl").read_text().splitlines()]
        assert rows_[0]["data/train_pairs"] == 7 and rows_[0]["data/eval_pairs"] == 3 and \
            "eval/accuracy" not in rows_[0]
        assert rows_[-1]["eval/pref_accuracy"] >= 0 and "train/pref_accuracy" in rows_[1]


def test_shard_map_gathers_in_order(monkeypatch):
    items, world = list(range(7)), 3
    monkeypatch.setattr(D.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(D.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(D.dist, "get_world_size", lambda: world)
    gather = lambda parts, mine: parts.__setitem__(slice(None), [[x * 10 for x in items[r::world]]
                                                                 for r in range(world)])
    monkeypatch.setattr(D.dist, "all_gather_object", gather)
    assert D.shard_map(lambda x: x * 10, items) == [x * 10 for x in items]


def test_torchrun_two_processes_equal_one(tmp_path, tiny_ckpt):
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "yes" * (i % 3 + 1),
                                                          "rejected": "no"}) + "\n"
                                              for i in range(13)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [str(Path(D.__file__)), "--model", str(tiny_ckpt), "--task", "jsonl",
            "--data-path", str(tmp_path / "p.jsonl"),
            "--steps", "2", "--eval-size", "5", "--batch-size", "4", "--micro-batch-size", "1", "--lr", "1e-2"]
    subprocess.run([sys.executable, *base, "--run-name", "one"], cwd=tmp_path, env=env, check=True, capture_output=True)
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    r = subprocess.run([torchrun, "--nproc_per_node=2", "--standalone", *base, "--run-name", "two"],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert torchrun_ended(r), r.stderr[-2000:]
    rows = lambda run: [json.loads(l) for l in (tmp_path / f"runs/{run}/metrics.jsonl").read_text().splitlines()]
    r = subprocess.run([torchrun, "--nproc_per_node=2", "--standalone", *base, "--run-name", "fsdp", "--fsdp"],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert torchrun_ended(r), r.stderr[-2000:]  # the policy sharded; the reference whole on each rank
    one, two, fsdp = rows("one"), rows("two"), rows("fsdp")
    assert one[0]["eval/pref_accuracy"] == two[0]["eval/pref_accuracy"] == 0.5  # reference log-probs gathered in order
    assert [r["step"] for r in one] == [r["step"] for r in two] == [r["step"] for r in fsdp]
    for a, b, c in zip(one, two, fsdp):
        if "train/loss" in a:
            assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
            assert a["train/loss"] == pytest.approx(c["train/loss"], rel=1e-5)
            assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-4)
            assert a["train/grad_norm"] == pytest.approx(c["train/grad_norm"], rel=1e-4)
        if "eval/pref_accuracy" in a:
            assert c["eval/pref_accuracy"] == pytest.approx(a["eval/pref_accuracy"])
    w1, w2 = (read_safetensors(tmp_path / f"runs/{n}/model.safetensors") for n in ("one", "fsdp"))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-4, rtol=1e-4)


def test_ipo_uses_length_normalised_log_ratios_by_default():
    assert D.length_normalised(D.Args(loss="ipo")) and not D.length_normalised(D.Args(loss="sigmoid"))
    assert D.length_normalised(D.Args(loss="sigmoid", length_norm="on"))
    assert not D.length_normalised(D.Args(loss="ipo", length_norm="off"))


def test_truncated_pairs_counts_every_pair_with_a_field_cut():
    from model import Tokenizer
    tok = Tokenizer.byte_level()
    rows = [{"prompt": "ab", "chosen": "x" * 20, "rejected": "yz"},  # only the chosen is cut (to 8 of 21 tokens)
            {"prompt": "p" * 30, "chosen": "c", "rejected": "r"},  # only the prompt is cut
            {"prompt": "ab", "chosen": "c", "rejected": "r"}]  # nothing is cut
    pairs, n_cut = D.tokenize_pairs(rows, tok, 16, raw=True)
    assert n_cut == 2 and len(pairs[0]["chosen_ids"]) == 8 and len(pairs[1]["prompt_ids"]) == 14
