"""`ddlm quickstart`: train small AR and MDLM models on the embedded Austen corpus, then show
their samples side by side with their test BPC. A few minutes on 2 CPU cores."""
from __future__ import annotations

import textwrap
from pathlib import Path

from ddlm.config import make_config, parse_overrides
from ddlm.eval.run import evaluate_checkpoint
from ddlm.sampling.run import sample_checkpoint
from ddlm.train.loop import train

QUICKSTART = {
    "data": {"corpus": "austen", "tokenizer": "char", "seq_len": 128},
    "model": {"dim": 256, "n_layers": 4, "n_heads": 4},
    "train": {"steps": 500, "batch_size": 16, "lr": 1e-3, "beta2": 0.95, "warmup_steps": 50,
              "eval_every": 200, "eval_batches": 4, "ckpt_every": 200, "ema": 0.99},
    "eval": {"max_batches": 20, "batch_size": 32},
    "sample": {"num": 2, "steps": 128},
}


def quickstart(*, out: str = "runs/quickstart", steps: int | None = None,
               methods: list[str] | None = None, overrides: list[str] | None = None,
               quiet: bool = False) -> dict:
    extra = parse_overrides(overrides or [])
    if steps:
        extra["train.steps"] = str(steps)
    from ddlm.methods.base import method_names

    report = {}
    for method in methods or [m for m in ("ar", "mdlm") if m in method_names()]:
        run = make_config(base={**QUICKSTART, "method": method}, overrides=extra)
        if not quiet:
            print(f"== {method}: d={run.model.dim} layers={run.model.n_layers} L={run.data.seq_len} "
                  f"steps={run.train.steps} on {run.data.corpus} ({run.data.tokenizer})")
        result = train(run, Path(out) / method, quiet=quiet)
        test = evaluate_checkpoint(result.out_dir, split="test")
        samples = sample_checkpoint(result.out_dir, options={"length": run.data.seq_len})
        report[method] = {"test_bpc": test["bpc"], "test_bpc_stderr": test["bpc_stderr"],
                          "exact": test["exact"], "tokens_per_second": result.tokens_per_second,
                          "dtype": result.dtype, "steps": result.step, "nfe": samples["nfe"],
                          "samples": samples["texts"], "out": str(result.out_dir)}
    if not quiet:
        print_report(report)
    return report


def print_report(report: dict) -> None:
    print("\nmethod  steps  test BPC            train tok/s  dtype   sampling NFE")
    for method, r in report.items():
        bound = "=" if r["exact"] else "<="
        print(f"{method:<7} {r['steps']:>5}  {bound} {r['test_bpc']:.3f} ± {r['test_bpc_stderr']:.3f}"
              f"   {r['tokens_per_second']:>11,.0f}  {r['dtype']:<6}  {r['nfe']:>6}")
    for i in range(max(len(r["samples"]) for r in report.values())):
        print(f"\n--- sample {i} ---")
        for method, r in report.items():
            if i < len(r["samples"]):
                body = textwrap.fill(r["samples"][i], width=96, initial_indent=f"{method:>5} | ",
                                     subsequent_indent="      | ")
                print(body)
