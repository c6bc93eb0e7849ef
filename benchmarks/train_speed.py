"""Training throughput and MFU of ddlm's trainer step, against the matmul rate measured in the same run.

    python benchmarks/train_speed.py [--steps 10] [--methods ar,mdlm] [--out benchmarks/results/train_speed.json]

Configs: small = d256, 4 layers, 4 heads, L=256, batch 8, char vocab (the public bd3lms code trains
AR at 4614 tok/s and MDLM at 3852 tok/s at this config on the reference CPU); large = d512, 8 layers,
8 heads, L=256, batch 8. Each is run in fp32 and bf16. MFU = tokens/s * FLOPs/token / matmul FLOP/s of
the same dtype, where the matmul rate is the best of square-ish GEMMs of the model's own widths.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ddlm import runtime
from ddlm.config import make_config
from ddlm.eval.speed import train_flops_per_token
from ddlm.train.loop import Trainer

CONFIGS = {
    "small": {"dim": 256, "n_layers": 4, "n_heads": 4},
    "large": {"dim": 512, "n_layers": 8, "n_heads": 8},
}
BASELINE = {"ar": 4614.0, "mdlm": 3852.0}  # bd3lms tok/s at the small config, fp32 (issue #3)


def peak_rate(dtype: torch.dtype, dims: list[int]) -> float:
    return max(runtime.matmul_rate(dtype, n=n, rows=2048, seconds=1.0) for n in dims)


def time_steps(method: str, size: str, dtype: str, steps: int, compile_: bool, block: str = "auto") -> dict:
    run = make_config(base={"method": method, "model": {**CONFIGS[size], "block": block},
                            "data": {"corpus": "austen", "tokenizer": "char", "seq_len": 256},
                            "train": {"batch_size": 8, "dtype": dtype, "steps": 10_000,
                                      "compile": compile_, "progress": False}})
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(run, tmp, quiet=True)
        for _ in range(3 if not compile_ else 6):
            trainer._train_step()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            trainer._train_step()
            times.append(time.perf_counter() - t0)
    tokens = run.train.batch_size * run.data.seq_len
    seconds = statistics.median(times)
    flops = train_flops_per_token(trainer.run.model, run.data.seq_len)
    return {"method": method, "size": size, "dtype": dtype, "compile": compile_, "block": run.model.block,
            "tokens_per_s": tokens / seconds, "step_s": seconds, "flops_per_token": flops}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--methods", default="ar,mdlm")
    p.add_argument("--sizes", default="small,large")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--blocks", default="auto", help="comma-separated model.block values (auto: the method's)")
    p.add_argument("--out", default="benchmarks/results/train_speed.json")
    args = p.parse_args(argv)
    dims = sorted({c["dim"] for c in CONFIGS.values()} | {1024})
    peaks = {d: peak_rate(runtime.DTYPES[d], dims) for d in args.dtypes.split(",")}
    rows = []
    for size in args.sizes.split(","):
        for dtype in args.dtypes.split(","):
            for method in args.methods.split(","):
                for compile_, block in [(c, b) for c in ([False, True] if args.compile else [False])
                                        for b in args.blocks.split(",")]:
                    r = time_steps(method, size, dtype, args.steps, compile_, block)
                    r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / peaks[dtype]
                    if size == "small" and dtype == "fp32" and method in BASELINE:
                        r["vs_bd3lms"] = r["tokens_per_s"] / BASELINE[method]
                    rows.append(r)
                    print(_row(r), flush=True)
    print_table(rows, peaks)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": _machine(), "matmul_flops": peaks, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


def _row(r: dict) -> str:
    ratio = f"{r['vs_bd3lms']:.2f}x" if "vs_bd3lms" in r else ""
    return (f"{r['method']:<5} {r['block']:<6} {r['size']:<6} {r['dtype']:<5} {'yes' if r['compile'] else 'no':<8}"
            f"{r['tokens_per_s']:>10,.0f} {100 * r['mfu']:>6.1f}%  {ratio}")


def print_table(rows: list[dict], peaks: dict) -> None:
    print("\nmatmul peak measured here: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()))
    print(f"{'method':<5} {'block':<6} {'size':<6} {'dtype':<5} {'compile':<8}{'tok/s':>10} {'MFU':>7}  vs bd3lms")
    for r in rows:
        print(_row(r))


def _machine() -> dict:
    return {"cpu": runtime._cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


if __name__ == "__main__":
    sys.exit(main())
