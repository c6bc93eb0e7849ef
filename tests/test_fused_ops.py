"""The backbone's fused forms equal the textbook ones they replace (float64, values and gradients).

  a. `RotaryQKV` (q and k rotated in place of the unfused rotate-half, with its own backward)
     equals RoPE written independently as complex rotation: dims (j, j + hd/2) form the complex
     number x_j + i x_{j+hd/2}, multiplied by exp(i p theta_j), theta_j = base^(-2j/hd)
     (Su et al. 2021, eq. 34); its backward passes gradcheck.
  b. With one modulation for every row (sigma None), the gated block folds shift/scale into the
     LayerNorm and each gate into its branch's output layer: the same function and gradients as the
     unfolded adaLN-zero block, which per-row sigma = 0 still runs; under bf16 autocast too.
  c. `logits_at` (the last block and the output layer computed only at the positions a loss reads)
     equals the full pass indexed at those positions, in values and every parameter's gradient, for
     the plain, folded and per-row blocks, with `logits_for`, and for an empty selection; MDLM's and
     BD3-LM's losses through it equal the SUBS loss written out from the full logits, and so does
     the samplers' denoiser (MDLM, and BD3-LM's block with its prefix cached or recomputed).
"""
from __future__ import annotations

import torch

import pytest

from ddlm.config import ModelConfig, SampleConfig, make_config
from ddlm.methods.mdlm import subs_log_probs
from ddlm.nn.transformer import RotaryQKV, Transformer
from ddlm.build import build_method, complete_model_config
from ddlm.data import build_tokenizer
from ddlm.sampling.block import PrefixModel

BASE = 10000.0


