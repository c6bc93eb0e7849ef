"""BD3-LM (block discrete denoising diffusion, Arriola et al., ICLR 2025) against exact answers.

  masks        block_diffusion_mask / prefix_block_mask / block_causal_mask, element by element
               against their definitions (L' = 1, 4 and L)
  loss         the vectorised x_t (+) x_0 pass == a per-block loop over clean prefixes (real tiny
               backbone, several L', time-conditioned or not); L' = 1 at t = 1 is the AR loss of the
               same network (== -log p(x) with an exact model); L' = L is MDLM's loss
  exact joint  conftest.ExactMaskedAttention (exact under any attention mask): the block NELBO by
               quadrature is -log p(x); the block sampler's TV to the joint falls with the steps
               per block, first-hitting reaches it
  sampler      KV cache == recomputed prefix (logits and tokens, batch 1 and 4, past the context),
               batched rows == rows drawn alone (per-row generators), EOS and entropy stops
  window       the clipped-window grid, adapt's argmin, training times inside the window, the
               window saved and restored on resume
  runs         fine-tuning from an MDLM checkpoint (train.init), one-line errors, and AR <=
               BD3 <= MDLM bounds above a Markov chain's exact NLL
"""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddlm.build import build_method, load_for_inference, prepare_data
from ddlm.checkpoint import load_trainer_state
from ddlm.config import SampleConfig, make_config
from ddlm.data import build_tokenizer
from ddlm.data.markov import chain_states
from ddlm.errors import ConfigError
from ddlm.commands.evaluate import checkpoint_info
from ddlm.methods.bd3 import BD3, BD3Config, window_grid
from ddlm.methods.mdlm import MDLM, MDLMConfig, subs_log_probs
from ddlm.nn.attention import block_causal_mask, block_diffusion_mask, prefix_block_mask
from ddlm.sampling.base import row_generators
from ddlm.sampling.block import BlockSampler, PrefixModel
from ddlm.commands.sample import sample_checkpoint
from ddlm.train.loop import Trainer, train

from conftest import (JOINT, MASK, V, ExactMaskedAttention, all_sequences, conditional,
                      dirichlet_joint, gauss_legendre, patterns, tiny_transformer)

VOCAB, MASK_ID, EOS = 11, 10, 9  # the real tiny backbone: symbols 0..9 (9 doubles as EOS), MASK 10
JOINT4 = dirichlet_joint(V ** 4, seed=1)  # a second enumerable joint: V = 3 symbols, L = 4
NEG_INF = float("-inf")


def backbone(time_conditioning: bool = False, max_len: int = 8, n_layers: int = 2, seed: int = 0):
    """A gated Transformer (the diffusion default) with every parameter perturbed, so its zero-
    initialised gates and modulations are live. Two layers: a second layer's keys carry what the
    first layer's queries saw, so a wrong x_0 -> x_t mask block also changes the x_t logits."""
    return tiny_transformer(time_conditioning, vocab=VOCAB, max_len=max_len, seed=seed, n_layers=n_layers)


def sampling_backbone(time_conditioning: bool = False, max_len: int = 16):
    """`backbone` with its output layer scaled down (logits of order 1): samples vary, and a
    changed logit would change the draws. The noise embedding is scaled down too: at full size
    its float32 rounding (which differs between batch shapes) alone moves logits by ~2e-5."""
    model = backbone(time_conditioning, max_len=max_len)
    with torch.no_grad():
        model.head.weight.mul_(0.15)
        model.head.bias.mul_(0.15)
        if model.noise_embed is not None:
            model.noise_embed.mlp[-1].weight.mul_(0.2)
            model.noise_embed.mlp[-1].bias.mul_(0.2)
    return model


def bd3(block_size: int, context: int = 8, **kw) -> BD3:
    """BD3-LM over the backbone's 11 ids."""
    return BD3(BD3Config(block_size=block_size, **kw), vocab_size=VOCAB, mask_id=MASK_ID, bos_id=EOS,
               pad_id=0, context=context)


def bd3_exact(block_size: int, length: int, **kw) -> BD3:
    """BD3-LM over the exact joints' V + 1 ids (symbols 0..V-1, MASK = V)."""
    return BD3(BD3Config(block_size=block_size, **kw), vocab_size=V + 1, mask_id=MASK, bos_id=0,
               pad_id=0, context=length)


def symbols(n: int, length: int, seed: int) -> torch.Tensor:
    """(n, length) ids in 0..8 (no MASK, no EOS)."""
    return torch.randint(0, 9, (n, length), generator=torch.Generator().manual_seed(seed))


def one_line(err) -> bool:
    text = str(err.value)
    return bool(text) and "\n" not in text


# ------------------------------------------------------------------------------------- masks

@pytest.mark.parametrize("Lb", [1, 4, 12])
def test_block_diffusion_mask_element_by_element(Lb):
    """(2L, 2L), b(i) = i // L': x_t -> x_t iff same block; x_t -> x_0 iff strictly earlier block;
    x_0 -> x_0 iff same or earlier block; x_0 -> x_t never."""
    n = 12
    mask = block_diffusion_mask(n, Lb, "cpu")
    assert mask.shape == (2 * n, 2 * n) and mask.dtype == torch.bool
    for i in range(2 * n):
        for j in range(2 * n):
            bi, bj = (i % n) // Lb, (j % n) // Lb
            if i < n and j < n:
                want = bi == bj
            elif i < n:
                want = bj < bi
            elif j < n:
                want = False
            else:
                want = bj <= bi
            assert bool(mask[i, j]) == want, (Lb, i, j)
    if Lb == 1:  # the AR view: position i sees its own MASK and the clean tokens before it
        assert torch.equal(mask[:n, :n], torch.eye(n, dtype=torch.bool))
        assert torch.equal(mask[:n, n:], torch.ones(n, n, dtype=torch.bool).tril(-1))
    if Lb == n:  # MDLM: the noisy half is bidirectional and reads nothing clean
        assert mask[:n, :n].all() and not mask[:n, n:].any()


