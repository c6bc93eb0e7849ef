"""Device, dtype, seeds and threads: the one place that decides how tensors are computed.

The training dtype is chosen by measurement, never by assumption: on CPUs with AMX or AVX512-BF16
bf16 matmuls are several times faster than fp32, on AVX2-only CPUs they can be 250x slower. The
probe times both once per machine and caches the verdict.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch

from ddlm.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cache_dir() -> Path:
    """Where ddlm caches token streams and probes ($DDLM_CACHE or ~/.cache/ddlm); a DDLM_CACHE
    that is a file, or cannot be created, is one line."""
    path = Path(os.environ.get("DDLM_CACHE") or Path.home() / ".cache" / "ddlm")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"DDLM_CACHE='{path}' is a file, not a directory; point it at a directory for "
                          f"ddlm's caches")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the cache directory '{path}' (DDLM_CACHE): {err.strerror}") from None
    return path


def device() -> torch.device:
    """CUDA when available, else CPU; DDLM_DEVICE (cpu, cuda, cuda:N) chooses, and a device that
    does not exist or is not available here is one line."""
    wanted = os.environ.get("DDLM_DEVICE", "").strip()
    if not wanted:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(wanted)
    except RuntimeError:
        raise ConfigError(f"DDLM_DEVICE={wanted!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ConfigError(f"DDLM_DEVICE={wanted!r}: ddlm runs on cpu or cuda (cuda:N)")
    if not torch.cuda.is_available():
        raise ConfigError(f"DDLM_DEVICE={wanted!r}, but CUDA is not available here; use DDLM_DEVICE=cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"DDLM_DEVICE={wanted!r}, but this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return dev


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG the training loop draws from, for exact resume, as tensors and plain data only
    (so it loads with torch.load(weights_only=True))."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def matmul_rate(dtype: torch.dtype, *, n: int = 512, rows: int = 2048, seconds: float = 0.5,
                dev: torch.device | None = None) -> float:
    """Measured dense matmul throughput in FLOP/s for (rows x n) @ (n x n)."""
    dev = dev or device()
    a = torch.randn(rows, n, dtype=dtype, device=dev)
    b = torch.randn(n, n, dtype=dtype, device=dev)
    for _ in range(2):
        a @ b
    _sync(dev)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    _sync(dev)
    return 2.0 * rows * n * n * count / (time.perf_counter() - start)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _probe_key(dev: torch.device) -> str:
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    return f"{dev.type}|{name}|{cpu_model()}|torch{torch.__version__}|threads{torch.get_num_threads()}"


def memory_bytes() -> int:
    """Physical memory of this machine (0 when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def probe_dtype(dev: torch.device | None = None, *, refresh: bool = False) -> dict:
    """Time fp32 and bf16 matmuls once per machine; cache {'fp32': rate, 'bf16': rate, 'choice'}."""
    dev = dev or device()
    path = cache_dir() / "dtype_probe.json"
    key = _probe_key(dev)
    cached = _read_probes(path)
    verdict = cached.get(key)
    if isinstance(verdict, dict) and verdict.get("choice") in DTYPES and not refresh:
        return verdict
    rates = {name: matmul_rate(dt, dev=dev, seconds=0.3) for name, dt in DTYPES.items()}
    # bf16 must win clearly: it also costs precision, so a tie goes to fp32.
    rates["choice"] = "bf16" if rates["bf16"] > 1.3 * rates["fp32"] else "fp32"
    cached[key] = rates
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(cached, indent=2))
        os.replace(tmp, path)
    except OSError:  # a cache that cannot be written is measured again next time
        tmp.unlink(missing_ok=True)
    return rates


def _read_probes(path: Path) -> dict:
    """The cached probe verdicts, or {} when the file is missing or is not a JSON object (damaged
    caches are measured again, never trusted)."""
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # ValueError: not UTF-8, not JSON
        return {}
    return cached if isinstance(cached, dict) else {}


def resolve_dtype(name: str, dev: torch.device | None = None) -> torch.dtype:
    """'auto' -> the measured winner; 'fp32' / 'bf16' forced."""
    if name == "auto":
        return DTYPES[probe_dtype(dev)["choice"]]
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose auto, fp32 or bf16")
    return DTYPES[name]


def autocast(dtype: torch.dtype, dev: torch.device | None = None):
    """Mixed precision context: bf16 autocast, or nothing for fp32 (weights stay fp32)."""
    dev = dev or device()
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]
