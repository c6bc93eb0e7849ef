"""The infilling table: each compare row's span score (`ddlm eval --infill-test`) over its seeds.

    python benchmarks/infill_table.py --runs results/austen-char/runs --rows ar,mdlm,bd3-4,bd3-16,sedd-absorbing

Diffusion rows score a hidden span given both sides (an upper bound); AR given the left side
(exact). Prints a table (mean ± s.e. over seeds, each seed's own evaluation error beside) and writes
benchmarks/results/infill_table.json.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path

from ddlm.eval.infill_test import infill_test


def seed_dirs(runs: Path, row: str) -> list[Path]:
    dirs = [runs / row] + sorted(runs.glob(f"{row}-seed*"))
    return [d for d in dirs if (d / "latest").is_file()]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", default="results/austen-char/runs")
    p.add_argument("--rows", default="ar,mdlm,bd3-4,bd3-16,sedd-absorbing,sedd-uniform")
    p.add_argument("--n", type=int, default=320)
    p.add_argument("--span", type=int, default=16)
    p.add_argument("--t-samples", type=int, default=8)
    p.add_argument("--out", default="benchmarks/results/infill_table.json")
    args = p.parse_args()
    table = []
    for row in args.rows.split(","):
        results = [infill_test(d, n=args.n, span=args.span, t_samples=args.t_samples) for d in seed_dirs(Path(args.runs), row)]
        bpcs = [r["bpc"] for r in results]
        mean = sum(bpcs) / len(bpcs)
        sd = math.sqrt(sum((b - mean) ** 2 for b in bpcs) / (len(bpcs) - 1)) if len(bpcs) > 1 else 0.0
        eval_se = sum(r["bpc_stderr"] for r in results) / len(results)
        se = math.sqrt(sd ** 2 / len(bpcs) + eval_se ** 2)  # spans are the same for every seed
        table.append({"row": row, "context": results[0]["context"], "seeds": len(results), "bpc": mean, "se": se,
                      "seed_sd": sd, "eval_se": eval_se, "per_seed": bpcs, "protocol": results[0]["protocol"]})
        print(f"{row:16s} {results[0]['context']:5s} {mean:.3f} ± {se:.3f}  (seeds {len(results)}, sd {sd:.3f}, "
              f"eval s.e. {eval_se:.3f})", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": platform.processor() or platform.machine(), "n": args.n,
                                          "span": args.span, "t_samples": args.t_samples, "rows": table}, indent=2))


if __name__ == "__main__":
    main()
