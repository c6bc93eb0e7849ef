"""EDLM against exact answers on conftest's tiny joint (V = 3 symbols + MASK, L = 3).

The proposal q(x_0 | z) is the exact MDLM denoiser's: the product over masked positions of the
exact one-position posteriors p(x_l | z). With weights w = exp(-E), the law of one importance-
resampling step with k proposals (SIR) is

    p_k(x) = k q(x) E[ w(x) / (w(x) + S) ],   S = sum of k - 1 i.i.d. w(y), y ~ q,

computed here exactly, either by enumerating the atoms of S (k <= 4) or from
E[1/(w + S)] = int_0^inf exp(-s w) phi(s)^(k-1) ds, phi(s) = E_q[exp(-s w(y))] (any k). Everything
below is computed from the table and these formulas, not from the code under test:

  (a) one importance step draws p_k, which moves from q (k = 1, MDLM) to the posterior as k grows;
      with the energy's sign flipped it moves away;
  (b) rows with different prompts resample among their own proposals, weighted by their own
      energies; per-row generators make a row's draw independent of its batch;
  (c) the carry-over AR energy's target prod_{l masked} p_AR(x_l | x_<l) is normalised over the
      completions of z; the full AR energy's is not;
  (d) the SIR bound B_k (module docstring of ddlm/methods/edlm.py) exactly, by enumeration of mask
      patterns and proposals and Gauss-Legendre in t; the estimator's mean is its exact
      expectation (B_k plus the Jensen bias of -log of a one-draw rho estimate); more
      bound_draws shrink the bias; k = 1 is MDLM's bound; B_k bounds the sampler's own law;
  (e) the paper's joint plug-in is not a bound: with the exact posterior (exact log Z) its mean
      over x ~ JOINT is below the entropy of JOINT, B_k's is above; so edlm.bound=joint is refused;
  (f) the importance sampler with k = 1 is MDLM's ancestral sampler token for token, steps outside
      the window are MDLM's steps, NFE counts k energy passes per resampling step.

Note (exact denoiser): q's one-position marginals are already exact, so with the exact energy B_1
is -log p(x) for every x and B_k (k > 1) is NOT >= -log p(x) for every x: resampling moves the
marginals, and B_k bounds -log of the sampler's own law p_model (tested), which is not JOINT.
"""
import functools
import itertools
import math

import pytest
import torch

from ddlm.config import SampleConfig
from ddlm.errors import ConfigError
from ddlm.methods.edlm import AREnergy, EDLM, EDLMConfig
from ddlm.methods.mdlm import MDLM, MDLMConfig
from ddlm.sampling.ancestral import AncestralSampler
from ddlm.sampling.base import row_generators
from ddlm.sampling.importance import ImportanceSampler

from conftest import (JOINT, MASK, PLACE, SEQS, ExactAR, ExactDenoiser, ExactEDLM, ExactEnergy, L, V,
                      gauss_legendre, patterns)

EPS = 1e-6  # eps = sampling_eps, as tests/test_contract.py's bound cases


def edlm(**kw) -> EDLM:
    return EDLM(EDLMConfig(**kw), vocab_size=V + 1, mask_id=MASK, bos_id=0, pad_id=0, context=L)


def mdlm(**kw) -> MDLM:
    return MDLM(MDLMConfig(**kw), vocab_size=V + 1, mask_id=MASK, bos_id=0, pad_id=0, context=L)


def exact_model(energy=None, *, scale: float = 1.0) -> ExactEDLM:
    """The exact denoiser with `energy` (default: the exact energy times `scale`)."""
    return ExactEDLM(ExactDenoiser(JOINT), energy if energy is not None else ExactEnergy(JOINT, scale=scale))


def law(tokens: torch.Tensor) -> torch.Tensor:
    """(27,) empirical law over SEQS of (N, L) tokens."""
    counts = torch.bincount((tokens * PLACE).sum(1), minlength=V ** L).double()
    return counts / counts.sum()


