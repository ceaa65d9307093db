"""Nothing lost: bad flags and inputs end in one clear message before the run dir is touched, a non-finite step never
reaches a checkpoint, a run dir serves one run at a time, a checkpoint is a whole set, and --resume checks its flags."""
import fcntl
import gzip
import http.server
import json
import re
import threading

import pytest
import torch

import dpo
import grape
import grpo
import ppo
import reinforce
import rejection_sampling
import sft
import trpo
from conftest import run_script
from model import read_safetensors

SMALL = ["--train-size", "32", "--eval-size", "4", "--batch-size", "4", "--micro-batch-size", "4",
         "--max-new-tokens", "8", "--eval-every", "0", "--warmup-steps", "1"]
RL = ["--train-size", "16", "--eval-size", "2", "--batch-size", "2", "--group-size", "2", "--micro-batch-size", "4",
      "--max-new-tokens", "6", "--eval-every", "0", "--steps", "1"]


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- bad flags


@pytest.mark.parametrize("script, flags", [
    (sft, ["--save-every", "0"]), (sft, ["--micro-batch-size", "0"]), (sft, ["--batch-size", "0"]),
    (sft, ["--batch-size", "-4"]), (sft, ["--lr", "-1"]), (sft, ["--lr", "nan"]), (sft, ["--max-new-tokens", "0"]),
    (sft, ["--grad-clip", "-1"]), (sft, ["--steps", "0"]), (sft, ["--eval-every", "-1"]), (sft, ["--seed", "-1"]),
    (sft, ["--save-every", "-5"]), (sft, ["--eval-size", "0"]), (sft, ["--train-size", "0"]),
    (sft, ["--device", "tpu"]), (sft, ["--task", "nope"]), (reinforce, ["--baseline", "mean"]),
    (grpo, ["--top-p", "0"]), (grpo, ["--temperature", "0"]), (grpo, ["--temperature", "-1"]), (grpo, ["--beta", "-1"]),
    (ppo, ["--gamma", "1.5"]), (ppo, ["--lam", "-0.1"]), (ppo, ["--epochs", "0"]), (trpo, ["--max-kl", "-1"]),
    (grape, ["--judge-retries", "0"]), (dpo, ["--loss", "kto"]),
])
def test_a_bad_flag_stops_before_anything_is_written(script, flags, monkeypatch, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_script(script, monkeypatch, tmp_path, "--model", "tiny", *flags)
    assert e.value.code == 2 and not (tmp_path / "runs").exists()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"{script.__name__}.py: error: argument --" if "invalid choice" in err else
                          f"{script.__name__}.py: error: --") and flags[0] in err, err


def test_device_cuda_without_a_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cuda: no CUDA device is available"):
        run_script(sft, monkeypatch, tmp_path, "--device", "cuda", *SMALL)


@pytest.mark.parametrize("script, flags, message", [
    (sft, ["--batch-size", "6", "--micro-batch-size", "4"], "--batch-size 6 must split into 1 ranks x whole"),
    (rejection_sampling, ["--batch-size", "6", "--micro-batch-size", "4"], "--batch-size 6 must split"),
    (dpo, ["--temperature", "0"], "--temperature 0: a prompt's k samples would all be the same"),
    (ppo, ["--mini-batches", "99"], "--mini-batches 99 must be between 1 and"),
])
def test_a_bad_combination_stops_before_the_model_loads(script, flags, message, monkeypatch, tmp_path):
    """Checked right after the command line, before the (here missing) checkpoint is read or anything written."""
    with pytest.raises(SystemExit, match=re.escape(message)):
        run_script(script, monkeypatch, tmp_path, "--model", str(tmp_path / "missing"), *flags)
    assert not (tmp_path / "runs").exists()


def test_k1_in_the_loss_is_refused(monkeypatch, tmp_path, tiny_ckpt):
    with pytest.raises(SystemExit, match="k1 penalty's expected gradient is zero"):
        run_script(grpo, monkeypatch, tmp_path, "--model", str(tiny_ckpt), *RL, "--kl-estimator", "k1")


def test_help_shows_no_empty_defaults(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["grpo.py", "--help"])
    with pytest.raises(SystemExit):
        grpo.parse_args()
    out = capsys.readouterr().out
    assert "(default: )" not in out and "(default: 0.04)" in out and "{group,batch,none}" in out


# ---------------------------------------------------------------------------------------------- bad data


