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


def test_noise_conditioning_changes_output_only_when_enabled():
    model = tiny(time_conditioning=True)
    for block in model.blocks:  # zero-init modulation makes sigma irrelevant until trained
        torch.nn.init.normal_(block.modulation.weight, std=0.1)
    x = torch.randint(0, 11, (2, 8))
    a = model(x, sigma=torch.tensor([0.1, 0.1]), mask="bidirectional")
    b = model(x, sigma=torch.tensor([2.0, 2.0]), mask="bidirectional")
    assert a.shape == (2, 8, 11) and a.dtype == torch.float32
    assert not torch.allclose(a, b)


def test_invalid_model_config_is_one_line():
    from ddlm.errors import ConfigError

    with pytest.raises(ConfigError, match="not divisible"):
        ModelConfig(dim=30, n_heads=4)