def complex_rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, hd) rotated at `positions` (L,), via complex multiplication."""
    half = x.shape[-1] // 2
    theta = BASE ** (-2 * torch.arange(half, dtype=torch.float64) / x.shape[-1])
    angle = positions.double()[:, None] * theta  # (L, hd/2)
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1)


def cos_sin(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    model = Transformer(ModelConfig(vocab_size=5, max_len=64, dim=2 * head_dim, n_layers=1, n_heads=2))
    cos, sin = model.rotary.cos_sin(positions)
    return cos.double(), sin.double()


def test_rotary_qkv_is_complex_rotation():
    torch.manual_seed(0)
    B, L, H, hd = 2, 7, 3, 8
    positions = torch.arange(5, 5 + L)
    qkv = torch.randn(B, L, 3, H, hd, dtype=torch.float64)
    q, k, v = RotaryQKV.apply(qkv, *cos_sin(positions, hd))
    ref_q, ref_k, ref_v = qkv.permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(q, complex_rope(ref_q, positions), rtol=0, atol=1e-6)
    torch.testing.assert_close(k, complex_rope(ref_k, positions), rtol=0, atol=1e-6)
    assert torch.equal(v, ref_v)


def test_rotary_qkv_gradient():
    torch.manual_seed(0)
    qkv = torch.randn(2, 5, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    cos, sin = cos_sin(torch.arange(5), 4)
    assert torch.autograd.gradcheck(lambda x: RotaryQKV.apply(x, cos, sin), (qkv,))


def gated_model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=11, max_len=32, dim=32, n_layers=2, n_heads=2, block="gated"))
    with torch.no_grad():  # move every zero-initialised modulation, gate and bias off zero
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def outputs_and_grads(model, x, sigma, **kw):
    out = model(x, sigma=sigma, mask="bidirectional", **kw)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum(),
                                list(model.parameters()))
    return out, grads


def test_folded_modulation_equals_per_row_modulation():
    model = gated_model().double()
    x = torch.randint(0, 11, (3, 12))
    for kw in ({}, {"logits_for": 5}):  # also with the last layer trimmed to the first positions
        folded, folded_grads = outputs_and_grads(model, x, None, **kw)
        per_row, per_row_grads = outputs_and_grads(model, x, torch.zeros(3, dtype=torch.float64), **kw)
        torch.testing.assert_close(folded, per_row, rtol=1e-10, atol=1e-10)
        for (name, _), a, b in zip(model.named_parameters(), folded_grads, per_row_grads):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)


@torch.no_grad()
def test_folded_modulation_under_bf16_autocast():
    """Under bf16 autocast the folded block runs and is as close to float32 as the unfolded one."""
    model = gated_model()
    x = torch.randint(0, 11, (3, 12))
    ref = model(x, mask="bidirectional")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        folded = model(x, mask="bidirectional")
        per_row = model(x, sigma=torch.zeros(3), mask="bidirectional")
    assert folded.dtype == torch.float32
    folded_error, per_row_error = (folded - ref).abs().mean(), (per_row - ref).abs().mean()
    assert folded_error < 2 * per_row_error, (folded_error, per_row_error)


def rows_and_grads(model, x, at, **kw):
    out = model(x, logits_at=at, **kw)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum(),
                                list(model.parameters()), allow_unused=True)
    return out, grads


@pytest.mark.parametrize("block,sigma", [("plain", None), ("gated", None), ("gated", "per_position")])
def test_logits_at_equals_the_full_pass_at_those_positions(block, sigma):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=11, max_len=32, dim=32, n_layers=2, n_heads=2, block=block,
                      time_conditioning=sigma is not None)
    model = Transformer(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randint(0, 11, (3, 12))
    s = None if sigma is None else torch.rand(3, 12, dtype=torch.float64)
    for n in (None, 7):
        at = torch.rand(3, n or 12) < 0.4
        at[0] = False  # a row with nothing to score
        for mask in ("bidirectional", "causal"):
            kw = {"sigma": s, "mask": mask, "logits_for": n}
            full = model(x, **kw)
            rows, grads = rows_and_grads(model, x, at, **kw)
            ref, ref_grads = rows_and_grads(model, x, None, **kw)
            assert rows.shape == (int(at.sum()), 11)
            torch.testing.assert_close(rows, full[at], rtol=1e-10, atol=1e-10)
            ref_grads = torch.autograd.grad((full[at] * torch.linspace(-1, 1, 11, dtype=full.dtype)).sum(),
                                            list(model.parameters()), allow_unused=True)
            for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads):
                if b is None:
                    assert a is None or not a.any(), name
                else:
                    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)
    empty = model(x, logits_at=torch.zeros(3, 12, dtype=torch.bool))
    assert empty.shape == (0, 11)


@pytest.mark.parametrize("method", ["mdlm", "bd3"])
def test_masked_rows_loss_equals_subs_loss_from_full_logits(method):
    """The loss scores only masked positions; written out from the full (B, L, V) logits with SUBS
    it is the same value and gradient."""
    m, model = perturbed(method)
    x0 = torch.randint(0, 28, (4, 16))
    t = torch.tensor([0.2, 0.5, 0.7, 0.95], dtype=torch.float64)
    zt = m.corrupt(x0, t[:, None], torch.Generator().manual_seed(0))
    loss = m.token_loss(model, x0, zt, t[:, None], dtype=torch.float64)
    logp = subs_log_probs(full_logits(m, model, zt, x0), zt, m.mask_id, dtype=torch.float64)
    ref = -logp.gather(-1, x0[..., None]).squeeze(-1) / t[:, None] * (zt == m.mask_id)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    params = list(model.parameters())
    grads = torch.autograd.grad(loss.sum(), params, allow_unused=True)
    ref_grads = torch.autograd.grad(ref.sum(), params, allow_unused=True)
    for a, b in zip(grads, ref_grads):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def perturbed(method: str):
    """A tiny char run's method (BD3-LM: L' = 4) and its float64 model, every parameter moved off
    its initial value."""
    run = make_config(base={"method": method, "model": {"dim": 32, "n_layers": 2, "n_heads": 2},
                            "data": {"corpus": "austen", "tokenizer": "char", "seq_len": 16},
                            **({"bd3": {"block_size": 4}} if method == "bd3" else {})})
    tokenizer = build_tokenizer("char")
    m = build_method(run, tokenizer)
    torch.manual_seed(1)
    model = m.build_model(complete_model_config(run, m, tokenizer.vocab_size).model).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m, model


@pytest.mark.parametrize("where", ["mdlm", "bd3 cached", "bd3 recomputed"])
@torch.no_grad()
def test_sampler_denoiser_equals_subs_of_full_logits(where):
    """The samplers ask the network for MASK positions only and carry the others over; the result
    is SUBS of the full pass at every position."""
    method = where.split()[0]
    m, model = perturbed(method)
    sampler = m.sampler(SampleConfig())
    sampler = getattr(sampler, "inner", sampler)
    g = torch.Generator().manual_seed(0)
    z = torch.randint(0, 28, (3, 4 if method == "bd3" else 16), generator=g)
    z[torch.rand(z.shape, generator=g) < 0.5] = m.mask_id
    z[0] = m.mask_id
    if method == "bd3":
        prefix = torch.randint(0, 28, (3, 8), generator=g)
        model = PrefixModel(model, 4, prefix, use_cache=where.endswith("cached"))
    got = sampler.denoiser(model, z, 0.6)
    ref = subs_log_probs(model(z, mask="bidirectional"), z, m.mask_id, dtype=torch.float64)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def full_logits(m, model, zt, x0):
    """The method's backbone call with every position scored."""
    if m.name == "mdlm":
        return model(zt, mask="bidirectional")
    L = zt.shape[1]
    return model(torch.cat([zt, x0], 1), mask=m.training_mask(L, zt.device),
                 positions=torch.arange(L).repeat(2), logits_for=L)
