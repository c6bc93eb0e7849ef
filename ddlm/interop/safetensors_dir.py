"""The weights of a model folder, from safetensors only: the files a `model.safetensors.index.json`
names, or the folder's one `.safetensors` file. Pickled weights (.bin, .pt, .pth, .ckpt, .pkl) are
refused without being opened: unpickling runs code from the file."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ddlm.errors import CheckpointError, DdlmError

PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX = "model.safetensors.index.json"


def weight_files(src: Path) -> list[Path]:
    """The safetensors files holding the weights; one line when there are none (pickles named)."""
    if not src.is_dir():
        raise CheckpointError(f"'{src}' is not a folder")
    if (src / INDEX).is_file():
        return indexed_files(src / INDEX)
    found = sorted(src.glob("*.safetensors"))
    if len(found) == 1:
        return found
    if len(found) > 1:
        raise CheckpointError(f"'{src}' holds {len(found)} .safetensors files and no {INDEX} to say which "
                              "are the weights")
    pickles = sorted(p.name for p in src.iterdir() if p.suffix in PICKLES)
    if pickles:
        raise CheckpointError(
            f"'{src / pickles[0]}' is a pickle (pickled weights), which ddlm never unpickles (it can run code); "
            f"convert it outside ddlm, where you trust the file: python -c \"import torch, safetensors.torch as st; "
            f"st.save_file(torch.load('{pickles[0]}', weights_only=True), 'model.safetensors')\"")
    raise CheckpointError(f"'{src}' holds no .safetensors weights")


def indexed_files(index: Path) -> list[Path]:
    """The shards an index names, each a .safetensors file beside it."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except Exception:
        raise CheckpointError(f"'{index}' is not a safetensors index (a 'weight_map' of key -> file)") from None
    files = [index.parent / name for name in names]
    for path in files:
        if path.suffix != ".safetensors" or path.parent != index.parent or not path.is_file():
            raise CheckpointError(f"'{index}' names '{path.name}', which is not a .safetensors file beside it")
    return files


def read_key_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    """key -> (shape, file) from the safetensors headers, no tensor read."""
    from safetensors import safe_open

    found: dict[str, tuple[tuple[int, ...], Path]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if key in found:
                        raise CheckpointError(f"key '{key}' is in both '{found[key][1].name}' and '{path.name}'")
                    found[key] = (tuple(f.get_slice(key).get_shape()), path)
        except DdlmError:
            raise
        except Exception as exc:
            raise CheckpointError(f"'{path}' is not a readable safetensors file: "
                                  f"{(str(exc).splitlines() or [type(exc).__name__])[0]}") from None
    return found


def load_files(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of `files` (their headers checked first by read_key_shapes)."""
    from safetensors import safe_open

    tensors = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def read_safetensors_dir(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors weights; one line when there are none."""
    files = weight_files(src)
    read_key_shapes(files)  # a damaged file or a key in two shards: one line before reading tensors
    return load_files(files)
