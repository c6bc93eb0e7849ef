"""Reliability: kill -9 at random moments, checksummed checkpoints, NaN steps skipped, one trainer
per run directory, bounds checked before work starts, and one line for every bad file."""
import json
import os
import random
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from ddlm.build import load_for_inference
from ddlm.checkpoint import load_checkpoint, write_manifest
from ddlm.cli import main
from ddlm.config import make_config
from ddlm.errors import CheckpointError, ConfigError, DataError
from ddlm.train.loop import Trainer, train

TINY = {"method": "ar", "model": {"dim": 32, "n_layers": 1, "n_heads": 2},
        "data": {"seq_len": 32},
        "train": {"steps": 6, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "eval_every": 0,
                  "ckpt_every": 2, "progress": False, "dtype": "fp32", "threads": 1}}
KILL_ARGS = ["--model.dim=32", "--model.n_layers=2", "--model.n_heads=2", "--data.seq_len=32",
             "--train.batch_size=8", "--train.log_every=1", "--train.eval_every=0",
             "--train.ckpt_every=3", "--train.keep_ckpts=2", "--train.dtype=fp32", "--train.threads=1",
             "--train.progress=false", "--steps", "40"]


def tiny(**train_opts):
    return make_config(base={**TINY, "train": {**TINY["train"], **train_opts}})


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DDLM_CACHE", str(tmp_path / "cache"))


# ----------------------------------------------------------------------- kill -9 at random moments

def kill_trials(tmp_path, trials: int, seed: int = 0) -> list[int]:
    """Train in a subprocess, SIGKILL it after a random delay, resume in this process; the result
    must equal an uninterrupted run's weights exactly. Returns the step each kill left behind."""
    reference = tmp_path / "reference"
    assert main(["train", "--method", "ar", "--out", str(reference), "--json", *KILL_ARGS]) == 0
    want = load_file(load_checkpoint(reference).path / "model.safetensors")
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    code = ("import sys; from ddlm.cli import main; sys.exit(main(sys.argv[1:]))")
    rng = random.Random(seed)
    left = []
    for trial in range(trials):
        out = tmp_path / f"trial{trial}"
        child = subprocess.Popen([sys.executable, "-c", code, "train", "--method", "ar", "--out", str(out),
                                  "--json", *KILL_ARGS], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 7.0))  # from before the first checkpoint to after the last
        child.kill()
        child.wait()
        left.append(load_checkpoint(out).step if (out / "latest").is_file() else 0)
        for ckpt in (out / "checkpoints").glob("step_*") if (out / "checkpoints").is_dir() else []:
            load_checkpoint(ckpt)  # every complete checkpoint verifies against its manifest
        assert main(["train", "--method", "ar", "--out", str(out), "--json", *KILL_ARGS]) == 0
        got = load_file(load_checkpoint(out).path / "model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), trial
        steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
                 if '"loss"' in line]
        assert steps == list(range(1, 41)), trial  # torn or repeated lines were cleaned on resume
    return left


def test_kill_9_at_random_moments_resumes_to_the_uninterrupted_weights(tmp_path):
    left = kill_trials(tmp_path, trials=3)
    assert len(left) == 3


@pytest.mark.slow
def test_kill_9_twenty_trials(tmp_path):
    left = kill_trials(tmp_path, trials=20, seed=1)
    print(f"kill -9 left checkpoints at steps {left}")
    assert len(set(left)) > 2  # the kills landed at different moments


# ------------------------------------------------------------------- manifest and bad files

def test_a_damaged_or_swapped_file_is_named_by_the_manifest(tmp_path):
    ckpt = train(tiny(steps=2), tmp_path / "run", quiet=True).checkpoint
    weights = ckpt / "model.safetensors"
    good = weights.read_bytes()
    damaged = bytearray(good)
    damaged[-5] ^= 0xFF  # same size, one byte flipped
    weights.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match="model.safetensors' does not match the checksum"):
        load_for_inference(tmp_path / "run")
    weights.write_bytes(good[:100])
    with pytest.raises(CheckpointError, match="model.safetensors' has 100 bytes but its manifest says"):
        load_for_inference(tmp_path / "run")


