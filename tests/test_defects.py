"""Defects found in review, each pinned by a test: a counter that must reset, checkpoints and
logs reached through links or names that leave the run directory, checkpoints read unchecked or
under a false label, a skipped last step that lost the run's work, numbers that are not numbers,
a quickstart that ignored SIGTERM, sample files written over devices, and files that never end."""
import json
import os
import stat
import subprocess
import sys
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_reliability import nan_at

from ddlm.build import load_for_inference
from ddlm.checkpoint import load_checkpoint, load_trainer_state, resolve_checkpoint, write_manifest
from ddlm.cli import main
from ddlm.config import make_config
from ddlm.errors import CheckpointError, ConfigError, DataError, DdlmError
from ddlm.train.loop import train

TINY = {"method": "ar", "model": {"dim": 32, "n_layers": 1, "n_heads": 2},
        "data": {"seq_len": 32},
        "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "eval_every": 0,
                  "ckpt_every": 2, "progress": False, "dtype": "fp32", "threads": 1}}
TINY_ARGS = ["--model.dim=32", "--model.n_layers=1", "--model.n_heads=2", "--data.seq_len=32",
             "--train.batch_size=4", "--train.eval_every=0", "--train.dtype=fp32", "--train.threads=1",
             "--train.progress=false", "--train.warmup_steps=1"]


def tiny(method: str = "ar", **train_opts):
    return make_config(base={**TINY, "method": method, "train": {**TINY["train"], **train_opts}})


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DDLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DDLM_ALLOW_UNVERIFIED", raising=False)


