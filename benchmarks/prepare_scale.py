"""`ddlm data prepare` at scale: peak memory and tokens/s on a synthetic corpus of a given size.

    python benchmarks/prepare_scale.py [--size 2GB] [--tokenizer gpt2] [--workers 1,2]
                                       [--dir TMP] [--out benchmarks/results/prepare_scale.json]

A text file of `--size` bytes is written in a streaming way to a temporary directory: lines of
words drawn from the Austen vocabulary with their frequencies (punctuation attached as in the
novels). Each worker count then prepares it in its own subprocess (wrap packing, default shards),
and reports

- the prepare process's peak RSS (getrusage RUSAGE_SELF ru_maxrss),
- the largest tokenizer worker's peak RSS (RUSAGE_CHILDREN of the prepare process; 0 with one
  worker, which tokenizes in-process),
- the peak of the whole process tree's summed RSS, sampled every 0.2 s with psutil (when
  installed; forked workers share pages with their parent, so the sum over-counts),
- tokens/s and MB/s over the whole prepare (two scans of the file plus the tokenizing pass).

Flat memory means these peaks do not grow with --size (compare a run at 200MB). The index.json
of every run must be identical (it holds every shard's sha256), which is checked and reported.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

CHILD = r'''
import json, resource, sys
from ddlm.data.prepare import prepare_corpus

source, out, workers, tokenizer = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
report = prepare_corpus(source, tokenizer, out, workers=workers, progress=True)
report["parent_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
report["worker_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps(report))
'''


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMG]?)B?\s*", text.upper())
    if not match:
        raise SystemExit(f"--size {text!r}: expected a size such as 2GB, 500MB or 123456")
    return int(float(match.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match.group(2)])


def write_corpus(path: Path, size: int, seed: int = 0) -> None:
    """`size` bytes of lines of Austen words drawn by frequency, written in 8 MiB pieces."""
    import numpy as np

    from ddlm.data.corpora import austen_text

    counts = Counter(austen_text().split())
    words = np.array(list(counts), dtype=object)
    p = np.array(list(counts.values()), dtype=np.float64)
    rng = np.random.default_rng(seed)
    pool = []  # 50,000 lines of 4..40 words: sampled lines, not a repeated paragraph
    for _ in range(50_000):
        pool.append(" ".join(words[rng.choice(len(words), size=int(rng.integers(4, 41)), p=p / p.sum())]))
    pool = np.array(pool, dtype=object)
    written = 0
    with open(path, "wb") as f:
        while written < size:
            piece = ("\n".join(pool[rng.integers(0, len(pool), size=40_000)]) + "\n").encode("utf-8")
            if written + len(piece) > size:  # end on the last whole line that fits
                piece = piece[: piece.rfind(b"\n", 0, size - written) + 1]
                f.write(piece)
                break
            f.write(piece)
            written += len(piece)


def tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    except psutil.Error:
        return 0


def run_prepare(source: Path, out: Path, workers: int, tokenizer: str) -> dict:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(source), str(out), str(workers), tokenizer],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        try:
            import psutil  # noqa: F401
        except ImportError:
            return
        while not done.wait(0.2):
            peak[0] = max(peak[0], tree_rss(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"prepare with {workers} workers failed (exit {proc.returncode})")
    report = json.loads(stdout.strip().splitlines()[-1])
    report["tree_peak_rss_mib"] = peak[0] / 2**20 if peak[0] else None
    return report


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        match = re.search(r"Model name:\s*(.+)", out)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2GB", help="bytes of synthetic text (default 2GB)")
    ap.add_argument("--tokenizer", default="gpt2", help="tokenizer to prepare with (default gpt2)")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a new temporary one)")
    ap.add_argument("--out", default="benchmarks/results/prepare_scale.json")
    args = ap.parse_args()
    size = parse_size(args.size)
    scratch = Path(tempfile.mkdtemp(prefix="prepare_scale-", dir=args.dir))
    try:
        source = scratch / "corpus.txt"
        t0 = time.perf_counter()
        write_corpus(source, size)
        print(f"wrote {source.stat().st_size / 2**20:,.0f} MiB of synthetic Austen text in "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
        runs, indexes = [], []
        for workers in [int(w) for w in args.workers.split(",")]:
            out = scratch / f"prepared-{workers}"
            report = run_prepare(source, out, workers, args.tokenizer)
            indexes.append((out / "index.json").read_text())
            shutil.rmtree(out)
            runs.append({"workers": workers, "seconds": report["seconds"], "tokens": report["tokens"],
                         "tokens_per_second": report["tokens_per_second"],
                         "mb_per_second": size / 1e6 / report["seconds"],
                         "parent_peak_rss_mib": report["parent_peak_rss_mib"],
                         "worker_peak_rss_mib": report["worker_peak_rss_mib"],
                         "tree_peak_rss_mib": report["tree_peak_rss_mib"]})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {"size_bytes": size, "tokenizer": args.tokenizer, "cpu": cpu_name(), "cpus": os.cpu_count(),
              "python": platform.python_version(), "identical_across_workers": len(set(indexes)) == 1,
              "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nprepare of {size / 2**30:.2f} GiB synthetic text, {args.tokenizer} tokenizer, on {result['cpu']} "
          f"({result['cpus']} CPUs); identical files across worker counts: {result['identical_across_workers']}")
    print(f"{'workers':>7} {'seconds':>8} {'tokens':>13} {'tok/s':>11} {'MB/s':>6} {'parent RSS':>11} "
          f"{'worker RSS':>11} {'tree RSS':>9}")
    for r in runs:
        tree = f"{r['tree_peak_rss_mib']:,.0f}" if r["tree_peak_rss_mib"] else "n/a"
        print(f"{r['workers']:>7} {r['seconds']:>8.1f} {r['tokens']:>13,} {r['tokens_per_second']:>11,.0f} "
              f"{r['mb_per_second']:>6.1f} {r['parent_peak_rss_mib']:>8,.0f} MiB {r['worker_peak_rss_mib']:>7,.0f} MiB "
              f"{tree:>5} MiB")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
