"""The weights of a model folder, from safetensors only: `model.safetensors`, or the shards a
`model.safetensors.index.json` names. Pickled weights (.bin, .pt, .pth, .ckpt) are refused without
being opened: unpickling runs code from the file."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ddlm.errors import CheckpointError

PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"'{path}' is not a readable safetensors file "
                              f"({str(err).splitlines()[0][:120]})") from None


def _shards(src: Path) -> list[Path]:
    try:
        index = json.loads((src / INDEX).read_text())
        names = sorted(set(index["weight_map"].values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"'{src / INDEX}' is not a safetensors index ({str(err)[:80]})") from None
    shards = []
    for name in names:
        path = src / name
        if not isinstance(name, str) or "/" in name or "\\" in name or not name.endswith(".safetensors"):
            raise CheckpointError(f"'{src / INDEX}' names {name!r}, not a safetensors file in the folder")
        if not path.is_file():
            raise CheckpointError(f"'{src / INDEX}' names shard {name}, which is missing")
        shards.append(path)
    return shards


def read_safetensors_dir(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors weights; one line when there are none."""
    if not src.is_dir():
        raise CheckpointError(f"'{src}' is not a folder")
    if (src / SINGLE).is_file():
        return _load(src / SINGLE)
    if (src / INDEX).is_file():
        weights: dict[str, torch.Tensor] = {}
        for shard in _shards(src):
            weights.update(_load(shard))
        return weights
    pickles = sorted(p.name for pattern in PICKLES for p in src.glob(pattern))
    if pickles:
        raise CheckpointError(f"'{src}' holds pickled weights ({pickles[0]}) and no safetensors; ddlm never "
                              "unpickles a file: convert it once where you trust it (e.g. transformers' "
                              "save_pretrained(..., safe_serialization=True)) and import the result")
    raise CheckpointError(f"'{src}' holds no model.safetensors (nor a {INDEX})")
