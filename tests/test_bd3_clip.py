"""BD3-LM's clipped window under `bd3.clip_mode` (ddlm/methods/bd3.py): time (the paper: each
block's t in the window) against mask (the public code's resampling: also each block's realised
masked fraction k/L' in the window, the mask drawn from q conditioned on that).

  fractions   under mask every block the loss scores has k/L' in the window; under time, with
              L' = 4, blocks with 0, 1 or 4 masked tokens turn up (the two objectives differ)
  law         at a fixed t the counts follow Binom(L', 1 - alpha_t) conditioned on the window and,
              given the count, the masked positions are uniform (chi-square against the exact law)
  objective   at a fixed t the mean training loss is sum_{z in A} q(z) loss(z) / P_t(A), the
              clipped_nll docstring's formula, by enumerating the 16 masks of one 4-token block
  search      the pooled, importance-weighted window variances equal each window's variance under
              the mask law (closed form by quadrature), not the unweighted or the time-mode one
  unchanged   the full window, evaluation and the time mode draw exactly what they drew before
  runs        the mode is saved in config.json, restored on resume (same losses), and searched
"""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from conftest import gauss_legendre, tiny_built, tiny_transformer

from ddlm.checkpoint import load_trainer_state
from ddlm.config import make_config
from ddlm.errors import ConfigError
from ddlm.methods.bd3 import BD3, BD3Config, allowed_counts, binomial_log_pmf
from ddlm.methods.noise import time_per_position
from ddlm.train.loop import Trainer, train

VOCAB, MASK_ID, EOS = 11, 10, 9


def bd3(block_size: int, context: int, **kw) -> BD3:
    return BD3(BD3Config(block_size=block_size, **kw), vocab_size=VOCAB, mask_id=MASK_ID, bos_id=EOS,
               pad_id=0, context=context)


def symbols(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 9, (n, length), generator=torch.Generator().manual_seed(seed))


def scored_masks(method: BD3, model, x0: torch.Tensor, seed: int) -> torch.Tensor:
    """(B, K) masked counts of the z_t that `method.loss` scored (a spy on token_loss)."""
    seen = []
    real = method.token_loss

    def spy(model, x0, zt, t, **kw):
        seen.append(zt)
        return real(model, x0, zt, t, **kw)

    method.token_loss = spy
    method.loss(model, x0, generator=torch.Generator().manual_seed(seed))
    (zt,) = seen
    return (zt == MASK_ID).view(x0.shape[0], -1, method.block_size).sum(-1)


@pytest.mark.parametrize("block_size, window", [(4, (0.45, 0.95)), (16, (0.3, 0.8))])
def test_mask_mode_keeps_every_block_fraction_in_the_window_time_mode_does_not(block_size, window):
    """The windows the paper's search found for LM1B (L' = 4: U[.45, .95]; L' = 16: U[.3, .8])."""
    lo, hi = window
    x0 = symbols(64, 64, seed=0)
    model = tiny_transformer(vocab=VOCAB, max_len=64, seed=0)
    frac = scored_masks(bd3(block_size, 64, clip_min=lo, clip_max=hi, clip_mode="mask"), model, x0, 1) / block_size
    assert ((frac >= lo) & (frac <= hi)).all()
    assert len(frac.unique()) >= (2 if block_size == 4 else 6)  # k = 2 and 3 for L' = 4
    frac = scored_masks(bd3(block_size, 64, clip_min=lo, clip_max=hi), model, x0, 1) / block_size
    outside = (frac < lo) | (frac > hi)
    if block_size == 4:  # t in [.45, .95] still gives k = 0, 1 or 4 in about 42% of the blocks
        assert outside.float().mean() > 0.25 and {0.0, 0.25, 1.0} <= set(frac.unique().tolist())
    else:
        assert outside.any()


