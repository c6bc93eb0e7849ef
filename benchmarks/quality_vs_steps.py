"""Sample quality against sampling steps: MDLM, EDLM-AR and EDLM-NCE at T in {8, ..., 256}.

    flock /tmp/cpu.lock python benchmarks/quality_vs_steps.py [--quick] [--corpora markov,austen]
        [--steps 8,16,32,64,128,256] [--k 4] [--window 1.0] [--speed-k 2 --speed-window 0.2 | --no-speed]
        [--runs runs/quality_vs_steps] [--out benchmarks/results]

Two corpora, each with its own small models (runs under --runs, reused when present):

  markov   a first-order chain over 8 letters written by this script (each letter has 3 allowed
           successors with Dirichlet(1) weights, so 5 of every 8 transitions have probability 0;
           200k chars on one line). Quality of a sample (L = 64): the true chain's NLL per token in
           bits (the first token under the stationary law, then every ALLOWED transition; the
           forbidden ones are left out of the mean) and the forbidden-transition rate (share of the
           L - 1 transitions with probability 0). Reference: the chain's entropy rate, and the same
           figures on held-out text. Tokens outside the 8 letters are banned in every sampler here
           (the models give them ~0 probability anyway), so the chain NLL is always defined.
  austen   the embedded Austen corpus, char tokenizer, L = 128. Quality: the generative NLL per char
           in bits of the samples under an AR "judge" (a ddlm AR run on the same corpus). The
           energy of EDLM-AR is ANOTHER AR run: same size and steps, different seed (--judge-seed),
           so the judge is not the energy. Reference: held-out test blocks under the judge.

Methods, all around one MDLM run per corpus (not time-conditioned, so the no-change cache is on):
  mdlm       MDLM's ancestral sampler.
  edlm-ar    `load_for_inference(MDLM, {"edlm.energy": "ar:AR_RUN", "edlm.k", "edlm.window"})`:
             importance sampling with E = -log p_AR(x_0) + log q(x_0 | x_t).
  edlm-nce   `ddlm train --method edlm --edlm.energy nce --init MDLM_RUN` (inherits data and model),
             sampled with the same k and window.
Each at k = --k proposals, window --window (default 4 and 1.0, the paper's quality setting) and, unless
--no-speed, at the paper's speed setting k = 2, window 0.2.

Beside the quality figures: the samples' unigram entropy (nats, per sample, over its own L tokens;
the data's blocks give the reference), the NFE of one batched generate() call (denoiser calls plus
k per step in which some row was importance-resampled; the energy's share in brackets), and
seconds per sample (wall time of the batched call / samples). Every figure is a mean over the
samples with its standard error (across samples).

Speed-up at equal quality (every quality figure here: lower is better): for each EDLM setting and
each T, the steps T' at which MDLM reaches the quality EDLM has at T, T'/T, and the time ratio
t_MDLM(T') / t_EDLM(T) (> 1: EDLM is faster at equal quality). MDLM's curve is first made monotone
in T (weighted isotonic fit, weights 1/s.e.^2, so one noisy point does not fold it), then read
piecewise linearly in log T; t_MDLM is interpolated log-log. Outside the grid the read-out is a
bound ("MDLM does not reach it by T = 256": ratio > t_MDLM(256)/t_EDLM(T); "MDLM is as good at
T = 8": ratio <= t_MDLM(8)/t_EDLM(T)). A 68% interval comes from a bootstrap over the samples of
every row (times held fixed). A weighted fit q(T) = q_inf + A/T of MDLM's curve says whether EDLM's
figure is beyond what MDLM reaches at any T. The EDLM paper reports 1.3x (equal gen-PPL at about half
the steps, ~13 s vs ~17 s per 1024-token sample).

Budget (default): about 25 minutes on 2 CPU cores for both corpora including training (Markov:
d64 x 2 layers, MDLM 2400 steps at batch 64, AR 600 at batch 32, NCE 300; Austen: d128 x 3 layers,
L = 128, MDLM / AR / judge 800 steps, NCE 300, batch 16 -- smaller than the quickstart's d256 x 4).
--quick: tiny models, a smoke run of about a minute, written under the runs folder, not to
benchmarks/results.
Run it under `flock /tmp/cpu.lock` on a shared machine so timings are not disturbed.

Read the Austen rows with their caveat: at this budget char-level MDLM is far from converged (its
bound is ~3.3 BPC against ~2.1 for the AR runs), so its samples score ~4.8-5.3 bits/char under the
judge against ~2.1 for held-out text; EDLM there corrects a weak denoiser, and an AR energy mostly
adds the AR model's own knowledge. The Markov MDLM comes within ~0.03 bits of the entropy rate.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ddlm import cli, runtime
from ddlm.build import load_for_inference, prepare_data
from ddlm.config import make_config
from ddlm.data.markov import chain_states
from ddlm.train.loop import train

LN2 = math.log(2)
LETTERS = "abcdefgh"  # char tokenizer ids 1..8

PRESETS = {
    "default": {
        "markov": {"n_chars": 200_000, "seq_len": 64, "samples": 64, "batch": 64,
                   "model": {"dim": 64, "n_layers": 2, "n_heads": 2},
                   "train": {"batch_size": 32, "lr": 3e-3, "warmup_steps": 20, "ema": 0.0},
                   # MDLM learns the chain far more slowly than AR (600 steps at batch 32 leave a
                   # denoiser that puts ~12% of its samples' transitions on forbidden pairs at any T)
                   "train_mdlm": {"batch_size": 64, "lr": 2e-3, "ema": 0.99},
                   "nce_train": {"batch_size": 32, "lr": 1e-3, "warmup_steps": 20, "ema": 0.0},
                   "steps": {"mdlm": 2400, "ar": 600, "nce": 300}},
        "austen": {"seq_len": 128, "samples": 32, "batch": 32,
                   "model": {"dim": 128, "n_layers": 3, "n_heads": 2},
                   "train": {"batch_size": 16, "lr": 2e-3, "beta2": 0.95, "warmup_steps": 50, "ema": 0.99},
                   "nce_train": {"batch_size": 16, "lr": 5e-4, "beta2": 0.95, "warmup_steps": 20, "ema": 0.99},
                   "steps": {"mdlm": 800, "ar": 800, "judge": 800, "nce": 300}, "reference_blocks": 512},
    },
    "quick": {
        "markov": {"n_chars": 20_000, "seq_len": 32, "samples": 8, "batch": 8,
                   "model": {"dim": 32, "n_layers": 1, "n_heads": 2},
                   "train": {"batch_size": 16, "lr": 3e-3, "warmup_steps": 5, "ema": 0.0},
                   "nce_train": {"batch_size": 16, "lr": 1e-3, "warmup_steps": 5, "ema": 0.0},
                   "steps": {"mdlm": 40, "ar": 40, "nce": 20}},
        "austen": {"seq_len": 32, "samples": 8, "batch": 8,
                   "model": {"dim": 32, "n_layers": 1, "n_heads": 2},
                   "train": {"batch_size": 8, "lr": 2e-3, "warmup_steps": 5, "ema": 0.0},
                   "nce_train": {"batch_size": 8, "lr": 1e-3, "warmup_steps": 5, "ema": 0.0},
                   "steps": {"mdlm": 30, "ar": 30, "judge": 30, "nce": 15}, "reference_blocks": 32},
    },
}
QUICK_STEPS = [4, 16]


# ---- the Markov chain ---------------------------------------------------------------------------

def make_chain(seed: int, n: int = len(LETTERS), support: int = 3):
    """A sparse chain: each state has `support` allowed successors with Dirichlet(1) weights,
    redrawn until irreducible and aperiodic (P^64 > 0). Returns (P, pi, entropy rate in bits)."""
    rng = np.random.default_rng(seed)
    while True:
        P = np.zeros((n, n))
        for i in range(n):
            P[i, rng.choice(n, size=support, replace=False)] = rng.dirichlet(np.ones(support))
        if (np.linalg.matrix_power(P, 64) > 0).all():
            break
    pi = np.linalg.matrix_power(P, 2000)[0]
    logP = np.log2(np.where(P > 0, P, 1.0))
    return P, pi, float(-(pi[:, None] * P * logP).sum())


def write_chain(path: Path, P: np.ndarray, pi: np.ndarray, n_chars: int, seed: int) -> None:
    rng = np.random.default_rng(seed + 1)
    states = chain_states(P, pi, n_chars, rng)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(LETTERS[s] for s in states) + "\n")


def chain_metrics(tokens: np.ndarray, P: np.ndarray, pi: np.ndarray) -> dict[str, np.ndarray]:
    """Per sample (N,): true-chain NLL per scored token in bits (first token + allowed transitions)
    and the forbidden-transition rate (transitions of probability 0, or touching a non-letter)."""
    x = tokens.astype(np.int64) - 1
    valid = (x >= 0) & (x < len(pi))
    xs = np.clip(x, 0, len(pi) - 1)
    p = P[xs[:, :-1], xs[:, 1:]]
    ok = valid[:, :-1] & valid[:, 1:] & (p > 0)
    first = np.where(valid[:, 0], -np.log(pi[xs[:, 0]]), 0.0)
    nll = first + np.where(ok, -np.log(np.where(ok, p, 1.0)), 0.0).sum(1)
    scored = valid[:, 0] + ok.sum(1)
    return {"chain_nll_bits": nll / np.maximum(scored, 1) / LN2, "forbidden_rate": 1.0 - ok.mean(1)}


# ---- shared figures ---------------------------------------------------------------------------

def unigram_entropy(tokens: np.ndarray, vocab: int) -> np.ndarray:
    """(N,) entropy in nats of each row's own token frequencies."""
    counts = np.stack([np.bincount(row, minlength=vocab) for row in tokens.astype(np.int64)])
    p = counts / counts.sum(1, keepdims=True)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(1)


def mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0


@torch.no_grad()
def judge_bits(judge, tokens: np.ndarray, batch: int = 64) -> np.ndarray:
    """(N,) exact NLL per char in bits of each row under the AR judge."""
    x = torch.as_tensor(tokens, dtype=torch.long)
    out = [judge.method.nll_bound(judge.model, x[i:i + batch]).nll for i in range(0, len(x), batch)]
    return (torch.cat(out) / x.shape[1] / LN2).numpy()


def last_valid(run_dir: Path) -> dict:
    """The last validation row of a run's metrics.jsonl (its final figures), without bookkeeping."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    rows = [r for r in rows if r.get("split") == "valid"]
    return {k: v for k, v in rows[-1].items() if k.startswith("val_") or k == "step"} if rows else {}


# ---- training ---------------------------------------------------------------------------------

def fit(method: str, data: dict, spec: dict, steps: int, out: Path, seed: int = 0) -> dict:
    """Train (or reuse) one run; returns its description and the seconds spent now."""
    run = make_config(base={
        "method": method, "data": data, "model": spec["model"],
        "train": {**spec["train"], **spec.get(f"train_{method}", {}), "steps": steps, "seed": seed,
                  "eval_every": 0, "eval_batches": 4, "ckpt_every": 0, "progress": False, "dtype": "fp32"}})
    begin = time.perf_counter()
    train(run, out, quiet=True)
    return {"dir": str(out), "method": method, "steps": steps, "seed": seed,
            "seconds_now": time.perf_counter() - begin, "final_valid": last_valid(out)}


def fit_nce(mdlm_dir: Path, spec: dict, steps: int, out: Path, seed: int = 0) -> dict:
    """EDLM-NCE from the MDLM run, through the command line the docs give."""
    args = ["train", "--method", "edlm", "--edlm.energy", "nce", "--init", str(mdlm_dir), "--out", str(out),
            "--steps", str(steps), f"--train.seed={seed}", "--train.eval_every=0", "--train.eval_batches=4",
            "--train.ckpt_every=0", "--train.dtype=fp32", "--train.progress=false"]
    args += [f"--train.{k}={v}" for k, v in spec["nce_train"].items()]
    begin = time.perf_counter()
    if cli.main(args + ["--json"]) != 0:
        raise SystemExit(f"ddlm {' '.join(args)} failed")
    return {"dir": str(out), "method": "edlm (nce)", "steps": steps, "seed": seed, "init": str(mdlm_dir),
            "command": "ddlm " + " ".join(args), "seconds_now": time.perf_counter() - begin,
            "final_valid": last_valid(out)}


# ---- sampling ---------------------------------------------------------------------------------

def sample_rows(loaded, T: int, n: int, batch: int, length: int, seed: int, banned: tuple[int, ...]):
    """n samples at T steps with the method's own sampler; (tokens (n, L), NFE per call, energy
    passes per call, seconds per sample)."""
    cfg = dataclasses.replace(loaded.run.sample, steps=T, cache=True)
    sampler = loaded.method.sampler(cfg)
    if banned:
        sampler.banned = banned
    generator = torch.Generator().manual_seed(seed)
    tokens, nfe, energy, seconds, calls = [], 0, 0, 0.0, 0
    for start in range(0, n, batch):
        gen = sampler.generate(loaded.model, min(batch, n - start), length, generator=generator)
        tokens.append(gen.tokens.cpu())
        nfe += gen.nfe
        energy += getattr(sampler, "energy_passes", 0)
        seconds += gen.seconds
        calls += 1
    return torch.cat(tokens).numpy(), nfe / calls, energy / calls, seconds / n


def load_variants(mdlm_dir: Path, ar_dir: Path, nce_dir: Path, settings: list[tuple[int, float]]) -> dict:
    variants = {"mdlm": (load_for_inference(mdlm_dir), None)}
    for k, w in settings:
        opts = {"edlm.k": str(k), "edlm.window": str(w)}
        variants[f"edlm-ar k{k} w{w:g}"] = (load_for_inference(mdlm_dir, method_options={
            "edlm.energy": f"ar:{ar_dir}", **opts}), (k, w))
        variants[f"edlm-nce k{k} w{w:g}"] = (load_for_inference(nce_dir, method_options=opts), (k, w))
    return variants


def measure(variants: dict, steps: list[int], spec: dict, seed: int, banned: tuple[int, ...],
            score) -> list[dict]:
    """One row per variant and T; `score(tokens) -> {metric: (N,) values}`."""
    n, batch, L = spec["samples"], spec["batch"], spec["seq_len"]
    rows = []
    for name, (loaded, kw) in variants.items():
        sample_rows(loaded, 2, 2, 2, L, seed, banned)  # warm-up
        for T in steps:
            tokens, nfe, energy, sec = sample_rows(loaded, T, n, batch, L, seed, banned)
            metrics = score(tokens)
            row = {"method": name, "family": name.split()[0], "k": kw[0] if kw else 1,
                   "window": kw[1] if kw else 0.0, "steps": T, "samples": n, "nfe": nfe,
                   "energy_passes": energy, "energy_share": energy / nfe if nfe else 0.0,
                   "seconds_per_sample": sec}
            for key, values in metrics.items():
                row[key], row[key + "_se"] = mean_se(values)
            row["per_sample"] = {key: [round(float(v), 6) for v in values] for key, values in metrics.items()}
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def ar_reference(ar_loaded, spec: dict, seed: int, banned: tuple[int, ...], score) -> dict:
    """The energy AR model's own samples (what EDLM-AR tends to as k grows)."""
    cfg = dataclasses.replace(ar_loaded.run.sample, cache=True)
    sampler = ar_loaded.method.sampler(cfg)
    if banned:
        sampler.banned = tuple(sorted(set(sampler.banned) | set(banned)))
    gen = sampler.generate(ar_loaded.model, spec["samples"], spec["seq_len"],
                           generator=torch.Generator().manual_seed(seed))
    out = {"seconds_per_sample": gen.seconds / spec["samples"], "nfe": gen.nfe}
    for key, values in score(gen.tokens.numpy()).items():
        out[key], out[key + "_se"] = mean_se(values)
    return out


