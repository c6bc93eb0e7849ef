"""MDLM against exact answers: a tiny joint distribution (V=3 symbols + MASK, L=3) whose exact
conditionals are the ideal SUBS denoiser, so the NELBO must equal -log p(x), the ancestral sampler
must converge to the joint, and conditional samples to the conditionals (METHODS.md §7).

Samplers are in this file too; the exact-joint helpers live in tests/conftest.py.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddlm.config import SampleConfig
from ddlm.errors import ConfigError
from ddlm.methods.base import method_class
from ddlm.methods.mdlm import MDLM, MDLMConfig, subs_log_probs
from ddlm.methods.noise import stratified_uniform
from ddlm.process.schedules import Cosine, Geometric, Linear, LogLinear, build_schedule
from ddlm.sampling.ancestral import AncestralSampler, FirstHittingSampler
from ddlm.sampling.base import SemiAutoregressiveSampler

from conftest import (JOINT, MASK, PLACE, SEQS, ExactDenoiser, L, V, gauss_legendre, pattern_cost,
                      patterns, tiny_transformer)


def exact_integrand(schedule, joint, x: tuple, t: torch.Tensor) -> torch.Tensor:
    """f_x(t) = weight(t) E_{z_t}[sum_masked -log p(x_i | visible)], exact over mask patterns."""
    m = schedule.mask_prob(t)
    out = torch.zeros_like(t)
    for masked in patterns():
        k = int(masked.sum())
        out += m ** k * (1 - m) ** (L - k) * pattern_cost(joint, x, masked)
    return schedule.weight(t) * out


def method(**kw) -> MDLM:
    return MDLM(MDLMConfig(**kw), vocab_size=V + 1, mask_id=MASK, bos_id=0, pad_id=0)


def tv(tokens: torch.Tensor, p: torch.Tensor) -> float:
    """Total variation between the empirical law of (N, L) tokens and p over SEQS."""
    counts = torch.bincount((tokens * PLACE).sum(1), minlength=V ** L).double()
    return 0.5 * (counts / counts.sum() - p).abs().sum().item()


def tv_noise(p: torch.Tensor, n: int) -> float:
    """Expected TV of n i.i.d. draws from p to p (normal approximation per cell)."""
    return 0.5 * float(torch.sqrt(2 * p * (1 - p) / (math.pi * n)).sum())


def product_of_marginals(joint: torch.Tensor) -> torch.Tensor:
    table = joint.view(V, V, V)
    m = [table.sum(dim=tuple(j for j in range(L) if j != i)) for i in range(L)]
    return torch.einsum("a,b,c->abc", *m).reshape(-1)


def method11(**kw) -> MDLM:
    """MDLM over the tiny transformer's 11 ids (10 = MASK) with a context of 8."""
    return MDLM(MDLMConfig(**kw), vocab_size=11, mask_id=10, bos_id=0, pad_id=0, context=8)


# ---------------------------------------------------------------------------------- schedules

SCHEDS = [LogLinear(), Cosine(), Linear(), Geometric()]


@pytest.mark.parametrize("schedule", SCHEDS, ids=lambda s: s.name)
def test_schedule_endpoints_and_derivatives(schedule):
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    h = 1e-6
    floor = getattr(schedule, "eps", 1e-8)
    assert abs(schedule.alpha(torch.tensor(0.0, dtype=torch.float64)).item() - 1) <= 1e-4
    assert schedule.alpha(torch.tensor(1.0, dtype=torch.float64)).item() <= floor + 1e-9
    d_alpha = (schedule.alpha(t + h) - schedule.alpha(t - h)) / (2 * h)
    assert torch.allclose(schedule.weight(t), -d_alpha / (1 - schedule.alpha(t)), rtol=1e-6)
    d_sigma = (schedule.total_noise(t + h) - schedule.total_noise(t - h)) / (2 * h)
    assert torch.allclose(schedule.rate(t), d_sigma, rtol=1e-6)
    assert torch.allclose(schedule.mask_prob(t), 1 - schedule.alpha(t), rtol=1e-12)
    assert torch.allclose(schedule.time_of(schedule.mask_prob(t)), t, atol=1e-9)


