"""Sample quality against NFE for MDLM's samplers: ancestral, first-hitting, ReMDM and confidence.

    OMP_NUM_THREADS=1 flock /tmp/ddlm-cpu2.lock python benchmarks/samplers_quality.py
        [--mdlm results/austen-char/runs/mdlm] [--judge results/austen-char/runs/ar]
        [--num 48] [--batch 48] [--steps 8,32,128,512] [--etas 0.005,0.02] [--thresholds 0.5,0.8,0.95,1.0]
        [--out benchmarks/results]

One trained char-level Austen MDLM run (L = 128, not time-conditioned, so the no-change cache is
on), sampled through ddlm's generation evaluation (`ddlm.eval.quality.draw`: `--num` samples in
batches, one generator seeded with sample.seed = 0 per setting, as `ddlm eval --generate`), and
judged by the AR run of the same corpus (`ar:DIR` judge, `judge_nll`): bits per byte of each sample
(mean ± s.e. over samples) and each sample's unigram entropy (nats). Reference: held-out test text
under the same judge.

Settings: ancestral at every T of --steps; first_hitting; remdm (cap) at every eta of --etas and T;
confidence at every threshold. NFE is network calls per batch. The ReMDM claim under test (Wang et
al. 2025, Fig. 1): past the T where ancestral sampling saturates, remasking keeps turning more steps
into quality. Read-out: for ancestral and each ReMDM eta, the change in bits/byte from the
second-largest to the largest T, with a 2-s.e. test. Writes samplers_quality.json and .png.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from ddlm.build import load_for_inference, prepare_data
from ddlm.config import SampleConfig
from ddlm.eval.generation import judge_nll
from ddlm.eval.judges import load_judge
from ddlm.eval.quality import draw, held_out_text, per_sample_statistics

LN2 = math.log(2)


def mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0


def per_text_bits(score: dict) -> list[float]:
    """Each sample's bits per byte under the judge."""
    t = score["per_text"]
    return [n / LN2 / b for n, b in zip(t["nll"], t["bytes"]) if b]


def measure(loaded, judge, label: str, fields: dict, num: int, batch: int, length: int) -> dict:
    cfg = SampleConfig(**{**dict(seed=0, batch_size=batch, num=1), **fields})
    begin = time.perf_counter()
    out = draw(loaded, cfg, num, length)
    score = judge_nll(judge, out.texts, ended=out.ended).as_dict()
    bits = per_text_bits(score)
    ent = per_sample_statistics(out.rows)["unigram_entropy"]
    row = {"label": label, **fields, "num": num, "nfe": out.nfe, "seconds": time.perf_counter() - begin,
           "bits_per_byte": score["bits_per_byte"]}
    row["bpb_mean"], row["bpb_se"] = mean_se(bits)
    row["entropy"], row["entropy_se"] = mean_se(ent)
    row["per_sample_bits"] = [round(b, 5) for b in bits]
    print(f"{label:28s} NFE {row['nfe']:6.1f}  bits/byte {row['bpb_mean']:.4f} ± {row['bpb_se']:.4f}  "
          f"entropy {row['entropy']:.3f} ± {row['entropy_se']:.3f}  ({row['seconds']:.0f} s)", flush=True)
    return row


def trend(rows: list[dict], family: str) -> dict:
    """Change of bits/byte from the second-largest to the largest T of a family (2-s.e. test)."""
    fam = sorted((r for r in rows if r["family"] == family), key=lambda r: r["steps"])
    a, b = fam[-2], fam[-1]
    delta = b["bpb_mean"] - a["bpb_mean"]
    se = math.hypot(a["bpb_se"], b["bpb_se"])
    verdict = "falls (better)" if delta < -2 * se else "rises (worse)" if delta > 2 * se else "flat within 2 s.e."
    return {"family": family, "from_T": a["steps"], "to_T": b["steps"], "delta": delta, "se": se, "verdict": verdict}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family in dict.fromkeys(r["family"] for r in report["rows"]):
        pts = sorted((r for r in report["rows"] if r["family"] == family), key=lambda r: r["nfe"])
        ax.errorbar([r["nfe"] for r in pts], [r["bpb_mean"] for r in pts], yerr=[2 * r["bpb_se"] for r in pts],
                    marker="o", capsize=3, label=family, linestyle="-" if len(pts) > 1 else "none")
    ref = report["reference"]
    ax.axhline(ref["bpb_mean"], color="gray", linestyle=":", label="held-out text")
    ax.set_xscale("log")
    ax.set_xlabel("NFE (network calls per batch)")
    ax.set_ylabel("bits/byte under the AR judge (±2 s.e.)")
    ax.set_title("Austen char MDLM: sample quality against NFE")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mdlm", default="results/austen-char/runs/mdlm")
    ap.add_argument("--judge", default="results/austen-char/runs/ar")
    ap.add_argument("--num", type=int, default=48)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--steps", default="8,32,128,512")
    ap.add_argument("--etas", default="0.005,0.02")
    ap.add_argument("--thresholds", default="0.5,0.8,0.95,1.0")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    loaded = load_for_inference(args.mdlm)
    judge = load_judge(f"ar:{args.judge}")
    length = loaded.run.model.max_len
    _, datasets = prepare_data(loaded.run, loaded.tokenizer)
    held = held_out_text(loaded.tokenizer, datasets["test"], judge, num=args.num, length=length)
    reference = {"num": held["num"], "bits_per_byte": held["score"]["bits_per_byte"]}
    reference["bpb_mean"], reference["bpb_se"] = mean_se(per_text_bits(held["score"]))
    reference["entropy"], reference["entropy_se"] = mean_se(held["per_sample"]["unigram_entropy"])
    print(f"held-out text: bits/byte {reference['bpb_mean']:.4f} ± {reference['bpb_se']:.4f}, "
          f"entropy {reference['entropy']:.3f}")
    begin = time.perf_counter()
    settings = [(f"ancestral T={T}", "ancestral", dict(sampler="ancestral", steps=T)) for T in steps]
    settings.append(("first_hitting", "first_hitting", dict(sampler="first_hitting")))
    for eta in (float(e) for e in args.etas.split(",")):
        settings += [(f"remdm cap eta={eta:g} T={T}", f"remdm cap eta={eta:g}",
                      dict(sampler="remdm", remask="cap", eta=eta, steps=T)) for T in steps]
    settings += [(f"confidence th={th:g}", "confidence", dict(sampler="confidence", threshold=float(th)))
                 for th in (float(x) for x in args.thresholds.split(","))]
    rows = []
    for label, family, fields in settings:
        row = measure(loaded, judge, label, fields, args.num, args.batch, length)
        row["family"] = family
        rows.append(row)
    families = ["ancestral"] + [f for f in dict.fromkeys(r["family"] for r in rows) if f.startswith("remdm")]
    trends = [trend(rows, f) for f in families]
    for t in trends:
        print(f"{t['family']:22s} T {t['from_T']} -> {t['to_T']}: {t['delta']:+.4f} ± {t['se']:.4f} bits/byte: {t['verdict']}")
    report = {"mdlm": args.mdlm, "judge": f"ar:{args.judge}", "length": length, "num": args.num,
              "seed": 0, "reference": reference, "rows": rows, "trends": trends,
              "seconds": time.perf_counter() - begin}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "samplers_quality.json").write_text(json.dumps(report, indent=1))
    plot(report, out / "samplers_quality.png")
    print(f"wrote {out / 'samplers_quality.json'} and .png in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