# ---- equal-quality read-out -------------------------------------------------------------------

def isotonic_decreasing(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least-squares non-increasing fit of y (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [value, weight, count]
    for yi, wi in zip(y, w):
        blocks.append([float(yi), float(wi), 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            v2, w2, c2 = blocks.pop()
            v1, w1, c1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    return np.concatenate([[v] * int(c) for v, _, c in blocks])


def mdlm_steps_for(target: float, T: np.ndarray, q: np.ndarray, se: np.ndarray, sec: np.ndarray):
    """(T', t_MDLM(T')) at which MDLM's curve reaches `target` (lower is better): the curve made
    monotone (isotonic, weights 1/se^2), interpolated linearly in log T, the time log-log; or
    ("below", T[0], sec[0]) when MDLM is already as good at the smallest T, ("beyond", None, None)
    when it never gets there on the grid."""
    fit = isotonic_decreasing(q, 1.0 / np.maximum(se, 1e-12) ** 2)
    if target >= fit[0]:
        return "below", float(T[0]), float(sec[0])
    for i in range(len(fit) - 1):
        if fit[i] > target >= fit[i + 1]:
            f = (fit[i] - target) / (fit[i] - fit[i + 1])
            lt = math.log(T[i]) + f * (math.log(T[i + 1]) - math.log(T[i]))
            log_sec = math.log(sec[i]) + f * (math.log(sec[i + 1]) - math.log(sec[i]))
            return "bracketed", math.exp(lt), math.exp(log_sec)
    return "beyond", None, None


def limit_fit(T: np.ndarray, q: np.ndarray, se: np.ndarray) -> tuple[float, float, float]:
    """Weighted least squares q = q_inf + A / T over MDLM's grid: (q_inf, its standard error, A)."""
    X = np.stack([np.ones_like(T, dtype=float), 1.0 / T], 1)
    W = 1.0 / np.maximum(se, 1e-12) ** 2
    cov = np.linalg.inv(X.T @ (X * W[:, None]))
    coef = cov @ (X.T @ (W * q))
    return float(coef[0]), float(math.sqrt(cov[0, 0])), float(coef[1])


def equal_quality(rows: list[dict], metric: str, values: dict, *, draws: int = 400, seed: int = 0) -> dict:
    """For each EDLM row: the MDLM steps T' reaching its quality, T'/T and the time ratio
    t_MDLM(T') / t_EDLM(T), with a bootstrap 68% interval (samples resampled within every row,
    times held fixed; 'beyond the grid' counts as infinite). `values[(method, T)][metric]` holds
    the per-sample figures."""
    base = sorted((r for r in rows if r["method"] == "mdlm"), key=lambda r: r["steps"])
    T = np.array([r["steps"] for r in base], dtype=float)
    sec = np.array([r["seconds_per_sample"] for r in base])
    q = np.array([r[metric] for r in base])
    se = np.array([r[metric + "_se"] for r in base])
    q_inf, q_inf_se, amp = limit_fit(T, q, se)
    rng = np.random.default_rng(seed)
    boot_base = []
    for _ in range(draws):
        means, ses = [], []
        for r in base:
            v = values[(r["method"], r["steps"])][metric]
            x = v[rng.integers(0, len(v), len(v))]
            means.append(x.mean())
            ses.append(x.std(ddof=1) / math.sqrt(len(x)) + 1e-12)
        boot_base.append((np.array(means), np.array(ses)))
    entries = []
    for r in rows:
        if r["method"] == "mdlm":
            continue
        kind, t_prime, mdlm_sec = mdlm_steps_for(r[metric], T, q, se, sec)
        entry = {"method": r["method"], "steps": r["steps"], "metric": metric, "value": r[metric],
                 "value_se": r[metric + "_se"], "seconds_per_sample": r["seconds_per_sample"], "readout": kind,
                 "beyond_mdlm_limit": bool(r[metric] < q_inf - 2 * q_inf_se)}
        if kind == "bracketed":
            entry.update(mdlm_steps=t_prime, step_ratio=t_prime / r["steps"], mdlm_seconds=mdlm_sec,
                         time_ratio=mdlm_sec / r["seconds_per_sample"])
        elif kind == "below":
            entry.update(note=f"MDLM is as good at T={int(T[0])} already: T' <= {int(T[0])}, time ratio <= "
                              f"{mdlm_sec / r['seconds_per_sample']:.2f}",
                         time_ratio_at_most=mdlm_sec / r["seconds_per_sample"])
        else:
            entry.update(note=f"MDLM does not reach it by T={int(T[-1])}: time ratio > "
                              f"{sec[-1] / r['seconds_per_sample']:.2f}",
                         time_ratio_above=sec[-1] / r["seconds_per_sample"])
        v = values[(r["method"], r["steps"])][metric]
        ratios = []
        for bq, bse in boot_base:
            target = v[rng.integers(0, len(v), len(v))].mean()
            k, _, s_ = mdlm_steps_for(target, T, bq, bse, sec)
            ratios.append(math.inf if k == "beyond" else s_ / r["seconds_per_sample"])
        lo, mid, hi = np.percentile(ratios, [16, 50, 84], method="inverted_cdf")
        finite = lambda x: float(x) if math.isfinite(x) else None  # None: MDLM not there by the grid's end
        entry["time_ratio_boot68"] = [finite(lo), finite(hi)]
        entry["time_ratio_boot_median"] = finite(mid)
        entries.append(entry)
    summary = {}
    for method in dict.fromkeys(e["method"] for e in entries):
        got = [e for e in entries if e["method"] == method]
        ratios = [e["time_ratio"] for e in got if e["readout"] == "bracketed"]
        summary[method] = {
            "geomean_time_ratio_bracketed": math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None,
            "bracketed": len(ratios), "of": len(got),
            "beyond_grid": sum(e["readout"] == "beyond" for e in got),
            "below_grid": sum(e["readout"] == "below" for e in got),
            "beyond_mdlm_limit": sum(e["beyond_mdlm_limit"] for e in got)}
    return {"metric": metric, "mdlm_limit_fit": {"q_inf": q_inf, "q_inf_se": q_inf_se, "A": amp,
                                                 "form": "q(T) = q_inf + A / T, weighted least squares"},
            "entries": entries, "summary": summary}


def fmt_ratio(x: float) -> str:
    return ">grid" if math.isinf(x) else f"{x:.2f}"


def format_readout(e: dict) -> str:
    head = f"  {e['method']:<18} T={e['steps']:>4}  {e['value']:.4f}±{e['value_se']:.4f}: "
    if e["readout"] == "bracketed":
        head += (f"MDLM needs T'={e['mdlm_steps']:6.1f} ({e['step_ratio']:.2f}x steps); time ratio "
                 f"t_MDLM(T')/t_EDLM(T) = {e['time_ratio']:.2f}")
    else:
        head += e["note"]
    lo, hi = (math.inf if x is None else x for x in e["time_ratio_boot68"])
    head += f"  [68%: {fmt_ratio(lo)}..{fmt_ratio(hi)}]"
    return head + ("  (better than MDLM's T->inf fit)" if e["beyond_mdlm_limit"] else "")


# ---- printing and plotting --------------------------------------------------------------------

QUALITY = {"markov": [("chain_nll_bits", "chain NLL bits/tok"), ("forbidden_rate", "forbidden")],
           "austen": [("judge_bits", "judge NLL bits/char")]}


def format_row(r: dict) -> str:
    parts = [f"{r['method']:<22} T={r['steps']:>4}"]
    for key, label in (("chain_nll_bits", "chainNLL"), ("forbidden_rate", "forbid"), ("judge_bits", "judgeNLL")):
        if key in r:
            parts.append(f"{label} {r[key]:.4f}±{r[key + '_se']:.4f}")
    parts.append(f"H1 {r['unigram_entropy_nats']:.3f}±{r['unigram_entropy_nats_se']:.3f}")
    parts.append(f"NFE {r['nfe']:>6.0f} ({100 * r['energy_share']:>3.0f}% E)")
    parts.append(f"{r['seconds_per_sample'] * 1000:>8.1f} ms/sample")
    return "  ".join(parts)


STYLE = {"mdlm": ("black", "-"), "edlm-ar": ("tab:blue", "-"), "edlm-nce": ("tab:orange", "-")}


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    corpora = [c for c in ("markov", "austen") if c in report["corpora"]]
    panels = {"markov": [("chain_nll_bits", "true-chain NLL of samples (bits/token)", "steps"),
                         ("forbidden_rate", "forbidden-transition rate", "steps"),
                         ("unigram_entropy_nats", "unigram entropy per sample (nats)", "steps"),
                         ("forbidden_rate", "forbidden-transition rate", "time")],
              "austen": [("judge_bits", "judge AR NLL of samples (bits/char)", "steps"),
                         ("unigram_entropy_nats", "unigram entropy per sample (nats)", "steps"),
                         ("seconds_per_sample", "seconds per sample", "steps"),
                         ("judge_bits", "judge AR NLL (bits/char)", "time")]}
    fig, axes = plt.subplots(len(corpora), 4, figsize=(17, 4.1 * len(corpora)), dpi=110, squeeze=False)
    for row_axes, corpus in zip(axes, corpora):
        c = report["corpora"][corpus]
        rows, refs = c["rows"], c["reference"]
        for ax, (key, label, x_kind) in zip(row_axes, panels[corpus]):
            for method in dict.fromkeys(r["method"] for r in rows):
                pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["steps"])
                color, _ = STYLE[pts[0]["family"]]
                dashed = pts[0]["window"] not in (0.0, report["config"]["window"]) or \
                    (pts[0]["k"] != report["config"]["k"] and pts[0]["family"] != "mdlm")
                xs = [p["steps"] if x_kind == "steps" else p["seconds_per_sample"] for p in pts]
                ys = [p[key] for p in pts]
                err = [p.get(key + "_se", 0.0) for p in pts]
                ax.errorbar(xs, ys, yerr=err, color=color, linestyle="--" if dashed else "-",
                            marker="s" if dashed else "o", markersize=3.5, capsize=2, linewidth=1.3,
                            label=method)
            lo_y = min(p[key] - p.get(key + "_se", 0.0) for p in rows)
            hi_y = max(p[key] + p.get(key + "_se", 0.0) for p in rows)
            margin = 0.5 * (hi_y - lo_y)
            refs_here = [("data", refs.get("data", {}).get(key), ":"),
                         ("AR samples", refs.get("ar_samples", {}).get(key), "-.")]
            if corpus == "markov" and key == "chain_nll_bits":
                refs_here.append(("entropy rate", refs["entropy_rate_bits"], "--"))
            off_scale = []
            for ref_label, value, style in refs_here:
                if value is None or key == "seconds_per_sample":
                    continue
                if not lo_y - margin <= value <= hi_y + margin:  # a line there would squash the curves
                    off_scale.append(f"{ref_label} {value:.3f} ({'below' if value < lo_y else 'above'})")
                    continue
                ax.axhline(value, color="grey", linestyle=style, linewidth=1)
                ax.annotate(ref_label, (1.0 if style != "--" else 0.0, value), xycoords=("axes fraction", "data"),
                            xytext=(-3 if style != "--" else 3, 2), textcoords="offset points",
                            ha="right" if style != "--" else "left", fontsize=7, color="grey")
            if off_scale:
                ax.text(0.02, 0.02, "off scale: " + "; ".join(off_scale), transform=ax.transAxes, fontsize=7,
                        color="grey", va="bottom")
            ax.set_xscale("log", base=2 if x_kind == "steps" else 10)
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            if key == "seconds_per_sample":
                ax.set_yscale("log")
            ax.set_xlabel("sampling steps T" if x_kind == "steps" else "seconds per sample (batched)")
            ax.set_ylabel(label, fontsize=9)
            ax.set_title(f"{corpus}: {label}" + (" vs time" if x_kind == "time" else ""), fontsize=9)
            ax.grid(alpha=0.3)
        row_axes[0].legend(fontsize=7)
    fig.suptitle(f"MDLM vs EDLM sample quality against steps ({report['machine']['cpu']}, "
                 f"{report['machine']['threads']} threads, fp32); error bars: ±1 s.e. over samples",
                 fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


# ---- the two corpora --------------------------------------------------------------------------

def run_markov(args, spec: dict, runs: Path, steps: list[int], settings) -> dict:
    P, pi, h = make_chain(args.seed)
    corpus = (runs / "markov" / "chain.txt").resolve()
    if not corpus.is_file():
        write_chain(corpus, P, pi, spec["n_chars"], args.seed)
    data = {"corpus": str(corpus), "tokenizer": "char", "seq_len": spec["seq_len"]}
    t0 = time.perf_counter()
    training = {"mdlm": fit("mdlm", data, spec, spec["steps"]["mdlm"], runs / "markov" / "mdlm"),
                "ar_energy": fit("ar", data, spec, spec["steps"]["ar"], runs / "markov" / "ar")}
    training["nce"] = fit_nce(runs / "markov" / "mdlm", spec, spec["steps"]["nce"], runs / "markov" / "nce")
    train_seconds = time.perf_counter() - t0
    variants = load_variants(runs / "markov" / "mdlm", runs / "markov" / "ar", runs / "markov" / "nce", settings)
    tok = variants["mdlm"][0].tokenizer
    banned = tuple(i for i in range(tok.vocab_size) if not 1 <= i <= len(LETTERS))  # non-letters

    def score(tokens):
        return {**chain_metrics(tokens, P, pi), "unigram_entropy_nats": unigram_entropy(tokens, tok.vocab_size)}

    _, datasets = prepare_data(variants["mdlm"][0].run, tok)
    held = np.asarray(datasets["test"].tokens, dtype=np.int64)
    reference = {"entropy_rate_bits": h, "data": {}}
    for key, values in score(held).items():
        reference["data"][key], reference["data"][key + "_se"] = mean_se(values)
    reference["data"]["blocks"] = len(held)
    t1 = time.perf_counter()
    ar = load_for_inference(runs / "markov" / "ar")
    reference["ar_samples"] = ar_reference(ar, spec, args.seed, banned, score)
    print(f"\n== markov: 8 letters, 3 successors each; entropy rate {h:.4f} bits/token; held-out "
          f"chain NLL {reference['data']['chain_nll_bits']:.4f}, unigram entropy "
          f"{reference['data']['unigram_entropy_nats']:.3f} nats; energy AR's own samples: chain NLL "
          f"{reference['ar_samples']['chain_nll_bits']:.4f}, forbidden "
          f"{reference['ar_samples']['forbidden_rate']:.4f}")
    rows = measure(variants, steps, spec, args.seed, banned, score)
    sample_seconds = time.perf_counter() - t1
    return {"chain": {"letters": LETTERS, "P": P.tolist(), "pi": pi.tolist(), "entropy_rate_bits": h,
                      "n_chars": spec["n_chars"], "seed": args.seed, "corpus": str(corpus)},
            "spec": spec, "training": training, "reference": reference, "rows": rows,
            "banned_in_sampling": list(banned), "train_seconds": train_seconds, "sample_seconds": sample_seconds}


def run_austen(args, spec: dict, runs: Path, steps: list[int], settings) -> dict:
    data = {"corpus": "austen", "tokenizer": "char", "seq_len": spec["seq_len"]}
    t0 = time.perf_counter()
    training = {"mdlm": fit("mdlm", data, spec, spec["steps"]["mdlm"], runs / "austen" / "mdlm"),
                "ar_energy": fit("ar", data, spec, spec["steps"]["ar"], runs / "austen" / "ar"),
                "ar_judge": fit("ar", data, spec, spec["steps"]["judge"], runs / "austen" / "judge",
                                seed=args.judge_seed)}
    training["nce"] = fit_nce(runs / "austen" / "mdlm", spec, spec["steps"]["nce"], runs / "austen" / "nce")
    train_seconds = time.perf_counter() - t0
    variants = load_variants(runs / "austen" / "mdlm", runs / "austen" / "ar", runs / "austen" / "nce", settings)
    judge = load_for_inference(runs / "austen" / "judge")
    tok = judge.tokenizer

    def score(tokens):
        return {"judge_bits": judge_bits(judge, tokens),
                "unigram_entropy_nats": unigram_entropy(tokens, tok.vocab_size)}

    _, datasets = prepare_data(judge.run, tok)
    held = np.asarray(datasets["test"].tokens, dtype=np.int64)[: spec["reference_blocks"]]
    reference = {"data": {"blocks": len(held), "split": "test"}}
    for key, values in score(held).items():
        reference["data"][key], reference["data"][key + "_se"] = mean_se(values)
    t1 = time.perf_counter()
    reference["ar_samples"] = ar_reference(load_for_inference(runs / "austen" / "ar"), spec, args.seed, (), score)
    print(f"\n== austen: judge = AR seed {args.judge_seed} (energy AR: seed 0), same size and steps; held-out "
          f"test blocks under the judge {reference['data']['judge_bits']:.4f} bits/char, unigram entropy "
          f"{reference['data']['unigram_entropy_nats']:.3f} nats; energy AR's own samples under the judge "
          f"{reference['ar_samples']['judge_bits']:.4f}")
    rows = measure(variants, steps, spec, args.seed, (), score)
    sample_seconds = time.perf_counter() - t1
    return {"spec": spec, "training": training, "reference": reference, "rows": rows,
            "judge": f"AR run {runs / 'austen' / 'judge'} (seed {args.judge_seed}); the energy is "
                     f"{runs / 'austen' / 'ar'} (seed 0), same size and steps",
            "train_seconds": train_seconds, "sample_seconds": sample_seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny models, T in {4, 16}: a smoke run")
    p.add_argument("--corpora", default="markov,austen")
    p.add_argument("--steps", default="8,16,32,64,128,256", help="comma-separated sampling steps T")
    p.add_argument("--k", type=int, default=4, help="proposals per importance step")
    p.add_argument("--window", type=float, default=1.0, help="importance sampling for t in [1 - window, 1]")
    p.add_argument("--speed-k", type=int, default=2, help="the paper's speed setting: k")
    p.add_argument("--speed-window", type=float, default=0.2, help="the paper's speed setting: window")
    p.add_argument("--no-speed", action="store_true", help="skip the speed setting")
    p.add_argument("--judge-seed", type=int, default=1, help="Austen: seed of the judge AR (the energy AR uses 0)")
    p.add_argument("--seed", type=int, default=0, help="chain and sampling seed")
    p.add_argument("--runs", default="runs/quality_vs_steps")
    p.add_argument("--out", default=None, help="folder for the JSON and PNG (default benchmarks/results; "
                                               "--quick: the runs folder)")
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON already in --out")
    args = p.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "default"]
    runs = Path(args.runs) / ("quick" if args.quick else "")
    out_dir = Path(args.out or (runs if args.quick else "benchmarks/results"))
    name = "quality_vs_steps_quick" if args.quick else "quality_vs_steps"
    if args.replot:
        plot(json.loads((out_dir / f"{name}.json").read_text()), out_dir / f"{name}.png")
        print(f"redrew {out_dir / (name + '.png')}")
        return 0
    steps = QUICK_STEPS if args.quick else [int(s) for s in args.steps.split(",")]
    settings = [(args.k, args.window)]
    if not args.no_speed and (args.speed_k, args.speed_window) != (args.k, args.window):
        settings.append((args.speed_k, args.speed_window))
    load = os.getloadavg()[0]
    begin = time.perf_counter()
    machine = {"cpu": runtime.cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
               "platform": platform.platform(), "torch": torch.__version__, "python": sys.version.split()[0],
               "load_average_1min_at_start": load}
    print(f"CPU: {machine['cpu']} ({machine['cores']} cores, {machine['threads']} torch threads, fp32); "
          f"1-min load at start {load:.2f}")
    report = {"benchmark": "quality_vs_steps", "quick": args.quick, "machine": machine,
              "config": {"steps": steps, "k": args.k, "window": args.window,
                         "settings": [{"k": k, "window": w} for k, w in settings], "seed": args.seed},
              "corpora": {}}
    for corpus in args.corpora.split(","):
        fn = {"markov": run_markov, "austen": run_austen}[corpus]
        result = fn(args, preset[corpus], runs, steps, settings)
        values = {(r["method"], r["steps"]): {k: np.asarray(v) for k, v in r["per_sample"].items()}
                  for r in result["rows"]}
        result["equal_quality"] = {metric: equal_quality(result["rows"], metric, values, seed=args.seed)
                                   for metric, _ in QUALITY[corpus]}
        report["corpora"][corpus] = result
    report["wall_seconds"] = time.perf_counter() - begin
    report["protocol"] = ("per (method, T): one batched generate() per batch, the same seed for every row; "
                          "figures are means over the samples ± standard error across samples; NFE per "
                          "generate() call counts denoiser calls + k per importance-resampled step; "
                          "seconds are the wall time of the calls / samples")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=2))
    plot(report, out_dir / f"{name}.png")

    print(f"\n{'=' * 100}\nCPU: {machine['cpu']}; wall time {report['wall_seconds']:.0f} s "
          f"(training {sum(c['train_seconds'] for c in report['corpora'].values()):.0f} s, sampling + scoring "
          f"{sum(c['sample_seconds'] for c in report['corpora'].values()):.0f} s)")
    for corpus, c in report["corpora"].items():
        print(f"\n[{corpus}]")
        for r in c["rows"]:
            print(format_row(r))
        for metric, readout in c["equal_quality"].items():
            fit = readout["mdlm_limit_fit"]
            print(f" speed-up at equal {metric} (lower is better; MDLM's fit q_inf + A/T gives q_inf = "
                  f"{fit['q_inf']:.4f} ± {fit['q_inf_se']:.4f}):")
            for e in readout["entries"]:
                print(format_readout(e))
            for method, sm in readout["summary"].items():
                g = sm["geomean_time_ratio_bracketed"]
                print(f"  => {method}: time ratio (geometric mean over the {sm['bracketed']}/{sm['of']} T "
                      f"that MDLM's curve brackets) {'n/a' if g is None else f'{g:.2f}x'}; MDLM never reaches it "
                      f"on the grid at {sm['beyond_grid']} T, is as good at the smallest T at {sm['below_grid']} T")
    print(f"\nwrote {out_dir / (name + '.json')} and {out_dir / (name + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