def chi_square(observed: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((observed - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("t", [0.5, 0.9])
def test_mask_mode_draws_the_binomial_conditioned_on_the_window(t):
    """At a fixed t, 40,000 blocks of 4: the counts follow Binom(4, (1 - eps) t) restricted to A =
    {2, 3} (window [.45, .95]) and, for each count, the masked subsets are uniform. Chi-square
    bounds at the 1e-4 level (1 degree of freedom: 15.1; 5: 25.7)."""
    method = bd3(4, 64, clip_min=0.45, clip_max=0.95, clip_mode="mask")
    B, L = 2500, 64
    x0 = symbols(B, L, seed=2)
    zt = method.window_corrupt(x0, torch.full((B, 1), t, dtype=torch.float64),
                               generator=torch.Generator().manual_seed(3))
    masked = (zt == MASK_ID).view(-1, 4)
    counts = masked.sum(-1)
    n = len(counts)
    law = binomial_log_pmf(4, method.schedule.mask_prob(torch.tensor(t, dtype=torch.float64))).exp()
    allowed = allowed_counts(4, (0.45, 0.95))
    law = law * allowed / (law * allowed).sum()
    observed = torch.bincount(counts, minlength=5).double()
    assert observed[~allowed].sum() == 0
    assert chi_square(observed[allowed], n * law[allowed]) < 15.1
    for k in (2, 3):
        subsets = [s for s in itertools.product([False, True], repeat=4) if sum(s) == k]
        rows = masked[counts == k]
        seen = torch.tensor([float((rows == torch.tensor(s)).all(-1).sum()) for s in subsets])
        assert seen.sum() == len(rows)
        assert chi_square(seen, torch.full_like(seen, len(rows) / len(subsets))) < 25.7


def test_mask_mode_training_loss_is_the_window_restricted_integrand():
    """One block of 4 tokens (L = L'), t = 0.9, window [.45, .95]: the mean of the mask mode's
    training loss over 6,000 draws equals sum_{z in A} q(z | t) loss(z) / P_t(A) with the weight
    w(t) of the block's own t (clipped_nll's formula), by enumerating the 16 masks; the time
    mode's mean is the unrestricted sum, several standard errors away."""
    method = bd3(4, 4, clip_min=0.45, clip_max=0.95, clip_mode="mask")
    model = tiny_transformer(vocab=VOCAB, max_len=4, seed=1, n_layers=2)
    x = symbols(1, 4, seed=4)
    t = torch.full((1, 1), 0.9, dtype=torch.float64)
    p = float(method.schedule.mask_prob(t))
    with torch.no_grad():
        masks = torch.tensor(list(itertools.product([False, True], repeat=4)))  # (16, 4)
        z = torch.where(masks, MASK_ID, x.expand(16, 4))
        loss = method.token_loss(model, x.expand(16, 4), z, t.expand(16, 1)).double().sum(-1)
        k = masks.sum(-1)
        q = p ** k * (1 - p) ** (4 - k)
        inside = (k == 2) | (k == 3)
        exact_mask = float((q * loss)[inside].sum() / q[inside].sum())
        exact_time = float((q * loss).sum())
        draws = 6000
        nll, zt = method.clipped_nll(model, x.expand(draws, 4), t.expand(draws, 1),
                                     generator=torch.Generator().manual_seed(5))
        per_draw = nll.double().sum(-1)
    se = float(per_draw.std()) / math.sqrt(draws)
    assert abs(float(per_draw.mean()) - exact_mask) < 4 * se
    assert abs(exact_time - exact_mask) > 8 * se  # the test can tell the two objectives apart


def mask_law_variance(window: tuple[float, float], n: int, eps: float, *, weighted: bool = True) -> float:
    """Var of X = w(t) k / n under t ~ U[window], k ~ Binom(n, (1 - eps) t) conditioned on the
    window's counts A (weighted=False: t's density proportional to P_t(A) instead, what keeping
    the pooled draws that land in A without the importance weights estimates). Gauss-Legendre
    on t, exact sum over k; log-linear schedule (w = 1/t)."""
    lo = max(window[0], 1e-3)
    t, wq = gauss_legendre(lo, window[1], 400)
    law = binomial_log_pmf(n, (1 - eps) * t).exp() * allowed_counts(n, window)  # (T, n + 1)
    p_allowed = law.sum(-1)
    law = law / p_allowed[:, None]
    density = wq * (p_allowed if not weighted else 1.0)
    density = density / density.sum()
    x = (torch.arange(n + 1, dtype=torch.float64) / n)[None] / t[:, None]  # (T, n + 1)
    m1 = (density[:, None] * law * x).sum()
    m2 = (density[:, None] * law * x ** 2).sum()
    return float(m2 - m1 ** 2)


def test_mask_mode_search_scores_each_window_under_its_mask_law():
    """With the token loss replaced by w(t) 1[masked] (a block's loss is w(t) k / L'), adapt's
    variance of a window is the variance of w(t) k / L' under t ~ U[window], k ~ Binom conditioned
    on the window: recovered from the pooled full-window draws only with the 1/P_t(A) weights."""
    method = bd3(4, 64, clip_mode="mask", search_draws=60)

    def indicator_loss(model, x0, zt, t, dtype=torch.float32):
        return (method.loss_weight(t.double()).expand(zt.shape) * (zt == MASK_ID)).to(dtype)

    method.token_loss = indicator_loss
    record = method.adapt(None, [symbols(64, 64, seed=s) for s in (6, 7)],
                          generator=torch.Generator().manual_seed(8))
    variances = record["bd3_window_variance"]
    assert len(variances) == 63  # every grid window allows some k >= 1 of 4
    eps = method.cfg.eps
    for window in [(0.3, 0.8), (0.45, 0.95), (0.5, 1.0), (0.2, 0.9)]:
        got = variances["{:.2f}-{:.2f}".format(*window)]
        want = mask_law_variance(window, 4, eps)
        assert got == pytest.approx(want, rel=0.05), window
    unweighted = mask_law_variance((0.3, 0.8), 4, eps, weighted=False)
    assert abs(unweighted / mask_law_variance((0.3, 0.8), 4, eps) - 1) > 0.12  # the weights matter
    assert method.window == tuple(record["bd3_window"])


def test_window_candidates_and_one_line_errors_of_the_mask_mode():
    assert len(bd3(4, 64, clip_mode="mask").window_candidates()) == 63
    ones = bd3(1, 8, clip_mode="mask").window_candidates()  # k/1 in {0, 1}: only windows holding 1
    assert (1.0, 1.0) in ones and all(hi == 1.0 for _, hi in ones) and len(ones) == 10
    for bad in ({"clip_mode": "blocks"},
                {"clip_mode": "mask", "block_size": 4, "clip_min": 0.3, "clip_max": 0.45},
                {"clip_mode": "mask", "block_size": 1, "clip_min": 0.2, "clip_max": 0.8}):
        with pytest.raises(ConfigError) as err:
            BD3Config(**bad)
        assert "bd3.clip_mode" in str(err.value) and "\n" not in str(err.value)


def test_old_draws_are_unchanged_full_window_evaluation_and_time_mode():
    """The mask mode draws nothing extra where no count is ruled out (the full window), so its
    loss equals the time mode's bit for bit; the bound ignores the mode; and the time mode's
    window_corrupt is MDLM's corrupt."""
    model = tiny_transformer(vocab=VOCAB, max_len=16, seed=0, n_layers=2)
    x0 = symbols(8, 16, seed=9)
    time, mask = bd3(4, 16), bd3(4, 16, clip_mode="mask")
    a = time.loss(model, x0, generator=torch.Generator().manual_seed(1))
    b = mask.loss(model, x0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.token_nll, b.token_nll) and torch.equal(a.loss, b.loss)
    clipped = dict(clip_min=0.45, clip_max=0.95)
    time, mask = bd3(4, 16, **clipped), bd3(4, 16, clip_mode="mask", **clipped)
    a = time.nll_bound(model, x0, n_samples=2, generator=torch.Generator().manual_seed(2))
    b = mask.nll_bound(model, x0, n_samples=2, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.nll, b.nll)
    t = time_per_position(time.training_times(8, 16, generator=torch.Generator().manual_seed(3)), 16)
    assert torch.equal(time.window_corrupt(x0, t, torch.Generator().manual_seed(4)),
                       time.corrupt(x0, t, torch.Generator().manual_seed(4)))
    assert not torch.equal(mask.window_corrupt(x0, t, torch.Generator().manual_seed(4)),
                           time.corrupt(x0, t, torch.Generator().manual_seed(4)))


def test_mode_with_the_tiny_builder_and_the_config_round_trip():
    run, _, method, _ = tiny_built("bd3", {"dim": 32, "n_layers": 1, "n_heads": 2}, 16)
    assert method.cfg.clip_mode == "time"
    run = make_config(base={**run.to_dict(), "bd3": {**run.to_dict()["bd3"], "clip_mode": "mask",
                                                     "clip_min": 0.45, "clip_max": 0.95}})
    again = type(run).from_dict(json.loads(run.to_json()))
    assert again.method_options.clip_mode == "mask"


TEXT = "the quick brown fox jumps over the lazy dog\n" * 300


def test_mask_mode_is_saved_restored_on_resume_and_searched(tmp_path, monkeypatch):
    """A tiny mask-mode run with the window search every 2 steps: config.json records the mode,
    the resumed trainer rebuilds it, and steps 3-4 after a resume repeat the uninterrupted run's
    losses (the same masks were drawn)."""
    monkeypatch.setenv("DDLM_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    run = make_config(base={
        "method": "bd3", "bd3": {"block_size": 4, "clip_mode": "mask", "clip_min": 0.45,
                                 "clip_max": 0.95, "search_every": 2, "search_batches": 2},
        "model": {"dim": 32, "n_layers": 1, "n_heads": 2},
        "data": {"corpus": str(corpus), "seq_len": 16},
        "train": {"steps": 4, "batch_size": 4, "warmup_steps": 2, "log_every": 1, "eval_every": 0,
                  "ckpt_every": 0, "progress": False, "dtype": "fp32", "threads": 1}})
    full = train(run, tmp_path / "full", quiet=True)
    part = train(run, tmp_path / "part", stop_after=2, quiet=True)
    saved = json.loads((part.checkpoint / "config.json").read_text())
    assert saved["bd3"]["clip_mode"] == "mask"
    method = Trainer(run, tmp_path / "part", quiet=True).method  # the trainer (and its lock) goes
    assert method.cfg.clip_mode == "mask" and method.clips_masks
    assert method.window == tuple(load_trainer_state(part.checkpoint)["method"]["window"])
    logged = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    searched = [r for r in logged if "bd3_window" in r]
    assert len(searched) == 1 and len(searched[0]["bd3_window_variance"]) == 63
    rest = train(run, tmp_path / "part", quiet=True)
    assert rest.resumed_from == 2 and rest.losses == full.losses[2:]
    assert np.isfinite(full.losses).all()
