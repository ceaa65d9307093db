"""grape.py: with one checked item it is grpo.py; the confidence weighting and the per-item advantages on
hand-worked batches; the checks; the rubric file's errors; the local critic on a tiny model; the HTTP critic
against a stub server; a smoke run with resume."""
import dataclasses
import http.server
import json
import math
import socket
import threading
import time
from types import SimpleNamespace

import pytest
import torch

import grape as R
import grpo as G
import model as M
from conftest import run_script
from model import read_safetensors

TINY = ["--batch-size", "2", "--group-size", "3", "--micro-batch-size", "4", "--max-new-tokens", "12",
        "--eval-size", "4", "--train-size", "16", "--eval-every", "0", "--warmup-steps", "1"]
GOOD = "70 + 20 + 9 + 6 = 90 + 15 = 105\n#### 105"
EX = {"prompt": "Ann has 79 pens and gets 26 more. How many now?", "completion": GOOD, "answer": "105"}


def metrics(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def write_rubric(tmp_path, rubric):
    path = tmp_path / "rubric.json"
    path.write_text(rubric if isinstance(rubric, str) else json.dumps(rubric))
    return str(path)


def some_reward(text, example):
    """A reward that varies between completions of the random tiny model (the task's would be all 0)."""
    return sum(text.encode()) % 5 / 4


# ---------------------------------------------------------------------------------------------- checks and rubric


def test_checks():
    c = lambda name, text, **item: R.CHECKS[name](text, EX, item)
    assert [c(n, GOOD) for n in ("correct", "format", "shows_work", "length")] == [1.0, 1.0, 1.0, 1.0]
    assert c("correct", GOOD.replace("#### 105", "#### 106")) == 0.0
    assert c("format", GOOD + "\nand more") == 0.0 and c("format", "#### 7") == 1.0 and c("format", "it is 105") == 0.0
    assert c("shows_work", "105\n#### 105") == 0.0 and c("shows_work", "#### 2 + 3 = 5") == 0.0  # work after '####'
    assert c("shows_work", "100 - 5 = 95\n#### 95") == 1.0
    assert c("length", GOOD + "x" * len(GOOD)) == 1.0 and c("length", GOOD + "x" * (len(GOOD) + 1)) == 0.0  # 2x
    assert c("length", GOOD + "x" * 20, max_ratio=1.5) == 1.0 and c("length", GOOD + "x" * 21, max_ratio=1.5) == 0.0


def test_default_rubric():
    items = R.load_rubric("")
    kinds = [it["kind"] for it in items]
    assert kinds.count("checked") >= 3 and kinds.count("judged") >= 1
    assert {it["category"] for it in items} == {"math"}


BAD = [  # (rubric, the error it must name)
    ("{\"math\": [", r"rubric\.json:1: not valid JSON"),
    ([{"name": "x"}], r"rubric\.json: expected an object \{category: \[items\]\}"),
    ({"math": []}, r"rubric\.json: category 'math': expected a non-empty list"),
    ({"math": [{"name": "x", "kind": "graded", "weight": 1}]},
     r"category 'math' item 0 \(x\): field 'kind': 'graded' is not checked or judged"),
    ({"math": [{"name": "x", "kind": "checked", "check": "spelling", "weight": 1}]},
     r"item 0 \(x\): field 'check': 'spelling' is not one of correct"),
    ({"math": [{"name": "x", "kind": "checked", "check": "correct"}]}, r"item 0 \(x\): field 'weight' is missing"),
    ({"math": [{"name": "x", "kind": ["checked"], "weight": 1}]},
     r"field 'kind': \['checked'\] is not checked or judged"),
    ({"math": [{"name": "x", "kind": "checked", "check": ["correct"], "weight": 1}]},
     r"field 'check': \['correct'\] is not one of"),
    ({"math": [{"kind": "checked", "check": "correct", "weight": 1}]}, r"item 0 \(\?\): field 'name' is missing"),
    ({"math": [{"name": "x", "kind": "judged", "weight": 1}]}, r"item 0 \(x\): field 'question' is missing"),
    ({"math": [{"name": "x", "kind": "checked", "check": "correct", "weight": 0}]},
     r"field 'weight': 0 is not a number > 0"),
    ({"math": [{"name": "x", "kind": "checked", "check": "correct", "weight": -2.5}]},
     r"field 'weight': -2\.5 is not a number > 0"),
    ({"math": [{"name": "x", "kind": "checked", "check": "correct", "weight": "1"}]},
     r"field 'weight': '1' is not a number > 0"),
    ({"math": [{"name": "a", "kind": "checked", "check": "correct", "weight": 1},
               {"name": "y", "kind": "checked", "check": "correct", "weight": 1, "wieght": 2}]},
     r"item 1 \(y\): field 'wieght' is not a field"),
    ({"math": [{"name": "x", "kind": "judged", "weight": 1, "question": "ok?", "check": "correct"}]},
     r"field 'check' is not a field of a judged item"),
    ({"math": [{"name": "a b", "kind": "checked", "check": "correct", "weight": 1}]},
     r"field 'name': 'a b' is not a unique name"),
    ({"math": [{"name": "x", "kind": "checked", "check": "correct", "weight": 1}],
      "code": [{"name": "x", "kind": "checked", "check": "format", "weight": 1}]}, r"item name 'x' is used twice"),
]


@pytest.mark.parametrize("rubric,message", BAD)
def test_rubric_errors_name_the_file_and_the_field(tmp_path, rubric, message):
    path = write_rubric(tmp_path, rubric)
    with pytest.raises(SystemExit, match=message) as e:
        R.load_rubric(path)
    assert str(e.value).startswith(f"error: --rubric {path}" if isinstance(rubric, str) else f"error: {path}: ")


def test_rubric_unknown_category_and_missing_file(tmp_path, monkeypatch, tiny_ckpt):
    with pytest.raises(SystemExit, match=r"--rubric .*nothere\.json: cannot read it"):
        R.load_rubric(str(tmp_path / "nothere.json"))
    path = write_rubric(tmp_path, {"code": [{"name": "x", "kind": "checked", "check": "format", "weight": 1}]})
    items = R.load_rubric(path)
    R.check_categories(items, path, {"train": [{"category": "code"}]}, "math")  # fine
    with pytest.raises(SystemExit, match=r"train example 1: category 'math' is not in .*rubric\.json "
                                         r"\(categories: code; see --category\)"):
        R.check_categories(items, path, {"train": [{"category": "code"}, {}]}, "math")
    with pytest.raises(SystemExit, match=r"train example 0: category 'math' is not in "
                                         r".*rubric\.json"):  # the arith default
        run_script(R, monkeypatch, tmp_path, "--model", str(tiny_ckpt), *TINY, "--rubric", path)
    run_script(R, monkeypatch, tmp_path, "--model", str(tiny_ckpt), *TINY, "--rubric", path, "--category", "code",
               "--steps", "1")


TWO = {"math": [{"name": "correct", "kind": "checked", "check": "correct", "weight": 1},
               {"name": "sound", "kind": "judged", "weight": 1, "question": "sound?"}],
       "style": [{"name": "short", "kind": "checked", "check": "length", "max_ratio": 1, "weight": 1}]}


def test_jsonl_categories_through_the_loader(tmp_path):
    """A jsonl line's "category" survives load_task and picks its rubric; a category without one is an error."""
    lines = [{"prompt": f"{a} + 1?", "completion": f"#### {a + 1}", "category": cat} for a, cat in
             zip(range(6), ["math", "style", "style", "math", "style", "math"])]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(l) + "\n" for l in lines))
    train, evals = R.load_task(SimpleNamespace(task="jsonl", data_path=str(data), eval_size=2))
    assert [ex["category"] for ex in train + evals] == [l["category"] for l in lines] and evals[0]["answer"] == "5"
    items = R.load_rubric(write_rubric(tmp_path, TWO))
    R.check_categories(items, "rubric.json", {"train": train, "eval": evals}, "math")
    texts = ["#### 1", "#### 3", "#### 3 and more", "#### 9"]  # right, short; right, too long; wrong
    s, c, applies = R.score_items(items, texts, train[:4], "math",
                                  lambda asks: (torch.tensor([0.9, 0.2]), torch.tensor([0.8, 0.6])))
    assert applies.tolist() == [[1, 1, 0], [0, 0, 1], [0, 0, 1], [1, 1, 0]]
    torch.testing.assert_close(s, torch.tensor([[1.0, 0.9, 0], [0, 0, 1], [0, 0, 0], [0, 0.2, 0]]))
    torch.testing.assert_close(c, torch.tensor([[1.0, 0.8, 0], [0, 0, 1], [0, 0, 1], [1, 0.6, 0]]))
    data.write_text(data.read_text() + json.dumps({"prompt": "p", "completion": "#### 1", "category": "code"}) + "\n")
    train, evals = R.load_task(SimpleNamespace(task="jsonl", data_path=str(data), eval_size=2))
    with pytest.raises(SystemExit, match=r"eval example 1: category 'code' is not in rubric\.json "
                                         r"\(categories: math, style"):
        R.check_categories(items, "rubric.json", {"train": train, "eval": evals}, "math")


