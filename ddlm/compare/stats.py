"""The statistics behind the report's verdicts: every figure is an estimate with its standard
error, and every claim a test against it.

    Estimate(mean, se, ...)             a figure and its standard error (seeds and evaluation noise)
    over_seeds(values, eval_ses)        a likelihood over N training seeds: mean, seed spread, and
                                        se^2 = sd^2 / N + (mean evaluation s.e.)^2
    ratio_bootstrap(seeds, ...)         a ratio of sums over samples (bits per byte, gen PPL, mean
                                        entropy), bootstrapped over seeds and samples within them
    mean_bootstrap(seeds_replicates)    a per-seed figure with its own bootstrap replicates (MAUVE)
    less(a, b), equivalent(a, b, m)     verdicts: "holds", "does NOT hold", "not resolved"
    at_cost(points, cost)               a curve's estimate at a cost between its points (log scale)

A one-sided claim a < b holds when b - a is beyond Z standard errors of the difference
(se_d^2 = se_a^2 + se_b^2, the rows are independent runs), does NOT hold when it is beyond Z the
other way, and is otherwise not resolved at this budget. An equivalence |a - b| < margin is a
two one-sided test (TOST): it holds when |a - b| + Z se_d < margin, does NOT hold when
|a - b| - Z se_d > margin. The evaluation's error of a row is taken as fully shared by its seeds
(they are scored on the same test sequences): conservative, it is not divided by N.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z = 2.0  # standard errors a difference must exceed
HOLDS, FAILS, OPEN = "holds", "**does NOT hold**", "not resolved at this budget"
BOOTSTRAP = 2000  # bootstrap replicates


@dataclass(frozen=True)
class Estimate:
    mean: float
    se: float  # standard error of `mean`
    seeds: int = 1
    seed_sd: float | None = None  # spread over training seeds (None: one seed)
    values: tuple = ()  # the per-seed figures

    def text(self, digits: int = 3) -> str:
        return f"{self.mean:.{digits}f} ± {self.se:.{digits}f}"


def over_seeds(values: list[float], eval_ses: list[float] | None = None) -> Estimate:
    """Mean over seeds with se^2 = sd^2 / N + (mean evaluation s.e.)^2 (sd: 0 for one seed)."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        raise ValueError("no values to estimate from")
    sd = float(x.std(ddof=1)) if n > 1 else None
    eval_se = float(np.mean(eval_ses)) if eval_ses else 0.0
    se = math.sqrt((sd or 0.0) ** 2 / n + eval_se ** 2)
    return Estimate(float(x.mean()), se, n, sd, tuple(float(v) for v in x))