def test_bad_data_files_are_one_line_each(tmp_path):
    read = lambda p: sft.read_jsonl(p, ["prompt", "completion"])
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9", "completion": "1"}\n'.encode("latin-1"))
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    (tmp_path / "dir.jsonl").mkdir()
    for name, message in [("empty.jsonl", "no records"), ("blank.jsonl", "no records"),
                          ("latin1.jsonl", "not UTF-8 text"), ("bad.jsonl.gz", "cannot read it"),
                          ("dir.jsonl", "a directory, not a data file")]:
        with pytest.raises(SystemExit, match=f"error: .*{name}: {message}"):
            read(tmp_path / name)
    rows = [{"prompt": f"p{i}", "completion": "#### 1"} for i in range(3)]
    (tmp_path / "few.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match=r"few\.jsonl: 3 records, and --eval-size 3 holds out the last 3: nothing"):
        sft.load_task(sft.Args(task="jsonl", data_path=str(tmp_path / "few.jsonl"), eval_size=3))


def test_gsm8k_record_without_an_answer_line_is_named(tmp_path):
    rows = [{"question": "q", "answer": "#### 4"}, {"question": "q2", "answer": "no final line"}]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match=r"train\.jsonl:2: the answer has no final '#### <number>' line"):
        sft.load_task(sft.Args(task="gsm8k", data_path=str(tmp_path)))


def test_error_locations_are_file_lines(tmp_path):
    from model import Tokenizer
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"prompt": "x" * n, "completion": "1"}) + "\n"
                                              for n in (1, 2, 200)))
    rows = sft.read_jsonl(tmp_path / "d.jsonl", ["prompt", "completion"])
    with pytest.raises(SystemExit, match=r"d\.jsonl:3: prompt of .* exceeds the model's context of 64"):
        sft.tokenize(rows, Tokenizer.byte_level(), 64, 8, "train")


class Server:
    """A local HTTP server (127.0.0.1, a thread) answering each path from a dict: (status, content type, body)."""

    def __init__(self, routes):
        routes_ = routes

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                status, kind, body = routes_.get(self.path, (404, "text/plain", b"not found"))
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_data_urls_cache_by_the_whole_url_and_keep_only_good_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    line = lambda p: (json.dumps({"prompt": p, "completion": "#### 1"}) + "\n").encode()
    server = Server({"/data_good.jsonl": (200, "application/json", line("a")),
                     "/data/good.jsonl": (200, "application/json", line("b")),
                     "/page.jsonl": (200, "text/html; charset=utf-8", b"<html>login</html>")})
    try:
        a = sft.read_jsonl(f"{server.url}/data_good.jsonl", ["prompt"])
        b = sft.read_jsonl(f"{server.url}/data/good.jsonl", ["prompt"])
        assert (a[0]["prompt"], b[0]["prompt"]) == ("a", "b")  # two URLs, two cache files
        with pytest.raises(SystemExit, match=r"page\.jsonl: download failed \(the server sent an HTML page"):
            sft.read_jsonl(f"{server.url}/page.jsonl", ["prompt"])
        with pytest.raises(SystemExit, match=r"missing\.jsonl: download failed \(HTTP Error 404"):
            sft.read_jsonl(f"{server.url}/missing.jsonl", ["prompt"])
        cached = sorted(p.name for p in (tmp_path / ".cache" / "post-training").iterdir())
        assert len(cached) == 2 and all(p.endswith("good.jsonl") for p in cached)  # no HTML page, no part file
    finally:
        server.close()
    with pytest.raises(SystemExit, match=r"download failed \(.*(refused|Errno)"):
        sft.read_jsonl(f"{server.url}/gone.jsonl", ["prompt"])


def test_dpo_warns_about_pairs_without_a_preference(monkeypatch, tmp_path, tiny_ckpt, capsys):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "a" if i == 2 else "b"} for i in range(8)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_script(dpo, monkeypatch, tmp_path, "--model", str(tiny_ckpt), "--task", "jsonl", "--data-path",
               str(tmp_path / "pairs.jsonl"), "--eval-size", "2", "--steps", "1", "--batch-size", "2",
               "--micro-batch-size", "2")
    assert "1 pairs have the same chosen and rejected text (no preference; first: " in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- the run dir


