"""Trainer: resume == uninterrupted, atomic checkpoints, and AR reaching a Markov chain's entropy rate."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddlm.build import load_for_inference, prepare_data
from ddlm.config import make_config
from ddlm.errors import CheckpointError, ConfigError
from ddlm.eval.likelihood import evaluate_likelihood
from ddlm.train.loop import train

TINY = {"model": {"dim": 32, "n_layers": 2, "n_heads": 2, "dropout": 0.1},
        "data": {"seq_len": 32},
        "train": {"steps": 8, "batch_size": 4, "warmup_steps": 2, "log_every": 1, "eval_every": 0,
                  "ckpt_every": 0, "progress": False, "dtype": "fp32", "threads": 1}}


def _losses(out):
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


def test_resume_equals_uninterrupted(tmp_path):
    run = make_config(base={**TINY, "method": "ar"})
    full = train(run, tmp_path / "full", quiet=True)
    part = train(run, tmp_path / "part", stop_after=3, quiet=True)
    assert part.interrupted and part.step == 3
    rest = train(run, tmp_path / "part", quiet=True)
    assert rest.resumed_from == 3 and rest.step == 8
    assert _losses(tmp_path / "full") == _losses(tmp_path / "part")
    a = load_file(full.checkpoint / "model.safetensors")
    b = load_file(rest.checkpoint / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(full.checkpoint / "trainer_state.pt", weights_only=False)["model"]
    sb = torch.load(rest.checkpoint / "trainer_state.pt", weights_only=False)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_different_run_in_out_dir_is_refused(tmp_path):
    run = make_config(base={**TINY, "method": "ar"}, overrides={"train.steps": "2"})
    train(run, tmp_path, quiet=True)
    other = make_config(base={**TINY, "method": "ar"}, overrides={"train.steps": "2", "model.dim": "64"})
    with pytest.raises(ConfigError, match="holds a different run"):
        train(other, tmp_path, quiet=True)
    assert train(other, tmp_path, overwrite=True, quiet=True).step == 2


def test_corrupt_and_truncated_checkpoints_are_one_line(tmp_path):
    run = make_config(base={**TINY, "method": "ar"}, overrides={"train.steps": "2"})
    ckpt = train(run, tmp_path, quiet=True).checkpoint
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_for_inference(tmp_path)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_for_inference(tmp_path)


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    import ddlm.checkpoint as ck

    run = make_config(base={**TINY, "method": "ar"}, overrides={"train.steps": "4", "train.ckpt_every": "2"})
    real = ck.save_file
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(ck, "save_file", failing)
    with pytest.raises(OSError):
        train(run, tmp_path, quiet=True)
    assert (tmp_path / "latest").read_text().strip() == "checkpoints/step_0000002"
    assert load_for_inference(tmp_path).step == 2


def markov_corpus(path, n_chars: int, seed: int = 0):
    """Letters a-e from a first-order chain with Dirichlet rows, on one line, so the char tokenizer
    maps it 1:1; returns the transition matrix, its stationary law and its entropy rate in bits."""
    rng = np.random.default_rng(seed)
    k = 5
    P = rng.dirichlet(np.full(k, 0.4), size=k)
    pi = np.linalg.matrix_power(P, 200)[0]
    states = np.empty(n_chars, dtype=np.int64)
    states[0] = rng.choice(k, p=pi)
    u = rng.random(n_chars)
    cum = P.cumsum(1)
    for i in range(1, n_chars):
        states[i] = min(int(np.searchsorted(cum[states[i - 1]], u[i])), k - 1)
    text = "".join("abcde"[s] for s in states)
    path.write_text(text + "\n")
    h = -float((pi[:, None] * P * np.log2(P)).sum())
    return P, pi, h


def test_ar_reaches_markov_entropy_rate(tmp_path):
    P, pi, h = markov_corpus(tmp_path / "chain.txt", 200_000)
    run = make_config(base={"method": "ar", "data": {"corpus": str(tmp_path / "chain.txt"), "seq_len": 64},
                            "model": {"dim": 64, "n_layers": 2, "n_heads": 2},
                            "train": {"steps": 300, "batch_size": 32, "lr": 3e-3, "warmup_steps": 20,
                                      "eval_every": 0, "ckpt_every": 0, "progress": False, "ema": 0.0}})
    result = train(run, tmp_path / "run", quiet=True)
    loaded = load_for_inference(result.out_dir)
    _, data = prepare_data(loaded.run, loaded.tokenizer)
    valid = data["valid"]
    bpc = evaluate_likelihood(loaded.method, loaded.model, valid, batch_size=64).bpc
    # The true chain's NLL of the same validation tokens (first token of each block from pi).
    offset = 1  # char ids: ' '=0, 'a'=1
    x = np.asarray(valid.tokens, dtype=np.int64) - offset
    true_bits = -(np.log2(pi[x[:, 0]]).sum() + np.log2(P[x[:, :-1], x[:, 1:]]).sum()) / x.size
    assert bpc >= true_bits - 2e-3, (bpc, true_bits, h)
    assert bpc <= h + 0.05, (bpc, h)
    assert abs(true_bits - h) < 0.05


def test_rerunning_a_finished_run_is_a_no_op(tmp_path):
    run = make_config(base={**TINY, "method": "ar"}, overrides={"train.steps": "2"})
    first = train(run, tmp_path, quiet=True)
    again = train(run, tmp_path, quiet=True)
    assert again.step == 2 and again.checkpoint == first.checkpoint and not again.interrupted


def test_sigterm_checkpoints_then_stops(tmp_path):
    import os
    import signal

    import ddlm.train.loop as loop

    run = make_config(base={**TINY, "method": "ar"}, overrides={"train.steps": "50"})
    trainer = loop.Trainer(run, tmp_path, quiet=True)
    real_step = trainer._train_step

    def step_then_signal():
        out = real_step()
        if trainer.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    trainer._train_step = step_then_signal
    result = trainer.fit()
    assert result.interrupted and result.step == 5
    assert load_for_inference(tmp_path).step == 5
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
