"""Checkpoint directories, written atomically.

    OUT/checkpoints/step_000500/   config.json  model.safetensors  tokenizer.json  trainer_state.pt
                                   manifest.json (size and SHA-256 of every other file)
    OUT/latest                     text file naming the newest complete checkpoint

Reading and writing live here, outside the trainer, so that loading for inference never touches
training code. Nothing read from a file is executed: weights are safetensors, the config and
tokenizer JSON, and `trainer_state.pt` is read with `torch.load(weights_only=True)`, which
refuses any pickled object other than tensors and plain containers.

A checkpoint is written into a temporary directory, fsynced, renamed into place, and only then is
`latest` replaced (write + os.replace), so an interruption at any moment leaves the previous
checkpoint intact. Every file is checked against the manifest when it is read, so a damaged or
swapped file is named, never loaded; a checkpoint without a manifest is refused unless
DDLM_ALLOW_UNVERIFIED=1 (runs written before manifests existed). `model.safetensors` holds the
weights for inference (the EMA when enabled) and records the method, the model's shape and the
dtype they were saved for, checked against config.json on load; `trainer_state.pt` holds
everything exact resume needs.

A run directory's `latest`, `checkpoints/` and `checkpoints/*` are never followed out of it: a
symbolic link that leaves the run directory is refused before anything is read, written or pruned.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ddlm.config import RunConfig
from ddlm.errors import CheckpointError, ConfigError, write_failure

FILES = ("config.json", "model.safetensors", "tokenizer.json")
MANIFEST = "manifest.json"
STATE = "trainer_state.pt"  # the whole resume state (one process, DDP)
SHARDED_META = "trainer_meta.pt"  # FSDP2: the resume state less what SHARDED_STATE holds
SHARDED_STATE = "trainer_state"  # FSDP2: torch.distributed.checkpoint folder, one part per process
UNVERIFIED = "DDLM_ALLOW_UNVERIFIED"  # =1: read a checkpoint without a manifest (written before them)
SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "vocab_size", "block")  # recorded in model.safetensors
WEIGHT_DTYPE = "float32"  # the dtype of every model ddlm builds, and so of the weights it loads
_warned_unverified: set[str] = set()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(ckpt: Path) -> list[Path]:
    """Every file of a checkpoint, those of its sharded trainer state (a folder) included."""
    return sorted(f for f in ckpt.rglob("*") if f.is_file() and f.name != MANIFEST)


def write_manifest(ckpt: Path) -> None:
    entries = {f.relative_to(ckpt).as_posix(): {"bytes": f.stat().st_size, "sha256": _sha256(f)}
               for f in _files(ckpt)}
    (ckpt / MANIFEST).write_text(json.dumps({"files": entries}, indent=1, sort_keys=True))


def manifest_entries(ckpt: Path) -> dict | None:
    """The manifest's {file: {bytes, sha256}}. A checkpoint without one is refused in one line,
    unless DDLM_ALLOW_UNVERIFIED=1 (a run written before manifests existed): then None, and one
    warning on stderr per checkpoint."""
    manifest = ckpt / MANIFEST
    if manifest.is_file():
        entries = _read_json(manifest).get("files")
        if not isinstance(entries, dict):
            raise CheckpointError(f"'{manifest}' lists no files; the checkpoint is not one ddlm wrote")
        return entries
    if os.environ.get(UNVERIFIED) != "1":
        raise CheckpointError(f"checkpoint '{ckpt}' has no {MANIFEST}, so its files cannot be checked; refused "
                              f"(a run written before manifests existed is read with {UNVERIFIED}=1)")
    if str(ckpt) not in _warned_unverified:
        _warned_unverified.add(str(ckpt))
        print(f"ddlm: warning: checkpoint '{ckpt}' has no {MANIFEST}; its files are read unverified "
              f"({UNVERIFIED}=1)", file=sys.stderr)
    return None


def verify_file(ckpt: Path, name: str) -> None:
    """Check one file of a checkpoint against its manifest: a wrong size or checksum is one line
    naming the file (see `manifest_entries` for a checkpoint without a manifest)."""
    entries = manifest_entries(ckpt)
    if entries is None:
        return
    manifest = ckpt / MANIFEST
    entry = entries.get(name)
    path = ckpt / name
    if entry is None:
        raise CheckpointError(f"'{path}' is not listed in '{manifest}'; the checkpoint is not one ddlm wrote")
    if not isinstance(entry, dict):
        raise CheckpointError(f"'{manifest}' gives {name} no size and checksum (its entry is {str(entry)[:40]!r}); "
                              f"the checkpoint is not one ddlm wrote")
    size = path.stat().st_size
    if size != entry.get("bytes"):
        raise CheckpointError(f"'{path}' has {size} bytes but its manifest says {entry.get('bytes')}; "
                              f"the file is truncated or replaced")
    if _sha256(path) != entry.get("sha256"):
        raise CheckpointError(f"'{path}' does not match the checksum in its manifest; the file is corrupt or replaced")


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
    tmp.unlink(missing_ok=True)  # never written through: a link left there is removed, not followed
    with open(tmp, "x") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def new_temporary(out_dir: Path, step: int) -> Path:
    """A fresh temporary directory for checkpoint `step`, into which the processes of a sharded
    run write their parts of the trainer state before `save_checkpoint(..., tmp=...)` completes it."""
    refuse_outside_links(Path(out_dir))
    root = Path(out_dir) / "checkpoints"
    tmp = root / f".tmp_step_{step:07d}_{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(root)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as err:
        raise CheckpointError(f"could not write checkpoint step {step} under '{root}' ({err.strerror}); "
                              f"the previous checkpoint {latest_name(Path(out_dir))} is intact") from None
    return tmp


def save_checkpoint(out_dir: Path, step: int, *, config: RunConfig, tokenizer_dict: dict,
                    weights: dict[str, torch.Tensor], trainer_state: dict | None,
                    keep: int = 2, tmp: Path | None = None, state_name: str = STATE) -> Path:
    """Write checkpoint `step` atomically and point OUT/latest at it; prune to `keep` newest. `tmp`:
    a `new_temporary` directory that already holds the sharded trainer state's parts; the resume
    state `trainer_state` is then written as `state_name` (SHARDED_META) beside them."""
    bad = next((k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = latest_name(Path(out_dir))
        raise CheckpointError(f"not saving step {step}: weight {bad} is not finite; " + (
            f"the previous checkpoint is kept ({kept})" if kept else "no earlier checkpoint exists"))
    root = Path(out_dir) / "checkpoints"
    final = root / f"step_{step:07d}"
    try:
        tmp = tmp or new_temporary(out_dir, step)
        (tmp / "config.json").write_text(config.to_json())
        (tmp / "tokenizer.json").write_text(json.dumps(tokenizer_dict))
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / "model.safetensors",
                  metadata=weights_label(config, weights, step))
        if trainer_state is not None:
            with open(tmp / state_name, "wb") as f:  # a file object: a full disk is an OSError, not torch's own
                torch.save(trainer_state, f)
        write_manifest(tmp)
        for f in _files(tmp) + [tmp / MANIFEST]:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        for folder in {f.parent for f in _files(tmp)}:
            _fsync_dir(folder)
        if final.exists():
            _discard(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_text(Path(out_dir) / "latest", f"checkpoints/{final.name}\n")
    except (OSError, RuntimeError, SafetensorError) as err:  # disk full, read-only directory, a failing writer
        shutil.rmtree(tmp, ignore_errors=True)
        kept = latest_name(Path(out_dir))
        reason = write_failure(err)
        raise CheckpointError(f"could not write checkpoint step {step} under '{root}' ({reason}); "
                              + (f"the previous checkpoint {kept} is intact" if kept else "no earlier checkpoint exists")
                              ) from None
    _prune(root, keep, final)
    return final


def latest_name(out_dir: Path) -> str | None:
    """What OUT/latest names (None when missing or unreadable), for messages."""
    try:
        return (out_dir / "latest").read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _remove_stale_temporaries(root: Path) -> None:
    """Temporary checkpoint directories left by a crashed writer (its pid no longer runs)."""
    for tmp in root.glob(".tmp_step_*"):
        pid = tmp.name.rsplit("_", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _prune(root: Path, keep: int, current: Path) -> None:
    steps = sorted(p for p in root.iterdir() if p.name.startswith("step_") and p.is_dir() and not p.is_symlink())
    for old in steps[:-keep]:
        if old != current:
            try:
                _discard(old)
            except OSError:  # left for the next prune
                pass


def _discard(ckpt: Path) -> None:
    """Remove a checkpoint folder: renamed out of sight first (a temporary name, cleaned up as a
    stale temporary if a kill comes before the removal ends), so no half-removed checkpoint is
    ever seen under its own name."""
    trash = ckpt.with_name(f".tmp_{ckpt.name}_discarded_{os.getpid()}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(ckpt, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _resolved(path: Path) -> Path | None:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a loop of links
        return None


def refuse_outside_links(run: Path) -> None:
    """Refuse a run directory whose `latest`, `checkpoints/` or an entry of `checkpoints/` is a
    symbolic link that leaves it: ddlm reads, writes, replaces and prunes there, and must never
    reach another run's files (checked before any of that)."""
    run = Path(run)
    home = _resolved(run)
    root = run / "checkpoints"
    entries = [run / "latest", root]
    if root.is_dir() and not root.is_symlink():
        entries += sorted(root.iterdir())
    for entry in entries:
        if not entry.is_symlink():
            continue
        target = _resolved(entry)
        if home is None or target is None or not target.is_relative_to(home):
            raise CheckpointError(f"'{entry}' is a symbolic link to '{os.readlink(entry)}', outside the run "
                                  f"directory '{run}'; ddlm reads, writes and prunes checkpoints only inside it "
                                  f"(remove the link, or give the other run's own directory)")


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (via its `latest`) or a checkpoint directory -> the checkpoint directory.
    `latest` must name a checkpoint under the run's own checkpoints/, reached without leaving it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path '{path}' does not exist")
    if (path / "config.json").is_file():
        return path
    latest = path / "latest"
    if latest.is_file() or latest.is_symlink():
        refuse_outside_links(path)
        try:
            name = latest.read_text().strip()
        except (OSError, UnicodeDecodeError):
            raise CheckpointError(f"'{latest}' is not a text file naming a checkpoint") from None
        target = path / name
        resolved = _resolved(target) if name else None
        if name and (resolved is None or not resolved.is_relative_to(path.resolve())):
            raise CheckpointError(f"'{latest}' names {name[:80]!r}, which leaves the run directory '{path}'; "
                                  f"it must name a checkpoint under '{path / 'checkpoints'}'")
        if not name or resolved.parent != (path / "checkpoints").resolve():
            raise CheckpointError(f"'{latest}' must name a checkpoint under '{path / 'checkpoints'}', "
                                  f"not {name[:80]!r}")
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
        verify_file(ckpt, name)
    try:
        config = RunConfig.from_dict(upgrade_config(_read_json(ckpt / "config.json")))
    except ConfigError as err:
        raise CheckpointError(f"'{ckpt / 'config.json'}' is not a valid run config: {err}") from None
    tokenizer_dict = _read_json(ckpt / "tokenizer.json")
    try:
        weights = load_file(ckpt / "model.safetensors")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint '{ckpt}/model.safetensors' is corrupt or truncated "
                              f"({str(err).splitlines()[0][:120]})") from None
    check_weights(weights, ckpt / "model.safetensors")
    check_label(weights, _safetensors_metadata(ckpt / "model.safetensors"), config, ckpt / "model.safetensors")
    step = int(ckpt.name.split("_")[-1]) if ckpt.name.startswith("step_") else 0
    return Checkpoint(ckpt, config, tokenizer_dict, weights, step)


