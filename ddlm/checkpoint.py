"""Checkpoint directories, written atomically.

    OUT/checkpoints/step_000500/   config.json  model.safetensors  tokenizer.json  trainer_state.pt
    OUT/latest                     text file naming the newest complete checkpoint

Reading and writing live here, outside the trainer, so that loading for inference never touches
training code. Nothing read from a file is executed: weights are safetensors, the config and
tokenizer JSON, and `trainer_state.pt` is read with `torch.load(weights_only=True)`, which
refuses any pickled object other than tensors and plain containers.

A checkpoint is written into a temporary directory, fsynced, renamed into place, and only then is
`latest` replaced (write + os.replace), so an interruption at any moment leaves the previous
checkpoint intact. `model.safetensors` holds the weights for inference (the EMA when enabled);
`trainer_state.pt` holds everything exact resume needs.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ddlm.config import RunConfig
from ddlm.errors import CheckpointError

FILES = ("config.json", "model.safetensors", "tokenizer.json")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(out_dir: Path, step: int, *, config: RunConfig, tokenizer_dict: dict,
                    weights: dict[str, torch.Tensor], trainer_state: dict | None,
                    keep: int = 2) -> Path:
    """Write checkpoint `step` atomically and point OUT/latest at it; prune to `keep` newest."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / "config.json").write_text(config.to_json())
    (tmp / "tokenizer.json").write_text(json.dumps(tokenizer_dict))
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / "model.safetensors",
              metadata={"step": str(step)})
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_text(Path(out_dir) / "latest", f"checkpoints/{final.name}\n")
    _prune(root, keep, final)
    return final


def _prune(root: Path, keep: int, current: Path) -> None:
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in steps[:-keep]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (via its `latest`) or a checkpoint directory -> the checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path '{path}' does not exist")
    if (path / "config.json").is_file():
        return path
    latest = path / "latest"
    if latest.is_file():
        target = path / latest.read_text().strip()
        if (target / "config.json").is_file():
            return target
        raise CheckpointError(f"'{latest}' points to '{target}', which is not a checkpoint")
    raise CheckpointError(f"'{path}' holds no checkpoint (no config.json or latest file)")


@dataclass
class Checkpoint:
    path: Path
    config: RunConfig
    tokenizer_dict: dict
    weights: dict[str, torch.Tensor]
    step: int


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate a checkpoint; a missing, truncated or corrupt file is one clear line."""
    ckpt = resolve_checkpoint(path)
    for name in FILES:
        if not (ckpt / name).is_file():
            raise CheckpointError(f"checkpoint '{ckpt}' is incomplete: {name} is missing")
    config = RunConfig.from_dict(upgrade_config(_read_json(ckpt / "config.json")))
    tokenizer_dict = _read_json(ckpt / "tokenizer.json")
    try:
        weights = load_file(ckpt / "model.safetensors")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint '{ckpt}/model.safetensors' is corrupt or truncated "
                              f"({str(err).splitlines()[0][:120]})") from None
    step = int(ckpt.name.split("_")[-1]) if ckpt.name.startswith("step_") else 0
    return Checkpoint(ckpt, config, tokenizer_dict, weights, step)


# Sampling options that older configs kept among a method's options: (method, old name, new name).
MOVED_TO_SAMPLE = (("mdlm", "sampler", "sampler"), ("mdlm", "t_min", "t_min"),
                   ("mdlm", "noise_removal", "noise_removal"), ("sedd", "predictor", "sampler"),
                   ("sedd", "t_min", "t_min"))


def upgrade_config(d: dict) -> dict:
    """Read configs written by earlier versions: without `model.block` the backbone was plain;
    sampling options then stored under the method move to the sample section."""
    d = json.loads(json.dumps(d))
    model = d.get("model")
    if isinstance(model, dict):
        model.setdefault("block", "plain")
    for method, old, new in MOVED_TO_SAMPLE:
        options = d.get(method)
        if isinstance(options, dict) and old in options:
            value = options.pop(old)
            sample = d.setdefault("sample", {})
            if isinstance(sample, dict) and sample.get(new) in (None, ""):
                sample[new] = value
    return d


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"'{path}' is not valid JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"'{path}' does not hold a JSON object")
    return data


def load_trainer_state(ckpt: Path) -> dict:
    """The resume state, read with weights_only=True: a file holding anything but tensors and
    plain containers (e.g. a crafted pickle that would run code) is refused, never executed."""
    path = Path(ckpt) / "trainer_state.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{ckpt}' has no trainer_state.pt; it cannot be resumed")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"'{path}' holds objects other than tensors and plain data; refused "
                              f"(nothing in it was run)") from None
    except Exception as err:  # torch raises many kinds on a damaged pickle/zip
        raise CheckpointError(f"'{path}' is corrupt or truncated ({type(err).__name__})") from None



def weights_misfit(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> str | None:
    """Load `weights` into `model`; None when they fit, else one line saying why not (a shape
    mismatch, or the first missing or unexpected tensor)."""
    own = model.state_dict()
    for name, tensor in weights.items():
        if name in own and own[name].shape != tensor.shape:
            return (f"tensor {name} has shape {tuple(tensor.shape)} in the checkpoint but "
                    f"{tuple(own[name].shape)} in the model")
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # anything else load_state_dict refuses
        return str(err).splitlines()[-1].strip()[:160]
    if missing or unexpected:
        return f"{'missing' if missing else 'unexpected'} tensor {(missing or unexpected)[0]}"
    return None