def tv(p: torch.Tensor, r: torch.Tensor) -> float:
    return 0.5 * float((p - r).abs().sum())


def tv_noise(p: torch.Tensor, n: int) -> float:
    """Expected TV of n i.i.d. draws from p to p (normal approximation per cell)."""
    return 0.5 * float(torch.sqrt(2 * p * (1 - p) / (math.pi * n)).sum())


# ------------------------------------------------------------------------ exact SIR machinery

@functools.lru_cache(maxsize=None)
def proposal(z: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(posterior, log q) over SEQS given z: JOINT restricted to the completions of z, and the
    exact denoiser's factorised proposal (log, -inf off the completions)."""
    zt = torch.tensor(z)
    compatible = ((zt == MASK) | (SEQS == zt)).all(1)
    post = JOINT * compatible / (JOINT * compatible).sum()
    log_q = torch.where(compatible, 0.0, -math.inf).double()
    for l in range(L):
        if z[l] == MASK:
            marginal = torch.zeros(V, dtype=torch.float64).index_add_(0, SEQS[:, l], post)
            log_q = log_q + marginal[SEQS[:, l]].log()
    return post, log_q


def log_weights(z: tuple, scale: float = 1.0) -> torch.Tensor:
    """(27,) -E of the exact energy times `scale` (log p(x) - log q(x | z)), -inf off the support."""
    _, log_q = proposal(z)
    return torch.where(log_q > -math.inf, scale * (JOINT.log() - log_q), torch.tensor(-math.inf).double())


def sum_atoms(log_w: torch.Tensor, log_q: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Atoms (values, probabilities) of S = w(y_1) + .. + w(y_n), y_j i.i.d. q (not merged)."""
    on = log_q > -math.inf
    w, q = log_w[on].exp(), log_q[on].exp()
    values, probs = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    for _ in range(n):
        values = (values[:, None] + w[None]).reshape(-1)
        probs = (probs[:, None] * q[None]).reshape(-1)
    return values, probs


def sir_law_enumerated(log_w, log_q, k: int) -> torch.Tensor:
    """(27,) p_k by enumerating the k - 1 other proposals (k <= 4)."""
    values, probs = sum_atoms(log_w, log_q, k - 1)
    w = log_w.exp()
    out = k * log_q.exp() * ((w[:, None] / (w[:, None] + values[None])) * probs).sum(1)
    return torch.where(log_q > -math.inf, out, torch.zeros_like(out))


def sir_law(log_w, log_q, k: int) -> torch.Tensor:
    """(27,) p_k for any k: E[1/(w + S)] = int_0^inf exp(-s w) phi(s)^(k-1) ds, s = e^v, trapezoid
    in v (the integrand is smooth and vanishes at both ends)."""
    on = log_q > -math.inf
    log_w = log_w - torch.logsumexp(log_w[on] + log_q[on], 0)  # scale-free: E_q[w] = 1
    v = torch.linspace(-60.0, 60.0, 24001, dtype=torch.float64)
    s = v.exp()
    log_phi = torch.logsumexp(log_q[on][None] - s[:, None] * log_w[on].exp()[None], 1)
    log_f = v[None] - s[None] * log_w.exp()[:, None] + (k - 1) * log_phi[None]  # (27, n)
    log_integral = torch.logsumexp(log_f, 1) + math.log(float(v[1] - v[0]))
    out = (math.log(k) + log_q + log_w + log_integral).exp()
    return torch.where(on, out, torch.zeros_like(out))


@functools.lru_cache(maxsize=None)
def rho(z: tuple, scale: float, k: int, l: int, a: int) -> tuple[float, float]:
    """(rho_k(l, z) for x_l = a, E[-log ratio]) with ratio = k w(x^1) / (w(x^1) + S_{k-1}),
    x^1 ~ q with x^1_l := a: rho is what the bound needs, E[-log ratio] what its estimator
    computes in expectation with bound_draws = 1."""
    _, log_q = proposal(z)
    log_w = log_weights(z, scale)
    first = (SEQS[:, l] == a) & (log_q > -math.inf)
    q1 = (log_q[first] - torch.logsumexp(log_q[first], 0)).exp()  # q of the other positions
    values, probs = sum_atoms(log_w, log_q, k - 1)
    w1 = log_w[first].exp()
    ratio = k * w1[:, None] / (w1[:, None] + values[None])
    joint = q1[:, None] * probs[None]
    return float((joint * ratio).sum()), float((joint * -ratio.log()).sum())


def marginal(z: tuple, l: int, a: int) -> float:
    post, _ = proposal(z)
    return float(post[SEQS[:, l] == a].sum())


@functools.lru_cache(maxsize=None)
def time_weights() -> dict[int, float]:
    """a -> (1/(1 - EPS)) int_EPS^1 w(t) m^a (1 - m)^(L - a) dt: the estimator's weight of a
    pattern with a masked positions (log-linear: w = 1/t, m = (1 - EPS) t; t drawn on [EPS, 1])."""
    t, w = gauss_legendre(EPS, 1.0, 32)
    m = (1 - EPS) * t
    return {a: float((w / t * m ** a * (1 - m) ** (L - a)).sum()) / (1 - EPS) for a in range(1, L + 1)}


def pattern_z(x: tuple, masked) -> tuple:
    return tuple(MASK if masked[i] else x[i] for i in range(L))


def exact_bound(k: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(27,) per x over SEQS: B_k(x), and the expectation of the estimator with bound_draws = 1,
    both with the prior term alpha_1 log(V) per token, window = 1."""
    prior = EPS * math.log(V) * L
    bound, expected = torch.full((27,), prior, dtype=torch.float64), torch.full((27,), prior, dtype=torch.float64)
    for i, x in enumerate(SEQS.tolist()):
        for masked in patterns():
            a = int(masked.sum())
            if a == 0:
                continue
            z = pattern_z(x, masked)
            for l in range(L):
                if masked[l]:
                    base = -math.log(marginal(z, l, x[l]))
                    r, e = rho(z, scale, k, l, x[l]) if k > 1 else (1.0, 0.0)
                    bound[i] += time_weights()[a] * (base - math.log(r))
                    expected[i] += time_weights()[a] * (base + e)
    return bound, expected


def any_order_bound_and_law(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """With the exact energy (and EPS -> 0): B_k(x) = E_order sum_i -log p_k(x_(i) | z_i) over
    uniform unmasking orders (MDLM's closed form, pattern weight (L-a)!(a-1)!/L!), and the law of
    the continuous-time sampler, p_model(x) = E_order prod_i p_k(x_(i) | z_i), with the
    one-position marginals p_k(x_l | z) = q_l(x_l) rho_k(l, z)."""
    bound, model = torch.zeros(27, dtype=torch.float64), torch.zeros(27, dtype=torch.float64)
    orders = list(itertools.permutations(range(L)))
    for i, x in enumerate(SEQS.tolist()):
        for order in orders:
            z, cost = [MASK] * L, 0.0
            for l in order:
                cost -= math.log(marginal(tuple(z), l, x[l]) * rho(tuple(z), 1.0, k, l, x[l])[0])
                z[l] = x[l]
            bound[i] += cost / len(orders)
            model[i] += math.exp(-cost) / len(orders)
    return bound, model


def test_exact_sir_law_formulas_agree():
    """The two references agree and are laws; k = 1 is q; the integral's k -> inf is the posterior."""
    for z in [(MASK,) * L, (MASK, 1, MASK), (2, MASK, 0)]:
        post, log_q = proposal(z)
        assert torch.allclose(log_q.exp().sum(), torch.tensor(1.0).double())
        for scale in (1.0, 0.5, -1.0):
            log_w = log_weights(z, scale)
            for k in (1, 2, 3, 4):
                enumerated = sir_law_enumerated(log_w, log_q, k)
                assert abs(float(enumerated.sum()) - 1) < 1e-12
                assert torch.allclose(sir_law(log_w, log_q, k), enumerated, atol=1e-12)
            assert torch.allclose(sir_law(log_w, log_q, 1), log_q.exp(), atol=1e-12)
        assert tv(sir_law(log_weights(z), log_q, 4096), post) < 1e-3


# --------------------------------------------------------------- (a) one importance step, exactly

N = 20000


def one_step(z: tuple, k: int, *, scale: float = 1.0, n: int = N, seed: int = 0) -> torch.Tensor:
    """x_0* of one ImportanceSampler step t = 1 -> s = 0 (every MASK unmasks) from n copies of z."""
    method = edlm(k=k)
    sampler = method.sampler(SampleConfig(steps=1, sampler="importance"))
    assert isinstance(sampler, ImportanceSampler) and sampler.k == k
    model = exact_model(scale=scale)
    zt = torch.tensor(z).expand(n, L).clone()
    logp = sampler.denoiser(model, zt, 1.0)
    out = sampler.step(model, zt, 1.0, 0.0, logp, torch.Generator().manual_seed(seed))
    assert not (out == MASK).any() and torch.equal(out[zt != MASK], zt[zt != MASK])
    return out


@pytest.mark.parametrize("z", [(MASK, MASK, MASK), (MASK, 1, MASK)], ids=["all-masked", "middle-given"])
def test_one_step_draws_the_sir_law_which_approaches_the_posterior_as_k_grows(z):
    """Exactly: TV(p_k, posterior) falls strictly for k = 1, 2, 4, 16, 256 (k = 1 is q, MDLM's
    draw; k = 256 within 0.01), and with E -> -E (the sign trap) k = 4 is worse than k = 1. The
    sampler's draws match p_k (flipped too) within sampling noise, and show the same order."""
    post, log_q = proposal(z)
    exact = {k: sir_law(log_weights(z), log_q, k) for k in (1, 2, 4, 16, 256)}
    flipped = sir_law(log_weights(z, -1.0), log_q, 4)
    gaps = [tv(exact[k], post) for k in (1, 2, 4, 16, 256)]
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[0] > 0.3 and gaps[-1] < 0.01
    assert tv(flipped, post) > gaps[0] + 0.2

    drawn = {}
    for k, scale, target in ((1, 1.0, exact[1]), (2, 1.0, exact[2]), (4, 1.0, exact[4]), (16, 1.0, exact[16]),
                             (4, -1.0, flipped)):
        drawn[k, scale] = law(one_step(z, k, scale=scale))
        assert tv(drawn[k, scale], target) < 3 * tv_noise(target, N), (k, scale)
    seen = [tv(drawn[k, 1.0], post) for k in (1, 2, 4, 16)]
    assert all(a > b for a, b in zip(seen, seen[1:])), seen
    assert tv(drawn[4, -1.0], post) > seen[0] + 0.2


# ---------------------------------------------------------------- (b) rows, prompts, generators

class CompatibleEnergy(ExactEnergy):
    """The exact energy, +inf where x_0 disagrees with z: it reads z, so a proposal scored against
    another row's z gets weight 0."""

    def __call__(self, x0, zt, sigma=None, *, log_q=None):
        energy = super().__call__(x0, zt, sigma, log_q=log_q)
        agrees = ((zt == MASK) | (zt == x0)).all(1)
        return torch.where(agrees, energy, torch.full_like(energy, math.inf))


def test_rows_with_different_prompts_draw_their_own_sir_laws():
    """Rows interleaving three prompts (position 0 given): each row's one-step law is the SIR law of
    its own z; wrong grouping of proposals, energies or z across rows breaks it."""
    firsts = torch.tensor([0, 1, 2]).repeat(6000)  # rows 0, 1, 2, 0, 1, 2, ...
    zt = torch.full((len(firsts), L), MASK)
    zt[:, 0] = firsts
    method = edlm(k=4)
    sampler = method.sampler(SampleConfig(steps=1, sampler="importance"))
    model = exact_model(CompatibleEnergy(JOINT))
    logp = sampler.denoiser(model, zt, 1.0)
    out = sampler.step(model, zt, 1.0, 0.0, logp, torch.Generator().manual_seed(1))
    assert torch.equal(out[:, 0], firsts)
    for a in range(V):
        z = (a, MASK, MASK)
        target = sir_law(log_weights(z), proposal(z)[1], 4)
        assert tv(law(out[firsts == a]), target) < 3 * tv_noise(target, 6000) + 0.005, a


def test_each_row_resamples_one_of_its_own_proposals_and_per_row_generators_ignore_the_batch(monkeypatch):
    """generate with 4 prompts (two rows share one) and one generator per row: every resampled
    x_0* is one of that row's own k proposals, the energy sees each proposal with its own row's z,
    and the batch draws each row's tokens exactly as drawing that row alone with its seed."""
    k = 3
    method = edlm(k=k)
    sampler = method.sampler(SampleConfig(steps=8, sampler="importance"))
    energy = CompatibleEnergy(JOINT, record=True)
    model = exact_model(energy)
    log = []
    real = sampler.resampled_x0

    def recorded(model_, z, t, logp, generator, rows):
        props = []
        real_proposals = method.proposals

        def proposals(*a, **kw):
            props.append(real_proposals(*a, **kw))
            return props[-1]

        monkeypatch.setattr(method, "proposals", proposals)
        before = len(energy.seen)
        x0 = real(model_, z, t, logp, generator, rows)
        monkeypatch.setattr(method, "proposals", real_proposals)
        log.append((z.clone(), rows.clone(), props[0], x0, energy.seen[before:]))
        return x0

    monkeypatch.setattr(sampler, "resampled_x0", recorded)
    prompt = torch.tensor([[0], [1], [2], [0]])
    seeds = [11, 12, 13, 14]
    batch = sampler.generate(model, 4, L - 1, prompt=prompt, generator=row_generators(seeds))
    assert torch.equal(batch.tokens[:, :1], prompt) and not (batch.tokens == MASK).any()
    assert log and any(not rows.all() for _, rows, *_ in log)  # some steps resample only some rows
    for z, rows, props, x0, seen in log:
        index = rows.nonzero().squeeze(1)
        assert len(seen) == 1  # one batched energy pass
        flat_x0, flat_z = seen[0]
        assert torch.equal(flat_x0.view(-1, k, L), props[index])
        assert torch.equal(flat_z.view(-1, k, L), z[index][:, None].expand(-1, k, L))
        for b in range(4):
            if rows[b]:
                assert (props[b] == x0[b]).all(1).any(), b  # one of its own proposals
                assert ((z[b] == MASK) | (props[b] == z[b])).all(), b  # which agree with its z
            else:
                assert torch.equal(x0[b], z[b])
    log.clear()
    for b in range(4):
        alone = sampler.generate(model, 1, L - 1, prompt=prompt[b:b + 1], generator=row_generators([seeds[b]]))
        assert torch.equal(alone.tokens[0], batch.tokens[b]), b


# ---------------------------------------------------------------------- (c) carry-over AR target

class ARModule(torch.nn.Module):
    """conftest's exact AR model of JOINT as the nn.Module AREnergy expects."""

    def __init__(self) -> None:
        super().__init__()
        self.exact = ExactAR(JOINT, vocab=V + 1)

    def forward(self, tokens, mask=None, **kw):
        return self.exact(tokens, mask=mask)


def test_carry_over_ar_target_is_normalised_over_the_completions_and_full_ar_is_not():
    """For every x and mask pattern z of x: sum over the completions x_0 of z of q(x_0) exp(-E) is 1
    with carry_over (prod_{l masked} p_AR(x_l | x_<l)); without, it is p(z's visible tokens), not 1
    unless everything is masked, and normalised it is the exact posterior. EDLM.energy computes the
    AR energy's log q from the denoiser itself when not given it."""
    method = edlm(energy="nce", k=4)
    co = AREnergy(ARModule(), bos_id=0, mask_id=MASK, carry_over=True)
    full = AREnergy(ARModule(), bos_id=0, mask_id=MASK, carry_over=False)
    off_one = 0.0
    for x in SEQS.tolist():
        for masked in patterns():
            z = pattern_z(x, masked)
            post, log_q = proposal(z)
            on = log_q > -math.inf
            x0, zt = SEQS[on], torch.tensor(z).expand(int(on.sum()), L)
            for energy, name in ((co, "co"), (full, "full")):
                target = (log_q[on] - energy(x0, zt, log_q=log_q[on])).exp()
                own = method.energy(exact_model(energy), x0, zt, torch.full((len(x0),), 0.5))
                assert torch.allclose(own, energy(x0, zt, log_q=log_q[on]), atol=1e-10)
                if name == "co":
                    assert abs(float(target.sum()) - 1) < 1e-12, (x, z)
                else:
                    assert abs(float(target.sum()) - float(JOINT[on].sum())) < 1e-12
                    assert torch.allclose(target / target.sum(), post[on], atol=1e-12)
                    off_one = max(off_one, abs(float(target.sum()) - 1))
    assert off_one > 0.5


# ------------------------------------------------------------------------------- (d) the bound

def estimates(method, model, copies: int, seeds) -> torch.Tensor:
    """(copies * len(seeds), 27) independent nll_bound draws for every x of SEQS (n_samples = 4)."""
    x0 = SEQS.repeat(copies, 1)
    return torch.cat([method.nll_bound(model, x0, n_samples=4, generator=torch.Generator().manual_seed(s))
                      .nll.view(copies, -1) for s in seeds])


def test_sir_bound_estimator_has_the_exact_expectation_and_more_draws_shrink_its_bias():
    """Imperfect energy (the exact one times 0.5), k = 2: the estimator's mean over draws is its
    exact expectation (B_k plus the Jensen bias of -log of a one-draw rho estimate) within 4
    standard errors, for every x and pooled; the exact bias is positive for every x; with
    bound_draws = 8 the mean moves down toward B_k and stays above it."""
    k, scale = 2, 0.5
    bound, expected = exact_bound(k, scale)
    assert (expected > bound + 1e-3).all()
    model = exact_model(scale=scale)
    one = estimates(edlm(k=k, bound_draws=1, eps=EPS, sampling_eps=EPS), model, 100, range(20))  # (2000, 27)
    mean, se = one.mean(0), one.std(0) / math.sqrt(len(one))
    assert ((mean - expected).abs() <= 4 * se).all(), ((mean - expected) / se)
    pooled_se = float(se.pow(2).sum().sqrt()) / 27
    assert abs(float((mean - expected).mean())) <= 4 * pooled_se
    assert float((mean - bound).mean()) > 8 * pooled_se  # the bias is visible at this precision

    many = estimates(edlm(k=k, bound_draws=8, eps=EPS, sampling_eps=EPS), model, 100, range(20, 40))
    mean8, se8 = many.mean(0), many.std(0) / math.sqrt(len(many))
    pooled8 = float(se8.pow(2).sum().sqrt()) / 27
    assert float((mean8 - bound).mean()) >= -4 * pooled8
    assert float((mean - mean8).mean()) > 4 * math.hypot(pooled_se, pooled8)
    assert float((mean8 - bound).mean()) < 0.5 * float((mean - bound).mean())


def test_k1_bound_is_mdlms_bound_on_the_same_generator_stream():
    x0 = SEQS.repeat(4, 1)
    for window in (1.0, 0.3):
        ours = edlm(k=1, window=window).nll_bound(exact_model(), x0, n_samples=3,
                                                  generator=torch.Generator().manual_seed(5))
        theirs = mdlm().nll_bound(ExactDenoiser(JOINT), x0, n_samples=3, generator=torch.Generator().manual_seed(5))
        assert torch.allclose(ours.nll, theirs.nll, rtol=1e-12, atol=1e-12)
        assert torch.equal(ours.tokens, theirs.tokens)


def test_exact_energy_bound_is_above_the_entropy_and_bounds_the_samplers_own_law():
    """Exact energy: B_1 = -log p(x) for every x (MDLM with the exact denoiser); for k = 2, 3 the
    mean of B_k over x ~ JOINT is above the entropy (the sum over masked positions of
    KL(p(x_l | z) || p_k(x_l | z)) >= 0), but for some x B_k(x) < -log p(x): B_k bounds -log p_model,
    the law of the continuous-time sampler (one-position marginals p_k), which is not JOINT."""
    truth = -JOINT.log()
    entropy = float((JOINT * truth).sum())
    b1, _ = exact_bound(1)
    assert torch.allclose(b1, truth, atol=1e-4)
    for k in (2, 3):
        bound, expected = exact_bound(k)
        closed, model = any_order_bound_and_law(k)
        assert torch.allclose(bound, closed, atol=1e-4)  # quadrature on [EPS, 1] == closed form
        assert abs(float(model.sum()) - 1) < 1e-12
        assert (closed >= -model.log() - 1e-12).all()
        assert float((JOINT * bound).sum()) > entropy + 0.005
        assert (bound < truth - 0.05).any() and (bound > truth + 0.05).any()
        assert tv(model, JOINT) > 0.03
        assert (expected >= truth).all()  # the contract's per-x check passes through this bias


def test_sampler_with_many_steps_draws_the_law_its_bound_bounds():
    """k = 2, exact energy, 256 steps (about one token per step): the draws follow p_model, not
    JOINT, i.e. the law whose NELBO B_k is."""
    _, model = any_order_bound_and_law(2)
    n = 6000
    sampler = edlm(k=2).sampler(SampleConfig(steps=256, sampler="importance"))
    tokens = sampler.generate(exact_model(), n, L, generator=torch.Generator().manual_seed(3)).tokens
    assert tv(law(tokens), model) < 3 * tv_noise(model, n) + 0.01
    assert tv(law(tokens), JOINT) > tv(law(tokens), model) + 0.02


# ---------------------------------------------------------------------- (e) the joint plug-in

def test_joint_plug_in_is_below_the_entropy_with_the_exact_posterior_so_it_is_refused():
    """Exact energy, exact log Z: the plug-in's integrand is w(t) -log p(x_masked | z), whose mean
    over x ~ JOINT is below the entropy (sum_l H(x_l | z) >= H(x_masked | z)); B_k's is above. No
    estimate of log Z can make it a bound, so edlm.bound=joint is refused in one line."""
    entropy = float(-(JOINT * JOINT.log()).sum())
    prior = EPS * math.log(V) * L
    plug_in = torch.full((27,), prior, dtype=torch.float64)
    for i, x in enumerate(SEQS.tolist()):
        for masked in patterns():
            a = int(masked.sum())
            if a == 0:
                continue
            post, _ = proposal(pattern_z(x, masked))
            plug_in[i] += time_weights()[a] * -math.log(float(post[i]))
    b2, _ = exact_bound(2)
    assert float((JOINT * plug_in).sum()) < entropy - 0.1
    assert float((JOINT * b2).sum()) > entropy

    with pytest.raises(ConfigError) as err:
        edlm(k=2, bound="joint")
    assert "edlm.bound=joint" in str(err.value) and "sir" in str(err.value) and "\n" not in str(err.value)


# -------------------------------------------------------------------------- (f) the sampler

def test_k1_importance_sampler_is_mdlms_ancestral_sampler():
    """k = 1 (any window): the same tokens and NFE as MDLM's AncestralSampler under one seed, with
    one generator and with per-row generators and a prompt; no energy pass."""
    for window in (1.0, 0.5):
        energy = ExactEnergy(JOINT)
        ours = ImportanceSampler(edlm(k=1, window=window), k=1, window=window, steps=16)
        theirs = AncestralSampler(mdlm(), steps=16)
        for prompt in (None, torch.tensor([[1]])):
            length = L if prompt is None else L - 1

            def generator():
                return torch.Generator().manual_seed(0) if prompt is None else row_generators(range(64))

            a = ours.generate(exact_model(energy), 64, length, prompt=prompt, generator=generator())
            b = theirs.generate(ExactDenoiser(JOINT), 64, length, prompt=prompt, generator=generator())
            assert torch.equal(a.tokens, b.tokens) and a.nfe == b.nfe
        assert energy.calls == 0


def test_steps_outside_the_window_are_mdlm_steps_and_inside_resample():
    """window = 0.5, k = 4, 8 steps: every step with t >= 0.5 that unmasks a token resamples, and
    every step with t < 0.5 is AncestralSampler's step (same z out, same generator state after)."""
    method = edlm(k=4, window=0.5)
    sampler = method.sampler(SampleConfig(steps=8, sampler="importance"))
    plain = AncestralSampler(method, steps=8)
    model = exact_model()
    times, outside = [], 0
    real_step, real_resample = sampler.step, sampler.resampled_x0

    def resample(model_, z, t, *a):
        times.append(t)
        return real_resample(model_, z, t, *a)

    def step(model_, z, t, s, logp, generator):
        nonlocal outside
        if t < 0.5:
            g = torch.Generator()
            g.set_state(generator.get_state())
            expect = plain.step(model_, z, t, s, logp, g)
            out = real_step(model_, z, t, s, logp, generator)
            assert torch.equal(out, expect) and torch.equal(g.get_state(), generator.get_state())
            outside += 1
            return out
        out = real_step(model_, z, t, s, logp, generator)
        assert torch.equal(out, z) or (times and times[-1] == t)  # a step that unmasks resampled
        return out

    sampler.step, sampler.resampled_x0 = step, resample
    sampler.generate(model, 200, L, generator=torch.Generator().manual_seed(0))
    assert times and min(times) >= 0.5 and outside > 0


def test_window_zero_is_plain_mdlm():
    energy = ExactEnergy(JOINT)
    a = edlm(k=4, window=0.0).sampler(SampleConfig(steps=8, sampler="importance")).generate(
        exact_model(energy), 64, L, generator=torch.Generator().manual_seed(0))
    b = AncestralSampler(mdlm(), steps=8).generate(ExactDenoiser(JOINT), 64, L,
                                                   generator=torch.Generator().manual_seed(0))
    assert energy.calls == 0
    assert torch.equal(a.tokens, b.tokens) and a.nfe == b.nfe


def test_nfe_counts_k_energy_passes_per_resampling_step():
    """NFE = denoiser calls + k per step in which some row resampled (one batched energy pass of
    k proposals per row); steps where no row unmasks spend no energy pass."""
    for k, steps in ((3, 6), (5, 64)):
        denoiser, energy = ExactDenoiser(JOINT), ExactEnergy(JOINT)
        model = ExactEDLM(denoiser, energy)
        sampler = edlm(k=k).sampler(SampleConfig(steps=steps, sampler="importance"))
        changed = []
        real = sampler.step

        def step(model_, z, t, s, logp, generator):
            out = real(model_, z, t, s, logp, generator)
            changed.append(not torch.equal(out, z))
            return out

        sampler.step = step
        gen = sampler.generate(model, 4, L, generator=torch.Generator().manual_seed(1))
        assert energy.calls == sum(changed) > 0
        assert gen.nfe == denoiser.calls + k * energy.calls
        assert sampler.energy_passes == k * energy.calls
        if steps == 64:
            assert not all(changed)  # some steps unmasked nothing and spent no energy pass