def test_evaluate_rubric_per_category_means(tmp_path, monkeypatch):
    """eval/rubric/<name>: each checked item's mean over the held-out examples of its category, on the very
    completions evaluate() kept; judged items are not asked (no critic at evaluation)."""
    items = R.load_rubric(write_rubric(tmp_path, TWO))
    exs = [{"prompt": "p", "completion": "#### 5", "answer": "5", "category": cat}
           for cat in ("math", "style", "style", "math", "math")]
    texts = ["#### 5", "#### 5", "#### 55", "#### 4", "#### 5"]

    def fake_completions(model, tok, examples, args, amp):
        assert examples is exs
        return list(zip(exs, texts))
    monkeypatch.setattr(R, "eval_completions", fake_completions)
    monkeypatch.setattr(R, "eval_metrics", lambda pairs, n: {"eval/reward": 0.5})
    got = R.evaluate_rubric(None, None, exs, SimpleNamespace(category="math"), None, items)
    assert got == pytest.approx({"eval/reward": 0.5, "eval/rubric/correct": 2 / 3, "eval/rubric/short": 1 / 2})


# ---------------------------------------------------------------------------------------------- aggregation


def test_single_checked_item_gives_grpos_rewards_and_advantages(tmp_path):
    items = R.load_rubric(write_rubric(tmp_path, {"math": [{"name": "c", "kind": "checked", "check": "correct",
                                                            "weight": 2.5}]}))
    texts = [GOOD, "#### 105", "#### 104", GOOD + "5", "", GOOD, GOOD, GOOD, "#### 1"]  # 3 groups of 3
    s, c, applies = R.score_items(items, texts, [EX] * 9, "math", None)
    w = R.item_weights(torch.tensor([2.5]), (applies * c).sum(0), applies.sum(0))
    r = R.rubric_rewards(s, applies, w)
    expected = torch.tensor([G.reward_fn(t, EX) for t in texts])
    assert torch.equal(r, expected) and expected.tolist() == [1, 1, 0, 0, 0, 1, 1, 1, 0]
    for scale in ("group", "none", "batch"):
        assert torch.equal(G.group_advantages(r.view(3, 3), scale), G.group_advantages(expected.view(3, 3), scale))


