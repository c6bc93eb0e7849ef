"""Text from a first-order Markov chain: a source whose entropy rate is known exactly, for tests
and benchmarks that check likelihoods and samples against the truth."""
from __future__ import annotations

import numpy as np


def chain_states(P: np.ndarray, pi: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) int64 states: the first from pi, then each from its row of the transition matrix P
    (one uniform per step, inverted through the row's cumulative sum)."""
    k = len(pi)
    cum = P.cumsum(1)
    states = np.empty(n, dtype=np.int64)
    states[0] = rng.choice(k, p=pi)
    u = rng.random(n)
    for i in range(1, n):
        states[i] = min(int(np.searchsorted(cum[states[i - 1]], u[i])), k - 1)
    return states
