"""Backbone: KV cache == recompute, masks, conditioning, shapes."""
import pytest
import torch

from ddlm.config import ModelConfig
from ddlm.nn.attention import block_causal_mask, causal_mask
from ddlm.nn.transformer import Transformer


def tiny(**kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=11, max_len=32, dim=32, n_layers=2, n_heads=2, **kw)).eval()


def test_kv_cache_equals_recompute():
    model = tiny()
    x = torch.randint(0, 11, (3, 20))
    full = model(x, mask="causal")
    cache = model.new_cache(3, 32)
    pieces = [model(x[:, :7], mask="causal", cache=cache)]
    for i in range(7, 20):
        pieces.append(model(x[:, i:i + 1], mask="causal", cache=cache))
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


def test_causal_mask_hides_the_future():
    model = tiny()
    x = torch.randint(0, 11, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 11
    a, b = model(x, mask="causal"), model(y, mask="causal")
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    c, d = model(x, mask="bidirectional"), model(y, mask="bidirectional")
    assert not torch.allclose(c[:, :10], d[:, :10])


def test_explicit_masks_match_kinds():
    model = tiny()
    x = torch.randint(0, 11, (2, 12))
    torch.testing.assert_close(model(x, mask=causal_mask(12)), model(x, mask="causal"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x, mask=block_causal_mask(12, 1)), model(x, mask="causal"),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x, mask=block_causal_mask(12, 12)), model(x, mask="bidirectional"),
                               atol=1e-5, rtol=1e-5)


TOL = dict(atol=1e-3, rtol=1e-3)  # float32 kernels of other shapes; a real error is O(0.1)