def test_a_failed_start_keeps_the_runs_logs(monkeypatch, tmp_path):
    run_script(sft, monkeypatch, tmp_path, *SMALL, "--steps", "1", "--run-name", "x")
    run = tmp_path / "runs" / "x"
    before = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "args.json")}
    with pytest.raises(SystemExit, match="typo.jsonl: no such data file"):
        run_script(sft, monkeypatch, tmp_path, *SMALL, "--run-name", "x", "--task", "jsonl",
                   "--data-path", "typo.jsonl")
    with pytest.raises(SystemExit):
        run_script(grpo, monkeypatch, tmp_path, *RL, "--model", "tiny", "--run-name", "x", "--kl-estimator", "k9")
    assert before == {name: (run / name).read_bytes() for name in before}


def test_one_run_at_a_time_and_a_dead_runs_lock_does_not_stick(monkeypatch, tmp_path):
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    with open(run / ".lock", "a+") as held:  # another live run holds the lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        with pytest.raises(SystemExit, match=r"runs/x is in use by another run \(process 4242\)"):
            run_script(sft, monkeypatch, tmp_path, *SMALL, "--steps", "1", "--run-name", "x")
        assert not (run / "metrics.jsonl").exists()
    # the lock file stays behind as a dead process leaves it: no lock is held, so the next run goes ahead
    run_script(sft, monkeypatch, tmp_path, *SMALL, "--steps", "1", "--run-name", "x")
    assert [m["step"] for m in metrics(run)] == [0, 1, 1]


