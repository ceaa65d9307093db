"""Scaling flags: --grad-checkpoint changes nothing but memory, --compile is CUDA only (one clear error here),
--track mirrors metrics.jsonl, and --fsdp under torchrun ends where plain data parallel ends, saves a Hugging Face
checkpoint and resumes."""
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import grpo  # noqa: E402
import ppo  # noqa: E402
import reinforce  # noqa: E402
import sft  # noqa: E402
import trpo  # noqa: E402
from conftest import run_script, torchrun_ended  # noqa: E402
from model import GPT, Tokenizer, read_safetensors, tiny_config  # noqa: E402

SFT = ["--train-size", "64", "--eval-size", "8", "--batch-size", "8", "--micro-batch-size", "4",
       "--max-new-tokens", "40", "--eval-every", "0", "--warmup-steps", "2"]
GRPO = ["--batch-size", "2", "--group-size", "3", "--micro-batch-size", "4", "--max-new-tokens", "12",
        "--eval-size", "4", "--train-size", "16", "--eval-every", "0", "--warmup-steps", "1"]
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_records(run_dir):  # a cut run also logs its final evaluation at the cut
    return [r for r in records(run_dir) if "train/lr" in r or "train/kl_step" in r]  # trpo has no lr


def assert_same_run(a, b, tol=1e-4):
    """The same losses and gradient norms at every step, and the same final weights (to float tolerance: Adam
    divides by sqrt(v), which amplifies summation-order noise in near-zero gradients)."""
    for ra, rb in zip(train_records(a), train_records(b), strict=True):
        for k in ("train/loss", "train/grad_norm", "train/reward", "train/entropy", "train/value_loss",
                  "train/surrogate_gain", "train/kl_step"):  # the entropy of the sampled tokens: the same samples
            if k in ra:
                # abs: metrics are logged to 6 decimals, and ppo's loss is a near-cancelling sum (~1e-3)
                assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-5), (k, ra["step"])
    wa, wb = read_safetensors(a / "model.safetensors"), read_safetensors(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=tol, rtol=tol)


@pytest.mark.parametrize("script", ["sft", "grpo", "trpo"])
def test_grad_checkpoint_changes_nothing_but_memory(monkeypatch, tmp_path, digits, script):
    """On `digits` the RL updates are not zero; trpo's Fisher-vector products are double backwards through the
    recomputed blocks (which must use the attention kernel of the first backward)."""
    rl = ["--model", str(digits[0]), "--task", "jsonl", "--data-path", str(digits[1]), *GRPO, "--max-new-tokens", "4"]
    module, flags = {"sft": (sft, SFT), "grpo": (grpo, rl), "trpo": (trpo, rl)}[script]
    for name, extra in (("plain", []), ("ckpt", ["--grad-checkpoint"])):
        run_script(module, monkeypatch, tmp_path, "--steps", "2", *flags, "--run-name", name, *extra)
    assert_same_run(tmp_path / "runs/plain", tmp_path / "runs/ckpt", tol=1e-6)


@pytest.mark.parametrize("script", ["sft", "reinforce", "grpo", "ppo", "trpo"])
def test_token_budget_changes_nothing_but_memory(monkeypatch, tmp_path, digits, script):
    """--micro-batch-tokens cuts a micro-batch into shorter ones of similar lengths with fewer columns: the same
    losses, gradients and weights as without it (every normaliser counts the whole batch)."""
    rl = ["--model", str(digits[0]), "--task", "jsonl", "--data-path", str(digits[1]), *GRPO, "--batch-size", "4",
          "--max-new-tokens", "4"]  # some samples right, some wrong: the updates are not zero
    module, flags = {"sft": (sft, SFT), "reinforce": (reinforce, rl), "grpo": (grpo, rl + ["--mu", "2"]),
                     "ppo": (ppo, rl + ["--mini-batches", "1"]), "trpo": (trpo, rl)}[script]
    real, cuts = module.micro_batches, []

    def spy(lengths, args):
        out = real(lengths, args)
        cuts.extend(cols for _, cols in out if cols != slice(None))
        return out
    monkeypatch.setattr(module, "micro_batches", spy)
    for name, budget in (("whole", "0"), ("cut", "24" if script != "sft" else "60")):
        run_script(module, monkeypatch, tmp_path, "--steps", "2", *flags, "--micro-batch-tokens", budget,
                   "--run-name", name)
        assert bool(cuts) == (name == "cut")  # the budget did cut micro-batches (and 0 never does)
    assert_same_run(tmp_path / "runs/whole", tmp_path / "runs/cut")


