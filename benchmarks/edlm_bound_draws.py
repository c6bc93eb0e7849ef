"""EDLM's likelihood bound against the number of draws behind its rho_k estimate.

EDLM's bound (ddlm/methods/edlm.py, `sir_correction`) needs -log rho_k, estimated as -log of a
mean over `edlm.bound_draws` draws of the k proposals: by Jensen's inequality it is biased up (the
bound stays a bound, but a loose one), by roughly Var / (2 draws). This script scores the same
test sequences with the same (t, x_t) draws at increasing draws and prints how far each figure
lies above the one with the most draws: the bias a comparison must stay below.

    python benchmarks/edlm_bound_draws.py --mdlm RUN --energy ar:AR_RUN [--draws 1,2,4,8,16,32]

Writes benchmarks/results/edlm_bound_draws.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ddlm import runtime
from ddlm.commands.evaluate import evaluate_checkpoint

OUT = Path(__file__).parent / "results" / "edlm_bound_draws.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mdlm", required=True, help="the MDLM run (EDLM's denoiser)")
    parser.add_argument("--energy", required=True, help="edlm.energy: ar:AR_RUN or nce:NCE_RUN")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--draws", default="1,2,4,8,16,32")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    rows = []
    print(f"EDLM bound vs draws: {args.mdlm} with {args.energy}, k={args.k}, {args.batches} batches "
          f"of {args.batch_size} ({runtime.cpu_model()}, {torch.get_num_threads()} threads)")
    print(f"{'draws':>6} {'BPC':>8} {'± s.e.':>8} {'seconds':>8}")
    for draws in [int(d) for d in args.draws.split(",")]:
        start = time.perf_counter()
        result = evaluate_checkpoint(args.mdlm, split="test", overrides=[
            f"--edlm.energy={args.energy}", f"--edlm.k={args.k}", f"--edlm.bound_draws={draws}",
            f"--eval.max_batches={args.batches}", f"--eval.batch_size={args.batch_size}", "--eval.seed=0"])
        seconds = time.perf_counter() - start
        rows.append({"draws": draws, "bpc": result["bpc"], "bpc_stderr": result["bpc_stderr"],
                     "sequences": result["sequences"], "seconds": seconds})
        print(f"{draws:>6} {result['bpc']:>8.4f} {result['bpc_stderr']:>8.4f} {seconds:>8.1f}")
    most = rows[-1]["bpc"]
    for row in rows:
        row["above_most_draws"] = row["bpc"] - most
    print("above the most draws: " + ", ".join(f"{r['draws']}: {r['above_most_draws']:+.4f}" for r in rows))
    payload = {"mdlm": args.mdlm, "energy": args.energy, "k": args.k, "cpu": runtime.cpu_model(),
               "threads": torch.get_num_threads(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