def test_non_finite_weights_never_reach_a_checkpoint(monkeypatch, tmp_path):
    real_step = torch.optim.AdamW.step

    def poisoning_step(self, *a, **k):  # the loss is finite, the new weights are not (from step 3 on)
        out = real_step(self, *a, **k)
        if self.state[self.param_groups[0]["params"][0]]["step"] >= 3:
            self.param_groups[0]["params"][0].data[0, 0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    with pytest.raises(SystemExit, match=r"step 3: the sum of the weights' magnitudes is nan; stopping without "
                                         r"saving \(the last checkpoint in runs/nan, of step 2, is intact\)"):
        run_script(sft, monkeypatch, tmp_path, *SMALL, "--steps", "5", "--save-every", "1", "--run-name", "nan")
    weights = read_safetensors(tmp_path / "runs/nan/model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    with pytest.raises(SystemExit, match=r"no checkpoint in runs/nan2\)"):
        run_script(sft, monkeypatch, tmp_path, *SMALL, "--steps", "5", "--save-every", "4", "--run-name", "nan2")


def test_a_huge_learning_rate_stops_with_finite_weights_on_disk(monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match="stopping without saving"):
        run_script(sft, monkeypatch, tmp_path, *SMALL, "--lr", "1e6", "--steps", "20", "--save-every", "1",
                   "--run-name", "big")
    ckpt = tmp_path / "runs/big/model.safetensors"
    assert not ckpt.exists() or all(torch.isfinite(t).all() for t in read_safetensors(ckpt).values())


def test_mixed_checkpoint_set_and_bad_state_are_refused_on_resume(monkeypatch, tmp_path):
    run = tmp_path / "runs" / "x"
    run_script(sft, monkeypatch, tmp_path, *SMALL, "--steps", "1", "--run-name", "x")
    old_weights = (run / "model.safetensors").read_bytes()
    run_script(sft, monkeypatch, tmp_path, *SMALL, "--steps", "2", "--run-name", "x", "--resume")
    good = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(old_weights)  # as if killed between the renames of the next save
    with pytest.raises(SystemExit, match="the weights and trainer_state.pt come from different saves"):
        run_script(sft, monkeypatch, tmp_path, *SMALL, "--steps", "3", "--run-name", "x", "--resume")
    (run / "model.safetensors").write_bytes(good)
    state = (run / "trainer_state.pt").read_bytes()
    (run / "trainer_state.pt").write_bytes(state[:len(state) // 2])
    with pytest.raises(SystemExit, match=r"--resume: the checkpoint in runs/x is incomplete or corrupt"):
        run_script(sft, monkeypatch, tmp_path, *SMALL, "--steps", "3", "--run-name", "x", "--resume")


def test_orphaned_temp_files_are_removed_and_a_partial_metrics_line_dropped(monkeypatch, tmp_path, capsys):
    run = tmp_path / "runs" / "x"
    run_script(sft, monkeypatch, tmp_path, *SMALL, "--steps", "1", "--run-name", "x")
    (run / ".model.safetensors.tmp999999").write_bytes(b"x" * 1000)  # a save killed mid-write
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 1, "train/lo')  # and a log line cut short
    run_script(sft, monkeypatch, tmp_path, *SMALL, "--steps", "2", "--run-name", "x", "--resume")
    assert not list(run.glob(".*.tmp*"))
    assert "dropped a line that is not a whole record" in capsys.readouterr().out
    assert [m["step"] for m in metrics(run)] == [0, 1, 1, 2, 2]  # the final evaluation is logged at the last step


def test_resume_checks_the_runs_flags(monkeypatch, tmp_path, tiny_ckpt, capsys):
    run_script(sft, monkeypatch, tmp_path, *SMALL, "--steps", "1", "--run-name", "x")
    with pytest.raises(SystemExit, match=r"--resume: runs/x was run with other flags: --lr 0\.003 \(now 0\.01\)"):
        run_script(sft, monkeypatch, tmp_path, *SMALL, "--steps", "2", "--run-name", "x", "--resume", "--lr", "0.01")
    with pytest.raises(SystemExit, match=r"other flags: .*--model 'tiny' \(now '.*tiny'\)"):
        run_script(sft, monkeypatch, tmp_path, *SMALL, "--steps", "2", "--run-name", "x", "--resume",
                   "--model", str(tiny_ckpt))
    with pytest.raises(SystemExit, match=r"--script 'sft\.py' \(now 'grpo\.py'\)"):
        run_script(grpo, monkeypatch, tmp_path, *RL[:-2], "--model", "tiny", "--steps", "2", "--run-name", "x",
                   "--resume")
    with pytest.raises(SystemExit, match="runs/x is at step 1: ask for more --steps"):
        run_script(sft, monkeypatch, tmp_path, *SMALL, "--steps", "1", "--run-name", "x", "--resume")
    run_script(sft, monkeypatch, tmp_path, *SMALL, "--steps", "2", "--run-name", "x", "--resume", "--eval-every", "5")
    assert "with --eval-every 0 -> 5" in capsys.readouterr().out


def test_rl_from_tiny_gets_the_same_reference_as_its_policy(monkeypatch, tmp_path):
    models = []
    real = reinforce.load_model
    monkeypatch.setattr(reinforce, "load_model", lambda *a: models.append(real(*a)[0]) or (models[-1], real(*a)[1]))
    run_script(reinforce, monkeypatch, tmp_path, *RL, "--model", "tiny", "--steps", "1")
    fresh = real("tiny", "cpu", 0)[0].state_dict()  # the policy's starting weights
    assert all(torch.equal(a, fresh[k]) for k, a in models[1].state_dict().items())  # the reference


def test_ema_baseline_starts_from_the_mean_over_every_rank(monkeypatch, tmp_path, tiny_ckpt):
    seen = []
    real = reinforce.advantages
    monkeypatch.setattr(reinforce, "advantages", lambda r, kind, ema: seen.append(ema) or real(r, kind, ema))
    sums = []
    real_sum = reinforce.all_sum

    def two_ranks(*values):  # as if a second rank had rewards summing to 3 more: every sum counts both ranks
        out = real_sum(*values)
        if len(values) == 1 and not sums:
            sums.append(out[0])
            return [out[0] + 3.0]
        return out

    monkeypatch.setattr(reinforce, "all_sum", two_ranks)
    run_script(reinforce, monkeypatch, tmp_path, *RL, "--model", str(tiny_ckpt), "--baseline", "ema", "--beta", "0")
    ema = seen[0]
    assert ema is not None and ema == pytest.approx((sums[0] + 3.0) / 4)  # 2 prompts x 2 completions in all


def test_gzip_data(tmp_path):
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    assert sft.read_jsonl(tmp_path / "d.jsonl.gz", ["prompt", "completion"])[0]["where"].endswith("d.jsonl.gz:1")


def test_an_unwritable_run_dir_is_found_before_training(monkeypatch, tmp_path):
    (tmp_path / "runs").write_text("a file where the runs folder should be")  # (as root, chmod would not stop us)
    with pytest.raises(SystemExit, match=r"error: cannot write to runs/x \(File exists|Not a directory"):
        run_script(sft, monkeypatch, tmp_path, *SMALL, "--steps", "1", "--run-name", "x")