def test_schedule_small_t_is_accurate_and_registry_errors():
    t = torch.tensor([1e-12], dtype=torch.float64)
    assert torch.allclose(LogLinear().weight(t), 1 / t) and torch.isfinite(Cosine().weight(t)).all()
    assert torch.allclose(Linear().weight(t), 1 / t, rtol=1e-5)  # sigma / expm1(sigma t) -> 1/t
    assert isinstance(build_schedule("cosine", eps=1e-4), Cosine)
    with pytest.raises(ConfigError, match="unknown noise schedule 'nope'"):
        build_schedule("nope")


def test_config_validation_and_registry():
    assert method_class("mdlm") is MDLM
    for bad in (dict(schedule="x"), dict(eps=0.0), dict(discrete_steps=-1)):
        with pytest.raises(ConfigError):
            MDLMConfig(**bad)
    with pytest.raises(ConfigError):
        SampleConfig(noise_removal="mode")
    m = method(time_conditioning=True)
    assert m.time_conditioned and m.attention == "bidirectional"
    assert isinstance(m.sampler(SampleConfig()), AncestralSampler)
    assert isinstance(m.sampler(SampleConfig(sampler="first_hitting")), FirstHittingSampler)
    for bad in ("nope", "euler"):
        with pytest.raises(ConfigError, match="unknown mdlm sampler"):
            m.sampler(SampleConfig(sampler=bad))


def test_loss_passes_sigma_only_when_time_conditioned():
    seen = []

    def spy(z, *, sigma=None, mask=None, **kw):
        seen.append((sigma, mask))
        return torch.zeros(*z.shape, V + 1)

    x0 = torch.zeros(2, L, dtype=torch.long)
    t = torch.tensor([0.3, 0.9])
    method().loss(spy, x0, t=t)
    method(time_conditioning=True).loss(spy, x0, t=t)
    assert seen[0] == (None, "bidirectional")
    assert torch.allclose(seen[1][0].double().flatten(), LogLinear().total_noise(t.double()))


# --------------------------------------------------------------------------- NELBO, exactly

EXACT_SCHEDS = [LogLinear(eps=1e-7), Cosine(eps=1e-7), Linear(eps=1e-7)]


def test_closed_form_nelbo_is_minus_log_likelihood():
    """alpha: 1 -> 0 integrates each mask pattern of size k to (L-k)!(k-1)!/L!."""
    for i, x in enumerate(SEQS.tolist()):
        total = sum(pattern_cost(JOINT, x, m) * math.factorial(L - int(m.sum()))
                    * math.factorial(int(m.sum()) - 1) / math.factorial(L)
                    for m in patterns() if m.any())
        assert abs(total + math.log(JOINT[i])) < 1e-12


@pytest.mark.parametrize("schedule", EXACT_SCHEDS, ids=lambda s: s.name)
def test_quadrature_nelbo_equals_minus_log_likelihood(schedule):
    t, w = gauss_legendre(0.0, 1.0, 96)
    for i in (0, 5, 13, 26):
        x = tuple(SEQS[i].tolist())
        nelbo = (w * exact_integrand(schedule, JOINT, x, t)).sum().item()
        assert abs(nelbo + math.log(JOINT[i])) < 1e-4


@pytest.mark.parametrize("name", ["loglinear", "cosine", "linear"])
def test_loss_code_reproduces_quadrature(name):
    """token_loss on every (x, mask pattern, quadrature t) sums to -log p(x) for all 27 x."""
    m = method(schedule=name, eps=1e-7)
    t, w = gauss_legendre(0.0, 1.0, 64)
    pats = torch.stack(patterns())  # (P, L)
    P, Q, S = len(pats), len(t), len(SEQS)
    x0 = SEQS[:, None, None, :].expand(S, Q, P, L).reshape(-1, L)
    masked = pats[None, None].expand(S, Q, P, L).reshape(-1, L)
    tt = t[None, :, None].expand(S, Q, P).reshape(-1)
    zt = torch.where(masked, torch.full_like(x0, MASK), x0)
    nll = m.token_loss(ExactDenoiser(JOINT), x0, zt, tt[:, None], dtype=torch.float64).sum(1)  # (S Q P)
    mp = m.schedule.mask_prob(tt)[:, None]
    prob = torch.where(masked, mp, 1 - mp).prod(1)
    nelbo = (nll * prob).view(S, Q, P).sum(2) @ w  # (S,)
    assert torch.allclose(nelbo, -JOINT.log(), atol=1e-4)


