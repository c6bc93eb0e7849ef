"""SEDD trained by the shared trainer on the Markov chain of test_mdlm_markov (entropy rate known
exactly): its bound on held-out blocks must stay above the chain's own NLL of the same tokens (up
to Monte-Carlo error) and come within 0.25 bits of it (absorbing graph) or 0.35 bits (uniform graph,
whose denoising task is harder: every token may be corrupted). Comparisons are paired per block."""
import numpy as np
import pytest
import torch

from test_mdlm_markov import chain_nll, fit, paired_bits, sequence_nll, write_chain


@pytest.mark.parametrize("graph, tolerance", [("absorbing", 0.25), ("uniform", 0.35)])
def test_sedd_bound_approaches_markov_entropy_rate(tmp_path, graph, tolerance):
    P, pi, h = write_chain(tmp_path / "chain.txt", 200_000)
    options = {"graph": graph} if graph == "absorbing" else {"graph": graph, "schedule": "geometric"}
    sedd, valid = fit("sedd", tmp_path / "chain.txt", tmp_path / "sedd", options)
    x = torch.tensor(np.asarray(valid.tokens, dtype=np.int64))  # (N, 64)
    truth = chain_nll(x.numpy(), P, pi)
    bound = sequence_nll(sedd, x, n_samples=128)
    gap, se = paired_bits(bound, truth, x.shape[1])
    print(f"entropy rate {h:.4f} bits; SEDD {graph} bound - truth = {gap:.4f} ± {se:.4f} bits/char")
    assert -3 * se < gap < tolerance, (gap, se)
