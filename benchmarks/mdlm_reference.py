"""ddlm's side of the MDLM comparison with the public bd3lms code (issue [3 of 9]).

    python benchmarks/mdlm_reference.py [--steps 1500] [--blocks gated,plain] [--out benchmarks/results]

Configuration of the comparison: embedded Austen, char tokenizer, d=256, 4 layers, 4 heads, L=128,
batch 16, AdamW lr 1e-3 (β2 0.95, 50 warm-up steps, cosine to 10%), EMA 0.99, no time
conditioning; the validation NELBO (8 batches, one stratified t per sequence) at steps 250, 500,
750, ... The public code's numbers were measured on the same tokens and settings and are quoted
from the issue; this script measures only ddlm. Runs go to runs/mdlm_reference/BLOCK and are
resumed when present. Writes mdlm_reference.json and mdlm_reference.png (validation bound vs step).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from ddlm.config import make_config
from ddlm.eval.plots import plot_validation_curves, validation_curve
from ddlm.quickstart import QUICKSTART
from ddlm.runtime import cpu_model
from ddlm.train.loop import train

PUBLIC_BD3LMS_MDLM = {250: 3.44, 500: 3.13, 750: 2.96, 1500: 2.71}  # quoted in issue [3 of 9]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--blocks", default="gated", help="comma-separated model.block values")
    p.add_argument("--runs", default="runs/mdlm_reference")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    overrides = {"train.steps": str(args.steps), "train.eval_every": "250", "train.eval_batches": "8",
                 "train.ckpt_every": "500", "train.progress": "false"}
    rows, curves = {}, {}
    for block in args.blocks.split(","):
        run = make_config(base={**QUICKSTART, "method": "mdlm"},
                          overrides={**overrides, "model.block": block})
        result = train(run, Path(args.runs) / block, quiet=True)
        steps, bpc, err = validation_curve(result.out_dir)
        curves[f"ddlm MDLM ({block})"] = result.out_dir
        rows[block] = {"steps": steps, "valid_bpc": bpc, "stderr": err,
                       "tokens_per_second": result.tokens_per_second, "dtype": result.dtype}
    report = {"benchmark": "mdlm_reference", "cpu": cpu_model(), "machine": platform.machine(),
              "config": {"data": QUICKSTART["data"], "model": QUICKSTART["model"],
                         "train": {**QUICKSTART["train"], "steps": args.steps}},
              "public_bd3lms_mdlm": PUBLIC_BD3LMS_MDLM, "ddlm": rows}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "mdlm_reference.json").write_text(json.dumps(report, indent=2))
    plot_validation_curves(curves, out_dir / "mdlm_reference.png",
                           points={"public bd3lms MDLM (quoted)": (list(PUBLIC_BD3LMS_MDLM),
                                                                   list(PUBLIC_BD3LMS_MDLM.values()))},
                           title="MDLM validation bound: ddlm vs public bd3lms (Austen char, d256x4, L=128)")
    print(f"{'step':>6}  {'public bd3lms':>13}  " + "  ".join(f"{'ddlm ' + b:>12}" for b in rows))
    all_steps = sorted(set(PUBLIC_BD3LMS_MDLM) | {s for r in rows.values() for s in r["steps"]})
    for step in all_steps:
        public = PUBLIC_BD3LMS_MDLM.get(step)
        cells = []
        for r in rows.values():
            cells.append(f"{r['valid_bpc'][r['steps'].index(step)]:>12.3f}" if step in r["steps"] else " " * 12)
        print(f"{step:>6}  {public if public else '':>13}  " + "  ".join(cells))
    print(f"wrote {out_dir / 'mdlm_reference.json'} ({report['cpu']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
