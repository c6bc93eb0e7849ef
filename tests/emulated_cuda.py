"""A CUDA device emulated on the CPU, to run ddlm's GPU path where no GPU is.

A tensor "on cuda" is a wrapper around a real CPU tensor whose `.device` says cuda:0, so the code
runs end to end with real numbers while the wrapper enforces what a GPU enforces and a CPU does not:

  * a Python-level torch call that mixes a cuda tensor with a CPU tensor (of one element or more)
    fails as CUDA fails ("Expected all tensors to be on the same device"); 0-dim CPU tensors are
    scalars and pass, as on CUDA; `copy_`, `.to()` and indexing with CPU indices pass, as on CUDA;
  * a random op on cuda drawing from a CPU generator fails, and the other way round;
  * `torch.cuda.*`, `torch.Generator(device="cuda")`, `pin_memory` and `torch.autocast("cuda")`
    behave as on a machine with one GPU; autocast really casts (to the CPU's autocast);
  * every device-to-host read (`.item()`, `.tolist()`, `.cpu()`, `bool(t)`, and ops whose output
    shape depends on the data, like `nonzero`) is counted in `host_reads`: where a GPU would stall.

What it cannot see: CUDA's kernels (the numbers are the CPU's), NCCL, torch.compile's Triton code,
memory, and C++ code that reads `tensor.device` (autograd runs on the CPU underneath; tensors that
C++ decompositions make are on the real CPU, so a stray is a CPU tensor that Python code passed to
the torch call, not one made inside it). It tests the code's device discipline, not a GPU.
"""
from __future__ import annotations

import contextlib
import sys
import time
from collections import Counter
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
aten = torch.ops.aten

# ops that take tensors on another device than the rest, as CUDA does
MIXED_OK = {aten.copy_.default, aten._to_copy.default, aten.index.Tensor, aten.index_put_.default,
            aten._index_put_impl_.default, aten.index_put.default, aten.lift_fresh.default,
            aten.set_.source_Tensor, aten.detach.default}
# ops a GPU must finish before the host can go on: a value read, or an output shaped by the data
SYNCING = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default,
           aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
           aten.unique_consecutive.default, aten.unique_dim.default}
# The storages of the CPU tensors passed to each Python-level torch call in progress (a stack,
# innermost last): a stray is one of these tensors or a view of one. Tensors that C++ decompositions
# make inside a call have the wrapper's real device, the CPU, where a GPU would have made them on
# the GPU: with storages of their own, they are not strays.
VISIBLE_CPU: list[set[int]] = []
HOST_METHODS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"}


