"""Sampling speed: NFE, seconds per sample and tokens/s, with and without each method's cache.

    python benchmarks/sampling.py [--quick] [--batch 1,4] [--out benchmarks/results/sampling.json]

Rows: MDLM ancestral at T in {16, 64, 256, 1024} steps with and without the no-change cache;
MDLM first-hitting (one token per NFE, so NFE = L whatever T); SEDD absorbing with the analytic
and Euler steps (T + 1 NFE: scores depend on the noise level, so nothing is cached); AR with a KV
cache and recomputing the prefix. Backbone: the quickstart size (d256, 4 layers, 4 heads, char vocab of 30, L = 256),
randomly initialised, fp32; all rows share its weights (AR uses it with a causal mask).

Read the cache rows honestly: whether a masked token unmasks in a step depends only on the schedule
(probability (m_t - m_s)/m_t), not on the network, so the weights do not change the saving. One
network call serves the whole batch, so a call is saved only on steps where no row changed a
token; that is rare until T is well above L * batch, so the saving grows with T and shrinks with
the batch. MDLM's paper reports its cache speed-up at T = 5k (Table 10). The default run takes several minutes on
2 CPU cores (most of it the uncached T = 1024 row); --quick takes about a minute.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from ddlm.config import ModelConfig
from ddlm.methods.ar import AR, ARConfig
from ddlm.methods.mdlm import MDLM, MDLMConfig
from ddlm.methods.sedd import SEDD, SEDDConfig
from ddlm.nn.transformer import Transformer
from ddlm.sampling.ancestral import AncestralSampler, FirstHittingSampler
from ddlm.sampling.ar import ARSampler
from ddlm.sampling.score import ScoreSampler

VOCAB, BOS, MASK, PAD = 30, 27, 28, 29  # the char tokenizer's layout
IDS = dict(vocab_size=VOCAB, mask_id=MASK, bos_id=BOS, pad_id=PAD)


def build_model(length: int, seed: int, block: str = "gated") -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, max_len=length, dim=256, n_layers=4, n_heads=4, block=block)
    return Transformer(cfg).eval()


def measure(label: str, sampler, model, batch: int, length: int, seed: int, **info) -> dict:
    gen = sampler.generate(model, batch, length, generator=torch.Generator().manual_seed(seed))
    row = {"sampler": label, **info, "batch": batch, "length": length, "nfe": gen.nfe,
           "seconds": gen.seconds, "seconds_per_sample": gen.seconds / batch,
           "tokens_per_s": batch * length / gen.seconds,
           "ms_per_nfe": 1000 * gen.seconds / max(gen.nfe, 1)}
    print(format_row(row), flush=True)
    return row


def mdlm_rows(model, steps: list[int], batch: int, length: int, seed: int) -> list[dict]:
    rows = []
    for T in steps:
        for cache in (True, False):
            sampler = AncestralSampler(MDLM(MDLMConfig(), **IDS, context=length), steps=T,
                                       use_cache=cache, banned=(PAD,))
            row = measure("mdlm-ancestral", sampler, model, batch, length, seed, steps=T, cache=cache)
            row["calls_saved"] = 1 - row["nfe"] / (T + 1)
            rows.append(row)
    sampler = FirstHittingSampler(MDLM(MDLMConfig(), **IDS, context=length), banned=(PAD,))
    rows.append(measure("mdlm-first-hitting", sampler, model, batch, length, seed, steps=None,
                        cache=False))
    return rows


def sedd_rows(model, steps: list[int], batch: int, length: int, seed: int) -> list[dict]:
    """SEDD absorbing (the backbone is not time-conditioned here; the cost per call is the same)."""
    method = SEDD(SEDDConfig(time_conditioning=False), **IDS, context=length)
    rows = []
    for T in steps:
        for predictor in ("analytic", "euler"):
            sampler = ScoreSampler(method, steps=T, predictor=predictor)
            rows.append(measure(f"sedd-{predictor}", sampler, model, batch, length, seed, steps=T,
                                cache=False))
    return rows


def ar_rows(model, batch: int, length: int, seed: int) -> list[dict]:
    rows = []
    for cache in (True, False):
        sampler = ARSampler(AR(ARConfig(), **IDS, context=length), use_cache=cache)
        # BOS takes one position, so AR generates length - 1 tokens within the same context
        rows.append(measure("ar", sampler, model, batch, length - 1, seed, steps=length - 1,
                            cache=cache))
    return rows


def format_row(r: dict) -> str:
    steps = "-" if r["steps"] is None else str(r["steps"])
    return (f"{r['sampler']:<20} {r['batch']:>5} {steps:>6} {str(r['cache']):>6} {r['nfe']:>6} "
            f"{r['seconds_per_sample']:>10.3f} {r['tokens_per_s']:>10.1f} {r['ms_per_nfe']:>9.1f}")


HEADER = (f"{'sampler':<20} {'batch':>5} {'steps':>6} {'cache':>6} {'nfe':>6} {'s/sample':>10} "
          f"{'tokens/s':>10} {'ms/nfe':>9}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="T in {16, 64}, L = 128, batch 2")
    p.add_argument("--steps", default="16,64,256,1024", help="comma-separated T for MDLM")
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--batch", default="1,4", help="comma-separated numbers of samples drawn in parallel")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/sampling.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = [int(s) for s in args.steps.split(",")]
    length, batches = args.length, [int(b) for b in args.batch.split(",")]
    if args.quick:
        steps, length, batches = [16, 64], 128, [2]
    model = build_model(length, args.seed)
    AncestralSampler(MDLM(MDLMConfig(), **IDS), steps=4).generate(model, 2, length)  # warm-up
    load = os.getloadavg()[0]
    start = time.perf_counter()
    print(HEADER)
    rows = []
    for batch in batches:
        rows += mdlm_rows(model, steps, batch, length, args.seed)
        rows += sedd_rows(model, steps, batch, length, args.seed)
        rows += ar_rows(model, batch, length, args.seed)
    result = {"benchmark": "sampling", "rows": rows, "total_seconds": time.perf_counter() - start,
              "model": {"dim": 256, "n_layers": 4, "n_heads": 4, "vocab_size": VOCAB,
                        "max_len": length, "init": "random", "dtype": "fp32"},
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "python": sys.version.split()[0],
                          "load_average_1min_at_start": load},
              "protocol": "one generate() call per row, batch samples in parallel, seed fixed; "
                          "seconds are wall time of that call; nfe counts network calls"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out} ({result['total_seconds']:.0f} s; 1-min load average at start {load:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
