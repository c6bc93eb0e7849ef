"""`ddlm import SRC --out DIR`: a model folder from elsewhere as an ordinary ddlm run directory.

Each format has a module with `detect(src) -> bool` and an importer returning `Imported`; the
first format that recognises the folder imports it. Only safetensors weights are read.
"""
from __future__ import annotations

from pathlib import Path

from ddlm.errors import CheckpointError, ConfigError
from ddlm.interop.rundir import Imported, write_run


def _gpt2(src: Path, method: str | None) -> Imported | None:
    from ddlm.interop import gpt2

    if not gpt2.detect(src):
        return None
    if method not in (None, "ar"):
        raise ConfigError(f"'{src}' is GPT-2, an autoregressive model: it imports as --method ar, not {method}")
    return gpt2.import_gpt2(src)


def _dit(src: Path, method: str | None) -> Imported | None:
    from ddlm.interop import dit

    if dit.detect(src) is None:
        return None
    return dit.import_dit(src, method)


def _export(src: Path, method: str | None) -> Imported | None:
    from ddlm.interop.export import detect_export, import_export

    if not detect_export(src):
        return None
    imported = import_export(src)
    if method not in (None, imported.run.method):
        raise ConfigError(f"'{src}' is a ddlm {imported.run.method} export; it imports as that method, not {method}")
    return imported


# a folder `ddlm export` wrote comes first: a GPT-2-shaped export is also a GPT-2 folder
FORMATS = (("ddlm export", _export), ("gpt2", _gpt2), ("mdlm / bd3 / sedd", _dit))


def read_source(src: str | Path, method: str | None = None) -> Imported:
    """The model in folder `src`, mapped onto ddlm (`method` overrides the inferred one where the
    format allows it)."""
    from ddlm.interop.dit import snapshot_dir

    src = Path(src)
    if not src.is_dir():
        raise ConfigError(f"import source '{src}' is not a folder (download the model first, e.g. with "
                          "huggingface-cli download, and pass its local folder)")
    src = snapshot_dir(src)  # a huggingface_hub cache folder (models--org--name): its snapshot
    refuse_pickled_weights(src)
    for _, importer in FORMATS:
        imported = importer(src, method)
        if imported is not None:
            return imported
    names = ", ".join(name for name, _ in FORMATS)
    raise CheckpointError(f"'{src}' is not a model ddlm can import (known: {names}); expected a config "
                          "naming the architecture and safetensors weights")


def refuse_pickled_weights(src: Path) -> None:
    """A folder whose weights are only pickles is refused for that, before its config is read (so
    the message says what to do about the weights, whatever else the folder lacks)."""
    from ddlm.interop.safetensors_dir import INDEX, PICKLES, weight_files

    has_safetensors = (src / INDEX).is_file() or any(src.glob("*.safetensors"))
    if not has_safetensors and any(p.suffix in PICKLES for p in src.iterdir()):
        weight_files(src)  # raises the pickle's one line, with the command that converts it


def import_model(src: str | Path, out: str | Path, *, method: str | None = None, overwrite: bool = False) -> dict:
    """Import `src` into run directory `out`; returns what was written."""
    imported = read_source(src, method)
    checkpoint = write_run(imported, out, overwrite=overwrite)
    model = imported.run.model
    return {"out": str(out), "checkpoint": str(checkpoint), "source": imported.source,
            "architecture": imported.architecture, "method": imported.run.method,
            "tokenizer": imported.run.data.tokenizer, "seq_len": imported.run.data.seq_len,
            "parameters": sum(v.numel() for k, v in imported.weights.items()),
            "model": {"dim": model.dim, "n_layers": model.n_layers, "n_heads": model.n_heads}}
