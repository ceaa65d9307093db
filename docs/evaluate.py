"""Score saved checkpoints on a fresh held-out set, greedy, with the scripts' own evaluation (sft.py's evaluate()).

    python docs/evaluate.py runs/smollm2-sft runs/smollm2-grpo --eval-size 1000 --seed 1

--seed 1 draws the arith problems from another stream than the runs' (seed 0), so none of them was scored during
training or chose anything; the 200 problems of a run's own evaluation have a standard error of about 3.4 points,
1000 fresh ones about 1.5.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sft  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="checkpoint directories (or anything sft.py's --model takes)")
    p.add_argument("--task", default="arith", choices=["arith", "gsm8k"])
    p.add_argument("--eval-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    device = torch.device(a.device)
    for run in a.runs:
        t0 = time.time()
        args = sft.Args(model=run, task=a.task, eval_size=a.eval_size, train_size=1, max_new_tokens=a.max_new_tokens,
                        seed=a.seed)
        model, tok = sft.load_model(run, device, a.seed)
        evals = sft.load_task(args)[1]
        sft.tokenize(evals, tok, model.config.max_seq_len, a.max_new_tokens, "eval")
        metrics = sft.evaluate(model.eval(), tok, evals, args, sft.autocast(device))
        print(f"{run}: " + " | ".join(f"{k} {v:.3f}" for k, v in metrics.items()) + f" | {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
