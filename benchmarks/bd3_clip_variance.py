"""BD3-LM's clipped schedules and the variance they are meant to lower (BD3-LM §4), measured.

    OMP_NUM_THREADS=1 python benchmarks/bd3_clip_variance.py [--steps 250] [--draws 256]

For L' = 4 and L' = 16 a small BD3-LM (char tokenizer on the embedded Austen corpus, d=128 x 2 layers,
L=64, batch 16, 300 steps) is trained once on the NELBO (full window), then, at those fixed weights, the
training loss of each objective is drawn `--draws` times (a held-out batch and a noise draw each;
the same batches for every objective):

  full   t ~ U[1e-3, 1] per block, the NELBO estimator (eq. 11 per block)
  time   t ~ U[beta, omega] per block (the paper's clipped schedule; bd3.clip_mode=time)
  mask   as time, and each block's masked fraction in [beta, omega] (the public code's
         resampling; bd3.clip_mode=mask)

with the windows the paper's search chose on LM1B: U[.45, .95] for L' = 4, U[.3, .8] for L' = 16.
Reported per objective: the mean and variance of the per-batch loss, the variance of the
per-block loss (what the window search minimises), and of the gradient: the trace of its
covariance (sum over parameters), the variance of its projection on a fixed random unit vector, its
mean's squared norm and the noise-to-signal ratio trace / |mean|^2 (scale-free: the objectives
differ in scale). Standard errors by batch means (8 groups). Prints a table and writes
benchmarks/results/bd3_clip_variance.json with the CPU it ran on. About 5 minutes with one thread.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

from ddlm import runtime
from ddlm.build import build_method, prepare_data
from ddlm.config import make_config
from ddlm.train.loop import Trainer

WINDOWS = {4: (0.45, 0.95), 16: (0.3, 0.8)}  # BD3-LM's searched LM1B windows (METHODS.md §3)
MODES = ("full", "time", "mask")
GROUPS = 8  # batch means for the standard errors


def run_config(block_size: int, args) -> "RunConfig":  # noqa: F821
    return make_config(base={
        "method": "bd3", "bd3": {"block_size": block_size},
        "data": {"corpus": "austen", "tokenizer": "char", "seq_len": args.seq_len},
        "model": {"dim": args.dim, "n_layers": args.layers, "n_heads": 4},
        "train": {"steps": args.steps, "batch_size": args.batch, "lr": 1e-3, "beta2": 0.95,
                  "warmup_steps": 25, "eval_every": 0, "eval_batches": 4, "ckpt_every": 0,
                  "log_every": 50, "progress": False, "dtype": "fp32", "threads": 1, "seed": 0}})


def objective(run, tokenizer, mode: str, window: tuple[float, float]):
    """The BD3 method of `run` training on objective `mode`."""
    options = run.method_options
    if mode != "full":
        options = dataclasses.replace(options, clip_min=window[0], clip_max=window[1], clip_mode=mode)
    return build_method(dataclasses.replace(run, method_options=options), tokenizer)


def batch_means(values: list[float]) -> float:
    """Standard error of the mean of `values` from GROUPS contiguous group means."""
    groups = torch.tensor(values, dtype=torch.float64).view(GROUPS, -1).mean(1)
    return float(groups.std() / math.sqrt(GROUPS))


def measure(method, model, batches: list[torch.Tensor], draws: int, direction: torch.Tensor) -> dict:
    """Losses and gradients of `draws` draws (batch i mod len(batches), noise seed i)."""
    params = [p for p in model.parameters() if p.requires_grad]
    losses, block_var, projections, sq_norms = [], [], [], []
    grad_sum = torch.zeros_like(direction)
    group_sums = torch.zeros(GROUPS, direction.numel(), dtype=torch.float64)
    per_group = draws // GROUPS
    for i in range(draws):
        x0 = batches[i % len(batches)]
        out = method.loss(model, x0, generator=torch.Generator().manual_seed(1000 + i))
        grads = torch.autograd.grad(out.loss, params)
        g = torch.cat([gr.reshape(-1) for gr in grads]).double()  # (P,)
        losses.append(float(out.loss.detach()))
        blocks = out.token_nll.detach().double().view(x0.shape[0], -1, method.block_size).mean(-1)  # (B, K)
        block_var.append(float(blocks.var()))
        projections.append(float(g @ direction))
        sq_norms.append(float(g @ g))
        grad_sum += g
        group_sums[i // per_group] += g
    n = draws
    mean = grad_sum / n
    trace = (sum(sq_norms) - n * float(mean @ mean)) / (n - 1)  # sum over parameters of Var(g_j)
    group_trace = []
    for j in range(GROUPS):  # each group's own trace estimate, for a batch-means standard error
        sq = sq_norms[j * per_group:(j + 1) * per_group]
        m = group_sums[j] / per_group
        group_trace.append((sum(sq) - per_group * float(m @ m)) / (per_group - 1))
    signal = float(mean @ mean) - trace / n  # unbiased |E g|^2
    loss_t = torch.tensor(losses, dtype=torch.float64)
    proj_t = torch.tensor(projections, dtype=torch.float64)
    return {
        "loss_mean": float(loss_t.mean()), "loss_mean_se": float(loss_t.std() / math.sqrt(n)),
        "loss_var": float(loss_t.var()), "loss_var_se": group_se(losses, lambda v: float(v.var())),
        "block_loss_var": sum(block_var) / n, "block_loss_var_se": batch_means(block_var),
        "grad_trace_var": trace,
        "grad_trace_var_se": float(torch.tensor(group_trace).std() / math.sqrt(GROUPS)),
        "grad_proj_var": float(proj_t.var()), "grad_proj_var_se": group_se(projections, lambda v: float(v.var())),
        "grad_mean_sq_norm": signal, "noise_to_signal": trace / signal if signal > 0 else float("inf"),
    }


def group_se(values: list[float], stat) -> float:
    """Standard error of `stat` over all values, from its spread over GROUPS groups (/ sqrt(G))."""
    v = torch.tensor(values, dtype=torch.float64).view(GROUPS, -1)
    per = torch.tensor([stat(row) for row in v])
    return float(per.std() / math.sqrt(GROUPS))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--draws", type=int, default=512, help="loss/gradient draws per objective (multiple of 8)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--runs", default="runs/bd3_clip_variance")
    p.add_argument("--out", default="benchmarks/results/bd3_clip_variance.json")
    args = p.parse_args(argv)
    if args.draws % GROUPS:
        p.error(f"--draws must be a multiple of {GROUPS}")
    torch.set_num_threads(1)
    started = time.perf_counter()
    results = {}
    for block_size, window in WINDOWS.items():
        run = run_config(block_size, args)
        trainer = Trainer(run, Path(args.runs) / f"block{block_size}", overwrite=True, quiet=True)
        trained = trainer.fit()
        model = trainer.model
        tokenizer, datasets = prepare_data(run)
        count = min(len(datasets["valid"]) // args.batch, 64)  # distinct held-out batches
        rows = torch.tensor(datasets["valid"].tokens[: args.batch * count], dtype=torch.long)
        batches = list(rows.view(count, args.batch, args.seq_len))
        generator = torch.Generator().manual_seed(7)
        size = sum(q.numel() for q in model.parameters() if q.requires_grad)
        direction = torch.randn(size, generator=generator, dtype=torch.float64)
        direction /= direction.norm()
        model.eval()  # no dropout; gradients at the trained weights
        row = {"window": list(window), "train_steps": trained.step, "final_train_loss": trained.losses[-1],
               "held_out_batches": len(batches)}
        for mode in MODES:
            row[mode] = measure(objective(run, tokenizer, mode, window), model, batches, args.draws, direction)
        results[f"L'={block_size}"] = row
        del trainer
    elapsed = time.perf_counter() - started
    report = {
        "benchmark": "bd3_clip_variance", "cpu": runtime.cpu_model(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "seconds": round(elapsed, 1),
        "command": " ".join(["OMP_NUM_THREADS=1 python benchmarks/bd3_clip_variance.py", *(argv or sys.argv[1:])]),
        "config": {"corpus": "austen", "tokenizer": "char", "seq_len": args.seq_len, "dim": args.dim,
                   "layers": args.layers, "batch": args.batch, "train_steps": args.steps,
                   "draws": args.draws, "trained_on": "full window (NELBO)",
                   "windows": {f"L'={k}": list(v) for k, v in WINDOWS.items()}},
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"wrote {out} ({report['cpu']}, {elapsed:.0f} s)")
    return 0


def print_table(report: dict) -> None:
    head = (f"{'':7} {'objective':9} {'loss mean':>15} {'Var(batch loss)':>17} {'Var(block loss)':>17} "
            f"{'tr Cov(grad)':>17} {'Var(u.grad)':>19} {'|E grad|^2':>11} {'noise/signal':>12}")
    print(head)
    for name, row in report["results"].items():
        print(f"{name}: clipped window U[{row['window'][0]}, {row['window'][1]}]")
        for mode in MODES:
            r = row[mode]
            print(f"{name:7} {mode:9} {r['loss_mean']:8.3f} ± {r['loss_mean_se']:.3f} "
                  f"{r['loss_var']:9.4f} ± {r['loss_var_se']:.4f} "
                  f"{r['block_loss_var']:9.3f} ± {r['block_loss_var_se']:.3f} "
                  f"{r['grad_trace_var']:9.3f} ± {r['grad_trace_var_se']:.3f} "
                  f"{r['grad_proj_var']:.3e} ± {r['grad_proj_var_se']:.1e} "
                  f"{r['grad_mean_sq_norm']:11.4f} {r['noise_to_signal']:12.1f}")


if __name__ == "__main__":
    sys.exit(main())
