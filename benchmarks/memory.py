"""Memory of long sampling and evaluation: resident set size after every batch, and the peak,
against batch size and denoising steps. Flat means no growth per batch once the first batch has
allocated its buffers.

    python benchmarks/memory.py [--batches 12] [--batch 4,16] [--steps 32,256]
                                [--out benchmarks/results/memory.json]

Each configuration runs in its own subprocess (so one peak does not hide another) on a randomly
initialised quickstart-size model (d256, 4 layers, char vocab, L=128): MDLM ancestral sampling,
AR with a KV cache, and MDLM likelihood evaluation over `--batches` batches. Printed: RSS after the
first batch, after the last, growth per batch after the first (least squares, MiB), and the peak.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r'''
import json, resource, sys, torch
from ddlm.config import ModelConfig, SampleConfig
from ddlm.data.blocks import BlockDataset
from ddlm.eval.likelihood import evaluate_likelihood
from ddlm.methods.ar import AR, ARConfig
from ddlm.methods.mdlm import MDLM, MDLMConfig
import numpy as np

kind, batch, steps, batches = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
V, L = 30, 128
ids = dict(vocab_size=V, mask_id=28, bos_id=27, pad_id=29, context=L)
method = AR(ARConfig(), **ids) if kind == "ar" else MDLM(MDLMConfig(), **ids)
cfg = ModelConfig(dim=256, n_layers=4, n_heads=4, vocab_size=V, max_len=L,
                  block="plain" if kind == "ar" else "gated")
model = method.build_model(cfg).eval()

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

trace = []
if kind == "eval":
    tokens = np.random.default_rng(0).integers(0, 27, size=(batch * batches, L))
    data = BlockDataset(tokens=tokens, valid=None, chars_per_token=1.0)
    for i in range(batches):  # one batch per call keeps the trace per batch
        sub = BlockDataset(tokens=tokens[i * batch:(i + 1) * batch], valid=None, chars_per_token=1.0)
        evaluate_likelihood(method, model, sub, batch_size=batch)
        trace.append(rss())
else:
    sampler = method.sampler(SampleConfig(steps=max(steps, 1), batch_size=batch))
    g = torch.Generator().manual_seed(0)
    for i in range(batches):
        sampler.generate(model, batch, L, generator=g)
        trace.append(rss())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"trace": trace, "peak_mib": peak}))
'''


def growth_per_batch(trace: list[float]) -> float:
    """Least-squares slope of RSS over batches 2..n (MiB per batch)."""
    ys = trace[1:]
    if len(ys) < 2:
        return 0.0
    xs = list(range(len(ys)))
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def measure(kind: str, batch: int, steps: int, batches: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(batch), str(steps), str(batches)],
                         capture_output=True, text=True, check=True)
    data = json.loads(out.stdout.strip().splitlines()[-1])
    trace = data["trace"]
    return {"kind": kind, "batch": batch, "steps": steps, "batches": batches,
            "rss_first_mib": trace[0], "rss_last_mib": trace[-1],
            "growth_mib_per_batch": growth_per_batch(trace), "peak_mib": data["peak_mib"], "trace": trace}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch", default="4,16")
    parser.add_argument("--steps", default="32,256")
    parser.add_argument("--out", default="benchmarks/results/memory.json")
    args = parser.parse_args()
    sizes = [int(b) for b in args.batch.split(",")]
    steps = [int(s) for s in args.steps.split(",")]
    rows = []
    for batch in sizes:
        for n in steps:
            rows.append(measure("mdlm", batch, n, args.batches))
        rows.append(measure("ar", batch, 0, args.batches))
        rows.append(measure("eval", batch, 0, args.batches))
    print(f"{'run':<6} {'batch':>5} {'steps':>5}  {'RSS 1st':>8} {'RSS last':>8} {'MiB/batch':>9} {'peak':>8}")
    for r in rows:
        print(f"{r['kind']:<6} {r['batch']:>5} {r['steps'] or '-':>5}  {r['rss_first_mib']:>8.1f} "
              f"{r['rss_last_mib']:>8.1f} {r['growth_mib_per_batch']:>9.3f} {r['peak_mib']:>8.1f}")
    from ddlm.eval.records import environment

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"environment": environment(), "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