def test_single_checked_item_run_equals_grpo_run(monkeypatch, tmp_path, tiny_ckpt):
    """The whole loop: grape.py with the one item "correct" ends with grpo.py's weights and rewards (with
    grpo.py's values of the flags whose defaults differ, if any)."""
    rubric = write_rubric(tmp_path, {"math": [{"name": "c", "kind": "checked", "check": "correct", "weight": 3}]})
    for module in (R, G):
        monkeypatch.setattr(module, "reward_fn", some_reward)
    same = [x for f in dataclasses.fields(G.Args) if getattr(R.Args, f.name) != f.default
            for x in (["--" + ("" if f.default else "no-") + f.name.replace("_", "-")] if f.type is bool else
                      ["--" + f.name.replace("_", "-"), str(f.default)])]
    flags = ["--model", str(tiny_ckpt), *same, "--steps", "2", *TINY]
    run_script(G, monkeypatch, tmp_path, *flags, "--run-name", "grpo")
    run_script(R, monkeypatch, tmp_path, *flags, "--run-name", "grape", "--rubric", rubric)
    a, b = (read_safetensors(tmp_path / f"runs/{n}/model.safetensors") for n in ("grpo", "grape"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ga, gb = (metrics(tmp_path / f"runs/{n}/metrics.jsonl")[1:3] for n in ("grpo", "grape"))
    assert [r["train/reward"] for r in ga] == [r["train/reward"] for r in gb] == [r["rubric/c/score"] for r in gb]
    assert 0 < ga[0]["train/reward"] < 1 and ga[0]["train/loss"] == gb[0]["train/loss"]


def judged_rubric(tmp_path):
    return R.load_rubric(write_rubric(tmp_path, {"math": [
        {"name": "correct", "kind": "checked", "check": "correct", "weight": 1},
        {"name": "vague", "kind": "judged", "weight": 1, "question": "vague?"},
        {"name": "sharp", "kind": "judged", "weight": 1, "question": "sharp?"}]}))


def test_uninformative_judged_item_gets_a_lower_weight(tmp_path):
    """A critic whose verdicts are coin flips (s = 1/2, so c = |2s - 1| = 0) on one item and sure ones on
    another: the first weighs 0 and leaves the rewards to the others, the second counts."""
    items = judged_rubric(tmp_path)
    texts = [GOOD, "#### 104", GOOD, "#### 3"]
    sharp = torch.tensor([0.95, 0.1, 0.8, 0.05])

    def judge(asks):
        assert [a[2] for a in asks] == ["vague?", "sharp?"] * 4 and [a[1] for a in asks[::2]] == texts
        assert all(a[0] == EX["prompt"] for a in asks)
        s = torch.stack([torch.full((4,), 0.5), sharp], 1).reshape(-1)
        return s, (2 * s - 1).abs()
    s, c, applies = R.score_items(items, texts, [EX] * 4, "math", judge)
    w = R.item_weights(torch.ones(3), (applies * c).sum(0), applies.sum(0))
    torch.testing.assert_close(w, torch.tensor([1.0, 0.0, (0.9 + 0.8 + 0.6 + 0.9) / 4]))
    assert w[1] < w[2]
    r = R.rubric_rewards(s, applies, w)
    torch.testing.assert_close(r, (torch.tensor([1.0, 0, 1, 0]) + w[2] * sharp) / (1 + w[2]))  # "vague" plays no part


def test_confidence_weighting_hand_worked():
    """Two groups of two. Group 1 is "math": A checked (λ 1), B judged (λ 2); group 2 is "style": C
    checked (λ 3). B's confidences 0.8, 0.4 average 0.6, so w_B = 1.2; w_A = 1, w_C = 3.
    r = (1·s_A + 1.2·s_B) / 2.2 in group 1 and s_C in group 2."""
    s = torch.tensor([[1.0, 0.9, 0], [0.0, 0.3, 0], [0, 0, 1.0], [0, 0, 0.0]])
    c = torch.tensor([[1.0, 0.8, 0], [1.0, 0.4, 0], [0, 0, 1.0], [0, 0, 1.0]])
    applies = torch.tensor([[1.0, 1, 0], [1, 1, 0], [0, 0, 1], [0, 0, 1]])
    w = R.item_weights(torch.tensor([1.0, 2.0, 3.0]), (applies * c).sum(0), applies.sum(0))
    torch.testing.assert_close(w, torch.tensor([1.0, 1.2, 3.0]))
    r = R.rubric_rewards(s, applies, w)
    torch.testing.assert_close(r, torch.tensor([(1 + 1.08) / 2.2, 0.36 / 2.2, 1.0, 0.0]))
    adv = G.group_advantages(r.view(2, 2), "group", eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5 ** 0.5, -0.5 ** 0.5]] * 2))  # two of anything: ±1/√2
    torch.testing.assert_close(G.group_advantages(r.view(2, 2), "none"),
                               torch.tensor([[1.72 / 4.4, -1.72 / 4.4], [0.5, -0.5]]))
    # every weight zero (a judged-only category the critic cannot judge): reward 0, not NaN
    assert R.rubric_rewards(torch.tensor([[0.7]]), torch.ones(1, 1), torch.zeros(1)).item() == 0.0