def _seed_slots(n_seeds: int, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """(replicates, n_seeds) seed indices: the seeds resampled with replacement (one seed: itself)."""
    if n_seeds == 1:
        return np.zeros((replicates, 1), dtype=np.int64)
    return rng.integers(0, n_seeds, size=(replicates, n_seeds))


def ratio_bootstrap(seeds: list[tuple[list[float], list[float]]], *, transform=None,
                    replicates: int = BOOTSTRAP, seed: int = 0) -> Estimate:
    """sum(a) / sum(b) over every sample of every seed (each seed: its samples' (a_i, b_i)),
    optionally transformed (exp for gen PPL), with its bootstrap standard error: each replicate
    draws N seeds with replacement, then each drawn seed's samples with replacement."""
    rng = np.random.default_rng(seed)
    transform = transform or (lambda r: r)
    arrays = [(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)) for a, b in seeds]
    if not arrays or any(len(a) == 0 or len(a) != len(b) for a, b in arrays):
        raise ValueError("every seed needs samples, with one denominator per numerator")
    point = transform(sum(a.sum() for a, _ in arrays) / sum(b.sum() for _, b in arrays))
    slots = _seed_slots(len(arrays), replicates, rng)
    num = np.zeros(replicates)
    den = np.zeros(replicates)
    for j in range(slots.shape[1]):
        for k, (a, b) in enumerate(arrays):
            picked = slots[:, j] == k
            if not picked.any():
                continue
            idx = rng.integers(0, len(a), size=(int(picked.sum()), len(a)))
            num[picked] += a[idx].sum(1)
            den[picked] += b[idx].sum(1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        reps = transform(num / den)
    reps = reps[np.isfinite(reps)]  # a replicate that drew only empty samples has no ratio
    per_seed = tuple(float(transform(a.sum() / b.sum())) for a, b in arrays)
    sd = float(np.std(per_seed, ddof=1)) if len(arrays) > 1 else None
    return Estimate(float(point), float(reps.std(ddof=1)) if len(reps) > 1 else math.nan, len(arrays), sd, per_seed)


def mean_bootstrap(seeds: list[tuple[float, list[float]]], *, replicates: int = BOOTSTRAP,
                   seed: int = 0) -> Estimate:
    """The mean over seeds of a figure each seed gives with its own bootstrap replicates (MAUVE:
    (value, replicates) per seed): each replicate draws N seeds with replacement and one of each
    drawn seed's replicates."""
    rng = np.random.default_rng(seed)
    values = np.asarray([v for v, _ in seeds], dtype=np.float64)
    slots = _seed_slots(len(seeds), replicates, rng)
    total = np.zeros(replicates)
    for j in range(slots.shape[1]):
        for k, (_, reps) in enumerate(seeds):
            picked = slots[:, j] == k
            pool = np.asarray(reps if len(reps) else [values[k]], dtype=np.float64)
            total[picked] += pool[rng.integers(0, len(pool), size=int(picked.sum()))]
    reps = total / slots.shape[1]
    sd = float(values.std(ddof=1)) if len(values) > 1 else None
    return Estimate(float(values.mean()), float(reps.std(ddof=1)), len(values), sd,
                    tuple(float(v) for v in values))


@dataclass(frozen=True)
class Verdict:
    label: str  # HOLDS | FAILS | OPEN
    difference: float  # the claimed-positive difference (b - a for a < b; margin - |a - b| for ≈)
    se: float
    margin: float | None = None

    @property
    def z(self) -> float:
        return self.difference / self.se if self.se > 0 else math.copysign(math.inf, self.difference)

    def text(self, digits: int = 3) -> str:
        if self.margin is not None:
            return (f"|Δ| {abs(self.margin - self.difference):.{digits}f} ± {self.se:.{digits}f} against a margin "
                    f"of {self.margin:.{digits}f}: {self.label}")
        return f"Δ {self.difference:+.{digits}f} ± {self.se:.{digits}f} ({_z(self.z)}): {self.label}"


def _z(z: float) -> str:
    return f"{z:+.1f} s.e." if math.isfinite(z) else "no error measured"


def less(a: Estimate, b: Estimate) -> Verdict:
    """The claim a < b: holds when b - a > Z se_d, does NOT hold when a - b > Z se_d."""
    d, se = b.mean - a.mean, math.hypot(a.se, b.se)
    label = HOLDS if d > Z * se else FAILS if -d > Z * se else OPEN
    return Verdict(label, d, se)


def equivalent(a: Estimate, b: Estimate, margin: float) -> Verdict:
    """The claim |a - b| < margin, by two one-sided tests at Z standard errors."""
    d, se = abs(a.mean - b.mean), math.hypot(a.se, b.se)
    label = HOLDS if d + Z * se < margin else FAILS if d - Z * se > margin else OPEN
    return Verdict(label, margin - d, se, margin)


def at_cost(points: list[tuple[float, Estimate]], cost: float) -> Estimate | None:
    """A curve of (cost, estimate) read at `cost` by linear interpolation in log cost between its
    two neighbouring points (None outside the measured range); the two points are independent."""
    points = sorted(points, key=lambda p: p[0])
    for (c0, e0), (c1, e1) in zip(points, points[1:]):
        if c0 <= cost <= c1 and c1 > c0:
            w = (math.log(cost) - math.log(c0)) / (math.log(c1) - math.log(c0))
            return Estimate((1 - w) * e0.mean + w * e1.mean, math.hypot((1 - w) * e0.se, w * e1.se),
                            min(e0.seeds, e1.seeds))
    for c, e in points:
        if math.isclose(c, cost, rel_tol=1e-9):
            return e
    return None
