"""EDLM-NCE trained by the shared trainer on a Markov chain with near-forbidden transitions.

The chain (5 letters, char ids 1..5) lets each letter go to 2 of the 5 letters; the other 3
transitions have probability EPS = 1e-3 ("rare"). Its exact log-likelihood scores any sequence, so
samples can be judged against the truth. A small MDLM (dim 32, 2 layers, L = 32) is trained for
300 steps (on purpose not to convergence), then EDLM with an NCE energy from it for 600 steps, as
`ddlm train --method edlm --edlm.energy nce --init MDLM` does (data and model inherited through
`init_base`).

  a. the energy separates data from the denoiser's own draws: for held-out blocks x0 and
     x_t ~ q(x_t | x0) at several t, -E(x0) is above -E(x0^-), x0^- ~ p_theta(. | x_t), with a
     pairwise AUC (Mann-Whitney, ties count 1/2) above chance (0.5) by more than three standard
     errors (Hanley & McNeil 1982) at every t (over training seeds it ranges 0.6-0.9 at t = 0.3);
  b. EDLM's importance sampler (k = 8 proposals, window 1) draws samples with a higher true-chain
     log-likelihood per token and fewer rare transitions than MDLM's ancestral sampler with the same
     (frozen, bit-identical) denoiser and the same number of steps; means of a few hundred samples,
     compared with the standard error of their difference (the two samplers spend their random
     numbers in different orders, so the draws are compared as independent samples, not paired).

Nothing is hard-coded: every threshold is relative (AUC vs chance, EDLM vs MDLM vs noise).
"""
import math

import numpy as np
import pytest
import torch

from ddlm.build import init_base, load_for_inference, prepare_data
from ddlm.config import SampleConfig, make_config
from ddlm.data.markov import chain_states
from ddlm.methods.edlm import NCEEnergy, same_weights
from ddlm.sampling.base import gumbel_argmax
from ddlm.train.loop import train

LETTERS = "abcde"  # char tokenizer ids 1..5
EPS = 1e-3  # probability of each rare transition
SEQ_LEN = 32
TRAIN = {"batch_size": 32, "lr": 3e-3, "warmup_steps": 20, "eval_every": 0, "ckpt_every": 0,
         "progress": False, "ema": 0.0, "dtype": "fp32", "threads": 2, "seed": 0}


def write_sparse_chain(path, n_chars: int, seed: int = 0, allowed: int = 2):
    """A first-order chain over LETTERS in which each letter goes to `allowed` letters (Dirichlet(2)
    weights) and to each of the others with probability EPS, written on one line.
    Returns (transition matrix P, stationary law pi)."""
    rng = np.random.default_rng(seed)
    n = len(LETTERS)
    P = np.full((n, n), EPS)
    for a in range(n):
        nxt = rng.choice(n, size=allowed, replace=False)
        P[a, nxt] = rng.dirichlet(np.full(allowed, 2.0)) * (1 - EPS * (n - allowed))
    pi = np.linalg.matrix_power(P, 500)[0]
    states = chain_states(P, pi, n_chars, rng)
    path.write_text("".join(LETTERS[s] for s in states) + "\n")
    return P, pi


def chain_scores(tokens: torch.Tensor, P: np.ndarray, pi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per (L,) row: the true chain's log-likelihood per token (nats; first token from pi), and the
    fraction of its L - 1 transitions that are rare (P = EPS). A token outside the chain's letters
    (the model may draw any char id) scores as a rare event: log EPS, and a rare transition."""
    x = tokens.numpy() - 1
    ok = (x >= 0) & (x < len(LETTERS))
    xc = np.clip(x, 0, len(LETTERS) - 1)
    step = np.log(P[xc[:, :-1], xc[:, 1:]])
    step = np.where(ok[:, :-1] & ok[:, 1:], step, math.log(EPS))
    first = np.where(ok[:, 0], np.log(pi[xc[:, 0]]), math.log(EPS))
    rare = (step <= math.log(EPS) + 1e-9).mean(1)
    return (first + step.sum(1)) / x.shape[1], rare


def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(pos > neg) + P(pos = neg) / 2 over all pairs (Mann-Whitney)."""
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean()).item()


def auc_se(value: float, n_pos: int, n_neg: int) -> float:
    """The standard error of an AUC (Hanley & McNeil 1982, eq. 2)."""
    q1, q2 = value / (2 - value), 2 * value ** 2 / (1 + value)
    var = (value * (1 - value) + (n_pos - 1) * (q1 - value ** 2) + (n_neg - 1) * (q2 - value ** 2))
    return math.sqrt(var / (n_pos * n_neg))


def diff_and_se(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """mean(a) - mean(b) and its standard error (independent samples)."""
    return a.mean() - b.mean(), math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))