def test_per_item_advantages_hand_worked():
    """One group of three, items A (λ 1) scores 1, 0, 0; B (λ 1) all 1/2; C (λ 2) scores 0, 1, 1. Each item's
    group advantages: A = (2, -1, -1)/√3, B = 0, C = (-2, 1, 1)/√3; weighted mean (A + 0 + 2C)/4 =
    (-2, 1, 1)/(4√3). The advantages of the summed reward (A + 1/2 + 2C)/4 = (3, 5, 5)/8 are (-2, 1, 1)/√3:
    the same direction here, four times the size."""
    s = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.5, 1.0], [0.0, 0.5, 1.0]])
    applies, w = torch.ones(3, 3), torch.tensor([1.0, 1.0, 2.0])
    adv = R.per_item_advantages(s, applies, w, 3, "group", torch.ones(3))
    torch.testing.assert_close(adv, torch.tensor([-2.0, 1.0, 1.0]) / (4 * 3 ** 0.5), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(G.group_advantages(R.rubric_rewards(s, applies, w).view(1, 3), "group")[0],
                               torch.tensor([-2.0, 1.0, 1.0]) / 3 ** 0.5, atol=1e-3, rtol=1e-3)
    # without the std: each item centred, then weighted: (1·(2,-1,-1)/3 + 2·(-2,1,1)/3)/4 = (-2, 1, 1)/12
    torch.testing.assert_close(R.per_item_advantages(s, applies, w, 3, "none", torch.ones(3)),
                               torch.tensor([-2.0, 1.0, 1.0]) / 12)
    # the batch std of each item divides its centred scores
    torch.testing.assert_close(R.per_item_advantages(s, applies, w, 3, "batch", torch.tensor([0.5, 1.0, 2.0])),
                               (torch.tensor([2.0, -1, -1]) / 3 / 0.5 + 2 * torch.tensor([-2.0, 1, 1]) / 3 / 2) / 4,
                               atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------------------------------------- local critic


def test_local_judge_on_a_tiny_model():
    torch.manual_seed(0)
    model, tok = M.GPT(M.tiny_config(n_layer=2, n_embd=64, ffn_dim=128)).eval(), M.Tokenizer.byte_level()
    assert tok.decode(R.judge_prompt(tok, "2+2?", "4", "Right? Answer yes or no.")) == \
        "Q: 2+2?\nA: 4\nQ: Right? Answer yes or no.\nA: "
    asks = [("2+2?", "4", "Right?"), ("A longer problem with more bytes", GOOD, "Does it show work?"), ("x", "", "ok?")]
    s, c = R.judge_local(model, tok, asks, 2, torch.autocast("cpu", enabled=False))  # micro-batches of 2: padding
    assert s.shape == c.shape == (3,) and ((s >= 0) & (s <= 1)).all() and ((c >= 0) & (c <= 1)).all()
    torch.testing.assert_close(c, (2 * s - 1).abs())
    for a, got in zip(asks, s):  # each alone, unpadded, from the full logits
        p = model(torch.tensor([R.judge_prompt(tok, *a)]))[0, -1].softmax(-1)
        yes, no = p[[ord("y"), ord("Y")]].sum(), p[[ord("n"), ord("N")]].sum()
        assert got.item() == pytest.approx((yes / (yes + no)).item(), abs=1e-5)
    assert len(set(s.tolist())) == 3  # the verdict depends on the prompt
    with pytest.raises(SystemExit, match=r"starts 'yes' and 'no' with the same token"):
        R.judge_local(model, SimpleNamespace(encode=lambda w: [7]), asks, 2, torch.autocast("cpu", enabled=False))


# ---------------------------------------------------------------------------------------------- HTTP critic


@pytest.fixture
def stub():
    """A chat-completions stub on 127.0.0.1: answers the queued (status, content) replies in turn
    (content None: a body that is not JSON) and records the requests."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            server.requests.append((self.path, dict(self.headers),
                                    json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            status, content = server.replies.pop(0) if len(server.replies) > 1 else server.replies[0]
            body = b"<html>oops" if content is None else \
                json.dumps({"choices": [{"message": {"content": content}}]}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.requests, server.replies = [], []
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    server.url = f"http://127.0.0.1:{server.server_port}/v1/chat/completions"
    yield server
    server.shutdown()


ASK = ("Ann has 79 pens and gets 26 more. How many now?", GOOD, "Is it right? Answer yes or no.")


def test_http_critic_good_reply(stub):
    stub.replies = [(200, "Sure.\n```json\n{\"score\": 1.0, \"confidence\": 0.7, \"reason\": \"adds up\"}\n```")]
    assert R.ask_critic(stub.url, "critic-7b", "sekret", ASK, 3, 5.0, backoff=0.001) == (1.0, 0.7, "adds up")
    (path, headers, body), = stub.requests
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sekret" and \
        body["model"] == "critic-7b"
    user = body["messages"][-1]["content"]
    assert all(part in user for part in ASK) and "JSON" in body["messages"][0]["content"]


def test_http_critic_malformed_reply_is_retried_then_one_clear_error(stub):
    stub.replies = [(200, "I think it is fine.")]
    with pytest.raises(SystemExit, match=rf"error: --judge-url {stub.url}: malformed reply "
                                         r".*I think it is fine.* after 3 tries"):
        R.ask_critic(stub.url, "m", None, ASK, 3, 5.0, backoff=0.001)
    assert len(stub.requests) == 3 and "Authorization" not in stub.requests[0][1]
    stub.replies = [(200, None)]  # not even JSON around the content
    with pytest.raises(SystemExit, match=r"malformed reply .* after 2 tries"):
        R.ask_critic(stub.url, "m", None, ASK, 2, 5.0, backoff=0.001)
    stub.replies = [(200, '{"score": 0.5, "reason": "no confidence"}')]
    with pytest.raises(SystemExit, match=r"malformed reply"):
        R.ask_critic(stub.url, "m", None, ASK, 1, 5.0)


def test_http_critic_recovers_from_an_http_500(stub):
    stub.replies = [(500, None), (200, '{"score": 0.25, "confidence": 0, "reason": ""}')]
    assert R.ask_critic(stub.url, "m", None, ASK, 3, 5.0, backoff=0.001) == (0.25, 0.0, "")
    assert len(stub.requests) == 2
    stub.replies = [(503, None)]
    with pytest.raises(SystemExit, match=rf"--judge-url {stub.url}: HTTP 503 .* after 2 tries"):
        R.ask_critic(stub.url, "m", None, ASK, 2, 5.0, backoff=0.001)


def test_http_critic_unreachable_and_judge_http(stub):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nobody listens there
    with pytest.raises(SystemExit, match=rf"--judge-url http://127.0.0.1:{port}/v1: no reply .* after 2 tries"):
        R.ask_critic(f"http://127.0.0.1:{port}/v1", "m", None, ASK, 2, 5.0, backoff=0.001)
    stub.replies = [(200, '{"score": 0.8, "confidence": 0.6, "reason": "ok"}')]
    s, c = R.judge_http([ASK] * 5, stub.url, "m", None, 2, 5.0, workers=3)
    assert s.tolist() == pytest.approx([0.8] * 5) and c.tolist() == pytest.approx([0.6] * 5) and len(stub.requests) == 5


def test_judge_url_in_a_run(monkeypatch, tmp_path, tiny_ckpt, stub):
    """The whole loop with the critic served: the judged item's score and confidence come from the server."""
    stub.replies = [(200, '{"score": 0.75, "confidence": 0.5, "reason": "fine"}')]
    monkeypatch.setenv("GRAPE_TEST_KEY", "k")
    run_script(R, monkeypatch, tmp_path, "--model", str(tiny_ckpt), "--steps", "1", *TINY, "--judge-url",
               stub.url.removesuffix("/chat/completions"), "--judge-name", "m", "--judge-key-env", "GRAPE_TEST_KEY")
    row = metrics(tmp_path / "runs/grape/metrics.jsonl")[1]
    assert row["rubric/stepwise/score"] == 0.75 and row["rubric/stepwise/confidence"] == 0.5
    assert row["rubric/stepwise/weight"] == pytest.approx(0.25 * 0.5)
    assert len(stub.requests) == 1 + 6 and stub.requests[0][1]["Authorization"] == "Bearer k"  # the probe, 6 asks


# ---------------------------------------------------------------------------------------------- runs


def test_smoke_and_resume(monkeypatch, tmp_path, tiny_ckpt):
    """The default rubric with the reference as the critic; every item logged; resume ends where the whole run does."""
    monkeypatch.setattr(R, "reward_fn", some_reward)
    args = ["--model", str(tiny_ckpt), "--steps", "3", "--save-every", "2", "--mu", "2", *TINY, "--eval-every", "2"]
    run_script(R, monkeypatch, tmp_path, *args, "--run-name", "full")
    rows = metrics(tmp_path / "runs/full/metrics.jsonl")
    train = [r for r in rows if "train/reward" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    items = R.load_rubric("")
    for r in train:
        for it in items:
            score, conf, w = (r[f"rubric/{it['name']}/{k}"] for k in ("score", "confidence", "weight"))
            assert 0 <= score <= 1 and 0 <= conf <= 1 and w == pytest.approx(it["weight"] * conf, abs=1e-6)
            assert conf == 1.0 or it["kind"] == "judged"
        assert 0 <= r["train/reward"] <= 1 and math.isfinite(r["train/loss"]) and "perf/judge_seconds" in r
    assert 0 < train[0]["rubric/stepwise/confidence"] < 1
    evals = [r for r in rows if "eval/reward" in r]
    assert [r["step"] for r in evals] == [0, 2, 3]
    for row in evals:  # the evaluations before, during and after: every checked item
        assert {f"eval/rubric/{it['name']}" for it in items if it["kind"] == "checked"} <= row.keys()
        assert row["eval/rubric/correct"] == row["eval/reward"]  # the same greedy completions

    real = R.lr_at
    monkeypatch.setattr(R, "lr_at", lambda s, a: (_ for _ in ()).throw(KeyboardInterrupt) if s == 2 else real(s, a))
    with pytest.raises(KeyboardInterrupt):
        run_script(R, monkeypatch, tmp_path, *args, "--run-name", "cut")
    monkeypatch.setattr(R, "lr_at", real)
    run_script(R, monkeypatch, tmp_path, *args, "--run-name", "cut", "--resume")
    a, b = (read_safetensors(tmp_path / f"runs/{n}/model.safetensors") for n in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rs]
    assert strip(metrics(tmp_path / "runs/cut/metrics.jsonl")) == strip(rows)  # the same scores, weights, rewards


def test_per_item_advantages_run_and_beta_zero_loads_the_critic(monkeypatch, tmp_path, tiny_ckpt):
    monkeypatch.setattr(R, "reward_fn", some_reward)
    loads, real = [], R.load_model
    monkeypatch.setattr(R, "load_model", lambda *a: loads.append(a[0]) or real(*a))
    run_script(R, monkeypatch, tmp_path, "--model", str(tiny_ckpt), "--steps", "1", *TINY, "--per-item-advantages",
               "--beta", "0")
    assert loads == [str(tiny_ckpt)] * 2  # the policy, then the critic (no reference to share)
    assert math.isfinite(metrics(tmp_path / "runs/grape/metrics.jsonl")[1]["train/loss"])
    with pytest.raises(SystemExit, match=r"--per-item-advantages needs --kl-in loss"):
        run_script(R, monkeypatch, tmp_path, "--model", str(tiny_ckpt), *TINY, "--per-item-advantages",
                   "--kl-in", "reward")
    with pytest.raises(SystemExit, match=r"--judge-url needs --judge-name"):
        run_script(R, monkeypatch, tmp_path, "--model", str(tiny_ckpt), *TINY, "--judge-url", "http://127.0.0.1:9/v1")


def test_http_critic_out_of_range_numbers_are_errors_not_clamps(stub):
    stub.replies = [(200, '{"score": 1.4, "confidence": 0.7, "reason": "too sure"}')]
    with pytest.raises(SystemExit, match=r"malformed reply \(score 1\.4 and confidence 0\.7 must be in \[0, 1\]"):
        R.ask_critic(stub.url, "m", None, ASK, 2, 5.0, backoff=0.001)


def test_http_critic_timeout_is_a_deadline_for_the_whole_reply():
    """A server that trickles its reply a byte at a time never trips a per-read timeout; the deadline stops it."""
    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"choices": [{"message": {"content": '{"score": 1, "confidence": 1}'}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for i in range(len(body)):
                self.wfile.write(body[i:i + 1])
                self.wfile.flush()
                time.sleep(0.05)

        def log_message(self, *a):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        t0 = time.monotonic()
        with pytest.raises(SystemExit, match=r"no reply \(the reply took over 0\.5 s\) after 1 tries"):
            R.ask_critic(f"http://127.0.0.1:{server.server_port}/v1", "m", None, ASK, 1, 0.5)
        assert time.monotonic() - t0 < 2.0  # the body alone takes ~3 s to trickle out
    finally:
        server.shutdown()
        server.server_close()


def test_judge_url_checked_before_any_work(monkeypatch, tmp_path, tiny_ckpt, stub):
    rubric = write_rubric(tmp_path, {"math": [{"name": "j", "kind": "judged", "weight": 1.0, "question": "ok?"}]})
    with pytest.raises(SystemExit, match=r"--judge-url localhost:8000/v1: not an http:// or https:// URL"):
        run_script(R, monkeypatch, tmp_path, "--model", str(tiny_ckpt), *TINY, "--rubric", rubric,
                   "--judge-url", "localhost:8000/v1", "--judge-name", "m")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(SystemExit, match=rf"--judge-url http://127.0.0.1:{port}/v1/chat/completions: no reply"):
        run_script(R, monkeypatch, tmp_path, "--model", str(tiny_ckpt), *TINY, "--rubric", rubric,
                   "--judge-url", f"http://127.0.0.1:{port}/v1", "--judge-name", "m", "--judge-retries", "1")
    assert not (tmp_path / "runs").exists()  # found before the run dir is touched
