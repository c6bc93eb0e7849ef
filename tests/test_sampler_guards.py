"""Sampler guards: each test pins one piece of sampling maths that exact-joint tests cannot see.

An exact denoiser makes any one-token-at-a-time order give the exact joint, so a wrong unmasking
rate, a wrong order or a stale cache can pass the convergence tests of test_mdlm.py. These tests
use context-free or spy models instead and check the law of each step against its formula:

  posterior step q(z_s | z_t, x0)   a MASK becomes x0 w.p. (m_t - m_s)/m_t; other tokens never move
  ancestral grid (cosine schedule)  masked counts after every grid step follow m(t_k)/m(1)
  first hitting                     the unmasked position is uniform over the masked ones
  argmax noise removal              writes only into still-masked positions
  temperature                       MDLM draws follow p^(1/tau); SEDD tempers each step's weights

Frequencies are compared with 5 binomial standard errors (fixed seeds, so the tests are
deterministic); each check also asserts that the broken alternative is > 10 standard errors away,
so it has the power to fail. Mutations each test was seen to catch are listed in its docstring.
"""
import math

import pytest
import torch

from ddlm.config import SampleConfig
from ddlm.methods.mdlm import MDLM, MDLMConfig
from ddlm.methods.sedd import SEDD, SEDDConfig
from ddlm.sampling.ancestral import AncestralSampler, FirstHittingSampler

from conftest import ExactScores

VOCAB, MASK_ID = 11, 10  # ids 0..9 are tokens, 10 = MASK


def mdlm(vocab=VOCAB, mask_id=MASK_ID, **kw) -> MDLM:
    return MDLM(MDLMConfig(**kw), vocab_size=vocab, mask_id=mask_id, bos_id=0, pad_id=0)


