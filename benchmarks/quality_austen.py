"""AR vs MDLM at equal steps on the embedded Austen corpus: validation curves and test BPC.

    python benchmarks/quality_austen.py [--steps 2000] [--methods ar,mdlm] [--out benchmarks/results]

Every method gets the quickstart model on characters (char tokenizer, d=256, 4 layers, L=128, batch 16)
and the same optimiser settings and number of steps. Runs go to runs/quality_austen/METHOD and are
resumed when present. Writes quality_austen.json (test BPC ± standard error, validation curve) and
quality_austen.png (validation BPC vs step, with the unigram entropy of the training split as a
reference line). About 10 minutes per method per 2,000 steps on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

from ddlm.build import prepare_data
from ddlm.config import make_config
from ddlm.eval.plots import plot_validation_curves, validation_curve
from ddlm.commands.evaluate import evaluate_checkpoint
from ddlm.quickstart import CHAR_QUICKSTART
from ddlm.train.loop import train


def unigram_bpc(run) -> float:
    """Entropy in bits of the training split's token frequencies (a context-free model's BPC)."""
    _, datasets = prepare_data(run)
    counts = Counter(datasets["train"].tokens.reshape(-1).tolist())
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--methods", default="ar,mdlm")
    p.add_argument("--runs", default="runs/quality_austen")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    overrides = {"train.steps": str(args.steps), "train.eval_every": "250", "train.ckpt_every": "1000"}
    results, curves = {}, {}
    for method in args.methods.split(","):
        run = make_config(base={**CHAR_QUICKSTART, "method": method}, overrides=overrides)
        out = train(run, Path(args.runs) / method).out_dir
        test = evaluate_checkpoint(out, split="test")
        steps, bpc, err = validation_curve(out)
        curves[method] = out
        results[method] = {"test_bpc": test["bpc"], "test_bpc_stderr": test["bpc_stderr"],
                           "exact": test["exact"], "protocol": test.get("protocol"),
                           "valid_curve": {"step": steps, "bpc": bpc, "stderr": err}}
    unigram = unigram_bpc(run)
    report = {"benchmark": "quality_austen", "steps": args.steps, "unigram_bpc": unigram,
              "config": {"data": CHAR_QUICKSTART["data"], "model": CHAR_QUICKSTART["model"],
                         "train": {**CHAR_QUICKSTART["train"], "steps": args.steps}},
              "methods": results}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quality_austen.json").write_text(json.dumps(report, indent=2))
    plot_validation_curves(curves, out_dir / "quality_austen.png", reference={"unigram": unigram},
                           title=f"Austen, char, d256 x 4 layers, L=128, batch 16, {args.steps} steps")
    print(f"{'method':<8} {'test BPC':>18}   (unigram entropy {unigram:.3f} bits)")
    for method, r in results.items():
        sign = "=" if r["exact"] else "<="
        print(f"{method:<8} {sign:>2} {r['test_bpc']:.3f} ± {r['test_bpc_stderr']:.3f}")
    print(f"wrote {out_dir / 'quality_austen.json'} and {out_dir / 'quality_austen.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