# Sampling options that older configs kept among a method's options: (method, old name, new name).
MOVED_TO_SAMPLE = (("mdlm", "sampler", "sampler"), ("mdlm", "t_min", "t_min"),
                   ("mdlm", "noise_removal", "noise_removal"), ("sedd", "predictor", "sampler"),
                   ("sedd", "t_min", "t_min"))


def check_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    """Floating-point weights must be finite: a NaN or inf weight would only produce numbers that
    look real. (Their dtype is checked against the model's in `weights_misfit`.)"""
    for name, tensor in weights.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"'{path}': tensor {name} holds NaN or inf values")


def _float_dtypes(weights: dict[str, torch.Tensor]) -> str:
    """The dtype(s) of the floating-point tensors, e.g. 'float32' ('' when there are none)."""
    return ",".join(sorted({str(v.dtype).replace("torch.", "") for v in weights.values() if v.is_floating_point()}))


def weights_label(config: RunConfig, weights: dict[str, torch.Tensor], step: int) -> dict[str, str]:
    """What model.safetensors records about itself: the step, the method, the model's shape and
    the weights' dtype (safetensors metadata is str -> str)."""
    return {"step": str(step), "method": config.method,
            **{name: str(getattr(config.model, name)) for name in SHAPE_FIELDS}, "dtype": _float_dtypes(weights)}


