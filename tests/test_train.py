"""Trainer: resume == uninterrupted, atomic checkpoints, and AR reaching a Markov chain's entropy rate."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddlm.build import load_for_inference, prepare_data
from ddlm.config import make_config
from ddlm.data.markov import chain_states
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


def test_corrupt_and_truncated_checkpoints_are_one_line(tmp_path, monkeypatch):
    run = make_config(base={**TINY, "method": "ar"}, overrides={"train.steps": "2"})
    ckpt = train(run, tmp_path, quiet=True).checkpoint
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors' has .* bytes but its manifest says"):
        load_for_inference(tmp_path)
    (ckpt / "manifest.json").unlink()  # as written by an earlier version: the readers still refuse
    monkeypatch.setenv("DDLM_ALLOW_UNVERIFIED", "1")  # (such a checkpoint is read only on request)
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
    with pytest.raises(CheckpointError, match="could not write checkpoint step 4 .*disk full.*"
                                              "checkpoints/step_0000002 is intact"):
        train(run, tmp_path, quiet=True)
    assert (tmp_path / "latest").read_text().strip() == "checkpoints/step_0000002"
    assert not list((tmp_path / "checkpoints").glob(".tmp_*"))  # the half-written directory is gone
    assert load_for_inference(tmp_path).step == 2


def markov_corpus(path, n_chars: int, seed: int = 0):
    """Letters a-e from a first-order chain with Dirichlet rows, on one line, so the char tokenizer
    maps it 1:1; returns the transition matrix, its stationary law and its entropy rate in bits."""
    rng = np.random.default_rng(seed)
    k = 5
    P = rng.dirichlet(np.full(k, 0.4), size=k)
    pi = np.linalg.matrix_power(P, 200)[0]
    states = chain_states(P, pi, n_chars, rng)
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


def test_crafted_trainer_state_is_refused_and_not_executed(tmp_path):
    """Resume reads trainer_state.pt with weights_only=True: a pickle that would run code is a
    one-line CheckpointError, and the code does not run."""
    run = make_config(base={**TINY, "method": "ar"}, overrides={"train.steps": "2"})
    ckpt = train(run, tmp_path / "run", quiet=True).checkpoint
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    torch.save({"step": 2, "model": Payload()}, ckpt / "trainer_state.pt")
    more = make_config(base={**TINY, "method": "ar"}, overrides={"train.steps": "4"})
    with pytest.raises(CheckpointError, match=r"trainer_state.pt' has \d+ bytes but its manifest says"):
        train(more, tmp_path / "run", quiet=True)  # the manifest catches the swapped file first
    from ddlm.checkpoint import write_manifest

    write_manifest(ckpt)  # an attacker who rewrites the manifest too still meets weights_only=True
    with pytest.raises(CheckpointError, match="refused"):
        train(more, tmp_path / "run", quiet=True)
    assert not marker.exists()


def test_configs_of_earlier_versions_load(tmp_path, monkeypatch):
    """A config.json without model.block describes the plain backbone; sampling options stored under
    the method then move to the sample section."""
    run = make_config(base={**TINY, "method": "mdlm"},
                      overrides={"train.steps": "1", "model.block": "plain", "model.dropout": "0"})
    ckpt = train(run, tmp_path, quiet=True).checkpoint
    config = json.loads((ckpt / "config.json").read_text())
    del config["model"]["block"], config["sample"]["t_min"], config["sample"]["noise_removal"]
    config["mdlm"].update(sampler="first_hitting", t_min=1e-4, noise_removal="argmax")
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "manifest.json").unlink()  # earlier versions wrote no manifest
    monkeypatch.setenv("DDLM_ALLOW_UNVERIFIED", "1")  # such a checkpoint is read only on request
    loaded = load_for_inference(tmp_path)
    assert loaded.run.model.block == "plain" and loaded.model.noise_embed is None
    assert (loaded.run.sample.sampler, loaded.run.sample.t_min, loaded.run.sample.noise_removal) == \
        ("first_hitting", 1e-4, "argmax")


def test_frozen_parts_stay_out_of_the_optimizer_and_ema(tmp_path, monkeypatch):
    """A method may build a model with frozen parts: they are not optimised or averaged, do not
    change, and are still saved and loaded with the rest."""
    from ddlm.methods.ar import AR
    from ddlm.nn.transformer import Transformer

    def build_partly_frozen(self, model_cfg):
        model = Transformer(model_cfg)
        model.embed.weight.requires_grad_(False)
        return model

    monkeypatch.setattr(AR, "build_model", build_partly_frozen)
    run = make_config(base={**TINY, "method": "ar"}, overrides={"train.steps": "3", "model.dropout": "0"})
    from ddlm.train.loop import Trainer

    trainer = Trainer(run, tmp_path, quiet=True)
    frozen = trainer.model.embed.weight.detach().clone()
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert id(trainer.model.embed.weight) not in optimised and "embed.weight" not in trainer.ema.shadow
    result = trainer.fit()
    assert torch.equal(trainer.model.embed.weight, frozen)
    saved = load_file(result.checkpoint / "model.safetensors")
    assert torch.equal(saved["embed.weight"], frozen)
    assert not torch.equal(saved["head.weight"], trainer.model.head.weight.detach())  # EMA of the rest
    assert torch.equal(load_for_inference(tmp_path).model.embed.weight.cpu(), frozen)


def test_method_without_likelihood_validates_its_loss(tmp_path, monkeypatch, capsys):
    from ddlm.cli import main
    from ddlm.methods.ar import AR

    monkeypatch.setattr(AR, "has_likelihood", False)
    args = ["train", "--method", "ar", "--out", str(tmp_path), "--steps", "2", "--model.dim=32",
            "--model.n_layers=1", "--model.n_heads=2", "--data.seq_len=16", "--train.batch_size=4",
            "--train.eval_every=1", "--train.dtype=fp32", "--train.progress=false"]
    assert main(args) == 0
    assert "valid loss" in capsys.readouterr().out
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in rows if r.get("split") == "valid"]
    assert len(valid) == 2 and all("val_loss" in r and "val_bpc" not in r for r in valid)
    assert all(math.isfinite(r["val_loss"]) and r["val_loss"] > 0 for r in valid)


@pytest.mark.slow
def test_compiled_blocks_train_as_the_plain_model(tmp_path):
    """train.compile compiles each block in place; the losses equal the eager run's (fp32)."""
    run = make_config(base={**TINY, "method": "mdlm"}, overrides={"train.steps": "3", "model.dropout": "0"})
    eager = train(run, tmp_path / "eager", quiet=True)
    compiled = train(make_config(base=run.to_dict(), overrides={"train.compile": "true"}), tmp_path / "c",
                     quiet=True)
    for a, b in zip(eager.losses, compiled.losses):
        assert abs(a - b) < 1e-4
