"""The trainer's resume state in both layouts, and the conversions between them.

    whole    trainer_state.pt: model, optimizer, EMA as full tensors (one process, DDP: rank 0 writes)
    sharded  trainer_state/ (torch.distributed.checkpoint, every FSDP2 rank writes its part) plus
             trainer_meta.pt (step, data position, RNG, method state), rank 0

Either layout resumes into either kind of model (plain, DDP, FSDP2) on any number of processes:
torch.distributed.checkpoint reshards a sharded state on load, and a whole state is sharded with
the torch.distributed.checkpoint.state_dict API. The optimizer state of a whole checkpoint is kept in
torch's own `optimizer.state_dict()` form (indices), converted to parameter names where needed.
"""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ddlm.errors import CheckpointError

# What a torch.distributed.checkpoint `.metadata` pickle may name; anything else is refused before
# torch unpickles it (it uses plain pickle, which would run code named in a crafted file).
_METADATA_MODULES = ("torch.distributed.checkpoint.",)
_METADATA_NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                   ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"), ("builtins", "set"),
                   ("builtins", "frozenset"), ("copyreg", "_reconstructor"), ("builtins", "object")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = module.startswith(_METADATA_MODULES) or (module, name) in _METADATA_NAMES or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)


def check_sharded_metadata(folder: Path) -> None:
    """Refuse a sharded state whose `.metadata` names anything but checkpoint metadata classes."""
    path = Path(folder) / ".metadata"
    try:
        with open(path, "rb") as f:
            _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"'{path}' names {err} ; refused (nothing in it was run)") from None
    except (OSError, EOFError, ValueError, AttributeError, ImportError) as err:
        raise CheckpointError(f"'{path}' is missing or corrupt ({type(err).__name__})") from None


def optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order (the indices of `optimizer.state_dict()`)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_by_name(state: dict, names: list[str]) -> dict:
    """torch's indexed optimizer state -> the same keyed by parameter name (the form of
    torch.distributed.checkpoint.state_dict)."""
    return {"state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


def _quiet(func, *args, **kwargs):
    with warnings.catch_warnings():  # "torch.distributed is not initialised: one process" is the point
        warnings.simplefilter("ignore", UserWarning)
        return func(*args, **kwargs)


def save_sharded(folder: Path, model: nn.Module, optimizer, ema) -> None:
    """Every rank writes its shards of the model, optimizer and EMA (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    if ema is not None:
        state["ema"] = ema.shadow
    _quiet(dcp.save, state, checkpoint_id=str(folder))


def load_sharded(folder: Path, model: nn.Module, optimizer, ema) -> None:
    """Read a sharded state into `model` (plain or sharded, any number of ranks), in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    check_sharded_metadata(folder)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    if ema is not None:
        state["ema"] = ema.shadow
    _quiet(dcp.load, state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)


def load_whole(state: dict, model: nn.Module, optimizer, ema, sharded: bool) -> None:
    """Read a whole state (trainer_state.pt) into `model`, sharding it when the model is sharded."""
    if not sharded:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    from torch.distributed.tensor import DTensor, distribute_tensor

    optim_state = optimizer_by_name(state["optimizer"], optimizer_names(model, optimizer))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))
    if ema is not None and state.get("ema") is not None:
        ema.decay, ema.updates = state["ema"]["decay"], state["ema"]["updates"]
        for name, full in state["ema"]["shadow"].items():
            own = ema.shadow[name]
            if isinstance(own, DTensor):
                full = distribute_tensor(full.to(own.device), own.device_mesh, own.placements).to_local()
                own = own.to_local()
            own.copy_(full)


def whole_state(model: nn.Module, optimizer, ema) -> dict:
    """The model, optimizer and EMA of an unsharded model, as trainer_state.pt holds them."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict() if ema is not None else None}


def inference_weights(model: nn.Module, ema, *, sharded: bool, is_main: bool) -> dict[str, torch.Tensor]:
    """The weights model.safetensors holds, whole: frozen parts as they are, trainable ones as
    their EMA when there is one. Sharded: gathered (collective), returned on rank 0 only."""
    if not sharded:
        weights = model.state_dict()
        return {**weights, **ema.shadow} if ema is not None else weights
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ema is not None:
        shadow = {k: (v.full_tensor() if isinstance(v, DTensor) else v).cpu() for k, v in ema.shadow.items()}
        weights = {**weights, **shadow}
    return weights if is_main else {}
