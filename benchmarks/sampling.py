"""Sampling speed: NFE, seconds per sample and tokens/s, with and without each method's cache.

    python benchmarks/sampling.py [--quick] [--batch 1,4] [--methods mdlm,sedd,ar,bd3]
                                  [--bd3-blocks 4,16] [--bd3-batch 1,8] [--out benchmarks/results/sampling.json]

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

BD3-LM rows (`--methods ...,bd3`; block sizes `--bd3-blocks`, batches `--bd3-batch`), all with a
`BlockSampler` built directly, PAD banned as in the MDLM rows, not time-conditioned:
  - at L = --length on the same backbone as the rows above: first-hitting inside each block (one
    token per call: NFE = L + cache writes, K - 1 for K blocks; nothing for the no-change cache to
    save, so it is the like-for-like row against the public code, whose first-hitting sampler also
    unmasks one token per call) and ancestral with T = L' steps per block (`--bd3-steps`), the
    no-change cache on; both with the KV cache of the clean prefix. The public bd3lms code samples
    a 256-token sequence at L' = 16 in about 3.0 s (quoted from the issue: AMD EPYC, d=256,
    4 layers; not measured here); ddlm's target is <= 0.6x of that, judged on the first-hitting
    row at batch 1 (the public first-hitting sampler runs at batch size 1 only).
  - at L = --long-length (1024) on a backbone whose context is 1024, batches --long-batch:
    first-hitting with the KV cache against recomputing the prefix on every call (`BlockSampler(use_kv_cache=False)`, the
    same inner sampler, so only the KV cache differs); same seed, so the tokens should match.
  - variable length at L = --long-length, batch max(--long-batch), one generator per row: stopping
    at the first EOS (`sample.stop_eos`) and on low entropy (`sample.stop_entropy`, nats of the
    last `--entropy-window` tokens); min / median / max lengths. An untrained model draws EOS
    about once in V - 2 tokens and has near-uniform entropy, so these rows time the mechanism;
    the lengths say nothing about a trained model's.
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
from ddlm.methods.bd3 import BD3, BD3Config
from ddlm.methods.mdlm import MDLM, MDLMConfig
from ddlm.methods.sedd import SEDD, SEDDConfig
from ddlm.nn.transformer import Transformer
from ddlm.sampling.ancestral import AncestralSampler, FirstHittingSampler
from ddlm.sampling.ar import ARSampler
from ddlm.sampling.base import row_generators
from ddlm.sampling.block import BlockSampler
from ddlm.commands.sample import length_stats
from ddlm.sampling.score import ScoreSampler

VOCAB, BOS, MASK, PAD = 30, 27, 28, 29  # the char tokenizer's layout
IDS = dict(vocab_size=VOCAB, mask_id=MASK, bos_id=BOS, pad_id=PAD)
# public bd3lms, quoted from the BD3-LM issue (not measured here)
BD3LMS = {"seconds_per_sequence": 3.0, "block_size": 16, "length": 256, "bar": 0.6,
          "source": "BD3-LM issue: public bd3lms code, AMD EPYC, d=256, 4 layers, L'=16, "
                    "256-token sequence"}


def build_model(length: int, seed: int, block: str = "gated") -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, max_len=length, dim=256, n_layers=4, n_heads=4, block=block)
    return Transformer(cfg).eval()


def measure(label: str, sampler, model, batch: int, length: int, seed: int, *, generator=None,
            echo: bool = True, keep: list | None = None, **info) -> dict:
    """One generate() call; a row of the table. `generator` defaults to one seeded generator for
    the batch; `keep` (a list) receives the Generation. Variable-length rows count the tokens each
    row actually generated."""
    generator = torch.Generator().manual_seed(seed) if generator is None else generator
    gen = sampler.generate(model, batch, length, generator=generator)
    tokens = batch * length if gen.lengths is None else int(gen.lengths.sum())
    row = {"sampler": label, **info, "batch": batch, "length": length, "nfe": gen.nfe,
           "seconds": gen.seconds, "seconds_per_sample": gen.seconds / batch,
           "tokens_per_s": tokens / gen.seconds,
           "ms_per_nfe": 1000 * gen.seconds / max(gen.nfe, 1)}
    if gen.lengths is not None:
        row["lengths"] = length_stats(gen.lengths.tolist())
        row["tokens_generated"] = tokens
    if keep is not None:
        keep.append(gen)
    if echo:
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


class CacheWrites:
    """Counts the backbone calls that write the KV cache (BD3: one per finished block)."""

    def __init__(self, model) -> None:
        self.model, self.writes = model, 0

    def __enter__(self) -> "CacheWrites":
        def hook(module, args, kwargs):
            if kwargs.get("cache") is not None and kwargs.get("cache_write", True):
                self.writes += 1
        self.handle = self.model.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def bd3_sampler(block: int, context: int, *, sampler: str, steps: int = 0, kv_cache: bool = True,
                stop_eos: bool = False, stop_entropy: float = 0.0, entropy_window: int = 256) -> BlockSampler:
    """BD3-LM's BlockSampler around MDLM's first-hitting or ancestral sampler (PAD banned, as in the
    MDLM rows; the no-change cache on for ancestral whatever `kv_cache` is)."""
    method = BD3(BD3Config(block_size=block), **IDS, context=context)
    if sampler == "first_hitting":
        inner = FirstHittingSampler(method, banned=(PAD,))
    else:
        inner = AncestralSampler(method, steps=steps or block, use_cache=True, banned=(PAD,))
    return BlockSampler(method, inner, use_kv_cache=kv_cache, stop_eos=stop_eos,
                        stop_entropy=stop_entropy, entropy_window=entropy_window)


def bd3_measure(label: str, sampler: BlockSampler, model, batch: int, length: int, seed: int, *,
                generator=None, keep: list | None = None, **info) -> dict:
    """measure() for a BlockSampler: also the block size, steps per block and the NFE split into
    denoiser calls and KV-cache writes."""
    block = sampler.method.block_size
    inner = sampler.inner
    steps = getattr(inner, "steps", None)
    with CacheWrites(model) as counter:
        row = measure(label, sampler, model, batch, length, seed, generator=generator, echo=False,
                      keep=keep, steps=steps, cache=sampler.use_kv_cache, **info)
    row.update(method="bd3", block_size=block, inner_sampler=type(inner).__name__,
               steps_per_block=steps, no_change_cache=bool(getattr(inner, "use_cache", False)),
               kv_cache=sampler.use_kv_cache, cache_writes=counter.writes,
               denoiser_calls=row["nfe"] - counter.writes, context=sampler.context)
    note = [f"writes {counter.writes}"]
    if steps is not None:
        note.append(f"T/block {steps}, no-change cache on")
    if "lengths" in row:
        lens = row["lengths"]
        note.append(f"lengths {lens['min']}/{lens['median']}/{lens['max']} (min/median/max)")
    row["note"] = ", ".join(note)
    return row


def bd3_rows(model, blocks: list[int], steps: list[int], batch: int, length: int, seed: int) -> list[dict]:
    """At L = length on the shared backbone: first-hitting and ancestral inside blocks, KV cache on."""
    rows = []
    for block in blocks:
        if length % block:
            print(f"skipping bd3/{block}: length {length} is not a multiple of the block size")
            continue
        sampler = bd3_sampler(block, length, sampler="first_hitting")
        row = bd3_measure(f"bd3/{block} first-hitting", sampler, model, batch, length, seed)
        if block == BD3LMS["block_size"] and length == BD3LMS["length"]:
            row["bd3lms_seconds_per_sequence"] = BD3LMS["seconds_per_sequence"]
            row["vs_bd3lms"] = row["seconds_per_sample"] / BD3LMS["seconds_per_sequence"]
            row["note"] += f", {row['vs_bd3lms']:.2f}x bd3lms's {BD3LMS['seconds_per_sequence']} s"
        print(format_row(row), flush=True)
        rows.append(row)
        for T in steps:
            sampler = bd3_sampler(block, length, sampler="ancestral", steps=T)
            row = bd3_measure(f"bd3/{block} ancestral", sampler, model, batch, length, seed)
            print(format_row(row), flush=True)
            rows.append(row)
    return rows


def bd3_long_rows(model, blocks: list[int], batches: list[int], length: int, seed: int, *,
                  stop_entropy: float, entropy_window: int) -> list[dict]:
    """At L = length = the model's context: first-hitting with the KV cache against recomputing the
    prefix; then variable length (EOS, entropy) with one generator per row."""
    rows = []
    for block in blocks:
        if length % block:
            print(f"skipping bd3/{block}: length {length} is not a multiple of the block size")
            continue
        for batch in batches:
            pair, gens = [], []
            for kv in (True, False):
                sampler = bd3_sampler(block, length, sampler="first_hitting", kv_cache=kv)
                pair.append(bd3_measure(f"bd3/{block} first-hitting", sampler, model, batch, length,
                                        seed, keep=gens))
            cached, recomputed = pair
            speedup = recomputed["seconds"] / cached["seconds"]
            same = torch.equal(gens[0].tokens, gens[1].tokens)
            for row in pair:
                row.update(kv_cache_speedup=speedup, tokens_match=same)
            cached["note"] += f", recomputed/cached time {speedup:.1f}x, same tokens: {same}"
            for row in pair:
                print(format_row(row), flush=True)
            rows += pair
        batch = max(batches)
        for stop, options in (("eos", dict(stop_eos=True)),
                              ("entropy", dict(stop_entropy=stop_entropy, entropy_window=entropy_window))):
            sampler = bd3_sampler(block, length, sampler="first_hitting", **options)
            row = bd3_measure(f"bd3/{block} fh {stop[:3]}-stop", sampler, model, batch, length, seed,
                              generator=row_generators([seed + i for i in range(batch)]), stop=stop,
                              **({"stop_entropy": stop_entropy, "entropy_window": entropy_window}
                                 if stop == "entropy" else {}))
            row["generators"] = "one per row"
            print(format_row(row), flush=True)
            rows.append(row)
    return rows


def bd3_summary(rows: list[dict]) -> dict:
    """The public-code comparison: BD3 L'=16 first-hitting at L=256 beside AR and MDLM of the same run."""
    out = {"bd3lms": BD3LMS, "rows": []}
    for r in rows:
        if "vs_bd3lms" in r:
            out["rows"].append({"batch": r["batch"], "seconds_per_sample": r["seconds_per_sample"],
                                "nfe": r["nfe"], "vs_bd3lms": r["vs_bd3lms"],
                                "meets_bar": r["vs_bd3lms"] <= BD3LMS["bar"] if r["batch"] == 1 else None})
    if not out["rows"]:
        return out
    print(f"\nBD3-LM against the public bd3lms code ({BD3LMS['source']}: {BD3LMS['seconds_per_sequence']} s "
          f"per sequence, quoted, not measured here; bar <= {BD3LMS['bar']}x at batch 1):")
    for r in out["rows"]:
        verdict = "" if r["meets_bar"] is None else f"  bar {'met' if r['meets_bar'] else 'NOT met'}"
        print(f"  bd3/16 first-hitting + KV cache, batch {r['batch']}: {r['seconds_per_sample']:.3f} s per "
              f"sample (NFE {r['nfe']}), {r['vs_bd3lms']:.2f}x{verdict}")
    beside = [r for r in rows if r.get("method") != "bd3" and r["batch"] == 1
              and (r["sampler"] in ("ar", "mdlm-first-hitting") or (r["sampler"] == "mdlm-ancestral"
                                                                      and r["cache"]))]
    for r in beside:
        steps = "" if r["steps"] is None else f" T={r['steps']}"
        print(f"  same run, batch 1: {r['sampler']}{steps} cache={r['cache']}: {r['seconds_per_sample']:.3f} s "
              f"per sample (NFE {r['nfe']})")
    return out


