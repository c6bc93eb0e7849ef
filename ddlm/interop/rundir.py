"""An imported model as an ordinary ddlm run directory: one checkpoint (step 0, no trainer
state), so `ddlm eval`, `sample`, `info`, `compare` and `train --init` read it as any other run."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ddlm.checkpoint import save_checkpoint
from ddlm.config import RunConfig
from ddlm.errors import ConfigError


@dataclass
class Imported:
    """What an importer returns: the run it maps onto, the weights in ddlm's names, the tokenizer
    (as `Tokenizer.to_dict()`), and what it was read from."""

    run: RunConfig
    weights: dict[str, torch.Tensor]
    tokenizer_dict: dict
    source: str
    architecture: str


def write_run(imported: Imported, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write `imported` as run directory `out` (a new or empty directory, or with `overwrite` one
    that holds an earlier import); returns the checkpoint written."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"--out '{out}' is not empty; choose a new directory or pass --overwrite")
        if not (out / "latest").is_file():
            raise ConfigError(f"--out '{out}' does not hold a ddlm run; refusing to overwrite it")
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "latest").unlink()
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to(torch.float32).contiguous() for k, v in imported.weights.items()}
    return save_checkpoint(out, 0, config=imported.run, tokenizer_dict=imported.tokenizer_dict,
                           weights=weights, trainer_state=None)