def snapshot(root) -> dict:
    """Every entry under `root` (links not followed): files by content, links by target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = ("link", os.readlink(path))
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    out[rel] = ("file", f.read())
            else:
                out[rel] = ("dir",)
    return out


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ddlm: error: "), err
    return err


# ------------------------------------------------------------------ 1. breaks the suite missed

def test_the_non_finite_counter_resets_after_a_good_step(tmp_path, monkeypatch):
    """NaN at steps 3, 5 and 7 is never two in a row: max_nonfinite=3 must not stop the run."""
    nan_at(monkeypatch, {3, 5, 7})
    result = train(tiny(steps=8, max_nonfinite=3), tmp_path / "run", quiet=True)
    assert result.step == 8 and not result.interrupted
    assert result.checkpoint.name == "step_0000008"


def test_latest_naming_another_runs_checkpoint_is_refused(tmp_path):
    train(tiny(), tmp_path / "other", quiet=True)
    train(tiny(), tmp_path / "run", quiet=True)
    (tmp_path / "run" / "latest").write_text("../other/checkpoints/step_0000002\n")
    load_checkpoint(tmp_path / "other" / "checkpoints" / "step_0000002")  # a real, valid checkpoint
    before = snapshot(tmp_path / "other")
    with pytest.raises(CheckpointError, match="leaves the run directory"):
        resolve_checkpoint(tmp_path / "run")
    with pytest.raises(CheckpointError, match="leaves the run directory"):
        train(tiny(steps=4, keep_ckpts=1), tmp_path / "run", quiet=True)
    assert snapshot(tmp_path / "other") == before


# ------------------------------------------------------------------------------- 2. symlinks

def _link_checkpoints(run, other):
    import shutil

    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").symlink_to(other / "checkpoints")


def _link_latest(run, other):
    (run / "latest").unlink()
    (run / "latest").symlink_to(other / "latest")


def _link_step(run, other):
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_0000002")
    (run / "checkpoints" / "step_0000002").symlink_to(other / "checkpoints" / "step_0000002")


def _link_metrics(run, other):
    import shutil

    shutil.rmtree(run)
    run.mkdir()  # a fresh run: its metrics would be appended to the other run's
    (run / "metrics.jsonl").symlink_to(other / "metrics.jsonl")


def _link_lock(run, other):
    (run / ".lock").unlink()
    (run / ".lock").symlink_to(other / ".lock")


@pytest.mark.parametrize("make_link", [_link_checkpoints, _link_latest, _link_step, _link_metrics, _link_lock],
                         ids=["checkpoints", "latest", "step", "metrics.jsonl", ".lock"])
def test_a_link_out_of_the_run_directory_is_refused_before_anything_is_written(tmp_path, make_link, capsys):
    other, run = tmp_path / "other", tmp_path / "run"
    train(tiny(), other, quiet=True)
    train(tiny(), run, quiet=True)
    make_link(run, other)
    before = snapshot(other)
    with pytest.raises(DdlmError, match="symbolic link.*outside the run directory"):
        train(tiny(steps=4, keep_ckpts=1), run, quiet=True)
    assert snapshot(other) == before
    assert main(["train", "--method", "ar", "--out", str(run), "--steps", "4", "--train.keep_ckpts=1",
                 *TINY_ARGS]) == 2
    assert "symbolic link" in one_line_error(capsys)
    assert snapshot(other) == before


def test_overwrite_removes_a_link_and_never_what_it_points_to(tmp_path):
    other, run = tmp_path / "other", tmp_path / "run"
    train(tiny(), other, quiet=True)
    train(tiny(), run, quiet=True)
    _link_checkpoints(run, other)
    before = snapshot(other)
    assert train(tiny(steps=4, keep_ckpts=1), run, overwrite=True, quiet=True).step == 4
    assert not (run / "checkpoints").is_symlink() and snapshot(other) == before


# ----------------------------------------------------------------- 3. integrity by deletion

def test_a_checkpoint_without_a_manifest_is_refused_unless_allowed(tmp_path, monkeypatch, capsys):
    ckpt = train(tiny(), tmp_path / "run", quiet=True).checkpoint
    weights = load_file(ckpt / "model.safetensors")
    save_file({k: torch.zeros_like(v) for k, v in weights.items()}, ckpt / "model.safetensors")
    (ckpt / "manifest.json").unlink()  # zeroed weights that would otherwise sample silently
    with pytest.raises(CheckpointError, match="no manifest.json.*DDLM_ALLOW_UNVERIFIED=1"):
        load_for_inference(tmp_path / "run")
    with pytest.raises(CheckpointError, match="no manifest.json"):
        load_trainer_state(ckpt)
    assert main(["sample", str(tmp_path / "run"), "--num", "1", "--length", "4"]) == 2
    assert "no manifest.json" in one_line_error(capsys)
    monkeypatch.setenv("DDLM_ALLOW_UNVERIFIED", "1")  # a run written before manifests existed
    assert load_checkpoint(tmp_path / "run").step == 2 and load_trainer_state(ckpt)["step"] == 2
    warning = capsys.readouterr().err.strip().splitlines()
    assert warning and all(line.startswith("ddlm: warning: ") and "unverified" in line for line in warning)


def test_every_checkpoint_ddlm_writes_has_a_manifest(tmp_path):
    from ddlm.checkpoint import new_temporary, save_checkpoint

    train(tiny(steps=4), tmp_path / "run", quiet=True)
    steps = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert [p.name for p in steps] == ["step_0000002", "step_0000004"]
    assert all((p / "manifest.json").is_file() for p in steps)
    good = load_checkpoint(tmp_path / "run")
    tmp = new_temporary(tmp_path / "run", 6)  # as FSDP2: the ranks' parts are there first
    (tmp / "trainer_state").mkdir()
    (tmp / "trainer_state" / "__0_0.distcp").write_bytes(b"part")
    final = save_checkpoint(tmp_path / "run", 6, config=good.config, tokenizer_dict=good.tokenizer_dict,
                            weights=good.weights, trainer_state={"step": 6}, tmp=tmp, state_name="trainer_meta.pt")
    listed = json.loads((final / "manifest.json").read_text())["files"]
    assert {"trainer_state/__0_0.distcp", "trainer_meta.pt", "model.safetensors"} <= set(listed)


# ------------------------------------------------------------------------ 4. work lost silently

def test_a_non_finite_last_step_still_checkpoints_the_last_good_state(tmp_path, monkeypatch):
    nan_at(monkeypatch, {4})
    with pytest.raises(DataError, match="step_0000004"):
        train(tiny(steps=4, ckpt_every=0), tmp_path / "run", quiet=True)
    assert (tmp_path / "run" / "latest").read_text().strip() == "checkpoints/step_0000004"
    weights = load_checkpoint(tmp_path / "run").weights
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert load_trainer_state(tmp_path / "run" / "checkpoints" / "step_0000004")["step"] == 4


def test_a_non_finite_last_step_ends_the_command_non_zero_naming_the_checkpoint(tmp_path, monkeypatch, capsys):
    nan_at(monkeypatch, {3})
    assert main(["train", "--method", "ar", "--out", str(tmp_path / "run"), "--steps", "3", *TINY_ARGS]) != 0
    assert "checkpoints/step_0000003" in one_line_error(capsys)


@pytest.mark.parametrize("option, value", [
    ("train.lr", "inf"), ("train.lr", "nan"), ("train.lr", "1e400"), ("model.rope_base", "0"),
    ("model.rope_base", "inf"), ("train.beta1", "1"), ("train.beta2", "1.0"), ("train.beta2", "-0.1"),
    ("model.cond_dim", "0"), ("train.weight_decay", "-1"), ("model.mlp_ratio", "nan"), ("eval.seed", "-1"),
    ("train.dist_timeout", "inf"), ("train.grad_clip", "nan"), ("train.ema", "nan"),
    ("sample.temperature", "inf"), ("sample.top_p", "nan"), ("sample.t_min", "nan"),
    ("sample.stop_entropy", "inf"), ("model.dropout", "nan"), ("train.min_lr_ratio", "nan"),
    ("mdlm.sigma_max", "inf"),
])
def test_every_float_option_is_range_checked(tmp_path, capsys, option, value):
    method = option.split(".")[0] if option.startswith("mdlm") else "ar"
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
        make_config(overrides={"method": method, option: value})
    assert main(["train", "--method", method, "--out", str(tmp_path / "run"), "--steps", "1", *TINY_ARGS,
                 f"--{option}={value}"]) == 2
    assert option in one_line_error(capsys)
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------ 5. weights that lie

def test_weights_record_their_method_shape_and_dtype(tmp_path):
    ckpt = train(tiny(), tmp_path / "run", quiet=True).checkpoint
    with safe_open(ckpt / "model.safetensors", framework="pt") as f:
        meta = f.metadata()
    assert {k: meta[k] for k in ("method", "dim", "n_layers", "n_heads", "vocab_size", "block", "dtype")} == {
        "method": "ar", "dim": "32", "n_layers": "1", "n_heads": "2",
        "vocab_size": str(load_checkpoint(ckpt).config.model.vocab_size), "block": "plain", "dtype": "float32"}


def _rewrite_config(ckpt, change):
    config = json.loads((ckpt / "config.json").read_text())
    change(config)
    (ckpt / "config.json").write_text(json.dumps(config))
    write_manifest(ckpt)


def test_mdlm_weights_relabelled_sedd_are_refused(tmp_path, capsys):
    ckpt = train(tiny("mdlm"), tmp_path / "run", quiet=True).checkpoint

    def relabel(config):
        config["method"] = "sedd"
        config["sedd"] = {"time_conditioning": False}
        del config["mdlm"]

    _rewrite_config(ckpt, relabel)
    with pytest.raises(CheckpointError, match="holds mdlm weights .*says method 'sedd'"):
        load_for_inference(tmp_path / "run")
    assert main(["sample", str(tmp_path / "run"), "--num", "1", "--length", "4", "--steps", "2"]) == 2
    assert "mdlm" in one_line_error(capsys)


def test_a_config_that_lies_about_the_heads_is_refused(tmp_path):
    """n_heads 2 -> 4 keeps every weight's shape: only the recorded shape catches it."""
    ckpt = train(tiny(), tmp_path / "run", quiet=True).checkpoint
    _rewrite_config(ckpt, lambda config: config["model"].update(n_heads=4))
    with pytest.raises(CheckpointError, match="n_heads=2 .*n_heads=4"):
        load_for_inference(tmp_path / "run")