def _safetensors_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint '{path}' is corrupt or truncated "
                              f"({str(err).splitlines()[0][:120]})") from None


def check_label(weights: dict[str, torch.Tensor], label: dict[str, str], config: RunConfig, path: Path) -> None:
    """Weights must be what config.json says they are: the method and the model's shape recorded
    when they were saved (older checkpoints record neither), and float32, as every model ddlm
    builds (another dtype would be cast silently on loading)."""
    if label.get("method", config.method) != config.method:
        raise CheckpointError(f"'{path}' holds {label['method']} weights but its config.json says method "
                              f"'{config.method}'; the checkpoint was relabelled")
    for name in SHAPE_FIELDS:
        if name in label and label[name] != str(getattr(config.model, name)):
            raise CheckpointError(f"'{path}' was saved with model.{name}={label[name]} but its config.json says "
                                  f"model.{name}={getattr(config.model, name)}; the checkpoint was relabelled")
    dtypes = _float_dtypes(weights)
    if not dtypes:  # no floating-point tensor: weights_misfit names the first one
        return
    if label.get("dtype", dtypes) != dtypes:
        raise CheckpointError(f"'{path}' holds {dtypes} weights but was saved as {label['dtype']}")
    if dtypes != WEIGHT_DTYPE:
        raise CheckpointError(f"'{path}' holds {dtypes} weights; ddlm's models are {WEIGHT_DTYPE}, and a "
                              f"checkpoint of another dtype is refused rather than cast")


