"""BD3-LM's attention paths equal the dense boolean mask (issue [4 of 9]).

The training pass runs as query groups (clean queries skip the noisy keys) and scores only the
noisy half in the last block; both must equal the plain dense-mask computation. FlexAttention is
the optional sparse path on torches that have it; on CPU it has no backward pass, so it serves
evaluation there and training is refused in one line. The dense mask itself is checked element by
element in tests/test_bd3.py.
"""
import pytest
import torch

from ddlm.build import build_method, complete_model_config
from ddlm.config import make_config
from ddlm.data import build_tokenizer
from ddlm.errors import ConfigError
from ddlm.nn.attention import block_diffusion_block_mask, block_diffusion_mask, flex_available

from ddlm.nn.attention import block_diffusion_groups

from conftest import tiny_transformer

needs_flex = pytest.mark.skipif(not flex_available(), reason="this torch has no FlexAttention")


@pytest.mark.parametrize("block", [1, 2, 8])
def test_query_groups_and_last_block_trim_equal_the_dense_mask(block):
    """Logits of the noisy half (first L of 2L positions): dense mask, every position scored, vs
    query groups with only the first L scored; forward and gradients."""
    # float64, so that the two paths' different summation orders stay far below the tolerance
    model = tiny_transformer(vocab=11, max_len=8).train().double()
    tokens = torch.randint(0, 11, (3, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(8).repeat(2)
    groups = block_diffusion_groups(8, block)
    assert torch.equal(groups.dense(), block_diffusion_mask(8, block))
    outs, grads = [], []
    for mask, logits_for in ((block_diffusion_mask(8, block), None), (groups, 8)):
        model.zero_grad()
        out = model(tokens, mask=mask, positions=positions, logits_for=logits_for)[:, :8]
        out.square().sum().backward()
        outs.append(out)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(outs[0], outs[1], atol=1e-10)
    assert torch.allclose(grads[0], grads[1], atol=1e-8, rtol=1e-10)


@pytest.mark.parametrize("mask", ["causal", "bidirectional"])
def test_scoring_the_first_positions_equals_slicing(mask):
    model = tiny_transformer(vocab=11, max_len=8)
    tokens = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(1))
    full = model(tokens, mask=mask)
    assert torch.allclose(model(tokens, mask=mask, logits_for=5), full[:, :5], atol=1e-6)


@needs_flex
@pytest.mark.parametrize("length, block", [(8, 1), (8, 2), (12, 4), (16, 16)])
def test_block_mask_visits_exactly_the_dense_mask(length, block):
    flex = block_diffusion_block_mask(length, block)
    q = torch.arange(2 * length)[:, None].expand(-1, 2 * length)
    k = torch.arange(2 * length)[None, :].expand(2 * length, -1)
    zero = torch.zeros((), dtype=torch.long)
    visible = flex.mask_mod(zero, zero, q, k)
    assert torch.equal(visible, block_diffusion_mask(length, block))


def built(attention: str):
    run = make_config(base={"method": "bd3", "data": {"seq_len": 16},
                            "model": {"dim": 32, "n_layers": 2, "n_heads": 2},
                            "bd3": {"block_size": 4, "attention": attention}})
    tokenizer = build_tokenizer("char")
    method = build_method(run, tokenizer)
    run = complete_model_config(run, method, tokenizer.vocab_size)
    torch.manual_seed(0)
    model = method.build_model(run.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return method, model.eval()


@needs_flex
def test_flex_bound_equals_dense_bound(monkeypatch):
    monkeypatch.setenv("DDLM_FLEX_EAGER", "1")  # eager FlexAttention: no compiler needed in CI
    x0 = torch.randint(0, 27, (3, 16), generator=torch.Generator().manual_seed(1))
    bounds = []
    for attention in ("dense", "flex"):
        method, model = built(attention)
        bounds.append(method.nll_bound(model, x0, n_samples=2, generator=torch.Generator().manual_seed(0)).nll)
    assert torch.allclose(bounds[0], bounds[1], atol=1e-4, rtol=1e-6), bounds


@needs_flex
def test_flex_training_on_cpu_is_a_one_line_error():
    method, model = built("flex")
    with pytest.raises(ConfigError, match="no CPU backward"):
        method.loss(model.train(), torch.randint(0, 27, (2, 16)))