@pytest.fixture(scope="module")
def chain_runs(tmp_path_factory):
    """(P, pi, MDLM loaded, EDLM-NCE loaded, held-out blocks (N, L))."""
    tmp = tmp_path_factory.mktemp("edlm_nce")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDLM_CACHE", str(tmp / "cache"))
        P, pi = write_sparse_chain(tmp / "chain.txt", 50_000)
        mdlm_run = make_config(base={
            "method": "mdlm", "data": {"corpus": str(tmp / "chain.txt"), "seq_len": SEQ_LEN},
            "model": {"dim": 32, "n_layers": 2, "n_heads": 2}, "train": {**TRAIN, "steps": 300}})
        mdlm = train(mdlm_run, tmp / "mdlm", quiet=True)
        # what `ddlm train --method edlm --edlm.energy nce --init MDLM` builds: data and model
        # inherited from the MDLM run, a frozen denoiser, an energy initialised from its weights
        edlm_run = make_config(base=init_base(mdlm.checkpoint, "edlm"), overrides={
            "edlm.energy": "nce", "train.init": str(mdlm.checkpoint),
            **{f"train.{k}": str(v) for k, v in TRAIN.items()}, "train.steps": "600"})
        nce = train(edlm_run, tmp / "nce", quiet=True)
        M, N = load_for_inference(mdlm.out_dir), load_for_inference(nce.out_dir)
        _, data = prepare_data(N.run, N.tokenizer)
    valid = torch.tensor(np.asarray(data["valid"].tokens, dtype=np.int64))[:128]
    assert valid.shape[1] == SEQ_LEN and len(valid) >= 64
    return P, pi, M, N, valid


def test_nce_run_inherits_and_freezes_the_mdlm_denoiser(chain_runs):
    _, _, M, N, _ = chain_runs
    assert N.run.method == "edlm" and N.run.model == M.run.model and N.run.data == M.run.data
    assert isinstance(N.model.energy, NCEEnergy)
    # NCE training never touched the denoiser: it is the MDLM checkpoint's, bit for bit
    assert same_weights(N.model.denoiser.state_dict(), M.model.state_dict())
    # ... and the energy moved away from its (zero-score) start
    assert N.model.energy.score.weight.abs().sum() > 0


@torch.no_grad()
def test_energy_ranks_data_above_denoiser_samples(chain_runs):
    _, _, _, N, valid = chain_runs
    method, model = N.method, N.model
    x0 = valid.repeat(4, 1)  # four corruptions of each held-out block
    g = torch.Generator().manual_seed(0)
    for t_value in (0.3, 0.6, 0.9):
        t = torch.full((len(x0),), t_value, dtype=torch.float64)
        zt = method.corrupt(x0, t[:, None], g)
        logp = method.log_x_theta(model, zt, t[:, None], dtype=torch.float64)
        negatives = gumbel_argmax(logp, g)  # x0^- ~ p_theta(. | x_t), unmasked positions kept
        assert torch.equal(negatives[zt != method.mask_id], x0[zt != method.mask_id])
        e_pos = method.energy(model, x0, zt, t)
        e_neg = method.energy(model, negatives, zt, t)
        score = auc(-e_pos, -e_neg)
        se = auc_se(score, len(e_pos), len(e_neg))
        assert score - 0.5 > 3 * se, (t_value, score, se)


@torch.no_grad()
def test_importance_samples_beat_mdlm_on_the_true_chain(chain_runs):
    P, pi, M, N, valid = chain_runs
    n, steps, k = 256, 8, 8
    N.method.cfg.k, N.method.cfg.window = k, 1.0
    mdlm_sampler = M.method.sampler(SampleConfig(steps=steps))
    edlm_sampler = N.method.sampler(SampleConfig(steps=steps))
    assert type(edlm_sampler).__name__ == "ImportanceSampler" and edlm_sampler.k == k
    plain = mdlm_sampler.generate(M.model, n, SEQ_LEN, generator=torch.Generator().manual_seed(0))
    edlm = edlm_sampler.generate(N.model, n, SEQ_LEN, generator=torch.Generator().manual_seed(0))
    assert edlm.nfe > plain.nfe  # energy passes are counted
    ll_plain, rare_plain = chain_scores(plain.tokens, P, pi)
    ll_edlm, rare_edlm = chain_scores(edlm.tokens, P, pi)
    ll_data, rare_data = chain_scores(valid, P, pi)
    # the undertrained MDLM with 8 parallel steps is visibly off the chain (the premise)
    gap, se = diff_and_se(ll_data, ll_plain)
    assert gap > 3 * se, (gap, se)
    # EDLM's samples are more likely under the true chain ...
    gain, se = diff_and_se(ll_edlm, ll_plain)
    assert gain > 3 * se, (ll_edlm.mean(), ll_plain.mean(), se)
    # ... and break the chain's near-forbidden transitions less often
    fewer, se = diff_and_se(rare_plain, rare_edlm)
    assert fewer > 3 * se, (rare_edlm.mean(), rare_plain.mean(), rare_data.mean(), se)