def test_discrete_time_objective_decreases_to_continuous():
    """L_T (eq. 10) >= L_inf = -log p(x), decreasing in T, gap O(1/T)."""
    pats = torch.stack(patterns())
    x0 = SEQS[:, None, :].expand(-1, len(pats), L).reshape(-1, L)
    masked = pats[None].expand(len(SEQS), -1, -1).reshape(-1, L)
    zt = torch.where(masked, torch.full_like(x0, MASK), x0)
    model = ExactDenoiser(JOINT)
    gaps = []
    for T in (1, 4, 16, 64):
        m = method(discrete_steps=T, eps=1e-7)
        total = torch.zeros(len(SEQS), dtype=torch.float64)
        for i in range(1, T + 1):
            t = torch.full((len(x0),), i / T, dtype=torch.float64)
            mp = m.schedule.mask_prob(t)[:, None]
            prob = torch.where(masked, mp, 1 - mp).prod(1)
            nll = m.token_loss(model, x0, zt, t[:, None], dtype=torch.float64).sum(1) / T
            total += (nll * prob).view(len(SEQS), -1).sum(1)
        gaps.append(((total + JOINT.log()) * JOINT).sum().item())  # E_x[L_T + log p(x)]
    assert all(g > 0 for g in gaps) and all(a > b for a, b in zip(gaps, gaps[1:]))
    assert gaps[-1] < 0.05 * gaps[0] and gaps[-1] < 0.02


# -------------------------------------------------------------------- estimators: t sampling

def test_antithetic_loss_is_unbiased():
    """Mean of loss() over seeds == (1/(1-eps)) int_eps^1 f_x(t) dt averaged over the batch."""
    m = method(sampling_eps=1e-3)
    g = torch.Generator().manual_seed(0)
    x0 = SEQS[torch.multinomial(JOINT, 32, replacement=True, generator=g)]
    model = ExactDenoiser(JOINT)
    draws = torch.tensor([m.loss(model, x0, generator=torch.Generator().manual_seed(s))
                          .token_nll.double().sum().item() / len(x0) for s in range(300)])
    t, w = gauss_legendre(1e-3, 1.0, 96)
    ref = np.mean([(w * exact_integrand(m.schedule, JOINT, tuple(x), t)).sum().item() / (1 - 1e-3)
                   for x in x0.tolist()])
    se = draws.std().item() / math.sqrt(len(draws))
    assert abs(draws.mean().item() - ref) < 4 * se


def test_antithetic_time_sampling_lowers_variance():
    """Two checks. (a) Exact in z (Rao-Blackwellised): only t is random, so stratification's
    gain is the whole story; the mean stays the integral. (b) End to end with loss(), under the
    cosine schedule with a context-free denoiser, where E[loss | t] varies with t."""
    m = method()
    x = tuple(SEQS[int(JOINT.argmax())].tolist())
    stats = {}
    for anti in (True, False):
        means = [exact_integrand(m.schedule, JOINT, x, 1e-3 + (1 - 1e-3) * stratified_uniform(
            16, antithetic=anti, generator=torch.Generator().manual_seed(s))).mean().item()
            for s in range(200)]
        stats[anti] = (np.mean(means), np.var(means))
    t, w = gauss_legendre(1e-3, 1.0, 96)
    ref = (w * exact_integrand(m.schedule, JOINT, x, t)).sum().item() / (1 - 1e-3)
    assert abs(stats[True][0] - ref) < 4 * math.sqrt(stats[True][1] / 200)
    assert stats[True][1] < 0.1 * stats[False][1]

    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])

    def unigram(z, *, sigma=None, mask=None, **kw):
        return torch.cat([probs.log().expand(*z.shape, 5), torch.zeros(*z.shape, 1)], -1)

    x0 = torch.multinomial(probs, 16 * 32, replacement=True, generator=torch.Generator().manual_seed(1))
    var = {}
    for anti in (True, False):
        mm = MDLM(MDLMConfig(schedule="cosine", antithetic=anti), vocab_size=6, mask_id=5, bos_id=0,
                  pad_id=0)
        var[anti] = torch.tensor([mm.loss(unigram, x0.view(16, 32), generator=torch.Generator()
                                          .manual_seed(s)).loss.item() for s in range(400)]).var()
    assert var[True] < 0.7 * var[False]


