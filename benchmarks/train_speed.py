"""Training throughput and MFU of ddlm's trainer step, against the matmul rate measured in the same run.

    python benchmarks/train_speed.py [--steps 10] [--methods ar,mdlm,bd3:4,bd3:16] [--out benchmarks/results/train_speed.json]
    python benchmarks/train_speed.py --bd3-bar        # the BD3-LM issue's configuration, see below

Configs: small = d256, 4 layers, 4 heads, L=256, batch 8, char vocab (the public bd3lms code trains
AR at 4614 tok/s and MDLM at 3852 tok/s at this config on the reference CPU); large = d512, 8 layers,
8 heads, L=256, batch 8; tiny = d64, 2 layers, 2 heads (smoke tests only). Each is run in fp32 and
bf16. `--seq-len` and `--batch` change L and the batch (the ratio to the public code is only
computed at the quoted configuration: small, fp32, L=256, batch 8).

Methods: `ar`, `mdlm`, `sedd`, and `bd3:N`, BD3-LM with block size L' = N (`--bd3.block_size=N`,
nothing else changed). The public bd3lms code trains BD3-LM at 1,862 (L'=4) and 2,181 (L'=16) tok/s
at the small fp32 config on an Intel Xeon (quoted from the issue; not measured here). `--bd3-bar`
runs exactly that configuration (small, fp32, L=256, batch 8) with AR, MDLM, BD3 L'=4 and BD3 L'=16
in one run, and prints each one's ratio to the quoted public figure (the bar for BD3: >= 1.5x).

tokens/s counts trained tokens: batch x L per step, for every method (BD3 included: its step runs
the backbone over 2L tokens, but only the L tokens of x_t are scored).

MFU = tokens/s x FLOPs per trained token / matmul FLOP/s of the same dtype, where the matmul rate is
the best of square-ish GEMMs of widths 256, 512 and 1024 ((2048 x n) @ (n x n)). FLOPs per trained
token, with N_b the matmul weights of the transformer blocks (4D^2 + 2 D hidden per layer), N_h = D V
the output head, n layers, width D:
  AR, SEDD:        6 (N_b + N_h) + 12 n L D                (ddlm.eval.speed.train_flops_per_token:
                   forward + backward of every weight, PaLM's attention count, causal not discounted)
  MDLM:            the same, except that the last layer's attention output and MLP and the head run
                   only on the masked positions the loss reads (`logits_at`): half of them on
                   average (the mask rate is t ~ U[0, 1] under the default log-linear schedule)
  BD3-LM:          the work its vectorised pass needs, per trained token: qkv over the 2L tokens of
                   x_t (+) x_0 in every layer; attention output + MLP over 2L tokens in all but the
                   last layer and, in the last, over the masked half of the L noisy ones
                   (`logits_for`, `logits_at`); the head on those;
                   attention scores (PaLM's 12 D per query-key pair) for L noisy queries over 2L
                   keys and L clean queries over the L clean keys (clean queries never see noisy
                   keys, so that quarter is not computed), the last layer's noisy queries only.
                   The mask inside those ranges is not discounted, as PaLM does not discount causal.
So BD3's MFU says how well the 2L-token pass runs, and its tokens/s what a trained token costs.

The ceiling of BD3's lead: the public code runs the same backbone over all 2L tokens in every layer
and the head, with dense 2L x 2L attention scores (`dense_bd3_flops_per_token`). Its FLOPs over
ddlm's are the speed-up ddlm would have if both ran at the same MFU (the `flop_ceiling` column):
on a machine where the two reach the same matmul efficiency, no lead above it comes from skipping
work, only from running the same work faster.
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
    "tiny": {"dim": 64, "n_layers": 2, "n_heads": 2},  # smoke tests only
}
PEAK_DIMS = (256, 512, 1024)  # GEMM widths of the matmul-rate probe
# public bd3lms tok/s at the small config, fp32, L=256, batch 8; quoted, not measured here
BASELINE = {"ar": 4614.0, "mdlm": 3852.0, "bd3:4": 1862.0, "bd3:16": 2181.0}
BASELINE_SOURCE = {"ar": "issue #3, reference CPU", "mdlm": "issue #3, reference CPU",
                   "bd3:4": "BD3-LM issue, Intel Xeon", "bd3:16": "BD3-LM issue, Intel Xeon"}
BAR = {"bd3:4": 1.5, "bd3:16": 1.5}  # ddlm's BD3 must train at least this much faster
BASELINE_CONFIG = {"size": "small", "dtype": "fp32", "seq_len": 256, "batch": 8}
MFU_DEFINITION = ("MFU = tokens/s * flops_per_token / matmul FLOP/s (same dtype, best GEMM of widths "
                  "256/512/1024). tokens/s counts batch*L trained tokens. flops_per_token: AR/MDLM/SEDD "
                  "6(N_b+N_h) + 12 n L D; BD3 the work of its vectorised pass: qkv on 2L tokens per layer, "
                  "attention output and MLP on 2L tokens (L in the last layer), head on L, scores for L "
                  "noisy queries x 2L keys and L clean queries x L clean keys (last layer: noisy only), "
                  "mask not discounted within those ranges; N_b block matmul weights, N_h = D*V head, "
                  "n layers, width D.")


def parse_method(spec: str) -> tuple[str, dict]:
    """'ar' -> ('ar', {}); 'bd3:16' -> ('bd3', {'block_size': 16}); 'bd3' is L' = 4 (bd3's default);
    'bd3:16:flex' trains with FlexAttention's sparse block mask (bd3.attention=flex, CUDA only)."""
    name, _, rest = spec.partition(":")
    block, _, attention = rest.partition(":")
    if name != "bd3":
        if rest:
            raise SystemExit(f"--methods: only bd3 takes a block size ({spec!r})")
        return name, {}
    if attention not in ("", "dense", "flex"):
        raise SystemExit(f"--methods: bd3's attention is dense or flex ({spec!r})")
    return name, {"block_size": int(block or 4), **({"attention": attention} if attention else {})}