def f64(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


class ContextFree:
    """A `model` whose logits ignore z and sigma (one fixed distribution at every position); it
    records a copy of every z it is called with."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits, self.seen = logits.double(), []

    def __call__(self, z, *, sigma=None, mask=None, **_):
        self.seen.append(z.clone())
        return self.logits.expand(*z.shape, -1).clone()


def uniform_logits(vocab=VOCAB) -> torch.Tensor:
    return torch.zeros(vocab, dtype=torch.float64)


def binomial_close(count, n, p, k=5.0) -> bool:
    """count successes out of n are within k standard errors of probability p."""
    se = math.sqrt(max(p * (1 - p), 1e-12) / n)
    return abs(count / n - p) <= k * se


def frequencies(tokens: torch.Tensor, size: int) -> torch.Tensor:
    return torch.bincount(tokens.reshape(-1), minlength=size).double() / tokens.numel()


def assert_law(freq: torch.Tensor, expected: torch.Tensor, n: int, wrong: list[torch.Tensor]):
    """freq within 5 SE of expected in every cell, and every `wrong` law > 10 SE away somewhere."""
    se = (expected * (1 - expected) / n).sqrt().clamp_min(1e-4)
    assert ((freq - expected).abs() <= 5 * se).all(), (freq, expected)
    for alt in wrong:
        assert ((alt - expected).abs() / se).max() > 10, "the check has no power against this law"


# ----------------------------------------------------------------------------- posterior step

@pytest.mark.parametrize("schedule", ["cosine", "loglinear", "linear"])
def test_posterior_step_unmasks_to_x0_at_rate_m_t_minus_m_s_over_m_t(schedule):
    """q(z_s | z_t, x0) in isolation: given x0 that differs from z everywhere, an unmasked token
    never changes, a MASK becomes exactly x0 with probability (m_t - m_s)/m_t (scalar times and
    per-row times; t = s moves nothing), and s = 0 unmasks every MASK.
    Caught (seen red): rate hard-coded as (t - s)/t [cosine, linear; equal under loglinear];
    stay/unmask swapped (m_s/m_t);
    x0 written into unmasked positions."""
    m = mdlm(schedule=schedule)
    sampler = AncestralSampler(m, steps=4)
    g = torch.Generator().manual_seed(0)
    B, Lx = 4000, 8
    z = torch.randint(0, 10, (B, Lx), generator=g)
    z[torch.rand(B, Lx, generator=g) < 0.5] = MASK_ID
    x0 = torch.where(z == MASK_ID, torch.randint(0, 10, (B, Lx), generator=g), (z + 1) % 10)
    masked = z == MASK_ID
    mp = m.schedule.mask_prob

    t, s = 0.7, 0.3
    out = sampler.posterior_step(z, x0, t, s, g)
    assert torch.equal(out[~masked], z[~masked])
    moved = out != MASK_ID
    assert torch.equal(out[moved & masked], x0[moved & masked])
    rate = ((mp(f64(t)) - mp(f64(s))) / mp(f64(t))).item()
    assert binomial_close(int((moved & masked).sum()), int(masked.sum()), rate)
    assert abs(rate - (t - s) / t) > 0.05 or schedule != "cosine"  # cosine tells the two apart

    # per-row times: even rows step 0.9 -> 0.6, odd rows t = s = 0.5 (nothing may move)
    tt = torch.where(torch.arange(B) % 2 == 0, f64(0.9), f64(0.5))
    ss = torch.where(torch.arange(B) % 2 == 0, f64(0.6), f64(0.5))
    out = sampler.posterior_step(z, x0, tt, ss, g)
    odd = (torch.arange(B) % 2 == 1)[:, None].expand(B, Lx)
    assert torch.equal(out[odd], z[odd]) and torch.equal(out[~masked], z[~masked])
    even_masked = masked & ~odd
    moved = (out != MASK_ID) & even_masked
    assert torch.equal(out[moved], x0[moved])
    rate = ((mp(f64(0.9)) - mp(f64(0.6))) / mp(f64(0.9))).item()
    assert binomial_close(int(moved.sum()), int(even_masked.sum()), rate)

    out = sampler.posterior_step(z, x0, 1e-5, 0.0, g)
    assert torch.equal(out, torch.where(masked, x0, z))


def test_step_to_zero_unmasks_everything_under_the_geometric_schedule():
    """Noise removal ('draw') is a posterior step to s = 0 and must unmask every MASK, also under
    mdlm.schedule=geometric where m(0) = 1 - exp(-sigma_min) ~ 1e-4 ~ m(t_min) (a step that used
    m(0) would keep ~all of them, and samples would end with MASK tokens)."""
    m = mdlm(schedule="geometric")
    g = torch.Generator().manual_seed(0)
    out = m.sampler(SampleConfig(steps=8)).generate(ContextFree(uniform_logits()), 2000, 64, generator=g)
    assert not (out.tokens == MASK_ID).any()  # 15 MASKs left in 2000 x 64 tokens at the time of writing
    z = torch.full((64, 8), MASK_ID)
    out = AncestralSampler(m).posterior_step(z, torch.zeros_like(z), 1e-5, 0.0, g)
    assert not (out == MASK_ID).any()


# ---------------------------------------------------------------------- the ancestral grid

def test_ancestral_masked_counts_follow_a_cosine_schedule_step_by_step():
    """Context-free denoiser, no cache, so the network sees z after every grid step. Starting from
    all-MASK at t = 1, the masked fraction before step k is m(t_k)/m(1); each step unmasks a
    fraction (m(t_k) - m(t_{k+1}))/m(t_k) of what is left; every position is equally likely to be
    still masked (no left-to-right order).
    Caught (seen red): rate hard-coded as (t - s)/t; grid taken linear in m instead of t;
    stay/unmask swapped; positions unmasked left to right."""
    T, B, Lx = 6, 2000, 16
    m = mdlm(schedule="cosine")
    model = ContextFree(uniform_logits())
    sampler = m.sampler(SampleConfig(steps=T, cache=False))
    out = sampler.generate(model, B, Lx, generator=torch.Generator().manual_seed(0))
    assert not (out.tokens == MASK_ID).any()
    grid = torch.linspace(1.0, 1e-5, T + 1, dtype=torch.float64)
    mp = m.schedule.mask_prob
    assert len(model.seen) == T == out.nfe  # no MASK is left at t_min: no removal call
    counts = [int((z == MASK_ID).sum()) for z in model.seen]
    assert counts[0] == B * Lx
    for k in range(1, T):
        expected = (mp(grid[k]) / mp(grid[0])).item()
        assert binomial_close(counts[k], B * Lx, expected), (k, counts[k] / (B * Lx), expected)
        assert abs(expected - grid[k].item()) > 0.05  # a log-linear grid would be far off
        step_rate = ((mp(grid[k - 1]) - mp(grid[k])) / mp(grid[k - 1])).item()
        assert binomial_close(counts[k - 1] - counts[k], counts[k - 1], step_rate)
    middle = model.seen[T // 2] == MASK_ID  # (B, L): which positions are still masked
    q = (mp(grid[T // 2]) / mp(grid[0])).item()
    for position in range(Lx):
        assert binomial_close(int(middle[:, position].sum()), B, q), position


# ----------------------------------------------------------------------------- first hitting

def test_first_hitting_unmasks_a_uniform_masked_position():
    """The token a first-hitting step reveals is at a uniformly chosen MASK: the first revealed
    position is uniform over all L (no template) and over the template's holes (never a given one).
    Caught (seen red): leftmost masked position; uniform over all positions (not just masked)."""
    B, Lx = 6000, 6
    m = mdlm(schedule="cosine")
    sampler = m.sampler(SampleConfig(sampler="first_hitting"))
    assert isinstance(sampler, FirstHittingSampler)
    model = ContextFree(uniform_logits())
    out = sampler.generate(model, B, Lx, generator=torch.Generator().manual_seed(0))
    assert out.nfe == Lx and not (out.tokens == MASK_ID).any()
    first = model.seen[1] != MASK_ID  # after one call: exactly one revealed token per row
    assert torch.equal(first.sum(1), torch.ones(B, dtype=torch.long))
    counts = first.sum(0)
    assert all(binomial_close(int(c), B, 1 / Lx) for c in counts), counts

    template = torch.tensor([[3, MASK_ID, MASK_ID, 4, MASK_ID, MASK_ID]])
    model = ContextFree(uniform_logits())
    out = sampler.generate(model, B, Lx, template=template, generator=torch.Generator().manual_seed(1))
    assert out.nfe == 4 and torch.equal(out.tokens[:, [0, 3]], template[:, [0, 3]].expand(B, 2))
    first = (model.seen[1] != MASK_ID) & (template == MASK_ID)
    assert torch.equal(first.sum(1), torch.ones(B, dtype=torch.long))
    counts = first.sum(0)
    assert counts[0] == counts[3] == 0
    assert all(binomial_close(int(counts[i]), B, 1 / 4) for i in (1, 2, 4, 5)), counts


# ---------------------------------------------------------------------- argmax noise removal

def peaked_logits(token: int, vocab=VOCAB) -> torch.Tensor:
    logits = torch.zeros(vocab, dtype=torch.float64)
    logits[token] = 40.0
    return logits


@pytest.mark.parametrize("removal", ["argmax", "draw"])
def test_noise_removal_writes_only_still_masked_positions(removal):
    """steps=1, t_min=0.999: almost every hole is still MASK at t_min, so noise removal fills it.
    (1) A denoiser (sampler.denoiser replaced, so SUBS cannot help) whose argmax is 7 at every
    position, given ones included: removal must write 7 into the holes and nothing elsewhere.
    (2) A raw model whose argmax is 7 everywhere, through SUBS: the template is kept.
    Caught (seen red): z = logp.argmax(-1) without the mask test [argmax]; the posterior step
    writing x0 into unmasked positions [argmax and draw]."""
    B, Lx = 64, 8
    g = torch.Generator().manual_seed(0)
    template = torch.randint(0, 6, (B, Lx), generator=g)  # given tokens in 0..5, never 7
    template[torch.rand(B, Lx, generator=g) < 0.5] = MASK_ID
    given = template != MASK_ID
    cfg = SampleConfig(steps=1, t_min=0.999, noise_removal=removal)

    sampler = mdlm(schedule="cosine").sampler(cfg)
    logp = torch.log_softmax(peaked_logits(7), -1)
    sampler.denoiser = lambda model, z, t: logp.expand(*z.shape, -1)  # ignores SUBS carry-over
    out = sampler.generate(ContextFree(uniform_logits()), B, Lx, template=template, generator=g)
    assert torch.equal(out.tokens[given], template[given])
    assert (out.tokens[~given] == 7).all()

    sampler = mdlm(schedule="cosine").sampler(cfg)
    model = ContextFree(peaked_logits(7))
    out = sampler.generate(model, B, Lx, template=template, generator=g)
    assert torch.equal(out.tokens[given], template[given]) and (out.tokens[~given] == 7).all()
    stepped = model.seen[-1]
    assert (stepped == MASK_ID).sum() > 0.9 * (~given).sum()  # removal, not the step, did the work


# ----------------------------------------------------------------------------- temperature

P4 = torch.tensor([0.55, 0.25, 0.15, 0.05], dtype=torch.float64)  # 4 tokens, MASK = 4


def tempered(p: torch.Tensor, tau: float) -> torch.Tensor:
    q = p ** (1 / tau)
    return q / q.sum()


@pytest.mark.parametrize("tau", [0.5, 2.0])
@pytest.mark.parametrize("name", ["ancestral", "first_hitting"])
def test_mdlm_temperature_draws_p_to_the_one_over_tau(name, tau):
    """One position, a context-free denoiser p: samples follow p^(1/tau) normalised, through
    method.sampler(SampleConfig(temperature=tau)).
    Caught (seen red): temperature ignored (denoiser or MDLM.sampler not passing it); logits
    multiplied by tau instead of divided."""
    n = 40000
    m = mdlm(vocab=5, mask_id=4, schedule="cosine")
    sampler = m.sampler(SampleConfig(sampler=name, steps=4, temperature=tau))
    logits = torch.cat([P4.log(), torch.zeros(1, dtype=torch.float64)])
    out = sampler.generate(ContextFree(logits), n, 1, generator=torch.Generator().manual_seed(0))
    freq = frequencies(out.tokens, 5)
    assert freq[4] == 0
    assert_law(freq[:4], tempered(P4, tau), n, wrong=[P4, tempered(P4, 1 / tau)])


def sedd_expected_law(p: torch.Tensor, m: SEDD, t_min: float, tau: float) -> torch.Tensor:
    """Final law of ScoreSampler(steps=1, t_min) for one absorbing position of law p with exact
    scores, when each step draws from its weights^(1/tau) normalised (what the code claims).
    The untempered analytic step with exact scores is the true reverse posterior:
      step 1 -> t_min from MASK: y token ∝ (alpha_s - alpha_1) p(y), stay MASK ∝ 1 - alpha_s;
      denoise from MASK at t_min: ∝ p(y) (MASK weight 0); a token stays itself."""
    alpha = lambda t: math.exp(-m.schedule.total_noise(f64(t)).item())  # noqa: E731
    a1, a_s = alpha(1.0), alpha(t_min)
    w1 = torch.cat([(a_s - a1) * p, f64([1 - a_s])]) ** (1 / tau)
    q1 = w1 / w1.sum()
    q2 = tempered(p, tau)
    return q1[:-1] + q1[-1] * q2


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_sedd_temperature_tempers_each_analytic_step(tau):
    """One absorbing position with exact scores, one analytic step 1 -> 0.5 then the final
    denoising step: the law of the result is the one computed from the tempered true posterior of
    each step (sedd_expected_law), through method.sampler(SampleConfig(temperature=tau)).
    Caught (seen red): temperature ignored (ScoreSampler.draw or SEDD.sampler not passing it);
    log-weights multiplied by tau instead of divided."""
    n = 40000
    p = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    m = SEDD(SEDDConfig(graph="absorbing", schedule="loglinear", eps=1e-3), vocab_size=4, mask_id=3,
             bos_id=0, pad_id=0)
    model = ExactScores.for_method(m, joint=p, n_symbols=3, length=1)
    sampler = m.sampler(SampleConfig(steps=1, t_min=0.5, temperature=tau))
    out = sampler.generate(model, n, 1, generator=torch.Generator().manual_seed(0))
    assert out.nfe == 2
    freq = frequencies(out.tokens, 4)
    assert freq[3] == 0
    expected = sedd_expected_law(p, m, 0.5, tau)
    assert torch.allclose(sedd_expected_law(p, m, 0.5, 1.0), p, atol=1e-12)  # exact when tau = 1
    assert_law(freq[:3], expected, n, wrong=[p, sedd_expected_law(p, m, 0.5, 1 / tau)])