def test_nll_bound_protocol_and_value():
    m = method(eps=1e-6, sampling_eps=1e-6)
    x0 = SEQS.repeat(8, 1)  # (216, L): each sequence 8 times
    out = m.nll_bound(ExactDenoiser(JOINT), x0, n_samples=32, generator=torch.Generator().manual_seed(0))
    assert out.nll.dtype == torch.float64 and out.nll.shape == (216,) and not out.exact
    assert torch.equal(out.tokens, torch.full((216,), float(L), dtype=torch.float64))
    per_copy = out.nll.view(8, 27).mean(1)  # 8 independent estimates of mean_x NELBO(x)
    se = per_copy.std().item() / math.sqrt(8)
    assert abs(per_copy.mean().item() + JOINT.log().mean().item()) < 4 * se + 1e-3
    masked = m.nll_bound(ExactDenoiser(JOINT), x0, loss_mask=torch.tensor([[1, 0, 1]]).expand(216, 3),
                         generator=torch.Generator().manual_seed(0))
    assert torch.equal(masked.tokens, torch.full((216,), 2.0, dtype=torch.float64))


# ------------------------------------------------------------------------------- SUBS

def test_subs_invariants():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, V + 1, generator=g)
    logits[..., MASK] = 50.0  # the backbone loves MASK; SUBS must not care
    z = torch.randint(0, V, (4, 6), generator=g)
    x0 = z.clone()
    z[torch.rand(4, 6, generator=g) < 0.5] = MASK
    p = subs_log_probs(logits, z, MASK).exp()
    assert (p[..., MASK] == 0).all()
    assert torch.equal(p[z != MASK], F.one_hot(z[z != MASK], V + 1).float())
    assert torch.allclose(p.sum(-1), torch.ones(4, 6))
    m = method()

    def garbage(zz, *, sigma=None, mask=None, **kw):
        return logits

    nll = m.token_loss(garbage, x0, z, torch.full((4, 1), 0.5))
    assert (nll[z != MASK] == 0).all() and (nll[z == MASK] > 0).all()
    assert logits.dtype == torch.float32 and subs_log_probs(logits.half(), z, MASK).dtype == torch.float32


def test_loss_with_transformer_backprops_and_respects_loss_mask():
    model = tiny_transformer(vocab=V + 1).train()
    m = method()
    x0 = torch.randint(0, V, (4, 8), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.2, 0.4, 0.6, 0.8])
    keep = torch.ones(4, 8)
    keep[:, 4:] = 0
    out = m.loss(model, x0, t=t, loss_mask=keep, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss) and (out.token_nll[:, 4:] == 0).all()
    assert torch.isclose(out.loss, out.token_nll.sum() / 16)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------- samplers, exact joint

N = 20000


def draw(sampler, n=N, length=L, seed=1, **kw):
    return sampler.generate(ExactDenoiser(JOINT), n, length, generator=torch.Generator().manual_seed(seed), **kw)


