"""The conditional bound: `nll_bound(..., given=G)` for every method, against exact answers.

Positions G (B, L) bool are a clean context: never corrupted, not counted, so the bound is on
-log p(x at the other positions | x at G) (lm-eval's loglikelihood, ddlm/interop/lm_eval.py).
On conftest.JOINT (V = 3 symbols, L = 3) with each method's exact model:

  - given=None is the bound as it was before `given` existed, bit for bit (its loop re-run here);
    an all-False given is given=None, bit for bit;
  - the conditional bound is >= the exact conditional NLL for every x and context pattern, and
    tight (the mean gap within 4 standard errors + 1e-3 nats) where the unconditional one is;
    AR's is exact, and AR refuses a context that is not a prefix;
  - the context is never corrupted: every input the model sees holds x0 at G.
"""
import math

import pytest
import torch

from ddlm.errors import ConfigError
from ddlm.methods.base import method_class
from ddlm.methods.noise import time_per_position

from conftest import EXACT_MODELS, JOINT, MASK, SEQS, V, ExactScores, kernel

L = SEQS.shape[1]
FLOORS = {"eps": 1e-6, "sampling_eps": 1e-6}
CASES = {  # id -> (method, options): the tiny cases of tests/test_contract.py's bound check
    "ar": ("ar", {}),
    "mdlm": ("mdlm", FLOORS),
    "sedd": ("sedd", FLOORS),
    "sedd-uniform": ("sedd", {"graph": "uniform", "schedule": "geometric", "sigma_min": 1e-5,
                              "sampling_eps": 1e-6}),
    "bd3-1": ("bd3", {**FLOORS, "block_size": 1}),
    "bd3-3": ("bd3", {**FLOORS, "block_size": 3}),
    "edlm": ("edlm", {**FLOORS, "bound_draws": 2}),
}
PREFIXES = [(True, False, False), (True, True, False)]
ANYWHERE = PREFIXES + [(False, True, False), (True, False, True), (False, False, True)]


def build(case: str):
    name, options = CASES[case]
    cls = method_class(name)
    return cls(cls.config_class(**options), vocab_size=V + 1, mask_id=MASK, bos_id=0, pad_id=0, context=L)


def given_rows(pattern, n: int) -> torch.Tensor:
    return torch.tensor(pattern, dtype=torch.bool).expand(n, L)


def bound(method, model, x0, seed, **kw):
    return method.nll_bound(model, x0, n_samples=4, generator=torch.Generator().manual_seed(seed), **kw)


# ------------------------------------------------------------------- given=None is unchanged

def bound_before_given(method, model, x0, seed) -> torch.Tensor:
    """(B,) nll_bound as written before `given` (the loop of ddlm/methods/noise.py then; AR's sum)."""
    if method.name == "ar":
        return method.loss(model, x0).token_nll.double().sum(1)
    B, _ = x0.shape
    g = torch.Generator().manual_seed(seed)
    weights = torch.ones(x0.shape, dtype=torch.float64)
    total = torch.zeros(B, dtype=torch.float64)
    for t in method.eval_times(B, L, 4, generator=g):
        total += (method.sampled_nll(model, x0, time_per_position(t, L), g) * weights).sum(1)
    return total / 4 + (method.prior_nll(x0) * weights).sum(1)


@pytest.mark.parametrize("case", [c for c in CASES if c != "edlm"])
def test_no_context_is_the_bound_as_before_bit_for_bit(case):
    method = build(case)
    model = EXACT_MODELS[method.name](method)
    x0 = SEQS.repeat(3, 1)
    assert torch.equal(bound(method, model, x0, 7).nll, bound_before_given(method, model, x0, 7))


@pytest.mark.parametrize("case", list(CASES))
def test_an_empty_context_is_no_context_bit_for_bit(case):
    method = build(case)
    model = EXACT_MODELS[method.name](method)
    x0 = SEQS.repeat(3, 1)
    plain = bound(method, model, x0, 3)
    empty = bound(method, model, x0, 3, given=torch.zeros(x0.shape, dtype=torch.bool))
    assert torch.equal(plain.nll, empty.nll) and torch.equal(plain.tokens, empty.tokens)


# ----------------------------------------------------------- the exact conditional, tightly

def start_law(method, pattern) -> torch.Tensor:
    """(27,) the law the exact model's process starts from with the context clean: JOINT, or
    JOINT noised by sigma_bar(0) > 0 (SEDD's geometric schedule) at the other positions only."""
    schedule = getattr(method, "schedule", None)
    if schedule is None or schedule.total_noise(torch.zeros((), dtype=torch.float64)) == 0:
        return JOINT
    K = kernel(method.cfg.graph, schedule.total_noise(torch.zeros(1, dtype=torch.float64)),
               method.vocab_size, method.mask_id)[0]  # (vocab, vocab)
    kept = torch.tensor(pattern)
    step = torch.where(kept[None, None, :], (SEQS[:, None, :] == SEQS[None, :, :]).double(),
                       K[SEQS[:, None, :], SEQS[None, :, :]])  # (27 x, 27 a, L)
    return step.prod(-1) @ JOINT