def test_fp16_weights_are_refused_and_old_weights_without_metadata_load(tmp_path):
    ckpt = train(tiny(), tmp_path / "run", quiet=True).checkpoint
    weights = load_file(ckpt / "model.safetensors")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
              ckpt / "model.safetensors", metadata={"step": "2"})
    write_manifest(ckpt)
    with pytest.raises(CheckpointError, match="float16"):
        load_for_inference(tmp_path / "run")
    save_file(weights, ckpt / "model.safetensors", metadata={"step": "2"})  # as earlier versions wrote
    write_manifest(ckpt)
    assert load_for_inference(tmp_path / "run").step == 2


# ------------------------------------------------------------------------ 6. quickstart and SIGTERM

def test_an_interrupted_quickstart_stops_with_status_130(tmp_path, monkeypatch, capsys):
    from ddlm.train import loop

    real = loop.Trainer.fit
    monkeypatch.setattr(loop.Trainer, "fit", lambda self, stop_after=None: real(self, stop_after=1))
    args = ["quickstart", "--out", str(tmp_path / "qs"), "--steps", "3", "--json", "--data.tokenizer=char",
            *[a for a in TINY_ARGS if not a.startswith("--data.seq_len")], "--sample.steps=2", "--sample.num=1"]
    assert main(args) == 130
    assert (tmp_path / "qs" / "ar" / "latest").is_file()  # the interrupted run is checkpointed
    assert not (tmp_path / "qs" / "mdlm").exists()  # and nothing runs after it
    assert "interrupted" in capsys.readouterr().err