def test_ancestral_tv_falls_with_steps_and_one_step_is_product_of_marginals():
    noise = tv_noise(JOINT, N)
    tvs = {T: tv(draw(AncestralSampler(method(), steps=T)).tokens, JOINT)
           for T in (1, 4, 16, 128)}
    assert tvs[1] > tvs[4] > tvs[16] > tvs[128]
    assert tvs[128] < 3 * noise
    one_step = draw(AncestralSampler(method(), steps=1)).tokens
    prod = product_of_marginals(JOINT)
    assert tv(one_step, prod) < 3 * tv_noise(prod, N) < 0.1 * tv(one_step, JOINT)


def test_first_hitting_matches_joint_one_token_per_nfe():
    gen = draw(FirstHittingSampler(method(schedule="cosine")))
    assert gen.nfe == L and not (gen.tokens == MASK).any()
    assert tv(gen.tokens, JOINT) < 3 * tv_noise(JOINT, N)


@pytest.mark.parametrize("kind", ["ancestral", "first_hitting"])
def test_prefix_and_infilling_sample_the_conditional(kind):
    sampler = (AncestralSampler(method(), steps=128) if kind == "ancestral"
               else FirstHittingSampler(method()))
    v = 1
    cases = [  # (how to call, the condition on SEQS)
        (dict(prompt=torch.tensor([[v]]), length=L - 1), SEQS[:, 0] == v),
        (dict(template=torch.tensor([[MASK, v, MASK]]), length=L), SEQS[:, 1] == v),
    ]
    for kw, given in cases:
        gen = draw(sampler, **kw)
        assert (gen.tokens[:, 0 if "prompt" in kw else 1] == v).all()
        cond = JOINT * given
        cond = cond / cond.sum()
        assert tv(gen.tokens, cond) < 3 * tv_noise(cond, N) + 0.005


# ------------------------------------------------------------------ samplers, a real backbone

def traced_ancestral(model, *, use_cache: bool, steps: int = 256, n: int = 4, length: int = 8, seed: int = 3):
    """Run AncestralSampler(method11(), steps, use_cache, top_p=0.9) while logging every posterior
    step (z before, z after) and every network call (how many steps came before it, its z)."""
    sampler = AncestralSampler(method11(), steps=steps, use_cache=use_cache, top_p=0.9)
    steps_log, calls = [], []
    real_step = sampler.posterior_step

    def logged_step(z, x0, t, s, generator):
        z_next = real_step(z, x0, t, s, generator)
        steps_log.append((z.clone(), z_next.clone()))
        return z_next

    def spy(z, **kw):
        calls.append((len(steps_log), z.clone()))
        return model(z, **kw)

    sampler.posterior_step = logged_step
    gen = sampler.generate(spy, n, length, generator=torch.Generator().manual_seed(seed))
    return gen, steps_log, calls


def test_no_change_cache_calls_the_network_after_every_change_and_matches_uncached():
    """With the cache on, the network is called before the first step and right after every step
    that changed a token (the noise-removal step included), and never otherwise; each call sees
    the current z. Cached and uncached samplers give identical tokens under one seed, and the
    cache does save calls. (A cache never cleared, cleared one step late or never used fails.)"""
    model = tiny_transformer()
    runs = {c: traced_ancestral(model, use_cache=c) for c in (True, False)}
    (cached, steps, calls), (plain, plain_steps, plain_calls) = runs[True], runs[False]
    assert torch.equal(cached.tokens, plain.tokens) and not (cached.tokens == 10).any()
    assert cached.nfe < plain.nfe <= 257
    assert cached.nfe <= 4 * 8 + 1  # at most one call per change
    for gen, log, seen, use_cache in ((cached, steps, calls, True), (plain, plain_steps, plain_calls, False)):
        assert (log[0][0] == 10).all() and all((a == 10).any() for a, _ in log)  # no empty steps
        assert all(torch.equal(log[k][0], log[k - 1][1]) for k in range(1, len(log)))
        changed = [not torch.equal(a, b) for a, b in log]
        expected = [k for k in range(len(log)) if k == 0 or changed[k - 1] or not use_cache]
        assert [k for k, _ in seen] == expected
        assert all(torch.equal(z, log[k][0]) for k, z in seen)
        assert gen.nfe == len(seen)
    assert len(steps) == len(plain_steps)  # the same trajectory, step by step
    assert all(torch.equal(a[1], b[1]) for a, b in zip(steps, plain_steps))
    assert 0 < sum(changed) < len(changed)  # some steps changed nothing: the cache had work to do


