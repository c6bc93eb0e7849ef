"""Dashboards (train.log): TensorBoard and offline wandb receive exactly the scalars of
metrics.jsonl and the validation samples; a missing package is refused before anything is written;
the samples leave the training RNG alone, so resume == uninterrupted still holds bit for bit."""
import importlib.util
import json
import struct
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ddlm.cli import main
from ddlm.config import make_config
from ddlm.train import loop
from ddlm.train.loop import train

TINY = {"model": {"dim": 32, "n_layers": 1, "n_heads": 2, "dropout": 0.1},
        "data": {"seq_len": 32},
        "train": {"steps": 6, "batch_size": 4, "warmup_steps": 2, "log_every": 1, "eval_every": 2,
                  "eval_batches": 1, "ckpt_every": 0, "progress": False, "dtype": "fp32", "threads": 1}}


def tiny(method: str = "mdlm", log: str = "jsonl", **train_options):
    return make_config(base={**TINY, "method": method,
                             "train": {**TINY["train"], "log": log, **train_options}})


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def logged_scalars(out) -> dict[tuple[str, int], float]:
    """(name, step) -> value of every number metrics.jsonl holds (as the sinks receive them)."""
    return {(key, row["step"]): float(value) for row in metrics(out) for key, value in row.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}


def logged_samples(out) -> dict[int, list[str]]:
    return {row["step"]: row["samples"] for row in metrics(out) if "samples" in row}


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb can make no network call: offline, silent, its own directories inside tmp_path."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


# ---------------------------------------------------------------------------- TensorBoard

def test_tensorboard_holds_the_scalars_and_samples_of_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(tiny(log="tensorboard"), out, quiet=True)
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    got = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    want = logged_scalars(out)
    assert {"loss", "lr", "grad_norm", "val_bpc"} <= {name for name, _ in want}
    assert got.keys() == want.keys()
    assert all(got[key] == np.float32(value) for key, value in want.items())  # stored as float32
    samples = logged_samples(out)
    assert sorted(samples) == [2, 4, 6] and all(len(texts) == 2 and all(texts) for texts in samples.values())
    for i in range(2):
        text = {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors(f"samples/{i}/text_summary")}
        assert text == {step: texts[i] for step, texts in samples.items()}


# ---------------------------------------------------------------------------------- wandb

def read_wandb_records(path):
    """The records of a .wandb file: a 7-byte header (':W&B', magic, version), then the LevelDB log
    format (32 KiB blocks; each chunk a 7-byte header crc32, length, type: 1 full, 2 first, 3
    middle, 4 last) whose whole records are wandb's Record protobufs."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(run_dir) -> dict[tuple[str, int], object]:
    """(key, step) -> value of every history row of the offline run(s) in run_dir/wandb."""
    import wandb

    wandb.teardown()  # run.finish() may return before wandb-core has written the offline file
    rows = {}
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in read_wandb_records(path):
            if record.WhichOneof("record_type") == "history":
                step = record.history.step.num
                for item in record.history.item:  # a logged object comes as one item per field
                    key, *field = item.nested_key or [item.key]
                    value = json.loads(item.value_json)
                    if key.startswith("_"):
                        continue
                    if field:
                        rows.setdefault((key, step), {})[field[0]] = value
                    else:
                        rows[key, step] = value
    return rows


def test_wandb_offline_run_holds_the_scalars_and_samples(tmp_path, offline_wandb):
    out = tmp_path / "run"
    train(tiny(log="wandb"), out, quiet=True)
    history = wandb_history(out)
    (offline,) = (out / "wandb").glob("offline-run-*")
    run_id = (out / "wandb" / "ddlm-run-id").read_text().strip()
    assert offline.name.endswith(run_id) and (offline / f"run-{run_id}.wandb").is_file()
    want = logged_scalars(out)
    got = {key: value for key, value in history.items() if not key[0].startswith("samples/")}
    assert got == want  # the same numbers at the same steps, in float64
    for step, texts in logged_samples(out).items():
        for i, text in enumerate(texts):
            table = json.loads((offline / "files" / history[f"samples/{i}", step]["path"]).read_text())
            assert table["data"] == [[step, text]]
    # --overwrite replaces the run: its dashboards go with it, and wandb starts a new run
    train(tiny(log="wandb", steps=2), out, overwrite=True, quiet=True)
    (offline,) = (out / "wandb").glob("offline-run-*")
    assert not offline.name.endswith(run_id) and offline.name.endswith((out / "wandb" / "ddlm-run-id").read_text().strip())


# ------------------------------------------------------------------------- missing package

@pytest.mark.parametrize("sink", ["tensorboard", "wandb", "tensorboard,wandb"])
def test_a_missing_package_is_one_line_and_nothing_is_written(sink, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    missing = sink.split(",")[-1]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    args = ["train", "--method", "ar", "--out", str(tmp_path / "run"), "--steps", "2", "--model.dim=32",
            "--model.n_layers=1", "--model.n_heads=2", "--data.seq_len=16", "--train.batch_size=4",
            "--train.dtype=fp32", "--train.progress=false", f"--train.log={sink}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"ddlm: error: train.log={sink} needs the package '{missing}': pip install {missing}"
    assert not (tmp_path / "run").exists()


# -------------------------------------------------------------------------- RNG and resume

def test_samples_leave_the_training_rng_alone(tmp_path, monkeypatch):
    """Dropout draws from the global RNG: had sampling drawn from it, every later loss would move."""
    with_samples = train(tiny("mdlm"), tmp_path / "with", quiet=True)
    assert logged_samples(tmp_path / "with")
    monkeypatch.setattr(loop.Trainer, "log_samples", lambda self: [])
    without = train(tiny("mdlm"), tmp_path / "without", quiet=True)
    assert with_samples.losses == without.losses
    assert not logged_samples(tmp_path / "without")


def test_resume_equals_uninterrupted_with_dashboards(tmp_path, offline_wandb):
    pytest.importorskip("tensorboard")
    run = tiny("mdlm", log="tensorboard,wandb")
    full = train(run, tmp_path / "full", quiet=True)
    part = train(run, tmp_path / "part", stop_after=3, quiet=True)
    assert part.interrupted and part.step == 3
    time.sleep(1.0)  # wandb names an offline directory by the second: the resumed process gets its own
    rest = train(run, tmp_path / "part", quiet=True)
    assert rest.resumed_from == 3 and rest.step == 6
    assert full.losses == part.losses + rest.losses
    a, b = (load_file(r.checkpoint / "model.safetensors") for r in (full, rest))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert logged_samples(tmp_path / "full") == logged_samples(tmp_path / "part")
    # the resumed process continued the same wandb run: two offline directories, one id
    run_id = (tmp_path / "part" / "wandb" / "ddlm-run-id").read_text().strip()
    offline = sorted((tmp_path / "part" / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(d.name.endswith(run_id) for d in offline)
    history = wandb_history(tmp_path / "part")
    assert {k: v for k, v in history.items() if not k[0].startswith("samples/")} == logged_scalars(tmp_path / "part")