@pytest.mark.parametrize("content", [b"", os.urandom(64), b"\x00" * 300])
def test_random_empty_or_zeroed_weights_without_a_manifest_are_one_line(tmp_path, content, monkeypatch):
    ckpt = train(tiny(steps=2), tmp_path / "run", quiet=True).checkpoint
    (ckpt / "manifest.json").unlink()  # as a checkpoint of an earlier version
    monkeypatch.setenv("DDLM_ALLOW_UNVERIFIED", "1")  # which is read only on request
    (ckpt / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_for_inference(tmp_path / "run")


def test_nan_and_integer_weights_are_refused(tmp_path):
    ckpt = train(tiny(steps=2), tmp_path / "run", quiet=True).checkpoint
    weights = load_file(ckpt / "model.safetensors")
    name = next(k for k, v in weights.items() if v.is_floating_point())
    nan = {**weights, name: torch.full_like(weights[name], float("nan"))}
    save_file(nan, ckpt / "model.safetensors")
    write_manifest(ckpt)
    with pytest.raises(CheckpointError, match=f"tensor {name} holds NaN or inf"):
        load_for_inference(tmp_path / "run")
    save_file({**weights, name: weights[name].long()}, ckpt / "model.safetensors")
    write_manifest(ckpt)
    with pytest.raises(CheckpointError, match=f"tensor {name} has dtype int64 in the checkpoint but float32"):
        load_for_inference(tmp_path / "run")


@pytest.mark.parametrize("latest", ["\x00\xff\xfe garbage", "../../etc", "checkpoints/../../x", ""])
def test_a_bad_latest_file_is_one_line(tmp_path, latest):
    train(tiny(steps=2), tmp_path / "run", quiet=True)
    (tmp_path / "run" / "latest").write_bytes(latest.encode("latin-1"))
    with pytest.raises(CheckpointError, match="latest'"):
        load_for_inference(tmp_path / "run")
    with pytest.raises(CheckpointError, match="latest'"):
        train(tiny(steps=4), tmp_path / "run", quiet=True)


def test_config_json_with_wrong_types_names_the_file(tmp_path):
    ckpt = train(tiny(steps=2), tmp_path / "run", quiet=True).checkpoint
    config = json.loads((ckpt / "config.json").read_text())
    config["model"]["dim"] = "wide"
    (ckpt / "config.json").write_text(json.dumps(config))
    write_manifest(ckpt)
    with pytest.raises(CheckpointError, match="config.json' is not a valid run config: model.dim='wide'"):
        load_for_inference(tmp_path / "run")


def test_a_torn_metrics_line_breaks_neither_info_nor_resume(tmp_path, capsys):
    train(tiny(steps=2), tmp_path / "run", quiet=True)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # what a kill mid-write leaves
    assert main(["info", str(tmp_path / "run")]) == 0
    assert train(tiny(steps=4), tmp_path / "run", quiet=True).step == 4
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def test_stale_temporary_checkpoints_are_cleaned(tmp_path):
    train(tiny(steps=2), tmp_path / "run", quiet=True)
    stale = tmp_path / "run" / "checkpoints" / ".tmp_step_0000004_999999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    train(tiny(steps=4), tmp_path / "run", quiet=True)
    assert not stale.exists()


# ------------------------------------------------------------------------------- NaN / inf

def nan_at(monkeypatch, steps: set[int]):
    """Make the loss NaN at the given (1-based) optimizer steps."""
    real = Trainer._train_step

    def step(self):
        if self.step + 1 in steps:
            for p in self.model.parameters():
                p.grad = None
            return float("nan"), float("nan"), 0.0
        return real(self)

    monkeypatch.setattr(Trainer, "_train_step", step)


def test_nan_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    nan_at(monkeypatch, {3, 5})
    result = train(tiny(steps=6), tmp_path / "run", quiet=True)
    assert result.step == 6 and not result.interrupted
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if r.get("skipped")]
    assert [r["step"] for r in skipped] == [3, 5] and skipped[-1]["nonfinite_steps"] == 2
    weights = load_file(result.checkpoint / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_nan_loss_from_the_model_skips_the_update(tmp_path, monkeypatch):
    """A real NaN (through backward) leaves the weights and the optimizer untouched."""
    from ddlm.methods.ar import AR

    real = AR.loss
    calls = {"n": 0}

    def poisoned(self, model, x0, **kw):
        out = real(self, model, x0, **kw)
        calls["n"] += 1
        if calls["n"] == 2:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(AR, "loss", poisoned)
    trainer = Trainer(tiny(steps=2, ckpt_every=0), tmp_path / "run", quiet=True)
    trainer._train_step()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    opt_before = trainer.optimizer.state_dict()["state"][0]["step"].clone()
    loss, grad_norm, _ = trainer._train_step()
    assert loss != loss
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert torch.equal(trainer.optimizer.state_dict()["state"][0]["step"], opt_before)
    trainer.lock.release()


def test_k_nan_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    nan_at(monkeypatch, set(range(3, 20)))
    with pytest.raises(DataError, match="not finite for 3 steps in a row .*step_0000002 keeps the last good"):
        train(tiny(steps=10, max_nonfinite=3), tmp_path / "run", quiet=True)
    assert (tmp_path / "run" / "latest").read_text().strip() == "checkpoints/step_0000002"
    weights = load_file(tmp_path / "run" / "checkpoints" / "step_0000002" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_non_finite_weights_are_never_saved(tmp_path):
    from ddlm.checkpoint import save_checkpoint

    run = tiny(steps=2)
    good = train(run, tmp_path / "run", quiet=True)
    weights = load_file(good.checkpoint / "model.safetensors")
    name = next(iter(weights))
    with pytest.raises(CheckpointError, match="is not finite; the previous checkpoint is kept"):
        save_checkpoint(tmp_path / "run", 3, config=good_config(tmp_path / "run"), tokenizer_dict={},
                        weights={**weights, name: weights[name] * float("inf")}, trainer_state=None)
    assert (tmp_path / "run" / "latest").read_text().strip() == "checkpoints/step_0000002"


def good_config(run_dir):
    return load_checkpoint(run_dir).config


# --------------------------------------------------------------- one trainer per run directory

def test_a_second_trainer_on_the_same_directory_is_refused(tmp_path):
    first = Trainer(tiny(steps=2), tmp_path / "run", quiet=True)
    with pytest.raises(ConfigError, match=f"in use by process {os.getpid()}"):
        Trainer(tiny(steps=2), tmp_path / "run", quiet=True)
    first.fit()  # releases the lock when done
    assert Trainer(tiny(steps=4), tmp_path / "run", quiet=True).fit().step == 4


def test_a_lock_left_by_a_dead_process_is_stale(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text("999999999\n")  # its owner died: no flock is held
    assert train(tiny(steps=2), tmp_path / "run", quiet=True).step == 2


def test_a_second_process_is_refused_with_one_line(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from ddlm.train.lock import RunLock; from pathlib import Path; "
        f"lock = RunLock(Path({str(tmp_path)!r})).acquire(); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"in use by process {holder.pid}"):
            Trainer(tiny(steps=2), tmp_path, quiet=True)
    finally:
        holder.kill()
        holder.wait()
    assert train(tiny(steps=2), tmp_path, quiet=True).step == 2  # the dead holder's lock is stale


# ------------------------------------------------------------------ bounds before any work

@pytest.mark.parametrize("args, message", [
    (["--model.dim=1000000"], "GiB for its weights and optimizer state"),
    (["--model.n_layers=1000000"], "GiB for its weights"),
    (["--train.threads=-4"], "train.threads=-4 must be >= 0"),
    (["--train.seed=-1"], "train.seed=-1 must be >= 0"),
])
def test_train_refuses_before_allocating(tmp_path, capsys, args, message):
    assert main(["train", "--out", str(tmp_path / "run"), "--steps", "1", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.fixture()
def trained(tmp_path):
    train(tiny(steps=2), tmp_path / "run", quiet=True)
    return tmp_path / "run"


@pytest.mark.parametrize("args, message", [
    (["--steps", "1000000000"], "sample.steps=1000000000 must be in 1..100,000"),
    (["--length", "100000000"], "sample.length=100000000 must be in 0..1,000,000"),
    (["--num", "100000000"], "sample.num=100000000 must be in 1..1,000,000"),
    (["--length", "0"], "--length 0 must be at least 1"),
    (["--top-k", "100000"], "top-k 100000 is larger than the vocabulary"),
    (["--seed", "-1"], "sample.seed=-1 must be >= 0"),
    (["--prompt", ""], "--prompt is empty"),
    (["--steps", "abc"], "invalid int value: 'abc'"),
])
def test_sample_refuses_bad_requests_in_one_line(trained, capsys, args, message):
    assert main(["sample", str(trained), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_sample_out_is_checked_first_and_replaced_atomically(trained, tmp_path, capsys, monkeypatch):
    assert main(["sample", str(trained), "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["sample", str(trained), "--out", str(tmp_path / "missing" / "s.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    target = tmp_path / "s.jsonl"
    target.write_text("old samples\n")
    import builtins

    import ddlm.commands.sample as sampling_run

    class FullDisk:
        """A file whose writes fail as on a full device."""

        def __init__(self, path, mode="r", *a, **kw):
            self.f = builtins.open(path, mode, *a, **kw)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(sampling_run, "open", FullDisk, raising=False)  # only the samples file's writes
    assert main(["sample", str(trained), "--num", "1", "--length", "4", "--out", str(target)]) == 2
    monkeypatch.delattr(sampling_run, "open")
    err = capsys.readouterr().err
    assert "No space left on device" in err and "unchanged" in err
    assert target.read_text() == "old samples\n" and not list(tmp_path.glob(".s.jsonl.tmp*"))
    assert main(["sample", str(trained), "--num", "2", "--length", "4", "--out", str(target)]) == 0
    assert len(target.read_text().splitlines()) == 2


def test_train_out_naming_a_file_and_an_interrupted_run_exit_status(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    assert main(["train", "--out", str(tmp_path / "file"), "--steps", "1"]) == 2
    assert "is a file, not a run directory" in capsys.readouterr().err
    from ddlm.train import loop

    real = loop.Trainer.fit
    monkeypatch.setattr(loop.Trainer, "fit", lambda self, stop_after=None: real(self, stop_after=1))
    args = ["train", "--out", str(tmp_path / "run"), "--json", "--steps", "3", "--model.dim=32",
            "--model.n_layers=1", "--model.n_heads=2", "--data.seq_len=32", "--train.batch_size=4",
            "--train.eval_every=0"]
    assert main(args) == 130  # interrupted is not success


# ------------------------------------------------------------------------------ determinism

def test_same_seed_same_samples_and_same_loss_curve(tmp_path):
    a = train(tiny(steps=4), tmp_path / "a", quiet=True)
    b = train(tiny(steps=4), tmp_path / "b", quiet=True)
    assert a.losses == b.losses
    from ddlm.commands.sample import sample_checkpoint

    first = sample_checkpoint(tmp_path / "a", options={"num": 3, "length": 16, "seed": 7})
    second = sample_checkpoint(tmp_path / "b", options={"num": 3, "length": 16, "seed": 7})
    assert first["tokens"] == second["tokens"]
    other = sample_checkpoint(tmp_path / "a", options={"num": 3, "length": 16, "seed": 8})
    assert other["tokens"] != first["tokens"]


def test_zero_shot_on_another_script_says_so(tmp_path, capsys):
    english = tmp_path / "en.txt"
    english.write_text("the quick brown fox jumps over the lazy dog\n" * 400)
    greek = tmp_path / "el.txt"
    greek.write_text("η γρήγορη καφέ αλεπού πηδά πάνω από τον τεμπέλη σκύλο\n" * 400)
    args = ["--model.dim=32", "--model.n_layers=1", "--model.n_heads=2", "--data.seq_len=16",
            "--train.batch_size=4", "--train.eval_every=0", "--train.progress=false", "--json"]
    assert main(["train", "--method", "ar", "--data", str(english), "--tokenizer", "byte",
                 "--out", str(tmp_path / "run"), "--steps", "2", *args]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--data", str(greek), "--json"]) == 0
    out, err = capsys.readouterr()
    assert "scripts absent from the training corpus" in err and "warning" in json.loads(out)
    assert main(["eval", str(tmp_path / "run"), "--data", str(english), "--json"]) == 0
    out, err = capsys.readouterr()
    assert "warning" not in err and "warning" not in json.loads(out)