# --------------------------------------------------------------- 7. sample files and temperature

def _read_in_background(fifo):
    got = {}

    def read():
        with open(fifo, "rb") as f:
            got["data"] = f.read()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread, got


def test_sample_output_to_a_fifo_is_written_into_it_not_replaced(tmp_path):
    from ddlm.commands.sample import write_output

    fifo = tmp_path / "samples.fifo"
    os.mkfifo(fifo)
    thread, got = _read_in_background(fifo)
    write_output(fifo, '{"index": 0}\n')
    thread.join(10)
    assert got.get("data") == b'{"index": 0}\n'
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.listdir(tmp_path) == ["samples.fifo"]


def test_sample_output_to_a_character_device_is_written_into_it_not_replaced(tmp_path):
    from ddlm.commands.sample import write_output

    device = tmp_path / "null"
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a second /dev/null
    except PermissionError:
        pytest.skip("mknod needs root")
    write_output(device, "samples\n")
    assert stat.S_ISCHR(os.lstat(device).st_mode) and os.listdir(tmp_path) == ["null"]
    regular = tmp_path / "s.jsonl"
    write_output(regular, "one\n")
    assert regular.read_text() == "one\n" and sorted(os.listdir(tmp_path)) == ["null", "s.jsonl"]


@pytest.mark.parametrize("args", [["--temperature", "inf"], ["--sample.temperature=inf"],
                                  ["--temperature", "1e400"], ["--top-p", "nan"]])
def test_sample_refuses_a_temperature_that_is_not_a_number(tmp_path, capsys, args):
    train(tiny(), tmp_path / "run", quiet=True)
    assert main(["sample", str(tmp_path / "run"), "--num", "1", "--length", "4", *args]) == 2
    err = one_line_error(capsys)
    assert "sample.temperature" in err or "sample.top_p" in err


# -------------------------------------------------------------------------------- 8. hangs

def _train_in_a_process(out, tmp_path, *extra, timeout=60):
    env = {**os.environ, "DDLM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    try:
        return subprocess.run([sys.executable, "-m", "ddlm", "train", "--method", "ar", "--out", str(out),
                               *TINY_ARGS, *extra], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ddlm train hung for {timeout} s")


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume"])
def test_metrics_jsonl_that_is_a_fifo_is_refused_not_waited_on(tmp_path, resume):
    run = tmp_path / "run"
    if resume:
        train(tiny(), run, quiet=True)
        (run / "metrics.jsonl").unlink()
    else:
        run.mkdir()
    os.mkfifo(run / "metrics.jsonl")
    proc = _train_in_a_process(run, tmp_path, "--steps", "4")
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "metrics.jsonl' is not a regular file" in err
    assert stat.S_ISFIFO(os.lstat(run / "metrics.jsonl").st_mode)


def test_a_fifo_as_corpus_is_refused_not_waited_on(tmp_path):
    from ddlm.data.corpora import load_corpus

    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)
    outcome = {}

    def load():
        try:
            load_corpus(str(fifo))
        except DataError as err:
            outcome["error"] = str(err)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():  # blocked opening the FIFO: give it an end of file and fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail("reading a FIFO as the corpus blocked")
    assert "not a regular file" in outcome.get("error", "")