def block_weights(cfg) -> tuple[int, int, int]:
    """Matmul weights per token: (qkv of a layer, the rest of a layer: attention output + MLP,
    the head)."""
    D = cfg.dim
    return 3 * D * D, D * D + 2 * D * int(cfg.mlp_ratio * D), D * cfg.vocab_size


MASKED_SHARE = 0.5  # the expected share of masked positions, E[t] for t ~ U[0, 1] (log-linear)


def mdlm_train_flops_per_token(cfg, seq_len: int) -> float:
    """FLOPs per trained token of MDLM's step (module docstring)."""
    D, n, L = cfg.dim, cfg.n_layers, seq_len
    qkv, rest, head = block_weights(cfg)
    weights = 6.0 * (n * qkv + (n - 1) * rest + MASKED_SHARE * (rest + head))
    return weights + 12.0 * n * L * D


def bd3_train_flops_per_token(cfg, seq_len: int) -> float:
    """FLOPs per trained token of BD3-LM's vectorised step (module docstring)."""
    D, n, L = cfg.dim, cfg.n_layers, seq_len
    qkv, rest, head = block_weights(cfg)
    weights = 6.0 * (2 * n * qkv + 2 * (n - 1) * rest + MASKED_SHARE * (rest + head))
    attention = 12.0 * D * ((n - 1) * 3 * L + 2 * L)
    return weights + attention


def dense_bd3_flops_per_token(cfg, seq_len: int) -> float:
    """FLOPs per trained token of a BD3 step that computes everything over x_t (+) x_0: every
    weight and the head on 2L tokens, attention scores for 2L queries x 2L keys in every layer."""
    D, n, L = cfg.dim, cfg.n_layers, seq_len
    qkv, rest, head = block_weights(cfg)
    weights = 6.0 * 2 * (n * (qkv + rest) + head)
    attention = 12.0 * D * n * 4 * L
    return weights + attention


def peak_rate(dtype: torch.dtype, dims, seconds: float = 1.0) -> float:
    return max(runtime.matmul_rate(dtype, n=n, rows=2048, seconds=seconds) for n in dims)


def time_steps(method: str, size: str, dtype: str, steps: int, compile_: bool, block: str = "auto",
               *, seq_len: int = 256, batch: int = 8) -> dict:
    name, options = parse_method(method)
    base = {"method": name, "model": {**CONFIGS[size], "block": block},
            "data": {"corpus": "austen", "tokenizer": "char", "seq_len": seq_len},
            "train": {"batch_size": batch, "dtype": dtype, "steps": 10_000,
                      "compile": compile_, "progress": False}}
    if options:
        base[name] = options
    run = make_config(base=base)
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
    if name == "bd3":
        flops = bd3_train_flops_per_token(trainer.run.model, run.data.seq_len)
    elif name == "mdlm":
        flops = mdlm_train_flops_per_token(trainer.run.model, run.data.seq_len)
    else:
        flops = train_flops_per_token(trainer.run.model, run.data.seq_len)
    row = {"method": name, "size": size, "dtype": dtype, "compile": compile_, "block": run.model.block,
           "seq_len": run.data.seq_len, "batch": run.train.batch_size,
           "tokens_per_s": tokens / seconds, "step_s": seconds, "flops_per_token": flops}
    if name == "bd3":
        dense = dense_bd3_flops_per_token(trainer.run.model, run.data.seq_len)
        row.update(block_size=options["block_size"], backbone_tokens_per_step=2 * tokens,
                   scored_tokens_per_step=tokens, dense_pass_flops_per_token=dense,
                   flop_ceiling=dense / flops)
    return row