def test_time_conditioned_model_turns_the_cache_off():
    T = 32
    model = tiny_transformer(time_conditioning=True)
    sigmas = []

    def spy(z, *, sigma=None, **kw):
        sigmas.append(sigma)
        return model(z, sigma=sigma, **kw)

    spy.cfg = model.cfg
    gens = [AncestralSampler(method11(time_conditioning=True), steps=T, use_cache=c)
            .generate(spy, 64, 8, generator=torch.Generator().manual_seed(0)) for c in (True, False)]
    assert gens[0].nfe == gens[1].nfe and gens[0].nfe in (T, T + 1)  # every step calls the network
    grid = torch.linspace(1, 1e-5, T + 1, dtype=torch.float64)[:T]
    assert torch.allclose(torch.stack([s[0, 0] for s in sigmas[:T]]).double(),
                          LogLinear().total_noise(grid), rtol=1e-5)

    # few tokens, many steps: the cache would fire; with time conditioning it must not
    for conditioned, fires in ((False, True), (True, False)):
        nfe = [AncestralSampler(method11(time_conditioning=conditioned), steps=128, use_cache=c)
               .generate(model, 2, 8, generator=torch.Generator().manual_seed(0)).nfe for c in (True, False)]
        assert (nfe[0] < nfe[1]) == fires and nfe[0] <= nfe[1]


def test_first_hitting_times_are_order_statistics():
    """m(t_k)/m(1) at the k-th call ~ the k-th largest of n uniforms: mean (n + 1 - k)/(n + 1)."""
    sched, n = Cosine(), L
    seen = []
    exact = ExactDenoiser(JOINT)

    def spy(z, *, sigma=None, **kw):
        seen.append(sigma.double())
        return exact(z, sigma=sigma)

    sampler = FirstHittingSampler(method(schedule="cosine", time_conditioning=True))
    sampler.generate(spy, 8000, n, generator=torch.Generator().manual_seed(0))
    assert len(seen) == n
    one = sched.mask_prob(torch.tensor(1.0, dtype=torch.float64))
    for k, sigma in enumerate(seen, start=1):
        ratio = -torch.expm1(-sigma) / one
        assert abs(ratio.mean().item() - (n + 1 - k) / (n + 1)) < 0.01


def test_given_positions_never_change_with_backbone():
    model = tiny_transformer()
    g = torch.Generator().manual_seed(0)
    template = torch.randint(0, 10, (6, 8), generator=g)
    template[torch.rand(6, 8, generator=g) < 0.6] = 10
    for sampler in (AncestralSampler(method11(schedule="cosine"), steps=16),
                    FirstHittingSampler(method11(schedule="cosine"))):
        out = sampler.generate(model, 6, 8, template=template, generator=g)
        given = template != 10
        assert torch.equal(out.tokens[given], template[given]) and not (out.tokens == 10).any()
        if isinstance(sampler, FirstHittingSampler):
            assert out.nfe == int((~given).sum(1).max())


def test_semi_autoregressive_generation_past_the_context():
    model = tiny_transformer(max_len=8)
    calls = []

    def spy(z, **kw):
        calls.append(z.shape[1])
        return model(z, **kw)

    spy.cfg = model.cfg
    prompt = torch.tensor([[1, 2, 3]])
    sampler = SemiAutoregressiveSampler(AncestralSampler(method11(), steps=8), stride=3)
    out = sampler.generate(spy, 2, 20, prompt=prompt, generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (2, 23) and torch.equal(out.tokens[:, :3], prompt.expand(2, 3))
    assert not (out.tokens == 10).any() and max(calls) <= 8 and out.nfe == len(calls)
    auto = AncestralSampler(method11(), steps=4).generate(
        model, 2, 30, generator=torch.Generator().manual_seed(0))  # longer than max_len: slides
    assert auto.tokens.shape == (2, 30) and not (auto.tokens == 10).any()
