"""MDLM trained by the shared trainer on a Markov chain whose entropy rate is known exactly.

The NELBO is an upper bound: on held-out text it must stay above the chain's own NLL of the same
tokens (up to Monte-Carlo error), come within 0.25 bits of it, and stay above the exact NLL of an
AR model trained on the same budget. Comparisons are paired per validation block, so only the
Monte-Carlo noise of the bound (128 time samples per block) counts against them. Protocol: the
methods' nll_bound on every validation block (L = 64, all tokens counted), bits per character.
"""
import math

import numpy as np
import torch

from ddlm.build import load_for_inference, prepare_data
from ddlm.config import make_config
from ddlm.data.markov import chain_states
from ddlm.train.loop import train

LETTERS = "abcde"  # char tokenizer ids 1..5


def write_chain(path, n_chars: int, seed: int = 0):
    """A first-order chain over 5 letters with Dirichlet(0.4) rows, written on one line.
    Returns (transition matrix P, stationary law pi, entropy rate in bits)."""
    rng = np.random.default_rng(seed)
    P = rng.dirichlet(np.full(len(LETTERS), 0.4), size=len(LETTERS))
    pi = np.linalg.matrix_power(P, 500)[0]
    states = chain_states(P, pi, n_chars, rng)
    path.write_text("".join(LETTERS[s] for s in states) + "\n")
    return P, pi, -float((pi[:, None] * P * np.log2(P)).sum())


def chain_nll(tokens: np.ndarray, P: np.ndarray, pi: np.ndarray) -> torch.Tensor:
    """(N,) the true chain's NLL in nats of each (L,) block, its first token drawn from pi."""
    x = tokens - 1
    return torch.from_numpy(-(np.log(pi[x[:, 0]]) + np.log(P[x[:, :-1], x[:, 1:]]).sum(1)))


def fit(method: str, corpus, out, options: dict | None = None):
    run = make_config(base={
        "method": method, method: options or {}, "data": {"corpus": str(corpus), "seq_len": 64},
        "model": {"dim": 64, "n_layers": 2, "n_heads": 2},
        "train": {"steps": 400, "batch_size": 32, "lr": 3e-3, "warmup_steps": 20, "eval_every": 0,
                  "ckpt_every": 0, "progress": False, "ema": 0.0, "dtype": "fp32", "threads": 2}})
    result = train(run, out, quiet=True)
    loaded = load_for_inference(result.out_dir)
    _, data = prepare_data(loaded.run, loaded.tokenizer)
    return loaded, data["valid"]


@torch.no_grad()
def sequence_nll(loaded, x: torch.Tensor, n_samples: int) -> torch.Tensor:
    """(N,) float64 nats per validation block: the method's nll_bound, batches of 64, seeded."""
    g = torch.Generator().manual_seed(1)
    return torch.cat([loaded.method.nll_bound(loaded.model, x[i:i + 64], n_samples=n_samples,
                                              generator=g).nll for i in range(0, len(x), 64)])


def paired_bits(a: torch.Tensor, b: torch.Tensor, length: int) -> tuple[float, float]:
    """Mean and standard error of (a - b) per token, in bits."""
    d = (a - b) / length / math.log(2)
    return d.mean().item(), d.std().item() / math.sqrt(len(d))


def test_mdlm_bound_approaches_markov_entropy_rate(tmp_path):
    P, pi, h = write_chain(tmp_path / "chain.txt", 200_000)
    mdlm, valid = fit("mdlm", tmp_path / "chain.txt", tmp_path / "mdlm")
    x = torch.tensor(np.asarray(valid.tokens, dtype=np.int64))  # (N, 64)
    truth = chain_nll(x.numpy(), P, pi)
    assert abs(truth.sum().item() / x.numel() / math.log(2) - h) < 0.05
    bound = sequence_nll(mdlm, x, n_samples=128)  # Monte-Carlo noise ~0.005 bits/token
    gap, se = paired_bits(bound, truth, x.shape[1])
    assert -3 * se < gap < 0.25, (gap, se)  # a bound: above the truth, and close to it
    ar, _ = fit("ar", tmp_path / "chain.txt", tmp_path / "ar")
    exact = sequence_nll(ar, x, n_samples=1)
    margin, se = paired_bits(bound, exact, x.shape[1])
    assert margin > 0, (margin, se)
