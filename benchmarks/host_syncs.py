"""Where a GPU would wait on the host: device-to-host reads per training step and per sampling step.

    OMP_NUM_THREADS=1 python benchmarks/host_syncs.py [--steps 16,64] [--out benchmarks/results]

Runs ddlm's own commands on the CUDA device emulated on the CPU (tests/emulated_cuda.py: every
tensor "on cuda" is a CPU tensor that says so; every `.item()`, `.tolist()`, `.cpu()`, `bool(t)`
and data-shaped op such as `nonzero` of a cuda tensor is counted). No GPU is needed and the counts
are exact: they are properties of the code, not of a device. A host read stalls the GPU's queue
until the work before it is done, and it is what keeps a loop from being captured as one CUDA
graph; a handful per step is harmless when a step is a whole forward pass of a large model.

For each method: tiny runs are trained for 4 and 8 steps (no validation), then
  train/step     the reads of one optimizer step (the difference between 8 steps and 4 steps / 4),
  sample/step    the reads of one denoising step for every sampler the method registers (the
                 difference between --steps T2 and T1 calls, divided by T2 - T1), batch 4,
  per call       the reads of one `ddlm sample` call at T1 that do not grow with steps,
with the three source lines that read most. Writes host_syncs.json.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ["DDLM_DEVICE"] = "cuda"

from emulated_cuda import EmulatedCuda  # noqa: E402

from ddlm.cli import main  # noqa: E402
from ddlm.commands.sample import sample_checkpoint  # noqa: E402
from ddlm.methods.base import method_class, method_names  # noqa: E402

TINY = ["--model.dim=32", "--model.n_layers=2", "--model.n_heads=2", "--data.seq_len=64",
        "--train.batch_size=4", "--train.dtype=fp32", "--train.progress=false", "--train.eval_every=0",
        "--train.ckpt_every=0"]


def quiet_main(args: list[str]) -> None:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(args)
    if code != 0:
        raise SystemExit(f"ddlm {' '.join(args)} exited {code}")


def reads(fn) -> tuple[int, Counter]:
    with EmulatedCuda() as emu:
        fn()
    return emu.n_host_reads, emu.read_sites


def train_reads(method: str, out: Path, init: Path | None) -> float:
    extra = ["--init", str(init)] if init else []
    counts = []
    for steps in (4, 8):
        n, _ = reads(lambda: quiet_main(["train", "--method", method, "--out", str(out / f"{method}-{steps}"),
                                          "--steps", str(steps), "--overwrite", *TINY, *extra]))
        counts.append(n)
    return (counts[1] - counts[0]) / 4


def sample_reads(run: Path, sampler: str, steps: tuple[int, int]) -> dict:
    def draw(t):
        return reads(lambda: sample_checkpoint(run, options={"sampler": sampler, "steps": t, "num": 4,
                                                             "batch_size": 4, "seed": 0}))
    (n1, sites1), (n2, _) = draw(steps[0]), draw(steps[1])
    per_step = (n2 - n1) / (steps[1] - steps[0])
    return {"per_step": per_step, "per_call": n1 - per_step * steps[0],
            "top_sites": [f"{site} ({n})" for site, n in sites1.most_common(3)]}


def run_benchmark(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="16,64")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    steps = tuple(int(s) for s in args.steps.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for method in [m for m in method_names() if m != "edlm"] + ["edlm"]:  # edlm starts from mdlm
            init = tmp / "mdlm-8" if method == "edlm" else None
            per_train_step = train_reads(method, tmp, init)
            for sampler in method_class(method).samplers:
                row = {"method": method, "sampler": sampler, "train_per_step": per_train_step,
                       **sample_reads(tmp / f"{method}-8", sampler, steps)}
                rows.append(row)
                print(f"{method:5s} {sampler:14s} train/step {per_train_step:5.1f}  sample/step "
                      f"{row['per_step']:5.2f}  per call {row['per_call']:6.1f}  {'; '.join(row['top_sites'])}",
                      flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_syncs.json").write_text(json.dumps({
        "what": "device-to-host reads on the emulated CUDA device (exact counts, no GPU involved)",
        "model": "dim 32, 2 layers, L=64, batch 4, fp32", "sample_steps": steps, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out / 'host_syncs.json'}")


if __name__ == "__main__":
    run_benchmark()