def label(r: dict) -> str:
    """The key of a row in BASELINE: 'ar', 'mdlm', 'bd3:4', ..."""
    return f"bd3:{r['block_size']}" if r["method"] == "bd3" else r["method"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--methods", default="ar,mdlm,bd3:4,bd3:16",
                   help="comma-separated: ar, mdlm, sedd, bd3:N (BD3-LM with block size N)")
    p.add_argument("--sizes", default="small,large", help=f"comma-separated: {', '.join(CONFIGS)}")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--seq-len", type=int, default=256, help="L (data.seq_len)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (train.batch_size)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--blocks", default="auto", help="comma-separated model.block values (auto: the method's)")
    p.add_argument("--bd3-bar", action="store_true",
                   help="the BD3-LM issue's run: small, fp32, L=256, batch 8, ar,mdlm,bd3:4,bd3:16")
    p.add_argument("--peak-seconds", type=float, default=1.0, help="seconds per GEMM width of the matmul probe")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--out", default="benchmarks/results/train_speed.json")
    args = p.parse_args(argv)
    if args.bd3_bar:
        args.methods, args.sizes, args.dtypes = "ar,mdlm,bd3:4,bd3:16", "small", "fp32"
        args.seq_len, args.batch = 256, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    for spec in args.methods.split(","):
        parse_method(spec)
    peaks = {d: peak_rate(runtime.DTYPES[d], PEAK_DIMS, args.peak_seconds) for d in args.dtypes.split(",")}
    rows = []
    print(HEADER, flush=True)
    for size in args.sizes.split(","):
        for dtype in args.dtypes.split(","):
            for method in args.methods.split(","):
                for compile_, block in [(c, b) for c in ([False, True] if args.compile else [False])
                                        for b in args.blocks.split(",")]:
                    r = time_steps(method, size, dtype, args.steps, compile_, block,
                                   seq_len=args.seq_len, batch=args.batch)
                    r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / peaks[dtype]
                    here = {"size": size, "dtype": dtype, "seq_len": args.seq_len, "batch": args.batch}
                    if here == BASELINE_CONFIG and label(r) in BASELINE:
                        r["bd3lms_tokens_per_s"] = BASELINE[label(r)]
                        r["vs_bd3lms"] = r["tokens_per_s"] / BASELINE[label(r)]
                        if label(r) in BAR:
                            r["bar"] = BAR[label(r)]
                            r["meets_bar"] = r["vs_bd3lms"] >= BAR[label(r)]
                    rows.append(r)
                    print(_row(r), flush=True)
    print_table(rows, peaks)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": _machine(), "matmul_flops": peaks, "mfu_definition": MFU_DEFINITION,
                               "bd3lms_baselines": {k: {"tokens_per_s": v, "source": BASELINE_SOURCE[k],
                                                        **BASELINE_CONFIG, "bar": BAR.get(k)}
                                                    for k, v in BASELINE.items()},
                               "steps_timed": args.steps, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


HEADER = (f"{'method':<6} {'L_blk':>5} {'block':<6} {'size':<6} {'dtype':<5} {'compile':<8}{'tok/s':>10} "
          f"{'MFU':>7}  {'vs bd3lms (quoted)':<26}")


def _row(r: dict) -> str:
    ratio = ""
    if "vs_bd3lms" in r:
        ratio = f"{r['vs_bd3lms']:.2f}x of {r['bd3lms_tokens_per_s']:,.0f}"
        if "bar" in r:
            ratio += f" (bar {r['bar']:.1f}x: {'met' if r['meets_bar'] else 'NOT met'})"
    blk = str(r["block_size"]) if "block_size" in r else "-"
    return (f"{r['method']:<6} {blk:>5} {r['block']:<6} {r['size']:<6} {r['dtype']:<5} "
            f"{'yes' if r['compile'] else 'no':<8}{r['tokens_per_s']:>10,.0f} {100 * r['mfu']:>6.1f}%  {ratio}")


def print_table(rows: list[dict], peaks: dict) -> None:
    print("\nmatmul peak measured here: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()))
    print("L_blk: BD3-LM block size L'. tok/s: trained (scored) tokens, batch x L per step; BD3's step "
          "runs the backbone over 2L tokens (x_t (+) x_0).")
    print("MFU: tok/s x FLOPs per trained token / the matmul peak; BD3 counts the work of its 2L-token "
          "pass, MDLM and BD3 the last layer and head on masked positions only (see the module docstring).")
    print("vs bd3lms: quoted public-code tok/s at small/fp32/L=256/batch 8 (AR, MDLM: reference CPU; "
          "BD3: Intel Xeon), not measured on this machine.")
    print(HEADER)
    for r in rows:
        print(_row(r))
    for r in rows:
        if "flop_ceiling" in r:
            print(f"BD3 L'={r['block_size']}: a dense 2L x 2L pass does {r['flop_ceiling']:.2f}x ddlm's FLOPs "
                  f"per trained token: ddlm's lead over it at equal MFU")


def _machine() -> dict:
    return {"cpu": runtime.cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


if __name__ == "__main__":
    sys.exit(main())