def test_micro_batches_cut_by_tokens():
    args = sft.Args(micro_batch_size=4, micro_batch_tokens=0)
    lengths = [5, 9, 3, 7, 2, 8]
    assert sft.micro_batches(lengths, args) == [([0, 1, 2, 3], slice(None)), ([4, 5], slice(None))]
    args.micro_batch_tokens = 36  # 4 x 9 = 36 fits; 2 x 8 = 16 fits: nothing is cut
    assert sft.micro_batches(lengths, args) == [([0, 1, 2, 3], slice(None)), ([4, 5], slice(None))]
    args.micro_batch_tokens = 16  # the first run is cut, longest first: [9], [7, 5] (2 x 7 = 14), [3]
    assert sft.micro_batches(lengths, args) == [([1], slice(0, 9)), ([3, 0], slice(0, 7)), ([2], slice(0, 3)),
                                                ([4, 5], slice(None))]
    args.micro_batch_tokens = 4  # a row longer than the budget is a micro-batch of its own
    out = sft.micro_batches(lengths, args)
    assert sorted(r for rows, _ in out for r in rows) == list(range(6)) and all(len(rows) == 1 or
                                                                                 len(rows) * lengths[rows[0]] <= 4
                                                                                 for rows, _ in out)


def test_compile_on_cpu_is_one_error_before_any_work(monkeypatch, tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"^error: --compile needs CUDA"):
        run_script(sft, monkeypatch, tmp_path, "--device", "cpu", "--compile", *SFT)
    assert not (tmp_path / "runs").exists()


def test_fsdp_needs_torchrun(monkeypatch, tmp_path):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(SystemExit, match=r"^error: --fsdp shards the model over the processes of torchrun"):
        run_script(sft, monkeypatch, tmp_path, "--fsdp", *SFT)
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_track_tensorboard_mirrors_metrics_jsonl(monkeypatch, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_script(sft, monkeypatch, tmp_path, "--steps", "2", *SFT, "--track", "tensorboard")
    run_dir = tmp_path / "runs/sft"
    assert list(run_dir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(run_dir)).Reload()
    logged = records(run_dir)
    assert set(events.Tags()["scalars"]) == {k for r in logged for k in r if k != "step"}
    for r in logged:
        for k, v in r.items():
            if k != "step":
                got = {e.step: e.value for e in events.Scalars(k)}
                assert got[r["step"]] == pytest.approx(v, rel=1e-5, abs=1e-6)


def test_track_without_the_package_is_one_error(monkeypatch, tmp_path):
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name: (_ for _ in ()).throw(ImportError(name))
                        if name == "wandb" else real(name))
    with pytest.raises(SystemExit, match=r"^error: --track wandb: the wandb package is not installed"):
        run_script(sft, monkeypatch, tmp_path, "--steps", "1", *SFT, "--track", "wandb")
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_track_wandb_offline_logs_the_same_names(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline by default: no network, no account
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_script(sft, monkeypatch, tmp_path, "--steps", "2", *SFT, "--track", "wandb")
    logs = list((tmp_path / "runs/sft/wandb").glob("offline-run-*/*.wandb"))
    assert len(logs) == 1  # wandb's own record of the run (uploaded later with `wandb sync`)
    names = {k for line in (tmp_path / "runs/sft/metrics.jsonl").read_text().splitlines() for k in json.loads(line)}
    data = logs[0].read_bytes()
    assert all(name.encode() in data for name in names - {"step"})  # every metric, under its own name


def launch(tmp_path, nproc, *argv):  # --standalone: torchrun picks a free port
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [TORCHRUN, f"--nproc_per_node={nproc}", "--standalone", *argv] if nproc else [sys.executable, *argv]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert torchrun_ended(r) if nproc else r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]