class OnCuda(torch.Tensor):
    """A CPU tensor that says it is on cuda:0."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        out = torch.Tensor._make_wrapper_subclass(
            cls, elem.size(), strides=elem.stride(), storage_offset=elem.storage_offset(),
            dtype=elem.dtype, layout=elem.layout, device=CPU, requires_grad=False)
        out.elem = elem
        return out

    @property
    def device(self):
        return CUDA

    @property
    def is_cuda(self):
        return True

    def __repr__(self):
        return f"OnCuda({self.elem!r})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})

    def __reduce_ex__(self, proto):  # torch.save of a cuda tensor: here, the CPU tensor it holds
        return self.elem.__reduce_ex__(proto)


class CudaGenerator(torch.Generator):
    """torch.Generator(device=...) where cuda is emulated: a CPU generator that says its device."""

    def __new__(cls, device=None):
        return super().__new__(cls)

    def __init__(self, device=None):
        dev = torch.device(device) if device is not None else CPU
        self.emulated = CUDA if dev.type == "cuda" else CPU

    @property
    def device(self):
        return self.emulated


class CudaEvent:
    """torch.cuda.Event on the emulated device: host time (the emulated work is synchronous)."""

    def __init__(self, enable_timing: bool = False, **_):
        self.time = None

    def record(self, stream=None) -> None:
        self.time = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "CudaEvent") -> float:
        return (end.time - self.time) * 1e3


def on_cuda(t: torch.Tensor) -> torch.Tensor:
    return t if isinstance(t, OnCuda) else OnCuda(t.detach()).requires_grad_(t.requires_grad)


def _cuda(value) -> bool:
    if value is None or isinstance(value, torch.dtype):
        return False
    return torch.device(value).type == "cuda"


def _check_generator(func, args, kwargs, out_on_cuda: bool) -> None:
    """At the Python level: under the dispatcher a generator is a fresh object with its real device."""
    gens = [g for g in (*args, kwargs.get("generator")) if isinstance(g, torch.Generator)]
    if not gens:
        return
    gen = gens[0]
    gen_cuda = gen.device.type == "cuda"
    if gen_cuda != out_on_cuda:
        raise RuntimeError(f"Expected a '{'cuda' if out_on_cuda else 'cpu'}' device type for generator "
                           f"but found '{'cuda' if gen_cuda else 'cpu'}' ({func})")


def _dispatch(func, args, kwargs):
    flat, _ = tree_flatten((args, kwargs))
    tensors = [t for t in flat if isinstance(t, torch.Tensor)]
    wrapped = [t for t in tensors if isinstance(t, OnCuda)]
    if func in SYNCING:
        EmulatedCuda.count(str(func))
    if func not in MIXED_OK:
        visible = VISIBLE_CPU[-1] if VISIBLE_CPU else set()
        stray = [t for t in tensors if not isinstance(t, OnCuda) and t.dim() > 0 and _storage(t) in visible]
        if stray:
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two "
                               f"devices, cuda:0 and cpu! ({func}: a cpu tensor of shape "
                               f"{tuple(stray[0].shape)})")
    plain_args, plain_kwargs = tree_map(lambda x: x.elem if isinstance(x, OnCuda) else x, (args, kwargs))
    out = func(*plain_args, **plain_kwargs)
    by_elem = {id(t.elem): t for t in wrapped}

    def wrap(x):
        if not isinstance(x, torch.Tensor):
            return x
        return by_elem[id(x)] if id(x) in by_elem else OnCuda(x)  # an in-place op returns its input

    return tree_map(wrap, out)


class _Moves(TorchFunctionMode):
    """Device moves and factories at the Python level: `.to/.cuda/.cpu`, `device="cuda"`, host reads."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        self_ = args[0] if args else None
        if name == "to" and isinstance(self_, torch.Tensor):
            return self._to(self_, *args[1:], **kwargs)
        if name == "cuda" and isinstance(self_, torch.Tensor):
            return on_cuda(self_) if not isinstance(self_, OnCuda) else self_
        if name == "cpu" and isinstance(self_, OnCuda):
            EmulatedCuda.count("cpu()")
            return self_.elem.detach().clone().requires_grad_(self_.requires_grad)
        if name == "pin_memory" and isinstance(self_, torch.Tensor):
            return self_
        if name in HOST_METHODS and isinstance(self_, OnCuda):
            EmulatedCuda.count(name)
            return getattr(self_.elem, name)(*args[1:], **kwargs)
        if _cuda(kwargs.get("device")):
            _check_generator(func, args, kwargs, True)
            kwargs = {**kwargs, "device": CPU}
            kwargs.pop("pin_memory", None)
            out = func(*args, **kwargs)
            return tree_map(lambda x: on_cuda(x) if isinstance(x, torch.Tensor) else x, out)
        flat = tree_flatten((args, kwargs))[0]
        _check_generator(func, args, kwargs, any(isinstance(t, OnCuda) for t in flat))
        VISIBLE_CPU.append({_storage(t) for t in flat if isinstance(t, torch.Tensor) and not isinstance(t, OnCuda)
                            and t.numel() > 0})
        try:
            return func(*args, **kwargs)
        finally:
            VISIBLE_CPU.pop()

    @staticmethod
    def _to(t: torch.Tensor, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if isinstance(args[0] if args else None, torch.Tensor):
            device = args[0].device
        target_cuda = _cuda(device) if device is not None else isinstance(t, OnCuda)
        if target_cuda and isinstance(t, OnCuda):  # a cast on the device: through the dispatcher, for autograd
            return t if dtype is None or dtype == t.dtype else torch.Tensor.to(t, dtype)
        base = t.elem if isinstance(t, OnCuda) else t
        if dtype is not None:
            base = base.to(dtype)
        if target_cuda:
            return on_cuda(base)
        if isinstance(t, OnCuda):
            EmulatedCuda.count("to(cpu)")
            return base.detach().clone().requires_grad_(t.requires_grad)
        return base


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr() if t.numel() else 0


def _caller() -> str:
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if "/ddlm/" in name and "/tests/" not in name:
            return f"ddlm/{name.rsplit('/ddlm/', 1)[1]}:{frame.f_lineno}"
        frame = frame.f_back
    return "elsewhere"


class EmulatedCuda:
    """Context manager: inside it torch sees one CUDA device, emulated as above."""

    active: "EmulatedCuda | None" = None

    def __init__(self):
        self.host_reads: Counter = Counter()
        self.read_sites: Counter = Counter()  # "ddlm/file.py:line" of the innermost ddlm frame
        self._stack = contextlib.ExitStack()

    @classmethod
    def count(cls, what: str) -> None:
        if cls.active is not None:
            cls.active.host_reads[what] += 1
            cls.active.read_sites[_caller()] += 1

    @property
    def n_host_reads(self) -> int:
        return sum(self.host_reads.values())

    def __enter__(self):
        real_autocast = torch.autocast

        def autocast(device_type, *args, **kwargs):
            return real_autocast("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

        patches = {
            "torch.cuda.is_available": lambda: True,
            "torch.cuda._lazy_init": lambda: None,
            "torch.cuda.device_count": lambda: 1,
            "torch.cuda.current_device": lambda: 0,
            "torch.cuda.set_device": lambda *a, **k: None,
            "torch.cuda.synchronize": lambda *a, **k: None,
            "torch.cuda.get_device_name": lambda *a, **k: "emulated CUDA (CPU)",
            "torch.cuda.is_bf16_supported": lambda *a, **k: True,
            "torch.cuda.get_rng_state_all": lambda: [torch.get_rng_state()],
            "torch.cuda.get_rng_state": lambda *a, **k: torch.get_rng_state(),
            "torch.cuda.set_rng_state": lambda *a, **k: None,
            "torch.cuda.set_rng_state_all": lambda states: None,
            "torch.cuda.manual_seed_all": lambda seed: None,
            "torch.cuda.manual_seed": lambda seed: None,
            "torch.cuda.empty_cache": lambda: None,
            "torch.cuda.reset_peak_memory_stats": lambda *a, **k: None,
            "torch.cuda.max_memory_allocated": lambda *a, **k: 0,
            "torch.cuda.Event": CudaEvent,
            "torch.Generator": CudaGenerator,
            "torch.autocast": autocast,
            "torch.amp.autocast": autocast,
        }
        for target, value in patches.items():
            self._stack.enter_context(mock.patch(target, value))
        overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)  # Module.to makes new Parameters
        self._stack.callback(torch.__future__.set_overwrite_module_params_on_conversion, overwrite)
        self._stack.enter_context(_Moves())
        EmulatedCuda.active = self
        return self

    def __exit__(self, *exc):
        EmulatedCuda.active = None
        return self._stack.__exit__(*exc)
