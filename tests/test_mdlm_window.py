"""MDLM's clipped training window and its search (BD3-LM §4 with the sequence as one block):
times inside the window, one block of BD3-LM equal to MDLM under the same window; evaluation
ignores it. The search run by the trainer, saved, restored on resume and shown by `ddlm info` is
tested with BD3-LM's (tests/test_bd3.py, test_window_is_saved_and_restored_on_resume[mdlm])."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_transformer

from ddlm.errors import ConfigError
from ddlm.methods.bd3 import BD3, BD3Config
from ddlm.methods.mdlm import MDLM, MDLMConfig

VOCAB, MASK_ID, EOS = 11, 10, 9


def mdlm(**kw) -> MDLM:
    return MDLM(MDLMConfig(**kw), vocab_size=VOCAB, mask_id=MASK_ID, bos_id=EOS, pad_id=0, context=8)


def symbols(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 9, (n, length), generator=torch.Generator().manual_seed(seed))


def test_training_times_lie_in_the_window_stratified_and_evaluation_ignores_it():
    method = mdlm(clip_min=0.3, clip_max=0.4)
    t = method.training_times(8, 8, generator=torch.Generator().manual_seed(0))
    assert t.shape == (8,) and (t >= 0.3).all() and (t <= 0.4).all()
    assert sorted(((t - 0.3) / 0.1 * 8).floor().long().tolist()) == list(range(8))  # one per stratum
    full = mdlm()
    same = full.training_times(8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(same, full.sample_t(8, generator=torch.Generator().manual_seed(0)))  # default unchanged
    u = method.eval_times(8, 8, 4, generator=torch.Generator().manual_seed(0))
    assert u.min() < 0.3 and u.max() > 0.4  # the bound integrates over the full [eps, 1]


def test_one_block_of_bd3_is_mdlm_under_the_same_window():
    model = tiny_transformer(vocab=VOCAB, max_len=8, seed=0, n_layers=2)
    window = dict(clip_min=0.45, clip_max=0.95)
    one_block = BD3(BD3Config(block_size=8, **window), vocab_size=VOCAB, mask_id=MASK_ID, bos_id=EOS,
                    pad_id=0, context=8)
    plain = mdlm(**window)
    x0 = symbols(6, 8, seed=3)
    a = one_block.loss(model, x0, generator=torch.Generator().manual_seed(1))
    b = plain.loss(model, x0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.token_nll == 0, b.token_nll == 0) and (a.token_nll > 0).any()  # same t, same z_t
    assert torch.allclose(a.token_nll, b.token_nll, rtol=1e-5, atol=1e-5)
    batches = [symbols(16, 8, seed=s) for s in (4, 5)]
    ra = one_block.adapt(model, batches, generator=torch.Generator().manual_seed(2))
    rb = plain.adapt(model, batches, generator=torch.Generator().manual_seed(2))
    va, vb = ra["bd3_window_variance"], rb["mdlm_window_variance"]
    assert va.keys() == vb.keys() and len(vb) == 63
    assert all(abs(va[k] - vb[k]) <= 1e-4 * max(1.0, vb[k]) for k in vb)
    assert one_block.window == plain.window == tuple(rb["mdlm_window"])
    assert min(vb, key=vb.get) == "{:.2f}-{:.2f}".format(*plain.window)


def var_inverse_t(a: float, b: float) -> float:
    """Var(1/t) for t ~ U[a, b]: E[1/t^2] - E[1/t]^2."""
    return (1 / a - 1 / b) / (b - a) - (math.log(b / a) / (b - a)) ** 2


def test_search_variances_of_a_known_integrand():
    """With the loss integrand replaced by the weight 1/t itself, a candidate's variance is
    Var(1/t) for t ~ U[a, b], known in closed form: the search's pooled draws (times stratified over
    the full window, each candidate keeping those inside it) recover it for every window away from
    t = 0 (where 1/t is too heavy-tailed to check), and the search picks its argmin, (0.5, 1)."""
    method = mdlm(search_draws=400)
    method.window_nll = lambda model, x0, t, generator=None: (1 / t.reshape(-1, 1)).expand(x0.shape).float()
    record = method.adapt(None, [symbols(16, 8, seed=s) for s in (4, 5)], generator=torch.Generator().manual_seed(0))
    variances = record["mdlm_window_variance"]
    assert len(variances) == 63
    for key, value in variances.items():
        a, b = map(float, key.split("-"))
        if a >= 0.1:
            assert value == pytest.approx(var_inverse_t(a, b), rel=0.1), key
    assert method.window == (0.5, 1.0) == tuple(record["mdlm_window"])


def test_window_options_are_checked_in_one_line():
    for bad in ({"clip_min": 0.6, "clip_max": 0.5}, {"search_every": -1}, {"search_batches": 0},
                {"search_draws": 0},
                {"discrete_steps": 8, "clip_min": 0.3}):
        with pytest.raises(ConfigError) as err:
            MDLMConfig(**bad)
        assert "mdlm." in str(err.value) and "\n" not in str(err.value)