def upgrade_config(d: dict) -> dict:
    """Read configs written by earlier versions: without `model.block` the backbone was plain;
    sampling options then stored under the method move to the sample section."""
    d = json.loads(json.dumps(d))
    model = d.get("model")
    if isinstance(model, dict):
        model.setdefault("block", "plain")
    train = d.get("train")
    if isinstance(train, dict) and "grad_accum" in train:  # k micro-batches of B: a global batch of k*B
        accum = train.pop("grad_accum")
        if isinstance(accum, int) and accum > 1 and isinstance(train.get("batch_size"), int):
            train["micro_batch_size"] = train["batch_size"]
            train["batch_size"] *= accum
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
    except RecursionError:
        raise CheckpointError(f"'{path}' is nested too deeply to be a file ddlm wrote") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"'{path}' does not hold a JSON object")
    return data


def load_trainer_state(ckpt: Path) -> dict:
    """The resume state, read with weights_only=True: a file holding anything but tensors and
    plain containers (e.g. a crafted pickle that would run code) is refused, never executed.
    A sharded checkpoint's state lacks the model, optimizer and EMA tensors; its key "sharded"
    names the torch.distributed.checkpoint folder that holds them (every file checked here)."""
    ckpt = Path(ckpt)
    entries = manifest_entries(ckpt) or {}
    if (ckpt / SHARDED_META).is_file():
        state = _load_state_file(ckpt, SHARDED_META)
        for name in entries:
            if name.startswith(SHARDED_STATE + "/"):
                verify_file(ckpt, name)
        if not (ckpt / SHARDED_STATE).is_dir():
            raise CheckpointError(f"checkpoint '{ckpt}' lacks its sharded state folder {SHARDED_STATE}/")
        return {**state, "sharded": ckpt / SHARDED_STATE}
    return _load_state_file(ckpt, STATE)


def _load_state_file(ckpt: Path, name: str) -> dict:
    path = ckpt / name
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{ckpt}' has no {STATE}; it cannot be resumed")
    verify_file(ckpt, name)
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
        if name in own and own[name].is_floating_point() != tensor.is_floating_point():
            return (f"tensor {name} has dtype {str(tensor.dtype).replace('torch.', '')} in the checkpoint "
                    f"but {str(own[name].dtype).replace('torch.', '')} in the model")
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # anything else load_state_dict refuses
        return str(err).splitlines()[-1].strip()[:160]
    if missing or unexpected:
        return f"{'missing' if missing else 'unexpected'} tensor {(missing or unexpected)[0]}"
    return None