def test_sft_fsdp_equals_one_process_saves_and_resumes(tmp_path):
    base = [str(ROOT / "sft.py"), "--steps", "2", "--save-every", "1", *SFT]
    launch(tmp_path, 0, *base, "--run-name", "one")
    launch(tmp_path, 2, *base, "--run-name", "fsdp", "--fsdp")
    assert_same_run(tmp_path / "runs/one", tmp_path / "runs/fsdp")
    saved = GPT.from_pretrained(str(tmp_path / "runs/fsdp"))  # a plain Hugging Face checkpoint
    assert saved.lm_head.weight is saved.transformer.wte.weight  # tied, as it was
    if importlib.util.find_spec("transformers") is not None:  # and transformers reads it the same
        import transformers
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "runs/fsdp"))
        ids = torch.tensor([[1, 40, 41, 10, 72, 101, 32]])
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, saved(ids), atol=1e-4, rtol=1e-4)
    state = torch.load(tmp_path / "runs/fsdp/trainer_state.pt", weights_only=True)
    assert state["step"] == 2 and len(state["optimizer"]["state"]) == len(list(saved.parameters()))
    # cut after step 1 (under --fsdp), then resume under --fsdp: the same end as the uninterrupted run
    launch(tmp_path, 2, *base[:2], "1", *base[3:], "--run-name", "cut", "--fsdp")
    launch(tmp_path, 2, *base, "--run-name", "cut", "--fsdp", "--resume")
    assert_same_run(tmp_path / "runs/fsdp", tmp_path / "runs/cut")


def test_fsdp_with_packed_decode_weights_equals_one_process(tmp_path):
    """A 512-wide model: its Linear weights (2^18+ entries) are packed for generate's decode steps
    (model.packed_weights). Under --fsdp they are gathered whole first, then packed: the samples (their entropy,
    lengths) and the run equal one process's. β = 0 and a random model (reward 0): no update but weight decay."""
    torch.manual_seed(0)
    GPT(tiny_config(n_layer=1, n_embd=512, ffn_dim=1024)).save_pretrained(tmp_path / "wide", Tokenizer.byte_level())
    base = [str(ROOT / "grpo.py"), "--model", str(tmp_path / "wide"), "--steps", "2", *GRPO, "--batch-size", "4",
            "--max-new-tokens", "6", "--beta", "0"]
    launch(tmp_path, 0, *base, "--run-name", "one")
    launch(tmp_path, 2, *base, "--run-name", "fsdp", "--fsdp")
    assert_same_run(tmp_path / "runs/one", tmp_path / "runs/fsdp")
    a, b = (train_records(tmp_path / f"runs/{n}") for n in ("one", "fsdp"))
    assert [r["train/completion_len"] for r in a] == [r["train/completion_len"] for r in b]


@pytest.mark.parametrize("script,extra", [("grpo", ["--mu", "2"]), ("reinforce", []), ("grape", []),
                                          ("ppo", ["--mini-batches", "1"]), ("trpo", ["--mini-batches", "1"])])
def test_rl_fsdp_equals_one_process(tmp_path, digits, script, extra):
    """2 ranks with --fsdp (and --grad-checkpoint) end where one process ends: each completion is sampled with
    its own seed, whatever the rank that samples it (on `digits` some samples are right and some wrong, so the
    updates depend on which were drawn). grape's critic is the sharded reference (gathered while it judges);
    ppo and trpo shard the critic too. (Their mini-batches are drawn from each rank's own rows, so with more
    than one mini-batch the split, and so the run, depends on the number of ranks.)"""
    base = [str(ROOT / f"{script}.py"), "--model", str(digits[0]), "--task", "jsonl", "--data-path", str(digits[1]),
            "--steps", "2", *extra, *GRPO, "--batch-size", "4", "--max-new-tokens", "4"]
    launch(tmp_path, 0, *base, "--run-name", "one")
    launch(tmp_path, 2, *base, "--run-name", "fsdp", "--fsdp", "--grad-checkpoint")
    assert_same_run(tmp_path / "runs/one", tmp_path / "runs/fsdp")
    if script in ("ppo", "trpo"):  # the critic and its optimizer state, gathered whole into the checkpoint
        a, b = (torch.load(tmp_path / f"runs/{n}/trainer_state.pt", weights_only=True) for n in ("one", "fsdp"))
        assert a["critic"].keys() == b["critic"].keys()
        for k in a["critic"]:
            torch.testing.assert_close(a["critic"][k], b["critic"][k], atol=1e-4, rtol=1e-4)
        assert len(b["critic_optimizer"]["state"]) == len(a["critic_optimizer"]["state"]) > 0
    if script == "ppo":  # cut after step 1 and resumed, under --fsdp: the policy, the critic and both
        # optimizers come back, so the run ends where the uninterrupted one does
        flags = ["--run-name", "cut", "--fsdp", "--grad-checkpoint"]
        at = base.index("--steps") + 1
        launch(tmp_path, 2, *base[:at], "1", *base[at + 1:], *flags)
        launch(tmp_path, 2, *base, *flags, "--resume")
        assert_same_run(tmp_path / "runs/fsdp", tmp_path / "runs/cut")