@pytest.mark.parametrize("Lb", [1, 4, 12])
def test_prefix_and_block_causal_masks_element_by_element(Lb):
    n = 12
    causal = block_causal_mask(n, Lb)
    for i in range(n):
        for j in range(n):
            assert bool(causal[i, j]) == (j // Lb <= i // Lb), (i, j)
    for P in range(0, n + 1, Lb):
        N = Lb
        mask = prefix_block_mask(P, N, Lb)
        assert mask.shape == (P + N, P + N)
        for i in range(P + N):
            for j in range(P + N):
                want = (j < P and j // Lb <= i // Lb) if i < P else True
                assert bool(mask[i, j]) == want, (P, i, j)


# ------------------------------------------------------------------- the vectorised loss

def reference_token_loss(model, x0, zt, t_blocks, Lb, time_conditioned) -> torch.Tensor:
    """(B, L) float64: the BD3 loss as a loop over blocks. Block b runs alone after its clean prefix
    x0[:, :b L'] (positions 0.., block-causal: the prefix as it would be cached, the block sees the
    prefix and itself), noise level 0 on the prefix and sigma(t_b) on the block; SUBS by hand;
    log-linear weight 1/t_b on the masked tokens."""
    B, n = x0.shape
    out = torch.zeros(B, n, dtype=torch.float64)
    for b in range(n // Lb):
        P = b * Lb
        tokens = torch.cat([x0[:, :P], zt[:, P:P + Lb]], dim=1)
        mask = torch.tensor([[j // Lb <= i // Lb for j in range(P + Lb)] for i in range(P + Lb)])
        sigma = None
        if time_conditioned:
            t = t_blocks[:, b].double()
            level = -torch.log1p(-(1 - 1e-3) * t)  # log-linear sigma_bar(t), eps = 1e-3
            sigma = torch.cat([torch.zeros(B, P), level.float()[:, None].expand(B, Lb)], dim=1)
        logits = model(tokens, sigma=sigma, mask=mask, positions=torch.arange(P + Lb))[:, P:].double()
        logits[..., MASK_ID] = NEG_INF
        nll = -torch.log_softmax(logits, -1).gather(-1, x0[:, P:P + Lb, None]).squeeze(-1)
        masked = zt[:, P:P + Lb] == MASK_ID
        out[:, P:P + Lb] = torch.where(masked, nll / t_blocks[:, b:b + 1].double(), 0.0)
    return out


@pytest.mark.parametrize("time_conditioning", [False, True], ids=["plain", "time-conditioned"])
@pytest.mark.parametrize("Lb", [1, 2, 4, 8])
def test_vectorised_loss_equals_a_loop_over_clean_prefixes(Lb, time_conditioning):
    n, B = 8, 6
    model = backbone(time_conditioning)
    method = bd3(Lb, time_conditioning=time_conditioning)
    assert method.schedule.name == "loglinear"
    x0 = symbols(B, n, seed=Lb)
    g = torch.Generator().manual_seed(10 + Lb)
    t_blocks = 0.1 + 0.8 * torch.rand(B, n // Lb, dtype=torch.float64, generator=g)  # one t per block
    t_pos = t_blocks.repeat_interleave(Lb, dim=1)  # (B, L)
    # the same masked positions the method draws: MDLM's u < (1 - eps) t per position
    u = torch.rand(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    zt = torch.where(u < (1 - 1e-3) * t_pos, MASK_ID, x0)
    assert (zt == MASK_ID).any() and (zt != MASK_ID).any()
    ref = reference_token_loss(model, x0, zt, t_blocks, Lb, time_conditioning)

    got = method.token_loss(model, x0, zt, t_pos)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5), (got.double() - ref).abs().max()
    # the training entry point: t per block (B, K), z_t drawn inside from the generator
    out = method.loss(model, x0, t=t_blocks, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(out.token_nll.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.isclose(out.loss.double(), ref.sum() / ref.numel(), rtol=1e-5)


@pytest.mark.parametrize("time_conditioning", [False, True], ids=["plain", "time-conditioned"])
def test_block_size_one_at_full_mask_is_the_ar_loss_of_the_same_network(time_conditioning):
    """L' = 1 in the full-mask window t = 1 (bd3.clip_min = clip_max = 1): every token masked,
    weight 1; token i's loss is -log p_theta(x_i | x_<i) with x_<i the clean prefix, read from the
    sampler's KV cache one position at a time."""
    n, B = 8, 4
    model = backbone(time_conditioning)
    method = bd3(1, time_conditioning=time_conditioning, clip_min=1.0, clip_max=1.0)
    x0 = symbols(B, n, seed=5)
    out = method.loss(model, x0, generator=torch.Generator().manual_seed(0))
    ref = torch.zeros(B, n, dtype=torch.float64)
    sigma = None
    if time_conditioning:
        sigma = torch.full((B, 1), -math.log(1e-3))  # sigma_bar(1) = -log eps
    for i in range(n):
        prefix = PrefixModel(model, 1, x0[:, :i], use_cache=True)
        logits = prefix(torch.full((B, 1), MASK_ID), sigma=sigma)[:, 0].double()
        logits[:, MASK_ID] = NEG_INF
        ref[:, i] = -torch.log_softmax(logits, -1).gather(-1, x0[:, i:i + 1]).squeeze(-1)
    assert torch.allclose(out.token_nll.double(), ref, rtol=1e-5, atol=1e-5), (out.token_nll - ref).abs().max()
    assert (out.token_nll > 0).all() and torch.isclose(out.loss.double(), ref.mean(), rtol=1e-5)
    # the same thing as MDLM's integrand with every token masked at t = 1 (weight 1/t = 1)
    every = method.token_loss(model, x0, torch.full_like(x0, MASK_ID), torch.ones(B, 1, dtype=torch.float64))
    assert torch.allclose(every.double(), ref, rtol=1e-5, atol=1e-5)


def test_block_size_one_at_full_mask_with_an_exact_model_is_the_exact_nll():
    for joint, length in ((JOINT, 3), (JOINT4, 4)):
        method = bd3_exact(1, length, clip_min=1.0, clip_max=1.0)
        model = ExactMaskedAttention(joint, length=length)
        seqs = all_sequences(V, length)
        nll = method.loss(model, seqs).token_nll.double().sum(1)
        assert torch.allclose(nll, -joint.log(), atol=1e-5), (nll + joint.log()).abs().max()
        zt = torch.full_like(seqs, MASK)
        exact = method.token_loss(model, seqs, zt, torch.ones(len(seqs), 1), dtype=torch.float64).sum(1)
        assert torch.allclose(exact, -joint.log(), atol=1e-12)


@pytest.mark.parametrize("time_conditioning", [False, True], ids=["plain", "time-conditioned"])
def test_block_size_L_is_mdlm(time_conditioning):
    n, B = 8, 6
    model = backbone(time_conditioning)
    block = bd3(n, time_conditioning=time_conditioning)
    mdlm = MDLM(MDLMConfig(time_conditioning=time_conditioning), vocab_size=VOCAB, mask_id=MASK_ID,
                bos_id=EOS, pad_id=0, context=n)
    x0 = symbols(B, n, seed=7)
    t = torch.linspace(0.1, 0.9, B, dtype=torch.float64)
    a = block.loss(model, x0, t=t, generator=torch.Generator().manual_seed(1))
    b = mdlm.loss(model, x0, t=t, generator=torch.Generator().manual_seed(1))
    assert (a.token_nll > 0).any() and (a.token_nll == 0).any()
    assert torch.equal(a.token_nll == 0, b.token_nll == 0)  # the same z_t
    assert torch.allclose(a.token_nll, b.token_nll, rtol=1e-5, atol=1e-5), (a.token_nll - b.token_nll).abs().max()
    zt = x0.clone()
    zt[:, 1::3] = MASK_ID
    a, b = block.log_x_theta(model, zt, t[:, None], x0=x0), mdlm.log_x_theta(model, zt, t[:, None])
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------- exact joint: bound

@pytest.mark.parametrize("joint, length, Lb", [(JOINT, 3, 1), (JOINT, 3, 3), (JOINT4, 4, 1),
                                               (JOINT4, 4, 2), (JOINT4, 4, 4)],
                         ids=["L3-Lb1", "L3-Lb3", "L4-Lb1", "L4-Lb2", "L4-Lb4"])
def test_block_nelbo_by_quadrature_is_minus_log_likelihood(joint, length, Lb):
    """sum_b int_0^1 w(t) E_{mask pattern of block b at t}[token_loss] dt == -log p(x) for every x,
    exactly over mask patterns, Gauss-Legendre in t, through the method's token_loss (vectorised
    pass) with the exact masked-attention model. Other blocks are left clean (they add 0)."""
    eps = 1e-7
    method = bd3_exact(Lb, length, eps=eps)
    model = ExactMaskedAttention(joint, length=length)
    seqs = all_sequences(V, length)
    S = len(seqs)
    t, w = gauss_legendre(0.0, 1.0, 12)
    Q = len(t)
    x0 = seqs.repeat_interleave(Q, dim=0)  # (S Q, L): row s Q + q is sequence s at node q
    tt = t.repeat(S)[:, None]
    total = torch.zeros(S, dtype=torch.float64)
    for b in range(length // Lb):
        for pattern in patterns(Lb):
            if not pattern.any():
                continue
            masked = torch.zeros(length, dtype=torch.bool)
            masked[b * Lb:(b + 1) * Lb] = pattern
            zt = torch.where(masked, MASK, x0)
            nll = method.token_loss(model, x0, zt, tt, dtype=torch.float64).sum(1)  # (S Q)
            assert (nll[:, None] * 0 == 0).all()  # finite
            k = int(pattern.sum())
            m = (1 - eps) * t
            prob = m ** k * (1 - m) ** (Lb - k)  # (Q,)
            total += (nll.view(S, Q) * prob * w).sum(1)
    assert torch.allclose(total, -joint.log(), atol=1e-5), (total + joint.log()).abs().max()


def test_nll_bound_is_unbiased_for_minus_log_likelihood_with_blocks_of_two():
    """The Monte-Carlo bound (per-block t in [sampling_eps, 1]) on JOINT4 with L' = 2 averages to
    E_x[-log p(x)] within 4 standard errors over independent copies (tests/test_contract.py checks
    each x's bound against -log p(x) for L' = 1 and 3)."""
    method = bd3_exact(2, 4, eps=1e-6, sampling_eps=1e-6)
    model = ExactMaskedAttention(JOINT4, length=4)
    seqs = all_sequences(V, 4)
    copies = 128
    out = method.nll_bound(model, seqs.repeat(copies, 1), n_samples=16,
                           generator=torch.Generator().manual_seed(0))
    assert out.nll.dtype == torch.float64 and not out.exact
    draws = out.nll.view(copies, -1)  # (copies, 81)
    truth = -JOINT4.log()
    per_copy = (draws - truth).mean(1)  # 128 independent estimates of E_x[bound(x) + log p(x)] = 0
    assert abs(per_copy.mean().item()) < 4 * per_copy.std().item() / math.sqrt(copies) + 1e-3
    assert per_copy.std().item() / math.sqrt(copies) < 0.05  # and the check has teeth


def test_eval_times_ignore_the_window_one_per_block():
    """nll_bound draws t ~ U[sampling_eps, 1] per block whatever the training window is."""
    method = bd3_exact(2, 4, sampling_eps=1e-3)
    method.window = (0.4, 0.5)
    seen = []
    real = method.sampled_nll

    def spy(model, x0, t, generator=None, **kw):
        seen.append(t.clone())
        return real(model, x0, t, generator, **kw)

    method.sampled_nll = spy
    x0 = all_sequences(V, 4)
    method.nll_bound(ExactMaskedAttention(JOINT4, length=4), x0, n_samples=3,
                     generator=torch.Generator().manual_seed(0))
    assert len(seen) == 3
    t = torch.stack(seen)  # (3, 81, 4)
    assert t.shape == (3, 81, 4)
    assert torch.equal(t[..., 0], t[..., 1]) and torch.equal(t[..., 2], t[..., 3])  # one per block
    assert not torch.equal(t[..., 0], t[..., 2])
    assert (t >= 1e-3).all() and (t <= 1).all()
    assert (t < 0.4).any() and (t > 0.5).any() and t.max() > 0.9 and t.min() < 0.1
    assert method.window == (0.4, 0.5)


# ------------------------------------------------------------------ exact joint: sampling

N_DRAWS = 20000
PLACE4 = torch.tensor([V ** (3 - i) for i in range(4)])


def tv4(tokens: torch.Tensor, p: torch.Tensor) -> float:
    counts = torch.bincount((tokens * PLACE4).sum(1), minlength=V ** 4).double()
    return 0.5 * (counts / counts.sum() - p).abs().sum().item()


def tv_noise(p: torch.Tensor, n: int) -> float:
    return 0.5 * float(torch.sqrt(2 * p * (1 - p) / (math.pi * n)).sum())


def one_step_law(joint: torch.Tensor) -> torch.Tensor:
    """The law of one ancestral step per block of 2 on L = 4: within a block the tokens are drawn
    independently from their conditionals given the clean prefix."""
    seqs = all_sequences(V, 4)
    out = torch.zeros(len(seqs), dtype=torch.float64)
    for s, x in enumerate(seqs.tolist()):
        p = conditional(joint, x, (), 0) * conditional(joint, x, (), 1)
        p *= conditional(joint, x, (0, 1), 2) * conditional(joint, x, (0, 1), 3)
        out[s] = p
    return out


def block_draws(sampler_name: str, steps: int, *, cache: bool = True, seed: int = 1):
    method = bd3_exact(2, 4)
    sampler = method.sampler(SampleConfig(sampler=sampler_name, steps=steps, cache=cache))
    return sampler.generate(ExactMaskedAttention(JOINT4, length=4), N_DRAWS, 4,
                            generator=torch.Generator().manual_seed(seed))


def test_block_sampler_tv_falls_with_steps_per_block():
    noise = tv_noise(JOINT4, N_DRAWS)
    gens = {T: block_draws("ancestral", T) for T in (1, 2, 64)}
    tvs = {T: tv4(g.tokens, JOINT4) for T, g in gens.items()}
    assert all(not (g.tokens == MASK).any() for g in gens.values())
    assert tvs[1] > tvs[2] > tvs[64], tvs
    assert tvs[64] < 3 * noise < tvs[2], (tvs, noise)
    law = one_step_law(JOINT4)  # one step: independent tokens within a block, given the prefix
    assert tv4(gens[1].tokens, law) < 3 * tv_noise(law, N_DRAWS) < 0.2 * tvs[1]


def test_block_first_hitting_matches_the_joint():
    gen = block_draws("first_hitting", 1)
    assert tv4(gen.tokens, JOINT4) < 3 * tv_noise(JOINT4, N_DRAWS)
    assert gen.nfe == 4 + 1  # one call per token, and one cache write for the first block


# --------------------------------------------------- KV cache == recomputing the prefix

@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("time_conditioning", [False, True], ids=["plain", "time-conditioned"])
def test_prefix_model_logits_cached_equal_recomputed_and_training_pass(batch, time_conditioning):
    """One block after P clean tokens: the KV cache written at once, the cache grown block by block,
    and the recomputed prefix give the same logits; and these are the training pass's logits of that
    block (the x_0 half's keys and values are the cache)."""
    n, Lb = 16, 4
    model = sampling_backbone(time_conditioning, max_len=n)
    method = bd3(Lb, context=n, time_conditioning=time_conditioning)
    x = symbols(batch, n, seed=batch)
    for P in range(0, n, Lb):
        z = x[:, P:P + Lb].clone()
        z[:, ::2] = MASK_ID
        t = torch.full((batch, 1), 0.6, dtype=torch.float64)
        sigma = method.schedule.total_noise(t).float() if time_conditioning else None
        cached = PrefixModel(model, Lb, x[:, :P], use_cache=True)
        grown = PrefixModel(model, Lb, x[:, :0], use_cache=True)
        for b0 in range(0, P, Lb):
            grown.append(x[:, b0:b0 + Lb])
        plain = PrefixModel(model, Lb, x[:, :P], use_cache=False)
        outs = [m(z, sigma=sigma) for m in (cached, grown, plain)]
        assert cached.cache.length == grown.cache.length == P and plain.cache is None
        for other in outs[1:]:
            assert torch.allclose(outs[0], other, atol=1e-5, rtol=1e-5), (P, (outs[0] - other).abs().max())
        if time_conditioning:  # the noise level does reach the logits
            other = cached(z, sigma=method.schedule.total_noise(t / 3).float())
            assert (other - outs[0]).abs().max() > 1e-3
        zt = x.clone()
        zt[:, P:P + Lb] = z
        vectorised = method.log_x_theta(model, zt, t.expand(batch, n), x0=x)[:, P:P + Lb]
        assert torch.allclose(vectorised, subs_log_probs(outs[2], z, MASK_ID), atol=1e-5, rtol=1e-5)


def spying(model):
    """model, plus a list of (input length, positions, cache length) of every call."""
    calls = []

    def spy(tokens, **kw):
        cache = kw.get("cache")
        positions = kw.get("positions")
        offset = cache.length if cache is not None else 0
        top = int(positions.max()) if positions is not None else offset + tokens.shape[1] - 1
        calls.append((tokens.shape[1], top))
        return model(tokens, **kw)

    spy.new_cache = model.new_cache
    spy.parameters = model.parameters
    return spy, calls


@pytest.mark.parametrize("sampler_name", ["ancestral", "first_hitting"])
@pytest.mark.parametrize("batch, time_conditioning", [(1, False), (4, False), (4, True)],
                         ids=["batch1", "batch4", "batch4-time-conditioned"])
def test_kv_cached_sampling_equals_recomputing_the_prefix(sampler_name, batch, time_conditioning):
    """Same tokens under one seed with and without the KV cache, within the context (16 tokens,
    blocks of 4) and far past it (the window slides), with a prompt that ends mid-block."""
    n, Lb = 16, 4
    model = sampling_backbone(time_conditioning, max_len=n)
    method = bd3(Lb, context=n, time_conditioning=time_conditioning)
    prompt = symbols(1, 6, seed=11)
    for length, given in ((n, None), (42, prompt)):
        out = {}
        for use_cache in (True, False):
            sampler = method.sampler(SampleConfig(sampler=sampler_name, steps=6))
            sampler.use_kv_cache = use_cache
            spy, calls = spying(model)
            out[use_cache] = sampler.generate(spy, batch, length, prompt=given,
                                              generator=torch.Generator().manual_seed(batch))
            assert max(top for _, top in calls) < n  # never a position past the context
            assert max(size for size, _ in calls) <= n
        Lp = 0 if given is None else given.shape[1]
        a, b = out[True].tokens, out[False].tokens
        assert a.shape == (batch, Lp + length) and not (a == MASK_ID).any()
        assert torch.equal(a, b)
        if given is not None:
            assert torch.equal(a[:, :Lp], given.expand(batch, Lp))
        assert out[True].lengths is None


@pytest.mark.parametrize("sampler_name", ["ancestral", "first_hitting"])
def test_batched_rows_equal_rows_drawn_alone(sampler_name):
    n, Lb = 16, 4
    model = sampling_backbone(max_len=n)
    method = bd3(Lb, context=n)
    sampler = method.sampler(SampleConfig(sampler=sampler_name, steps=6))
    prompt = symbols(1, 5, seed=2)
    seeds = [11, 12, 13, 14]
    together = sampler.generate(model, 4, 23, prompt=prompt, generator=row_generators(seeds)).tokens
    alone = torch.cat([sampler.generate(model, 1, 23, prompt=prompt, generator=row_generators([s])).tokens
                       for s in seeds])
    assert torch.equal(together, alone)
    assert len({tuple(r) for r in together[:, 5:].tolist()}) == 4  # the rows do differ


# ------------------------------------------------------------------------ variable length

def eos_rich_backbone(n: int = 16):
    """The tiny backbone with its head biased towards EOS (id 9): a few EOS per row."""
    model = sampling_backbone(max_len=n)
    with torch.no_grad():
        model.head.bias[EOS] += 0.8
    return model


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "recomputed"])
def test_eos_stops_each_row_at_its_first_eos(use_cache):
    n, Lb, rows, length = 16, 4, 12, 14  # 2 + 14 = 16: the last block is whole
    model = eos_rich_backbone(n)
    method = bd3(Lb, context=n)
    prompt = symbols(1, 2, seed=0)
    seeds = list(range(100, 100 + rows))
    samplers = {}
    for stop in (True, False):
        samplers[stop] = method.sampler(SampleConfig(steps=4, stop_eos=stop))
        samplers[stop].use_kv_cache = use_cache
    gen = samplers[True].generate(model, rows, length, prompt=prompt, generator=row_generators(seeds))
    full = samplers[False].generate(model, rows, length, prompt=prompt, generator=row_generators(seeds))
    assert gen.lengths is not None and full.lengths is None
    lengths = gen.lengths.tolist()
    assert len(set(lengths)) > 3, lengths  # lengths vary
    for r in range(rows):
        row, ref = gen.tokens[r].tolist(), full.tokens[r].tolist()
        eos = [i for i in range(2, 2 + length) if ref[i] == EOS]
        end = eos[0] + 1 if eos else 2 + length
        assert lengths[r] == end, (r, lengths[r], eos)
        assert row[:end] == ref[:end]  # the same draws up to the stop
        assert all(tok == 0 for tok in row[end:])  # PAD after
        assert EOS not in row[2:end - 1]
    assert any(EOS in row for row in full.tokens[:, 2:].tolist())


class Positional:
    """A model whose logits depend only on the absolute position: uniform over ids 1..4 before
    `switch`, then always id `then`. Reads positions from `positions=` or after its cache, as the
    backbone does."""

    def __init__(self, switch: int, then: int = 5) -> None:
        self.switch, self.then = switch, then

    def new_cache(self, batch, max_len=None):
        return ExactMaskedAttention.Cache(batch)

    def __call__(self, tokens, *, positions=None, cache=None, cache_write=True, logits_for=None, **_):
        B, N = tokens.shape
        offset = cache.length if cache is not None else 0
        positions = torch.arange(offset, offset + N) if positions is None else positions
        if cache is not None and cache_write:
            cache.length += N
        logits = torch.full((B, N, VOCAB), NEG_INF)
        early = positions < self.switch
        logits[:, early, 1:5] = 0.0
        logits[:, ~early, self.then] = 0.0
        logits[..., MASK_ID] = 3.0
        return logits[:, :logits_for] if logits_for is not None else logits


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "recomputed"])
def test_eos_past_the_requested_length_does_not_lengthen_a_row(use_cache):
    """The last block is drawn whole even when the request ends inside it. A model that emits EOS
    only from position 13 on, asked for 13 tokens in blocks of 4: no row has an EOS among its 13
    tokens, so every row has all 13 (lengths <= the tokens returned)."""
    method = bd3(4, context=16)
    sampler = method.sampler(SampleConfig(steps=4, stop_eos=True))
    sampler.use_kv_cache = use_cache
    gen = sampler.generate(Positional(13, then=EOS), 3, 13, generator=torch.Generator().manual_seed(0))
    assert gen.tokens.shape == (3, 13) and not (gen.tokens == EOS).any()
    assert gen.lengths.tolist() == [13, 13, 13]


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "recomputed"])
def test_entropy_stop_cuts_a_repeated_tail(use_cache):
    """Blocks of 4, window 8, threshold 0.5 nats; the model repeats id 5 from position 12. At the
    end of block 4 (20 tokens) the last 8 are all 5 (entropy 0): the row stops and those 8 are cut,
    so it has 12 tokens. At 16 tokens the window still holds 4 varied ones (entropy >= log 2)."""
    method = bd3(4, context=0)
    sampler = method.sampler(SampleConfig(steps=4, stop_entropy=0.5, entropy_window=8))
    sampler.use_kv_cache = use_cache
    gen = sampler.generate(Positional(12), 3, 32, generator=torch.Generator().manual_seed(0))
    assert gen.tokens.shape == (3, 32) and gen.lengths.tolist() == [12, 12, 12]
    assert ((gen.tokens[:, :12] >= 1) & (gen.tokens[:, :12] <= 4)).all()
    assert (gen.tokens[:, 12:] == 0).all()
    sampler = method.sampler(SampleConfig(steps=4))
    free = sampler.generate(Positional(12), 3, 32, generator=torch.Generator().manual_seed(0))
    assert free.lengths is None and (free.tokens[:, 12:] == 5).all()
    assert torch.equal(free.tokens[:, :12], gen.tokens[:, :12])


# ------------------------------------------------------------------- the clipped window

def test_window_grid_contents():
    expected = set()
    for width in range(50, 95, 5):
        for start in range(0, 100 - width + 1, 5):
            expected.add((start, start + width))
    for Lb in (1, 2, 4, 16):
        grid = window_grid(Lb)
        got = [(round(lo * 100), round(hi * 100)) for lo, hi in grid]
        assert len(got) == len(set(got))
        assert all(abs(lo * 100 - a) < 1e-9 and abs(hi * 100 - b) < 1e-9 for (lo, hi), (a, b) in zip(grid, got))
        want = expected | ({(100, 100)} if Lb == 1 else set())
        assert set(got) == want, Lb
        widths = {b - a for a, b in got if a < 100}
        assert widths == set(range(50, 95, 5))
    assert len(window_grid(4)) == sum(range(3, 12)) == 63 and len(window_grid(1)) == 64


def test_training_times_stay_inside_the_window():
    method = bd3(4, context=16, sampling_eps=1e-3)
    g = torch.Generator().manual_seed(0)
    for window in [(0.0, 1.0), (0.0, 0.5), (0.3, 0.85), (0.45, 1.0), (0.05, 0.6)]:
        method.window = window
        for _ in range(3):
            t = method.training_times(8, 16, generator=g)
            assert t.shape == (8, 4) and t.dtype == torch.float64
            lo, hi = max(window[0], 1e-3), window[1]
            assert (t >= lo).all() and (t <= hi).all(), (window, t.min(), t.max())
            if hi > lo:  # stratified: spread over the window
                assert t.max() - t.min() > 0.7 * (hi - lo)
    # the loss draws its per-block times from the window: (B, K) times repeated over each block
    method.window = (0.3, 0.4)
    seen = []
    real = method.sampled_nll

    def spy(model, x0, t, generator=None, **kw):
        seen.append(t)
        return real(model, x0, t, generator, **kw)

    method.sampled_nll = spy
    method.loss(backbone(max_len=16), symbols(8, 16, seed=0), generator=g)
    (t,) = seen
    assert t.shape == (8, 16) and torch.equal(t, t[:, ::4].repeat_interleave(4, 1))
    assert (t >= 0.3).all() and (t <= 0.4).all() and len(t.unique()) == 32


def test_adapt_picks_the_lowest_variance_window_and_full_mask_for_block_size_one():
    """With L' = 1 and an exact model, the full-mask window (1, 1) scores the AR losses, whose
    variance is computed here independently; every other window adds the variance of w(t) * 1[masked],
    so adapt must choose (1, 1). For L' = 2 the chosen window is the argmin of what it returns."""
    method = bd3_exact(1, 3)
    model = ExactMaskedAttention(JOINT, length=3)
    g = torch.Generator().manual_seed(0)
    batches = [all_sequences(V, 3)[torch.randint(0, 27, (16,), generator=g)] for _ in range(3)]
    record = method.adapt(model, batches, generator=torch.Generator().manual_seed(1))
    assert record["bd3_window"] == [1.0, 1.0] and method.window == (1.0, 1.0)
    variances = record["bd3_window_variance"]
    assert len(variances) == 64 and min(variances, key=variances.get) == "1.00-1.00"
    nll = torch.tensor([[-math.log(conditional(JOINT, tuple(row), tuple(range(i)), i)) for i in range(3)]
                        for x in batches for row in x.tolist()])
    assert abs(variances["1.00-1.00"] - nll.var().item()) < 1e-5  # over every block of every batch
    assert method.state_dict() == {"window": [1.0, 1.0]}

    method = bd3_exact(2, 4)
    model = ExactMaskedAttention(JOINT4, length=4)
    batches = [all_sequences(V, 4)[torch.randint(0, 81, (16,), generator=g)] for _ in range(2)]
    record = method.adapt(model, batches, generator=torch.Generator().manual_seed(2))
    variances = record["bd3_window_variance"]
    best = min(variances, key=variances.get)
    assert len(variances) == 63 and "1.00-1.00" not in variances
    assert method.window == tuple(float(v) for v in best.split("-")) == tuple(record["bd3_window"])
    assert len(set(variances.values())) > 10  # the windows were really scored
    restored = bd3_exact(2, 4)
    restored.load_state_dict(json.loads(json.dumps(method.state_dict())))
    assert restored.window == method.window


# ------------------------------------------------------------------------------ runs

TEXT = "the quick brown fox jumps over the lazy dog\n" * 300
TINY_MODEL = {"dim": 32, "n_layers": 1, "n_heads": 2}


def tiny_run(corpus, method: str, options: dict | None = None, **train_opts):
    return make_config(base={
        "method": method, method: options or {}, "model": dict(TINY_MODEL),
        "data": {"corpus": str(corpus), "seq_len": 16},
        "train": {"steps": 4, "batch_size": 4, "warmup_steps": 2, "log_every": 1, "eval_every": 0,
                  "ckpt_every": 0, "progress": False, "dtype": "fp32", "threads": 1, **train_opts}})


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("DDLM_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


@pytest.mark.parametrize("method", ["bd3", "mdlm"])
def test_window_is_saved_and_restored_on_resume(corpus, tmp_path, method):
    """The clipped-window search of BD3-LM and of MDLM (the same mechanism, one block)."""
    key = f"{method}_window"
    run = tiny_run(corpus, method, {"search_every": 2, "search_batches": 2})
    full = train(run, tmp_path / "full", quiet=True)
    part = train(run, tmp_path / "part", stop_after=2, quiet=True)
    logged = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    searched = [r for r in logged if key in r]
    assert [r["step"] for r in searched] == [2] and len(searched[0][f"{key}_variance"]) == 63
    window = searched[0][key]
    assert window != [0.0, 1.0]  # (0, 1) is not in the grid
    state = load_trainer_state(part.checkpoint)
    assert state["method"] == {"window": window}
    assert Trainer(run, tmp_path / "part", quiet=True).method.window == tuple(window)  # restored
    rest = train(run, tmp_path / "part", quiet=True)
    assert rest.resumed_from == 2 and rest.step == 4
    assert rest.losses == full.losses[2:]  # steps 3-4 drew their times in the restored window
    a, b = load_trainer_state(full.checkpoint), load_trainer_state(rest.checkpoint)
    assert a["method"] == b["method"]
    shown = checkpoint_info(tmp_path / "part")[key]  # `ddlm info` names the trained window
    assert shown == f"t ~ U[{b['method']['window'][0]}, {b['method']['window'][1]}] (chosen by the search)"
    if method != "bd3":
        return
    # the trained checkpoint samples with a variable length through `ddlm sample`'s entry point
    result = sample_checkpoint(tmp_path / "full", options={"num": 3, "length": 8, "steps": 2,
                                                           "stop_eos": True})
    assert len(result["tokens"]) == 3 and all(1 <= len(t) <= 8 for t in result["tokens"])


@pytest.fixture
def mdlm_checkpoint(corpus, tmp_path):
    train(tiny_run(corpus, "mdlm", steps=2), tmp_path / "mdlm", quiet=True)
    return tmp_path / "mdlm"


def test_fine_tuning_from_an_mdlm_checkpoint(corpus, tmp_path, mdlm_checkpoint):
    weights = load_file(load_for_inference(mdlm_checkpoint).path / "model.safetensors")
    run = tiny_run(corpus, "bd3", {"block_size": 4}, init=str(mdlm_checkpoint))
    trainer = Trainer(run, tmp_path / "bd3", quiet=True)
    start = trainer.model.state_dict()
    assert start.keys() == weights.keys()
    assert all(torch.equal(start[k], weights[k]) for k in weights)  # the MDLM run's EMA weights
    fresh = Trainer(tiny_run(corpus, "bd3", {"block_size": 4}), tmp_path / "fresh", quiet=True)
    assert not all(torch.equal(fresh.model.state_dict()[k], weights[k]) for k in weights)
    assert trainer.fit().step == 4

    wider = make_config(base={**tiny_run(corpus, "bd3", init=str(mdlm_checkpoint)).to_dict(),
                              "model": {**TINY_MODEL, "dim": 64}})
    with pytest.raises(ConfigError) as err:
        Trainer(wider, tmp_path / "wider", quiet=True)
    assert one_line(err) and "train.init" in str(err.value)


def test_stop_options_with_another_method_are_one_line_errors(mdlm_checkpoint):
    for option in ({"stop_eos": True}, {"stop_entropy": 1.0}):
        with pytest.raises(ConfigError) as err:
            sample_checkpoint(mdlm_checkpoint, options={"num": 1, "length": 4, "steps": 2, **option})
        assert one_line(err) and "bd3" in str(err.value)


def test_one_line_errors():
    tokenizer = build_tokenizer("char")
    run = make_config(base={"method": "bd3", "bd3": {"block_size": 5}, "data": {"seq_len": 16}})
    with pytest.raises(ConfigError) as err:
        build_method(run, tokenizer)
    assert one_line(err) and "block_size=5" in str(err.value) and "16" in str(err.value)
    with pytest.raises(ConfigError) as err:
        bd3(3, context=16)
    assert one_line(err)
    with pytest.raises(ConfigError) as err:  # no context given: checked at the loss
        bd3(4, context=0).loss(backbone(), symbols(2, 6, seed=0))
    assert one_line(err)
    for bad in ({"block_size": 0}, {"clip_min": 0.6, "clip_max": 0.5}, {"search_every": -1},
                {"discrete_steps": 8, "clip_min": 0.3}, {"attention": "sparse"}):
        with pytest.raises(ConfigError) as err:
            BD3Config(**bad)
        assert one_line(err)

    method = bd3(4, context=16)
    template = symbols(2, 16, seed=1)
    template[:, ::3] = MASK_ID
    for name in ("ancestral", "first_hitting"):  # a template is filled block by block, its given tokens kept
        sampler = method.sampler(SampleConfig(sampler=name, steps=2))
        assert isinstance(sampler, BlockSampler)
        out = sampler.generate(backbone(max_len=16), 2, 0, template=template).tokens
        given = template != MASK_ID
        assert torch.equal(out[given], template[given]) and (out != MASK_ID).all()
    with pytest.raises(ConfigError) as err:
        method.sampler(SampleConfig(sampler="euler"))
    assert one_line(err)


# ------------------------------------------------------------------------ a Markov chain

LETTERS = "abcd"  # char ids 1..4


def write_chain(path, n_chars: int, seed: int = 0):
    """An order-1 chain over 4 letters with Dirichlet(0.5) rows, on one line (the char tokenizer
    maps each letter to one token: 1 char per token). Returns (P, stationary pi)."""
    rng = np.random.default_rng(seed)
    k = len(LETTERS)
    P = rng.dirichlet(np.full(k, 0.5), size=k)
    pi = np.linalg.matrix_power(P, 500)[0]
    states = chain_states(P, pi, n_chars, rng)
    path.write_text("".join(LETTERS[s] for s in states) + "\n")
    return P, pi


def test_markov_chain_bounds_are_ordered_ar_bd3_mdlm(tmp_path, monkeypatch):
    """AR <= BD3 (L' = 4) <= MDLM within two standard errors (paired per validation block), and all
    three above the chain's own NLL of the same tokens. Nats per token = per character here.
    lr 1e-3: at 3e-3, BD3's gradient norm spiked to 25 on an Intel Xeon and its bound stayed at twice
    MDLM's gap to the chain after 250 steps (the same code passed on an AMD EPYC); at 1e-3 the three
    were ordered with wide margins for seeds 0, 1 and 2 there."""
    monkeypatch.setenv("DDLM_CACHE", str(tmp_path / "cache"))
    P, pi = write_chain(tmp_path / "chain.txt", 120_000)
    seq_len = 32
    fitted = {}
    for method, options in (("ar", {}), ("bd3", {"block_size": 4}), ("mdlm", {})):
        run = make_config(base={
            "method": method, method: options, "data": {"corpus": str(tmp_path / "chain.txt"), "seq_len": seq_len},
            "model": {"dim": 48, "n_layers": 2, "n_heads": 2},
            "train": {"steps": 250, "batch_size": 32, "lr": 1e-3, "warmup_steps": 20, "eval_every": 0,
                      "ckpt_every": 0, "progress": False, "ema": 0.0, "dtype": "fp32", "threads": 2}})
        fitted[method] = load_for_inference(train(run, tmp_path / method, quiet=True).out_dir)
    _, data = prepare_data(fitted["ar"].run, fitted["ar"].tokenizer)
    valid = data["valid"]
    assert valid.chars_per_token == 1.0
    x = torch.tensor(np.asarray(valid.tokens, dtype=np.int64))
    x = x[((x >= 1) & (x <= len(LETTERS))).all(1)]  # blocks of letters only (not the split's EOS)
    assert len(x) >= 100
    s = (x - 1).numpy()
    truth = torch.from_numpy(-(np.log(pi[s[:, 0]]) + np.log(P[s[:, :-1], s[:, 1:]]).sum(1)))
    rate = -float((pi[:, None] * P * np.log(P)).sum())
    assert abs(truth.mean().item() / seq_len - rate) < 0.05

    nll = {}
    with torch.no_grad():
        for method, loaded in fitted.items():
            g = torch.Generator().manual_seed(1)
            nll[method] = torch.cat([loaded.method.nll_bound(loaded.model, x[i:i + 64], n_samples=32,
                                                             generator=g).nll for i in range(0, len(x), 64)])

    def paired(a, b):
        d = (a - b) / seq_len
        return d.mean().item(), d.std().item() / math.sqrt(len(d))

    for method in nll:
        gap, se = paired(nll[method], truth)
        assert gap > -2 * se, (method, gap, se)
    ar_vs_bd3, se1 = paired(nll["bd3"], nll["ar"])
    bd3_vs_mdlm, se2 = paired(nll["mdlm"], nll["bd3"])
    assert ar_vs_bd3 > -2 * se1, (ar_vs_bd3, se1)
    assert bd3_vs_mdlm > -2 * se2, (bd3_vs_mdlm, se2)
