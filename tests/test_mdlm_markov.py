"""MDLM trained by the shared trainer on a Markov chain whose entropy rate is known exactly.

The NELBO is an upper bound: on held-out text it must stay above the chain's own NLL of the same
tokens (up to Monte-Carlo error), come within 0.25 bits of it, and (a bound of a bidirectional
model trained on the same budget) not beat the exact AR likelihood.
"""
import numpy as np
import pytest

from ddlm.build import load_for_inference, prepare_data
from ddlm.config import make_config
from ddlm.eval.likelihood import evaluate_likelihood
from ddlm.train.loop import train

LETTERS = "abcde"  # char tokenizer ids 1..5


def write_chain(path, n_chars: int, seed: int = 0):
    """A first-order chain over 5 letters with Dirichlet(0.4) rows, written on one line.
    Returns (transition matrix P, stationary law pi, entropy rate in bits)."""
    rng = np.random.default_rng(seed)
    P = rng.dirichlet(np.full(len(LETTERS), 0.4), size=len(LETTERS))
    pi = np.linalg.matrix_power(P, 500)[0]
    cum = P.cumsum(1)
    states = np.empty(n_chars, dtype=np.int64)
    states[0] = rng.choice(len(LETTERS), p=pi)
    u = rng.random(n_chars)
    for i in range(1, n_chars):
        states[i] = min(int(np.searchsorted(cum[states[i - 1]], u[i])), len(LETTERS) - 1)
    path.write_text("".join(LETTERS[s] for s in states) + "\n")
    return P, pi, -float((pi[:, None] * P * np.log2(P)).sum())


def chain_bits(tokens: np.ndarray, P: np.ndarray, pi: np.ndarray) -> float:
    """The true chain's NLL per token (bits) of (N, L) blocks, each block's first token from pi."""
    x = tokens - 1
    return -(np.log2(pi[x[:, 0]]).sum() + np.log2(P[x[:, :-1], x[:, 1:]]).sum()) / x.size


def fit(method: str, corpus, out, **options):
    run = make_config(base={
        "method": method, "data": {"corpus": str(corpus), "seq_len": 64},
        "model": {"dim": 64, "n_layers": 2, "n_heads": 2},
        "train": {"steps": 400, "batch_size": 32, "lr": 3e-3, "warmup_steps": 20, "eval_every": 0,
                  "ckpt_every": 0, "progress": False, "ema": 0.0, "dtype": "fp32", "threads": 2},
        **({method: options} if options else {})})
    result = train(run, out, quiet=True)
    loaded = load_for_inference(result.out_dir)
    _, data = prepare_data(loaded.run, loaded.tokenizer)
    return loaded, data["valid"]


@pytest.mark.slow
def test_mdlm_bound_approaches_markov_entropy_rate(tmp_path):
    P, pi, h = write_chain(tmp_path / "chain.txt", 200_000)
    mdlm, valid = fit("mdlm", tmp_path / "chain.txt", tmp_path / "mdlm")
    bound = evaluate_likelihood(mdlm.method, mdlm.model, valid, batch_size=64, n_samples=8, seed=1)
    truth = chain_bits(np.asarray(valid.tokens, dtype=np.int64), P, pi)
    assert abs(truth - h) < 0.05
    assert bound.bpc > truth - 3 * bound.bpc_stderr, (bound.bpc, truth)
    assert bound.bpc < truth + 0.25, (bound.bpc, truth)
    ar, _ = fit("ar", tmp_path / "chain.txt", tmp_path / "ar")
    exact = evaluate_likelihood(ar.method, ar.model, valid, batch_size=64)
    assert bound.bpc > exact.bpc, (bound.bpc, exact.bpc)