def perturbed(model, std=0.2):
    """The model with every parameter (zero-initialised gates and output layer too) jittered."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn_like(p))
    return model


def test_noise_conditioning_changes_output_only_when_enabled():
    model = tiny(time_conditioning=True)
    for block in model.blocks:  # zero-init modulation makes sigma irrelevant until trained
        torch.nn.init.normal_(block.modulation.weight, std=0.1)
    x = torch.randint(0, 11, (2, 8))
    a = model(x, sigma=torch.tensor([0.1, 0.1]), mask="bidirectional")
    b = model(x, sigma=torch.tensor([2.0, 2.0]), mask="bidirectional")
    assert a.shape == (2, 8, 11) and a.dtype == torch.float32
    assert not torch.allclose(a, b)
    plain = perturbed(tiny())  # a plain block has no conditioning: sigma is not read at all
    assert plain.noise_embed is None
    torch.testing.assert_close(plain(x, sigma=torch.tensor([0.1, 0.1]), mask="bidirectional"),
                               plain(x, sigma=torch.tensor([2.0, 2.0]), mask="bidirectional"))


def test_gated_blocks_start_as_the_identity():
    """adaLN-zero: with zero gates every block is the identity, so no position sees another."""
    model = tiny(block="gated")
    x = torch.randint(0, 11, (2, 8))
    y = x.clone()
    y[:, 3] = (y[:, 3] + 1) % 11
    a, b = model(x, mask="bidirectional"), model(y, mask="bidirectional")
    keep = [i for i in range(8) if i != 3]
    torch.testing.assert_close(a[:, keep], b[:, keep])
    expected = model.head(model.norm(model.embed(x)))  # identity blocks, zero final modulation
    torch.testing.assert_close(a, expected)
    with torch.no_grad():
        model.blocks[0].modulation.bias[2 * 32:3 * 32] = 1.0  # open the attention gate g1
    c, d = model(x, mask="bidirectional"), model(y, mask="bidirectional")
    assert not torch.allclose(c[:, keep], d[:, keep])


def test_gated_sigma_none_is_a_learned_constant():
    """sigma None is sigma = 0 for every row (float64: the blocks fold the one modulation into
    their weights, the same function up to rounding)."""
    model = perturbed(tiny(block="gated")).double()
    x = torch.randint(0, 11, (3, 8))
    none = model(x, mask="bidirectional")
    torch.testing.assert_close(none, model(x, sigma=torch.zeros(3, dtype=torch.float64), mask="bidirectional"))
    assert not torch.allclose(none, model(x, sigma=torch.ones(3, dtype=torch.float64), mask="bidirectional"),
                              atol=0.05)


def test_per_position_conditioning():
    """sigma (B,), (B, 1), (B, L) with equal columns and (B, K) groups broadcast alike; a different
    level at some positions changes the output."""
    model = perturbed(tiny(block="gated"))
    x = torch.randint(0, 11, (2, 8))
    sigma = torch.tensor([0.3, 1.7])
    ref = model(x, sigma=sigma, mask="bidirectional")
    for same in (sigma[:, None], sigma[:, None].expand(2, 8)):
        torch.testing.assert_close(model(x, sigma=same, mask="bidirectional"), ref, **TOL)
    blocks = torch.tensor([[0.3, 2.0], [1.7, 0.1]])  # two blocks of 4 positions
    torch.testing.assert_close(model(x, sigma=blocks, mask="bidirectional"),
                               model(x, sigma=blocks.repeat_interleave(4, dim=1), mask="bidirectional"),
                               **TOL)
    varied = sigma[:, None].expand(2, 8).clone()
    varied[:, 6:] = 3.0
    out = model(x, sigma=varied, mask="bidirectional")
    assert not torch.allclose(out[:, 6:], ref[:, 6:], atol=0.05)
    with pytest.raises(ValueError, match="do not divide"):
        model(x, sigma=torch.zeros(2, 3), mask="bidirectional")


@pytest.mark.parametrize("block", ["plain", "gated"])
def test_cache_read_without_write(block):
    """A query block reads a cached prefix with cache_write=False: equal to the block-causal full
    pass, and the cache keeps only the prefix (BD3-LM denoises a block this way many times)."""
    model = perturbed(tiny(block=block))
    x = torch.randint(0, 11, (2, 8))
    full = model(x, mask=block_causal_mask(8, 4))
    cache = model.new_cache(2, 8)
    model(x[:, :4], mask="bidirectional", cache=cache)
    assert cache.length == 4
    for _ in range(2):  # reading twice gives the same: nothing was stored
        out = model(x[:, 4:], mask="bidirectional", cache=cache, cache_write=False)
        torch.testing.assert_close(out, full[:, 4:], **TOL)
        assert cache.length == 4


def test_explicit_positions():
    """positions= sets the rotary positions: a shift of all positions changes nothing (relative
    encoding), two halves both at 0..L-1 under a block-diagonal mask equal two separate passes
    (BD3-LM's x_t + x_0 input), and other positions change the output."""
    model = perturbed(tiny(block="gated"))
    x = torch.randint(0, 11, (2, 6))
    ref = model(x, mask="bidirectional")
    torch.testing.assert_close(model(x, mask="bidirectional", positions=torch.arange(5, 11)), ref,
                               **TOL)
    y = torch.randint(0, 11, (2, 6))
    both = torch.cat([x, y], dim=1)
    halves = torch.block_diag(torch.ones(6, 6), torch.ones(6, 6)).bool()
    out = model(both, mask=halves, positions=torch.cat([torch.arange(6), torch.arange(6)]))
    torch.testing.assert_close(out[:, :6], ref, **TOL)
    torch.testing.assert_close(out[:, 6:], model(y, mask="bidirectional"), **TOL)
    shuffled = model(x, mask="bidirectional", positions=torch.tensor([0, 2, 1, 3, 5, 4]))
    assert not torch.allclose(shuffled, ref, atol=0.05)


def test_invalid_model_config_is_one_line():
    from ddlm.errors import ConfigError

    with pytest.raises(ConfigError, match="not divisible"):
        ModelConfig(dim=30, n_heads=4)
