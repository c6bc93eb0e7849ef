"""AR sampling: KV-cached == uncached; filters; Gumbel draws in float64."""
import torch

from ddlm.config import ModelConfig
from ddlm.methods.ar import AR, ARConfig
from ddlm.nn.transformer import Transformer
from ddlm.sampling.ar import ARSampler
from ddlm.sampling.base import filter_logits, gumbel_argmax


def ar(context: int) -> AR:
    return AR(ARConfig(), vocab_size=13, mask_id=11, bos_id=12, pad_id=10, context=context)


def test_cached_equals_uncached_sampling():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=13, max_len=40, dim=32, n_layers=2, n_heads=2)).eval()
    prompt = torch.tensor([1, 2, 3])
    outs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(123)
        outs.append(ARSampler(ar(40), use_cache=use_cache, top_p=0.95, banned=()).generate(
            model, 4, 30, prompt=prompt, generator=g))
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    assert outs[0].tokens.shape == (4, 33) and torch.equal(outs[0].tokens[:, :3], prompt.expand(4, 3))
    assert outs[0].nfe == 30


def test_gumbel_argmax_matches_distribution():
    p = torch.tensor([0.6, 0.3, 0.1, 1e-4], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    draws = gumbel_argmax(p.log().expand(200_000, 4), g)
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    assert torch.allclose(freq, p, atol=4e-3)
    assert freq[3] > 0  # the tail is not truncated


def test_top_p_and_top_k_filter():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    kept = filter_logits(logits, top_k=2).exp()
    assert kept[0, 2:].sum() == 0 and torch.isclose(kept.sum(), torch.tensor(1.0, dtype=torch.float64))
    p = torch.softmax(logits.double(), -1)[0]
    nucleus = filter_logits(logits, top_p=float(p[0] + 1e-3)).exp()[0]
    assert nucleus[0] > 0 and nucleus[1] > 0 and nucleus[2] == 0


def test_generation_past_the_context_slides_a_window():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=13, max_len=8, dim=32, n_layers=2, n_heads=2)).eval()
    prefills = []

    class Spy(torch.nn.Module):
        cfg = model.cfg

        def forward(self, tokens, **kw):
            if tokens.shape[1] > 1 or kw.get("cache") is None:
                prefills.append(tokens.clone())
            return model(tokens, **kw)

        def new_cache(self, *a, **kw):
            return model.new_cache(*a, **kw)

    spy = Spy()
    spy.dummy = torch.nn.Parameter(torch.zeros(1))
    prompt = torch.tensor([1, 2, 3])
    out = ARSampler(ar(8), stride=3, banned=()).generate(spy, 2, 20, prompt=prompt,
                                                         generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (2, 23) and torch.equal(out.tokens[:, :3], prompt.expand(2, 3))
    assert all(p.shape[1] <= 8 and (p[:, 0] == 12).all() for p in prefills)
    # first window: BOS + prompt; each later one: BOS + the last 8 - 3 tokens generated so far
    assert torch.equal(prefills[0][:, 1:], prompt.expand(2, 3))
    done = 8
    for p in prefills[1:]:
        assert torch.equal(p[:, 1:], out.tokens[:, done - 5:done])
        done += 3
    assert done >= 23 and out.nfe == 20
    try:
        ARSampler(ar(8)).generate(model, 1, 4, prompt=torch.arange(8) % 12)
    except Exception as err:
        assert "leaves no room" in str(err)
    else:
        raise AssertionError("a prompt filling the context must be refused")


def test_ar_refuses_a_template():
    from ddlm.errors import ConfigError

    model = Transformer(ModelConfig(vocab_size=13, max_len=8, dim=32, n_layers=1, n_heads=2)).eval()
    try:
        ARSampler(ar(8)).generate(model, 1, 4, template=torch.tensor([[1, 11, 2]]))
    except ConfigError as err:
        assert "cannot fill a template" in str(err)
    else:
        raise AssertionError("AR must refuse a template instead of ignoring it")