def format_row(r: dict) -> str:
    steps = "-" if r["steps"] is None else str(r["steps"])
    return (f"{r['sampler']:<20} {r['batch']:>5} {steps:>6} {str(r['cache']):>6} {r['nfe']:>6} "
            f"{r['seconds_per_sample']:>10.3f} {r['tokens_per_s']:>10.1f} {r['ms_per_nfe']:>9.1f}"
            f"{'  ' + r['note'] if r.get('note') else ''}")


HEADER = (f"{'sampler':<20} {'batch':>5} {'steps':>6} {'cache':>6} {'nfe':>6} {'s/sample':>10} "
          f"{'tokens/s':>10} {'ms/nfe':>9}  notes")
BD3_LEGEND = ("bd3/N: BD3-LM with blocks of L' = N, untrained, not time-conditioned, PAD banned. steps: "
              "ancestral steps per block ('-': first-hitting, one token per call). cache: the KV cache "
              "of the clean prefix (False: the prefix is recomputed on every call). nfe: denoiser calls "
              "+ KV-cache writes (one per finished block). The no-change cache is on for ancestral "
              "(with and without the KV cache); first-hitting changes a token on every call, so it "
              "has nothing to save there.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="T in {16, 64}, L = 128, batch 2")
    p.add_argument("--steps", default="16,64,256,1024", help="comma-separated T for MDLM")
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--batch", default="1,4", help="comma-separated numbers of samples drawn in parallel")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="mdlm,sedd,ar,bd3", help="comma-separated row groups")
    p.add_argument("--bd3-blocks", default="4,16", help="BD3-LM block sizes L'")
    p.add_argument("--bd3-batch", default="1,8", help="batches of the BD3-LM rows")
    p.add_argument("--bd3-steps", default="0", help="ancestral steps per block for BD3 (0: T = L'; '': none)")
    p.add_argument("--long-length", type=int, default=1024,
                   help="BD3 KV cache vs recompute and variable length: L = the model's context (0: skip)")
    p.add_argument("--long-batch", default="1,8",
                   help="batches of the L = --long-length rows (variable length: the largest)")
    p.add_argument("--stop-entropy", type=float, default=2.0, help="entropy stop threshold in nats")
    p.add_argument("--entropy-window", type=int, default=256, help="tokens the entropy stop looks at")
    p.add_argument("--out", default="benchmarks/results/sampling.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = [int(s) for s in args.steps.split(",")]
    length, batches = args.length, [int(b) for b in args.batch.split(",")]
    methods = set(args.methods.split(","))
    blocks = [int(b) for b in args.bd3_blocks.split(",")]
    bd3_batches = [int(b) for b in args.bd3_batch.split(",")]
    bd3_steps = [int(s) for s in args.bd3_steps.split(",") if s]
    long_length, long_batches = args.long_length, [int(b) for b in args.long_batch.split(",")]
    if args.quick:
        steps, length, batches = [16, 64], 128, [2]
        bd3_batches, long_batches, long_length = [2], [2], min(long_length, 256)
    model = build_model(length, args.seed)
    AncestralSampler(MDLM(MDLMConfig(), **IDS), steps=4).generate(model, 2, length)  # warm-up
    if "bd3" in methods:
        bd3_sampler(blocks[0], length, sampler="first_hitting").generate(model, 2, 2 * blocks[0])
    load = os.getloadavg()[0]
    start = time.perf_counter()
    print(HEADER)
    rows = []
    for batch in batches:
        if "mdlm" in methods:
            rows += mdlm_rows(model, steps, batch, length, args.seed)
        if "sedd" in methods:
            rows += sedd_rows(model, steps, batch, length, args.seed)
        if "ar" in methods:
            rows += ar_rows(model, batch, length, args.seed)
    bd3 = {}
    if "bd3" in methods:
        print(BD3_LEGEND)
        for batch in bd3_batches:
            rows += bd3_rows(model, blocks, bd3_steps, batch, length, args.seed)
        if long_length:
            long_model = build_model(long_length, args.seed)
            bd3_sampler(blocks[0], long_length, sampler="first_hitting").generate(long_model, 2, 2 * blocks[0])
            rows += bd3_long_rows(long_model, blocks, long_batches, long_length, args.seed,
                                  stop_entropy=args.stop_entropy, entropy_window=args.entropy_window)
        bd3 = {"legend": BD3_LEGEND, "long_length": long_length,
               "long_model": {"max_len": long_length, "init": "random", "seed": args.seed},
               "summary": bd3_summary(rows)}
    result = {"benchmark": "sampling", "rows": rows, "total_seconds": time.perf_counter() - start,
              "bd3": bd3,
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
