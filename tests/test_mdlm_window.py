"""MDLM's clipped training window and its search (BD3-LM §4 with the sequence as one block):
times inside the window, one block of BD3-LM equal to MDLM under the same window, the search run
by the trainer, saved, restored on resume and shown by `ddlm info`; evaluation ignores it."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_transformer

from ddlm.checkpoint import load_trainer_state
from ddlm.config import make_config
from ddlm.errors import ConfigError
from ddlm.eval.run import checkpoint_info
from ddlm.methods.bd3 import BD3, BD3Config
from ddlm.methods.mdlm import MDLM, MDLMConfig
from ddlm.train.loop import Trainer, train

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


def test_window_options_are_checked_in_one_line():
    for bad in ({"clip_min": 0.6, "clip_max": 0.5}, {"search_every": -1}, {"search_batches": 0},
                {"discrete_steps": 8, "clip_min": 0.3}):
        with pytest.raises(ConfigError) as err:
            MDLMConfig(**bad)
        assert "mdlm." in str(err.value) and "\n" not in str(err.value)


TEXT = "the quick brown fox jumps over the lazy dog\n" * 300


def test_the_search_runs_is_saved_restored_on_resume_and_shown(tmp_path, monkeypatch):
    monkeypatch.setenv("DDLM_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    run = make_config(base={
        "method": "mdlm", "mdlm": {"search_every": 2, "search_batches": 2},
        "model": {"dim": 32, "n_layers": 1, "n_heads": 2}, "data": {"corpus": str(corpus), "seq_len": 16},
        "train": {"steps": 4, "batch_size": 4, "warmup_steps": 2, "log_every": 1, "eval_every": 0,
                  "ckpt_every": 0, "progress": False, "dtype": "fp32", "threads": 1}})
    full = train(run, tmp_path / "full", quiet=True)
    part = train(run, tmp_path / "part", stop_after=2, quiet=True)
    logged = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    searched = [r for r in logged if "mdlm_window" in r]
    assert [r["step"] for r in searched] == [2] and len(searched[0]["mdlm_window_variance"]) == 63
    window = searched[0]["mdlm_window"]
    assert load_trainer_state(part.checkpoint)["method"] == {"window": window}
    assert Trainer(run, tmp_path / "part", quiet=True).method.window == tuple(window)
    rest = train(run, tmp_path / "part", quiet=True)
    assert rest.resumed_from == 2 and rest.losses == full.losses[2:]
    shown = checkpoint_info(tmp_path / "part")["mdlm_window"]
    final = load_trainer_state(rest.checkpoint)["method"]["window"]
    assert shown == f"t ~ U[{final[0]}, {final[1]}] (chosen by the search)"
