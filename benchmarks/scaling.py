"""Data-parallel scaling on this machine: N gloo processes of one thread each against one process of
one thread, at the same global batch and micro-batch (so each forward pass does the same work).

    python benchmarks/scaling.py [--methods ar,mdlm,bd3] [--procs 2] [--steps 12] [--rounds 2]

For each method: tokens/s of one process (accumulating the N micro-batches) and of N processes
under torchrun (DDP), interleaved over rounds; the ratio of their medians; and the share of the
N-process step spent waiting on communication, measured as 1 - t(step without gradient sync) /
t(step with it) on the same processes (DDP's no_sync on every micro-batch: the same compute, no
all-reduce). Prints a table and writes benchmarks/results/scaling_<cpu>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"ar": {}, "mdlm": {}, "bd3": {"bd3": {"block_size": 16}}}


def run_config(method: str, args) -> dict:
    from ddlm.config import make_config

    base = {"method": method, "data": {"corpus": "austen", "tokenizer": "char", "seq_len": args.seq_len},
            "model": {"dim": args.dim, "n_layers": args.layers, "n_heads": args.dim // 64},
            "train": {"steps": 10_000, "batch_size": args.batch, "micro_batch_size": args.micro,
                      "warmup_steps": 10, "eval_every": 0, "ckpt_every": 0, "progress": False,
                      "dtype": args.dtype, "threads": 1, "ema": 0.0},
            **CONFIGS[method]}
    return make_config(base=base).to_dict()


def worker(args) -> None:
    """Time `args.steps` optimizer steps after 2 warm-up steps, with and without gradient sync."""
    import contextlib

    import torch

    from ddlm import runtime
    from ddlm.config import RunConfig
    from ddlm.distributed import Distributed
    from ddlm.train.loop import Trainer

    dist = Distributed.from_environment(runtime.device())
    run = RunConfig.from_dict(json.loads(args.worker))
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(run, Path(out) / f"rank{dist.rank}", quiet=True, dist=dist)
        timings = {}
        for label in ("sync", "no_sync"):
            if label == "no_sync":  # the same step with every micro-batch's gradients kept local
                trainer.dist.skip_sync = lambda module, last: (
                    module.no_sync() if hasattr(module, "no_sync") else contextlib.nullcontext())
            for _ in range(2):
                trainer._train_step()
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                trainer._train_step()
            dist.barrier()
            timings[label] = (time.perf_counter() - start) / args.steps
        trainer._release()
    tokens = run.train.batch_size * run.data.seq_len
    if dist.is_main:
        print("RESULT " + json.dumps({"world": dist.world_size, "tokens_per_s": tokens / timings["sync"],
                                      "step_s": timings["sync"], "step_no_sync_s": timings["no_sync"],
                                      "dtype": runtime.dtype_name(trainer.dtype), "threads": torch.get_num_threads()}))
    dist.close()


def launch(run: dict, procs: int, steps: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDLM_DEVICE": "cpu", "PYTHONPATH": str(ROOT)}
    script = [str(Path(__file__).resolve()), "--steps", str(steps), "--worker", json.dumps(run)]
    if procs == 1:
        cmd = [sys.executable, *script]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
               "--master_port", str(port), *script]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    match = re.search(r"^RESULT (.*)$", done.stdout, re.M)
    if done.returncode or not match:
        raise SystemExit(f"benchmark worker failed:\n{done.stderr[-2000:]}")
    return json.loads(match.group(1))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="ar,mdlm,bd3")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16, help="global batch")
    parser.add_argument("--micro", type=int, default=8, help="micro-batch (the same for every world size)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    from ddlm import runtime

    cpu = runtime.cpu_model()
    rows = []
    print(f"{'method':<6} {'1 proc tok/s':>13} {f'{args.procs} procs tok/s':>14} {'ratio':>6} {'comm share':>11}")
    for method in args.methods.split(","):
        run = run_config(method, args)
        one, many = [], []
        for _ in range(args.rounds):  # interleaved, so drift hits both alike
            one.append(launch(run, 1, args.steps))
            many.append(launch(run, args.procs, args.steps))
        rate_one = statistics.median(r["tokens_per_s"] for r in one)
        rate_many = statistics.median(r["tokens_per_s"] for r in many)
        comm = statistics.median(1 - r["step_no_sync_s"] / r["step_s"] for r in many)
        rows.append({"method": method, "tokens_per_s_1": rate_one, f"tokens_per_s_{args.procs}": rate_many,
                     "ratio": rate_many / rate_one, "communication_share": comm, "dtype": many[0]["dtype"],
                     "rounds": {"1": one, str(args.procs): many}})
        print(f"{method:<6} {rate_one:>13,.0f} {rate_many:>14,.0f} {rate_many / rate_one:>6.2f} {comm:>10.1%}")
    payload = {"cpu": cpu, "procs": args.procs, "threads_per_proc": 1, "config": {
        k: getattr(args, k) for k in ("dim", "layers", "seq_len", "batch", "micro", "steps", "rounds", "dtype")},
        "rows": rows, "when": time.strftime("%Y-%m-%d %H:%M")}
    slug = re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-")[:40]
    path = Path(args.out) / f"scaling_{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    print(f"wrote {path} ({cpu})")
    return payload


if __name__ == "__main__":
    main()
