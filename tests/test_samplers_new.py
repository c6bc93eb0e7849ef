"""ReMDM remasking (`remdm`) and confidence-parallel decoding (`confidence`) against exact answers.

  zero schedule == ancestral      eta = 0 (cap, rescale) draws the same random numbers and gives the
                                  same tokens as AncestralSampler, on the exact denoiser and on a
                                  real backbone (cached, uncached, time-conditioned)
  marginals kept at every step    with x_0 drawn from the exact JOINT posterior q(x_0 | z_t) (the
                                  sampler protocol's part 1, as EDLM swaps it), ReMDM's step keeps
                                  q(z_s) = sum_x p(x) q(z_s | x) at every step, for any sigma <=
                                  sigma_max: the law of each frame equals the forward marginal
  exact denoiser -> JOINT         with the factorised exact denoiser, small eta, many steps
  threshold 1.0                   == a hand-written loop decoding the most confident token a step
  given tokens                    never change and never go back to MASK (templates, prompts, BD3)
"""
import itertools

import pytest
import torch

from ddlm.config import SampleConfig
from ddlm.errors import ConfigError
from ddlm.methods.bd3 import BD3, BD3Config
from ddlm.sampling.ancestral import AncestralSampler
from ddlm.sampling.base import row_generators
from ddlm.sampling.block import BlockSampler
from ddlm.sampling.confidence import ConfidenceSampler
from ddlm.sampling.remask import RemaskingSampler
from ddlm.sampling.trace import Recorder

from conftest import JOINT, MASK, PLACE, SEQS, ExactDenoiser, L, V, tiny_built, tiny_transformer
from test_mdlm import method, method11, tv, tv_noise

N = 20000


