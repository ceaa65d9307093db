"""Every log-prob of a sampled token is taken at the temperature it was sampled at: the policy, the old policy and the
reference in reinforce, grpo, grape, ppo and trpo, and trpo's vocabulary log-probs (its KL and Fisher products)."""
import pytest
import torch

import grape
import grpo
import ppo
import reinforce
import trpo
from conftest import run_script
from model import GPT

FLAGS = ["--train-size", "16", "--eval-size", "2", "--batch-size", "2", "--group-size", "2", "--micro-batch-size", "4",
         "--max-new-tokens", "6", "--eval-every", "0", "--steps", "1", "--temperature", "0.7"]


@pytest.mark.parametrize("script", [reinforce, grpo, grape, ppo, trpo])
def test_every_fused_logprob_of_a_sampled_token_is_at_the_sampling_temperature(script, monkeypatch, tmp_path,
                                                                              tiny_ckpt):
    seen, real = [], GPT.forward

    def forward(self, idx, targets=None, mask=None, temperature=1.0, entropy=False):
        if targets is not None:
            seen.append(temperature)
        return real(self, idx, targets, mask=mask, temperature=temperature, entropy=entropy)

    monkeypatch.setattr(GPT, "forward", forward)
    if script is trpo:
        vocab, real_vocab = [], trpo.vocab_logprobs
        monkeypatch.setattr(trpo, "vocab_logprobs", lambda *a: vocab.append(a[-1]) or real_vocab(*a))
    extra = ["--mu", "2"] if script in (grpo, grape) else []
    run_script(script, monkeypatch, tmp_path, "--model", str(tiny_ckpt), *FLAGS, *extra)
    assert seen and set(seen) == {0.7}, seen
    if script is trpo:
        assert vocab and set(vocab) == {0.7}


def test_trpos_vocabulary_logprobs_are_the_fused_ones_at_the_same_temperature(tiny_llama):
    ids = torch.randint(0, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    for t in (0.7, 1.0, 1.5):
        fused = tiny_llama(ids[:, :-1], ids[:, 1:], mask=mask, temperature=t)[mask.bool()]
        full = trpo.vocab_logprobs(tiny_llama, ids[:, :-1], mask, torch.autocast("cpu", enabled=False), t)
        torch.testing.assert_close(full.gather(1, ids[:, 1:][mask.bool()][:, None]).squeeze(1), fused)