def conditional_nll(law: torch.Tensor, pattern) -> torch.Tensor:
    """(27,) -log p(x at the other positions | x at the pattern's positions) under `law`."""
    kept = torch.tensor(pattern)
    same = (SEQS[:, None, kept] == SEQS[None, :, kept]).all(-1).double()  # (27, 27) same context
    return -law.log() + (same @ law).log()


class ContextScores:
    """SEDD's exact concrete scores of the process that keeps the context clean: for each context
    value, ExactScores of JOINT restricted to it (the clean context's factor cancels in every ratio
    at the other positions). The context's own rows are a finite dummy (they are not counted). The
    absorbing graph needs none of this (its unconditional exact scores at a clean context are
    these), the uniform graph does (there a token may have been noised into the context's value)."""

    def __init__(self, method, pattern) -> None:
        self.method, self.kept = method, torch.tensor(pattern)

    def __call__(self, z, *, sigma=None, **_):
        out = torch.zeros(*z.shape, self.method.vocab_size, dtype=torch.float64)
        context = z[:, self.kept]
        for value in torch.unique(context, dim=0):
            rows = (context == value).all(1)
            joint = JOINT * (SEQS[:, self.kept] == value).all(1)
            exact = ExactScores.for_method(self.method, joint=joint / joint.sum())
            out[rows] = exact(z[rows], sigma=sigma[rows])
        out[:, self.kept] = 0.0
        return out


def exact_model(method, pattern):
    if method.name == "sedd" and method.cfg.graph == "uniform":
        return ContextScores(method, pattern)
    return EXACT_MODELS[method.name](method)


def patterns_of(case: str):
    """Prefixes for the block-autoregressive methods (a block reads only the context in or before
    it, so a later context would be a weaker conditional), any pattern for the others."""
    return PREFIXES if CASES[case][0] in ("ar", "bd3") and not case.endswith("-3") else ANYWHERE


@pytest.mark.parametrize("case", list(CASES))
def test_conditional_bound_is_the_exact_conditional_nll_with_the_exact_model(case):
    method = build(case)
    for pattern in patterns_of(case):
        model = exact_model(method, pattern)
        truth = conditional_nll(start_law(method, pattern), pattern)  # (27,)
        copies = 40  # 40 copies x 20 calls x 4 times, as tests/test_contract.py (heavy tails need them)
        x0 = SEQS.repeat(copies, 1)
        given = given_rows(pattern, len(x0))
        first = bound(method, model, x0, 0, given=given)
        assert torch.equal(first.tokens, torch.full((len(x0),), float(L - sum(pattern)), dtype=torch.float64))
        if first.exact:
            assert torch.allclose(first.nll.view(copies, -1)[0], truth, atol=1e-5), (pattern, first.nll[:27] - truth)
            continue
        calls = 40 if case == "sedd-uniform" else 20  # its one-free-position estimates are heavy-tailed
        draws = torch.cat([bound(method, model, x0, seed, given=given).nll.view(copies, -1)
                           for seed in range(1, calls + 1)])  # (40 * calls, 27)
        mean, se = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
        assert (mean >= truth - 4 * se - 1e-9).all(), (pattern, (mean - truth) / se)
        gap, gap_se = (mean - truth).mean(), se.pow(2).sum().sqrt() / len(se)
        assert gap.abs() <= 4 * gap_se + 1e-3, (pattern, gap, gap_se)


def test_ar_refuses_a_context_that_is_not_a_prefix():
    method = build("ar")
    with pytest.raises(ConfigError, match="prefix"):
        method.nll_bound(EXACT_MODELS["ar"](method), SEQS, given=given_rows((False, True, False), len(SEQS)))


# ------------------------------------------------------------------ the context stays clean

class Spy:
    """Wraps a model and keeps the token input of every call (the x_t half of BD3's pass)."""

    def __init__(self, model, length: int = L) -> None:
        self.model, self.length, self.inputs = model, length, []

    def __call__(self, tokens, **kw):
        self.inputs.append(tokens[:, :self.length].clone())
        return self.model(tokens, **kw)

    def parameters(self):
        return iter(())

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)


@pytest.mark.parametrize("case", [c for c in CASES if c != "ar"])
def test_the_context_is_never_corrupted(case):
    method = build(case)
    pattern = (True, False, True) if case != "bd3-1" else (True, True, False)
    model = exact_model(method, pattern)
    x0 = SEQS.repeat(4, 1)
    given = given_rows(pattern, len(x0))
    if method.name == "edlm":
        model.denoiser = Spy(model.denoiser)
        spy = model.denoiser
    else:
        model = spy = Spy(model)
    bound(method, model, x0, 0, given=given)
    assert spy.inputs
    for z in spy.inputs:
        assert torch.equal(z[given], x0[given])
    assert any(not torch.equal(z[~given], x0[~given]) for z in spy.inputs)  # the rest is corrupted