def seeded(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def one_line(err) -> bool:
    return bool(str(err.value)) and "\n" not in str(err.value)


def recorded(sampler, model, n, length, seed=1, **kw):
    sampler.recorder = Recorder()
    gen = sampler.generate(model, n, length, generator=seeded(seed), **kw)
    return gen, sampler.recorder.frames


# ------------------------------------------------------------------------- zero schedule == MDLM

@pytest.mark.parametrize("remask", ["cap", "rescale"])
def test_zero_schedule_is_the_ancestral_sampler_token_for_token(remask):
    for steps in (1, 5, 64):
        a = AncestralSampler(method(), steps=steps).generate(ExactDenoiser(JOINT), 500, L, generator=seeded())
        r = RemaskingSampler(method(), steps=steps, remask=remask, eta=0.0).generate(
            ExactDenoiser(JOINT), 500, L, generator=seeded())
        assert torch.equal(a.tokens, r.tokens) and a.nfe == r.nfe
    for conditioned, cache in ((False, True), (False, False), (True, True)):
        model = tiny_transformer(time_conditioning=conditioned)
        kw = dict(steps=32, use_cache=cache, top_p=0.9)
        a = AncestralSampler(method11(time_conditioning=conditioned), **kw).generate(
            model, 6, 8, generator=seeded(3))
        r = RemaskingSampler(method11(time_conditioning=conditioned), remask=remask, eta=0.0, **kw).generate(
            model, 6, 8, generator=seeded(3))
        assert torch.equal(a.tokens, r.tokens) and a.nfe == r.nfe
    gens = [cls(method11(), steps=16, **extra).generate(tiny_transformer(), 3, 8, generator=row_generators([4, 5, 6]))
            for cls, extra in ((AncestralSampler, {}), (RemaskingSampler, dict(remask=remask, eta=0.0)))]
    assert torch.equal(gens[0].tokens, gens[1].tokens)  # one generator per row, too


# ------------------------------------------------------------------- marginals, exact posterior

class JointPosteriorRemdm(RemaskingSampler):
    """ReMDM whose part 1 draws x_0 jointly from the exact posterior q(x_0 | z_t) of JOINT."""

    def draw_x0(self, model, z, t, logp, generator, active=None):
        compatible = ((z[:, None, :] == MASK) | (z[:, None, :] == SEQS[None])).all(-1)  # (B, 27)
        post = compatible * JOINT
        return SEQS[torch.multinomial(post / post.sum(1, keepdim=True), 1, generator=generator)[:, 0]]


STATES = torch.tensor(list(itertools.product(range(V + 1), repeat=L)))  # every z: 4^L states


def forward_marginal(m: float) -> torch.Tensor:
    """(4^L,) q(z) = sum_x p(x) prod_l [m if z_l = MASK else (1 - m) 1(z_l = x_l)]."""
    q = torch.zeros(len(STATES), dtype=torch.float64)
    for x, p in zip(SEQS, JOINT):
        for hide in itertools.product([False, True], repeat=L):
            hide = torch.tensor(hide)
            k = int(hide.sum())
            z = torch.where(hide, MASK, x)
            q[int((z * (V + 1) ** torch.arange(L - 1, -1, -1)).sum())] += p * m ** k * (1 - m) ** (L - k)
    return q


def state_tv(tokens: torch.Tensor, q: torch.Tensor) -> float:
    counts = torch.bincount((tokens * (V + 1) ** torch.arange(L - 1, -1, -1)).sum(1),
                            minlength=len(STATES)).double()
    return 0.5 * (counts / counts.sum() - q).abs().sum().item()


@pytest.mark.parametrize("kw", [dict(remask="rescale", eta=1.0), dict(remask="cap", eta=0.3),
                                dict(remask="loop", eta=0.5, alpha_on=0.6, t_on=0.75, t_off=0.25)],
                         ids=["rescale", "cap", "loop"])
def test_remasking_keeps_the_forward_marginals_at_every_step(kw):
    """With the exact joint x_0 draw, z_s ~ q_s after every step (ReMDM's marginal theorem). A
    posterior that unmasks with (m_t - m_s)/m_t, without the sigma alpha_t term, leaves too many
    MASKs and fails at every remasking step."""
    sampler = JointPosteriorRemdm(method(), steps=8, **kw)
    gen, frames = recorded(sampler, ExactDenoiser(JOINT), N, L)
    steps = [f for f in frames if f.note.get("t", 0) > 0]
    assert len(steps) == 8 and sum(f.note["remasked"] for f in steps) > 0.05 * N
    for f in steps:
        s = torch.tensor([[f.note["t"]]], dtype=torch.float64)
        q = forward_marginal(float(sampler.level(s)))
        assert state_tv(f.tokens, q) < 3 * tv_noise(q, N), f.note
    assert tv(gen.tokens, JOINT) < 3 * tv_noise(JOINT, N)


@pytest.mark.parametrize("remask", ["cap", "rescale"])
def test_exact_denoiser_with_small_eta_samples_the_joint(remask):
    gen = RemaskingSampler(method(), steps=64, remask=remask, eta=0.02).generate(
        ExactDenoiser(JOINT), N, L, generator=seeded())
    assert not (gen.tokens == MASK).any() and tv(gen.tokens, JOINT) < 3 * tv_noise(JOINT, N)


# ------------------------------------------------------------------- remasking on a backbone

def test_frames_show_remasking_and_the_cache_is_cleared_after_it():
    """A token may go back to MASK between frames; the last frame is the sample; the network is
    called before every step whose z has a MASK and changed since the last call (a remasking step
    included), never otherwise; with time conditioning every such step calls it with its t."""
    model = tiny_transformer()
    calls = []

    def spy(z, **kw):
        calls.append(z.clone())
        return model(z, **kw)

    sampler = RemaskingSampler(method11(), steps=48, remask="rescale", eta=1.0, top_p=0.9)
    gen, frames = recorded(sampler, spy, 4, 8)
    assert torch.equal(frames[-1].tokens, gen.tokens) and not (gen.tokens == 10).any()
    back = [(a.tokens != 10) & (b.tokens == 10) for a, b in zip(frames, frames[1:])]
    assert any(x.any() for x in back)
    states = [f.tokens for f in frames[:-1] if "t" in f.note or f.note.get("start")]
    expected = [z for k, z in enumerate(states[:-1])
                if (z == 10).any() and (k == 0 or not torch.equal(z, states[k - 1]) or
                                        not any(torch.equal(z, c) for c in calls))]
    assert len(calls) == gen.nfe and all(any(torch.equal(z, c) for c in calls) for z in expected)
    assert all((c == 10).any() for c in calls)
    sigmas = []
    tc = tiny_transformer(time_conditioning=True)

    def tc_spy(z, *, sigma=None, **kw):
        sigmas.append(sigma)
        return tc(z, sigma=sigma, **kw)

    tc_spy.cfg = tc.cfg
    gen = RemaskingSampler(method11(time_conditioning=True), steps=16, remask="cap", eta=0.1).generate(
        tc_spy, 4, 8, generator=seeded())
    assert gen.nfe == len(sigmas) and all(s is not None for s in sigmas)


@pytest.mark.parametrize("kw", [dict(sampler="remdm", remask="cap", eta=0.2), dict(sampler="remdm", remask="conf"),
                                dict(sampler="remdm", remask="loop", eta=0.1), dict(sampler="remdm", remask="rescale", eta=1.0),
                                dict(sampler="confidence", threshold=0.5)], ids=lambda kw: kw.get("remask", kw["sampler"]))
def test_given_tokens_never_change_nor_go_back_to_mask(kw):
    model = tiny_transformer()
    g = seeded(0)
    template = torch.randint(0, 10, (6, 8), generator=g)
    template[torch.rand(6, 8, generator=g) < 0.6] = 10
    given = template != 10
    sampler = method11().sampler(SampleConfig(steps=32, **kw))
    gen, frames = recorded(sampler, model, 6, 8, template=template)
    assert not (gen.tokens == 10).any() and torch.equal(frames[-1].tokens, gen.tokens)
    for f in frames:
        assert torch.equal(f.tokens[given], template[given])
    prompt = torch.tensor([[1, 2, 3]])
    gen, frames = recorded(method11().sampler(SampleConfig(steps=32, **kw)), model, 2, 5, prompt=prompt)
    assert all(torch.equal(f.tokens[:, :3], prompt.expand(2, 3)) for f in frames)
    assert not (gen.tokens == 10).any() and torch.equal(frames[-1].tokens, gen.tokens)


@pytest.mark.parametrize("name", ["remdm", "confidence"])
def test_bd3_runs_them_block_by_block(name):
    _, tok, method_, model = tiny_built("bd3", {"dim": 32, "n_layers": 1, "n_heads": 2}, 16, perturb=0.1)
    sampler = method_.sampler(SampleConfig(sampler=name, steps=8, eta=0.2))
    assert isinstance(sampler, BlockSampler) and type(sampler.inner).__name__ in ("RemaskingSampler", "ConfidenceSampler")
    gen, frames = recorded(sampler, model, 2, 16)
    assert gen.tokens.shape == (2, 16) and not (gen.tokens == tok.mask_id).any()
    assert torch.equal(frames[-1].tokens, gen.tokens)


# ------------------------------------------------------------------------------- confidence

def exact_log_probs(z: torch.Tensor) -> torch.Tensor:
    """SUBS log-probabilities of the exact denoiser, written out: log p(x_l | unmasked of z) at
    MASKs (MASK itself never drawn), a one-hot on the token elsewhere."""
    logits = ExactDenoiser(JOINT)(z).double()
    logits[..., MASK] = float("-inf")
    logp = torch.log_softmax(logits, -1)
    onehot = torch.full_like(logp, float("-inf")).scatter(-1, z[..., None], 0.0)
    return torch.where((z != MASK)[..., None], onehot, logp)


def hand_written_one_per_step(log_probs, n: int, length: int, generator, mask: int) -> tuple[torch.Tensor, int]:
    """Threshold 1.0 by hand: per step, draw x_0 at every position (float64 Gumbel from the same
    stream), then unmask only the MASK whose drawn token is most probable."""
    z = torch.full((n, length), mask, dtype=torch.long)
    calls = 0
    while (z == mask).any():
        logp = log_probs(z)
        u = torch.rand(logp.shape, dtype=torch.float64, generator=generator)
        x0 = (logp - torch.log(-torch.log(u))).argmax(-1)
        p = logp.gather(-1, x0[..., None])[..., 0].exp().masked_fill(z != mask, -1.0)
        for b in range(n):
            if (z[b] == mask).any():
                j = int(p[b].argmax())
                z[b, j] = x0[b, j]
        calls += 1
    return z, calls


def test_threshold_one_is_one_token_a_step_in_confidence_order():
    """The exact denoiser's log-probabilities are written out here; the backbone's come from the
    sampler's own network call (a float32 pass that computes every position instead of the MASK
    rows moves probabilities by ~1e-7, enough to reorder near-ties)."""
    model = tiny_transformer()
    backbone = ConfidenceSampler(method11(), threshold=1.0)
    cases = ((method(), exact_log_probs, ExactDenoiser(JOINT), 300, L),
             (method11(), lambda z: backbone.denoiser(model, z, 1.0), model, 5, 8))
    for m, log_probs, net, n, length in cases:
        want, calls = hand_written_one_per_step(log_probs, n, length, seeded(2), m.mask_id)
        gen, frames = recorded(ConfidenceSampler(m, threshold=1.0), net, n, length, seed=2)
        assert torch.equal(gen.tokens, want) and gen.nfe == calls == length
        for a, b in zip(frames, frames[1:]):
            assert ((a.tokens == m.mask_id) & (b.tokens != m.mask_id)).sum(1).tolist() == [1] * n


def test_lower_thresholds_decode_more_tokens_a_step_and_steps_only_cap():
    model = tiny_transformer()
    nfe = {th: ConfidenceSampler(method11(), threshold=th).generate(model, 8, 8, generator=seeded()).nfe
           for th in (1.0, 0.5, 0.1, 1e-6)}
    assert nfe[1.0] == 8 >= nfe[0.5] >= nfe[0.1] >= nfe[1e-6] == 1
    capped = ConfidenceSampler(method11(), threshold=1.0, steps=3).generate(model, 4, 8, generator=seeded())
    assert capped.nfe == 3 and not (capped.tokens == 10).any()
    one = ConfidenceSampler(method11(), threshold=1.0, steps=256).generate(
        model, 1, 8, template=torch.tensor([[1, 10, 2, 10, 3, 4, 5, 6]]), generator=seeded())
    assert one.nfe == 2


# --------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("name", ["ar", "sedd", "edlm"])
def test_other_methods_refuse_them_in_one_line(name):
    _, _, method_, _ = tiny_built(name, {"dim": 32, "n_layers": 1, "n_heads": 2}, 16)
    for sampler in ("remdm", "confidence"):
        with pytest.raises(ConfigError) as err:
            method_.sampler(SampleConfig(sampler=sampler))
        assert one_line(err) and f"sampler {sampler!r}" in str(err.value)


def test_sample_config_validates_the_new_fields_in_one_line():
    for bad in (dict(remask="loopy"), dict(eta=-0.1), dict(eta=1.5), dict(threshold=0.0), dict(threshold=1.2),
                dict(t_on=0.1, t_off=0.2), dict(alpha_on=1.0)):
        with pytest.raises(ConfigError) as err:
            SampleConfig(**bad)
        assert one_line(err) and next(iter(bad)) in str(err.value)
    m = method11()
    assert isinstance(m.sampler(SampleConfig(sampler="remdm", remask="loop")), RemaskingSampler)
    assert m.sampler(SampleConfig(sampler="confidence", threshold=0.7)).threshold == 0.7
    assert isinstance(BD3(BD3Config(block_size=2), vocab_size=11, mask_id=10, bos_id=9, pad_id=0, context=8)
                      .sampler(SampleConfig(sampler="remdm")).inner, RemaskingSampler)
