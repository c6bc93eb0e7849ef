"""report.md and plots from a comparison's results.json (ddlm/compare/runner.py).

Every figure is given with its standard error (ddlm/compare/stats.py): likelihoods over training
seeds and the evaluation's own error, generation metrics bootstrapped over seeds and samples. Every
claim the papers (or the recipe) make is a test with that error: "holds" only when the difference
is beyond 2 standard errors, "does NOT hold" when it is beyond 2 the other way, otherwise "not
resolved at this budget", printed with the numbers. Which methods the papers order, and how, comes
from the registered methods (`Method.variant`, `likelihood_rank`, `likelihood_source`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddlm.compare import stats
from ddlm.compare.stats import Estimate

LN2 = math.log(2)
PARITY = 1.10  # "parity": a test perplexity within 10% of the other's


def fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, float):
        return f"{x:,.{digits}f}" if abs(x) < 1e4 else f"{x:,.0f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def est(e: Estimate | None, digits: int = 3) -> str:
    if e is None:
        return "—"
    return f"{fmt(e.mean, digits)} ± {fmt(e.se, digits)}"


# ---- what a row is ----------------------------------------------------------------------------
def method_of(row: dict) -> str:
    """The method a row's samples and bounds come from: its own, or the one its sample options
    wrap its source run in (EDLM around an MDLM run)."""
    from ddlm.methods.base import method_names

    if row["method"] == row["config"]["method"]:
        return row["method"]
    wrapper = row["method"].partition(" + ")[2].partition(".")[0]  # "--edlm.energy=..." -> edlm
    return wrapper if wrapper in method_names() else row["config"]["method"]  # a sampler option: its own


def _class(row: dict):
    from ddlm.methods.base import method_class

    return method_class(method_of(row))


def options_of(row: dict) -> dict:
    return row["config"].get(method_of(row), {}) or row["config"].get(row["config"]["method"], {})


def variant(row: dict) -> str:
    """What the papers' claims call the row (ar, bd3-16, sedd-uniform, edlm, ...)."""
    return _class(row).variant(options_of(row))


def is_ar(row: dict) -> bool:
    return method_of(row) == "ar"


def runs(row: dict) -> list[dict]:
    return row.get("seeds") or []


def trained(row: dict) -> bool:
    return row["trained_as"] == row["name"]


# ---- estimates --------------------------------------------------------------------------------
def likelihood(row: dict, key: str = "bpc") -> Estimate | None:
    """The row's test BPC (or, with key 'nats_per_token', its log perplexity) over its seeds."""
    return _over_seeds([r["likelihood"] for r in runs(row) if r.get("likelihood") and "bpc" in r["likelihood"]], key)


def zero_shot(row: dict, corpus: str, key: str = "bpc") -> Estimate | None:
    """The row's BPC (or log PPL, key 'nats_per_token') on zero-shot corpus `corpus` over its seeds."""
    return _over_seeds([r["zero_shot"][corpus] for r in runs(row)
                        if "bpc" in ((r.get("zero_shot") or {}).get(corpus) or {})], key)


def _over_seeds(liks: list[dict], key: str) -> Estimate | None:
    """Likelihood results of the seeds as one estimate: BPC, or log PPL with the same relative s.e."""
    if not liks:
        return None
    if key == "bpc":
        return stats.over_seeds([x["bpc"] for x in liks], [x["bpc_stderr"] for x in liks])
    values = [math.log(x["ppl"]) for x in liks]
    return stats.over_seeds(values, [x["bpc_stderr"] * v / x["bpc"] for x, v in zip(liks, values)])


def settings(row: dict) -> list[tuple[int, float]]:
    keys = []
    for g in (runs(row)[0]["generation"] if runs(row) else []):
        if (g["steps"], g["top_p"]) not in keys:
            keys.append((g["steps"], g["top_p"]))
    return keys


def generations(row: dict, steps: int, top_p: float) -> list[dict]:
    """The generation result of each seed at one setting."""
    return [g for r in runs(row) for g in r["generation"] if g["steps"] == steps and g["top_p"] == top_p]


def judged(gens: list[dict], judge: str, metric: str) -> Estimate | None:
    """bits_per_byte | gen_ppl under `judge`, bootstrapped over seeds and samples."""
    scores = [g["judges"][judge] for g in gens if judge in g.get("judges", {})]
    if not scores:
        return None
    if any(not s.get("per_text") for s in scores):  # an old record: the seeds' spread only
        return stats.over_seeds([s[metric] for s in scores])
    if metric == "bits_per_byte":
        pairs = [([n / LN2 for n in s["per_text"]["nll"]], s["per_text"]["bytes"]) for s in scores]
        return stats.ratio_bootstrap(pairs)
    pairs = [(s["per_text"]["nll"], s["per_text"]["tokens"]) for s in scores]
    return stats.ratio_bootstrap(pairs, transform=np.exp)


def per_sample_mean(gens: list[dict], key: str) -> Estimate | None:
    """A per-sample statistic (unigram_entropy, repetition, tokens) averaged over every sample."""
    if not gens:
        return None
    if any("per_sample" not in g for g in gens):
        return stats.over_seeds([g[{"tokens": "mean_tokens"}.get(key, key)] for g in gens])
    return stats.ratio_bootstrap([(g["per_sample"][key], [1.0] * len(g["per_sample"][key])) for g in gens])


def seed_mean(values: list[float]) -> Estimate | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return stats.over_seeds(values) if values else None


def conditional(row: dict, metric: str) -> Estimate | None:
    conds = [r["conditional"] for r in runs(row) if r.get("conditional")]
    if not conds:
        return None
    if metric == "mauve":
        return stats.mean_bootstrap([(c["mauve"], c.get("mauve_bootstrap") or []) for c in conds])
    if any("per_text" not in c for c in conds):
        return stats.over_seeds([c[metric] for c in conds])
    if metric == "bits_per_byte":
        return stats.ratio_bootstrap([([n / LN2 for n in c["per_text"]["nll"]], c["per_text"]["bytes"])
                                      for c in conds])
    return stats.ratio_bootstrap([(c["per_text"]["nll"], c["per_text"]["tokens"]) for c in conds],
                                 transform=np.exp)


def reference(results: dict, judge: str, metric: str) -> Estimate | None:
    """The judge's score of held-out text (the reference line), with its bootstrap error."""
    ref = (results.get("reference") or {}).get(judge)
    if not ref:
        return None
    if metric == "unigram_entropy":
        values = ref["per_sample"]["unigram_entropy"]
        return stats.ratio_bootstrap([(values, [1.0] * len(values))])
    per = ref["score"]["per_text"]
    if metric == "bits_per_byte":
        return stats.ratio_bootstrap([([n / LN2 for n in per["nll"]], per["bytes"])])
    return stats.ratio_bootstrap([(per["nll"], per["tokens"])], transform=np.exp)


def first_judge(results: dict) -> str | None:
    judges = results["evaluate"]["generation"]["judges"]
    return judges[0] if judges else None


# ---- the report -------------------------------------------------------------------------------
def write_report(results: dict, out: Path) -> Path:
    out = Path(out)
    plots = write_plots(results, out)
    lines = header(results) + likelihood_table(results) + zero_shot_table(results) + generation_tables(results)
    lines += conditional_table(results) + claims_section(results) + sample_section(results)
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def header(results: dict) -> list[str]:
    env, shared = results["environment"], results["rows"][0]["config"]
    data, model, train = shared["data"], shared["model"], shared["train"]
    scale = results.get("scale") or {}
    command = f"ddlm compare {results.get('recipe_path') or results['recipe']}"
    command += f" --scale {scale['name']}" if scale else ""
    if results.get("processes"):
        command = f"torchrun --nproc_per_node {results['processes']} -m {command}"
    prov = results.get("provenance") or {}
    if prov.get("commit"):
        source = f"ddlm commit {prov['commit'][:12]}, " + ("clean tree" if prov["clean"] else
                                                          f"**uncommitted changes** ({', '.join(prov['changed'][:5])})")
    else:
        source = "ddlm source not a git checkout (commit unknown)"
    seeds = results.get("seeds", 1)
    lines = [f"# ddlm compare: {results['recipe']}" + (f" ({scale['name']} scale)" if scale else ""), "",
             results.get("description") or "", "",
             f"Made with `{command}` ({source}; ddlm {env['ddlm']}, torch {env['torch']}, {env['cpu']}, "
             f"{env['threads']} thread{'s' * (env['threads'] != 1)}, {env['time']}).",
             *([f"At the {scale['name']} scale this run used {scale['tokenizer_note']}.", ""]
               if scale.get("tokenizer_note") else [""]),
             f"Every trained row is trained with {seeds} seed{'s' * (seeds != 1)} (train.seed + k); a figure "
             "is the mean over seeds ± its standard error: for likelihoods, the seeds' spread (sd / √N) "
             "combined with the evaluation's standard error (not divided by N: every seed is scored on the "
             "same test sequences); for generation metrics, a bootstrap over seeds and the samples within "
             f"them. A claim holds only beyond {stats.Z:g} standard errors of the difference."
             + (" With one seed the seeds' spread is not measured: the errors are the evaluation's alone."
                if seeds == 1 else ""), "",
             "## What every row shares, and what differs", "",
             f"- data: {data.get('corpus', 'austen')}, tokenizer {data.get('tokenizer', 'char')}, "
             f"sequence length {data.get('seq_len', '?')}",
             f"- backbone: d={model.get('dim', '?')}, {model.get('n_layers', '?')} layers, "
             f"{model.get('n_heads', '?')} heads (block: "
             f"{(results.get('base') or {}).get('model', {}).get('block', 'auto')}; auto is each method's "
             "default: gated for diffusion, plain for AR)",
             f"- budget: {train.get('steps', '?')} steps of batch {train.get('batch_size', '?')} "
             f"(lr {train.get('lr', '?')}); FLOPs per trained token differ by method (table below)"]
    for row in results["rows"]:
        differs = row["note"] or ("" if trained(row) else row["method"])
        steps = {(r.get("train") or {}).get("steps") for r in runs(row)} - {None}
        if trained(row) and steps and steps != {train.get("steps")}:
            differs = (differs + "; " if differs else "") + f"trained {', '.join(map(str, sorted(steps)))} steps"
        if differs:
            lines.append(f"- **{row['name']}**: {differs}")
    return lines + [""]


def likelihood_table(results: dict) -> list[str]:
    lines = ["## Likelihood", "",
             "| row | test BPC | seeds (sd) | eval s.e. | kind | PPL | train tok/s | FLOPs / trained token | last valid BPC |",
             "|---|---|---|---|---|---|---|---|---|"]
    protocols = {}
    for row in results["rows"]:
        lik = likelihood(row)
        first = (runs(row)[0].get("likelihood") or {}) if runs(row) else {}
        if lik is None:
            same = f"the bound of {row['trained_as']} (a sampler does not change it)" \
                if row["trained_as"] != row["name"] and " + sampler=" in row["method"] else "not evaluated"
            lines.append(f"| {row['name']} | — | | | {first.get('skipped', same)} | | | | |")
            continue
        liks = [r["likelihood"] for r in runs(row) if "bpc" in (r.get("likelihood") or {})]
        text = f"{first['split']} split, {first['sequences']} sequences; {first['protocol']}"
        if method_of(row) == "edlm":
            text += "; it bounds the likelihood of EDLM's importance sampler in the limit of infinitely many steps"
        protocols.setdefault(text, []).append(row["name"])
        if trained(row):
            trains = [r.get("train") or {} for r in runs(row)]
            speed = fmt(seed_mean([t.get("tokens_per_second") for t in trains]).mean if
                        seed_mean([t.get("tokens_per_second") for t in trains]) else None, 0)
            flops = seed_mean([t.get("flops_per_token") for t in trains])
            flops = f"{flops.mean / 1e6:,.2f} M" if flops else "—"
            valid = est(seed_mean([t.get("valid_bpc") for t in trains]))
        else:
            speed = flops = valid = f"— (samples {row['trained_as']})"
        spread = f"{lik.seeds}" + (f" ({fmt(lik.seed_sd)})" if lik.seed_sd is not None else "")
        lines.append(f"| {row['name']} | {est(lik)} | {spread} | {fmt(float(np.mean([x['bpc_stderr'] for x in liks])))} | "
                     f"{'exact' if first['exact'] else 'upper bound'} | "
                     f"{fmt(float(np.mean([x['ppl'] for x in liks])))} | {speed} | {flops} | {valid} |")
    lines.append("")
    lines += [f"- {', '.join(names)}: {text}." for text, names in protocols.items()]
    return lines + ["", "Train tok/s: median over logged steps, mean over seeds. FLOPs per trained token: "
                    "counted by torch's FlopCounterMode on one training step of the row's own loss "
                    "(forward and backward), so BD3's 2L pass and EDLM's proposals are in it.", ""]


def zero_shot_table(results: dict) -> list[str]:
    """PPL and BPC of every row on each zero-shot corpus, mean over seeds ± s.e. (as the likelihood
    table), and how each corpus was prepared."""
    corpora = [z["name"] for z in results["evaluate"].get("zero_shot") or []]
    if not corpora:
        return []
    lines = ["## Zero-shot likelihood", "",
             "Every row scored on corpora it was not trained on, prepared as the papers prepare them "
             "(detokenized, wrapped into windows of the context with their BOS/EOS rule; docs/zero-shot.md). "
             "PPL = exp(NLL per counted token); BPC per character of the detokenized text; mean over "
             "seeds ± s.e. (seeds' spread and the evaluation's error, as the likelihood table).", "",
             "| row | kind | " + " | ".join(f"{c} PPL | {c} BPC" for c in corpora) + " |",
             "|---|---|" + "---|---|" * len(corpora)]
    protocols: dict[str, str] = {}
    for row in results["rows"]:
        cells, kind = [], ""
        for corpus in corpora:
            found = [r["zero_shot"][corpus] for r in runs(row) if corpus in (r.get("zero_shot") or {})]
            first = found[0] if found else {}
            if "bpc" not in first:
                cells += [first.get("skipped", "—"), ""]
                continue
            kind = "exact" if first["exact"] else "upper bound"
            protocols.setdefault(corpus, f"{first['protocol']}; {first['zero_shot']['windows']} windows, "
                                         f"{first['tokens']:,} counted tokens")
            log_ppl = zero_shot(row, corpus, "nats_per_token")
            ppl = math.exp(log_ppl.mean)
            cells += [f"{fmt(ppl, 2)} ± {fmt(ppl * log_ppl.se, 2)}", est(zero_shot(row, corpus))]
        lines.append(f"| {row['name']} | {kind} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {corpus}: {text}." for corpus, text in protocols.items()]
    return lines + [""]


def _mark(gens: list[dict], judge: str) -> str:
    return "†" if any(judge in (g.get("self_judged") or []) for g in gens) else ""


def generation_tables(results: dict) -> list[str]:
    gen = results["evaluate"]["generation"]
    seeds = results.get("seeds", 1)
    lines = ["## Unconditional generation", "",
             f"{gen['num']} samples per setting and seed ({seeds} seed{'s' * (seeds != 1)}; sampling seed "
             f"{gen['seed']} + k); NFE per batch of {gen['batch_size']}; seconds per sample include every "
             "network call (mean over seeds). Bits per byte is the judge's NLL per UTF-8 byte of the text "
             "(it does not depend on the judge's tokeniser); gen PPL is token-weighted under the judge. "
             "± is a bootstrap standard error over seeds and samples.", ""]
    marked = False
    for judge in gen["judges"]:
        lines += [f"### Judge: {judge}", "",
                  "| row | T | top-p | NFE | s/sample | bits/byte | gen PPL | entropy | repetition | tokens kept |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        ref = [reference(results, judge, m) for m in ("bits_per_byte", "gen_ppl", "unigram_entropy")]
        if ref[0] is not None:
            lines.append(f"| held-out text | | | | | {est(ref[0])} | {est(ref[1], 2)} | {est(ref[2])} | | |")
        for row in results["rows"]:
            for steps, top_p in settings(row):
                gens = generations(row, steps, top_p)
                mark = _mark(gens, judge)
                marked |= bool(mark)
                seconds = seed_mean([g["seconds_per_sample"] for g in gens])
                lines.append(f"| {row['name']} | {steps if _class(row).has_steps else '—'} | {top_p:g} | "
                             f"{fmt(float(np.mean([g['nfe'] for g in gens])), 1)} | {fmt(seconds.mean if seconds else None)} | "
                             f"{est(judged(gens, judge, 'bits_per_byte'))}{mark} | {est(judged(gens, judge, 'gen_ppl'), 2)}{mark} | "
                             f"{est(per_sample_mean(gens, 'unigram_entropy'))} | "
                             f"{est(per_sample_mean(gens, 'repetition'))} | {fmt(per_sample_mean(gens, 'tokens').mean, 1)} |")
        lines.append("")
    if marked:
        lines += ["†: judged by a model the row's samples came from (its own run, or the energy it was "
                  "sampled with): not an independent judgement.", ""]
    skipped = {r["name"]: run["skipped"][0]["skipped"] for r in results["rows"] for run in runs(r)[:1]
               if run.get("skipped")}
    lines += [f"Not run for {name}: {reason}." for name, reason in skipped.items()]
    if any(method_of(r) == "bd3" for r in results["rows"]):
        lines += ["", "BD3 rows: T is the number of denoising steps inside each block (as in the public code), "
                      "so their NFE grows with the number of blocks; compare rows by NFE and seconds."]
    lines += ["", "AR draws one token per network call with a KV cache; it has no steps. Tokens kept: "
              "mean tokens per sample before its first EOS (what follows is another document and "
              "is not judged). Entropy: unigram entropy of each sample, in nats; repetition: share of "
              "a sample's 4-grams seen earlier in it.", ""]
    return lines


def conditional_table(results: dict) -> list[str]:
    rows = [r for r in results["rows"] if any(run.get("conditional") for run in runs(r))]
    if not rows:
        return []
    c = next(run["conditional"] for run in runs(rows[0]) if run.get("conditional"))
    lines = ["## Conditional generation", "",
             f"{c['prompts']} held-out test prompts of {c['prompt_tokens']} tokens per seed, each continued by "
             f"{c['length']} tokens at T={c['steps']}; MAUVE against the true continuations with "
             f"{c['judge']} features (± bootstrap over seeds and continuations); the judge's perplexity of "
             f"each continuation given its prompt. True continuations: gen PPL "
             f"{fmt(c['reference_gen_ppl'], 2)}, {fmt(c['reference_bits_per_byte'])} bits/byte.", "",
             "| row | MAUVE | gen PPL | bits/byte | NFE | s/sample |", "|---|---|---|---|---|---|"]
    for row in rows:
        conds = [run["conditional"] for run in runs(row) if run.get("conditional")]
        mark = "†" if any(x.get("self_judged") for x in conds) else ""
        seconds = seed_mean([x["seconds_per_sample"] for x in conds])
        lines.append(f"| {row['name']} | {est(conditional(row, 'mauve'))}{mark} | "
                     f"{est(conditional(row, 'gen_ppl'), 2)}{mark} | {est(conditional(row, 'bits_per_byte'))}{mark} | "
                     f"{fmt(float(np.mean([x['nfe'] for x in conds])), 1)} | {fmt(seconds.mean if seconds else None)} |")
    return lines + [""]


# ---- claims -----------------------------------------------------------------------------------
@dataclass
class Claim:
    claim: str  # what is claimed, and by whom
    lines: list[str]  # the tests, each with its figures and verdict


def claims_section(results: dict) -> list[str]:
    found = [c for c in (likelihood_order(results), parity(results), steps_claims(results),
                         sedd_beats_ar(results), mauve_claim(results), edlm_claims(results),
                         speed_claim(results)) if c is not None and c.lines]
    lines = ["## The claims, tested", "",
             "Each claim of the papers (or of this recipe's description) with the rows that test it: "
             f"**holds** when the difference is beyond {stats.Z:g} standard errors in the claimed "
             f"direction, **does NOT hold** beyond {stats.Z:g} the other way, otherwise not resolved at "
             "this budget.", ""]
    for c in found:
        lines += [f"### {c.claim}", ""] + [f"- {line}" for line in c.lines] + [""]
    return lines


def _row_groups(results: dict) -> dict[float, list[dict]]:
    """Rows with a likelihood, grouped by the papers' likelihood rank of their method."""
    groups: dict[float, list[dict]] = {}
    for row in results["rows"]:
        rank = _class(row).likelihood_rank(options_of(row))
        if rank is not None and likelihood(row) is not None:
            groups.setdefault(rank, []).append(row)
    return dict(sorted(groups.items()))


def likelihood_order(results: dict) -> Claim:
    groups = list(_row_groups(results).values())
    lines = []
    for worse in groups[1:]:
        better = groups[groups.index(worse) - 1]
        a, b = better[0], worse[0]
        source = _class(a).likelihood_source
        lines.append(f"BPC {a['name']} < {b['name']} ({source}): {est(likelihood(a))} vs {est(likelihood(b))}; "
                     f"{stats.less(likelihood(a), likelihood(b)).text()}")
    unranked = [r["name"] for r in results["rows"] if likelihood(r) is not None
                and _class(r).likelihood_rank(options_of(r)) is None]
    if unranked:
        lines.append(f"not ordered by the papers here: {', '.join(unranked)} (their methods declare no likelihood rank)")
    return Claim("The papers' likelihood ordering (AR < BD3-LM by L' < MDLM < SEDD absorbing < SEDD uniform)", lines)


def parity(results: dict) -> Claim:
    """SEDD's likelihood parity with AR: the test PPLs within PARITY of each other (TOST in log PPL)."""
    ar = next((r for r in results["rows"] if is_ar(r) and likelihood(r) is not None), None)
    lines = []
    for row in results["rows"]:
        if ar is None or variant(row) != "sedd-absorbing" or likelihood(row) is None:
            continue
        a, b = likelihood(row, "nats_per_token"), likelihood(ar, "nats_per_token")
        verdict = stats.equivalent(a, b, math.log(PARITY))
        lines.append(f"{row['name']} vs {ar['name']}: test PPL {math.exp(a.mean):.3f} vs {math.exp(b.mean):.3f}, "
                     f"log PPL {verdict.text()}")
    return Claim(f"SEDD's likelihood parity with AR (SEDD §5; parity taken as test PPL within "
                 f"{(PARITY - 1) * 100:.0f}%)", lines)


def _series(row: dict, judge: str, metric: str, top_p: float = 1.0) -> list[tuple[int, Estimate]]:
    out = []
    for steps, p in settings(row):
        if p == top_p:
            gens = generations(row, steps, p)
            e = per_sample_mean(gens, metric) if metric == "unigram_entropy" else judged(gens, judge, metric)
            if e is not None:
                out.append((steps, e))
    return sorted(out, key=lambda x: x[0])


def steps_claims(results: dict) -> Claim:
    judge = first_judge(results)
    lines = []
    for row in results["rows"]:
        if not _class(row).has_steps or not judge:
            continue
        quality, entropy = _series(row, judge, "bits_per_byte"), _series(row, judge, "unigram_entropy")
        if len(quality) < 2:
            continue
        (s0, q0), (s1, q1) = quality[0], quality[-1]
        (_, e0), (_, e1) = entropy[0], entropy[-1]
        lines.append(f"{row['name']}, T {s0}→{s1}: {judge} bits/byte {est(q0)} → {est(q1)}, "
                     f"falls: {stats.less(q1, q0).text()}; entropy {est(e0)} → {est(e1)}, "
                     f"falls (less diverse): {stats.less(e1, e0).text()}")
    return Claim("More steps: better samples (lower bits/byte) that are less diverse (lower entropy) "
                 "(SEDD §5.2; MDLM, EDLM Table 3)", lines)


def _ar_quality(results: dict, judge: str) -> tuple[dict, Estimate, list[dict]] | None:
    ar = next((r for r in results["rows"] if is_ar(r) and settings(r)), None)
    if ar is None:
        return None
    gens = generations(ar, *next(k for k in settings(ar) if k[1] == 1.0))
    quality = judged(gens, judge, "bits_per_byte")
    return (ar, quality, gens) if quality is not None else None


def sedd_beats_ar(results: dict) -> Claim:
    judge = first_judge(results)
    found = _ar_quality(results, judge) if judge else None
    lines = []
    for row in results["rows"]:
        if found is None or not variant(row).startswith("sedd"):
            continue
        ar, ar_q, _ = found
        series = dict(_series(row, judge, "bits_per_byte"))
        if 32 not in series:
            lines.append(f"{row['name']}: not sampled at T=32")
            continue
        lines.append(f"{row['name']} T=32 vs {ar['name']} (no nucleus, {judge} bits/byte): {est(series[32])} vs "
                     f"{est(ar_q)}; {stats.less(series[32], ar_q).text()}")
    return Claim("SEDD at 32 steps beats AR samples without annealing (SEDD §5.2, Fig. 2)", lines)


def mauve_claim(results: dict) -> Claim:
    ar = next((r for r in results["rows"] if is_ar(r) and conditional(r, "mauve") is not None), None)
    lines = []
    for row in results["rows"]:
        if ar is None or is_ar(row) or conditional(row, "mauve") is None:
            continue
        a, b = conditional(row, "mauve"), conditional(ar, "mauve")
        lines.append(f"{row['name']} vs {ar['name']}: MAUVE {est(a)} vs {est(b)}; {stats.less(a, b).text()}")
    return Claim("Diffusion LMs give weaker MAUVE than AR from short prompts (SEDD §5.3)", lines)


def edlm_claims(results: dict) -> Claim:
    """EDLM below MDLM (judge bits/byte) at equal steps, at equal NFE and at equal seconds: MDLM's
    curve is read at EDLM's cost between its measured points (log scale)."""
    judge = first_judge(results)
    mdlm = next((r for r in results["rows"] if variant(r) == "mdlm" and settings(r)), None)
    lines = []
    if not judge or mdlm is None:
        return Claim("", [])
    for row in results["rows"]:
        if method_of(row) != "edlm":
            continue
        for steps, e in _series(row, judge, "bits_per_byte"):
            gens = generations(row, steps, 1.0)
            base = dict(_series(mdlm, judge, "bits_per_byte"))
            parts = [f"T={steps}:"]
            if steps in base:
                parts.append(f"equal steps {est(e)} vs {est(base[steps])} ({stats.less(e, base[steps]).label})")
            for key, name in (("nfe", "NFE"), ("seconds_per_sample", "seconds")):
                cost = float(np.mean([g[key] for g in gens]))
                curve = [(float(np.mean([g[key] for g in generations(mdlm, s, 1.0)])), q)
                         for s, q in _series(mdlm, judge, "bits_per_byte")]
                at = stats.at_cost(curve, cost)
                parts.append(f"equal {name} ({fmt(cost, 2)}) vs {est(at)} ({stats.less(e, at).label})" if at
                             else f"equal {name} ({fmt(cost, 2)}): outside MDLM's measured range")
            lines.append(f"{row['name']} " + " ".join(parts[:1]) + " " + "; ".join(parts[1:]))
    return Claim("EDLM's samples beat MDLM's at equal steps, equal NFE and equal seconds "
                 f"({judge} bits/byte, no nucleus; EDLM §5, Table 3)", lines)


def speed_claim(results: dict) -> Claim:
    """AR with a KV cache against each diffusion row's fastest setting that AR's quality does not
    beat (judge bits/byte not worse by 2 s.e.)."""
    judge = first_judge(results)
    found = _ar_quality(results, judge) if judge else None
    lines = []
    if found is None:
        return Claim("", [])
    ar, ar_q, ar_gens = found
    ar_s = seed_mean([g["seconds_per_sample"] for g in ar_gens])
    for row in results["rows"]:
        if is_ar(row) or not settings(row):
            continue
        reach = []
        for steps, top_p in settings(row):
            gens = generations(row, steps, top_p)
            q = judged(gens, judge, "bits_per_byte")
            if q is not None and stats.less(ar_q, q).label != stats.HOLDS:
                reach.append((seed_mean([g["seconds_per_sample"] for g in gens]), steps, top_p, q))
        if not reach:
            best = min((judged(generations(row, s, p), judge, "bits_per_byte") for s, p in settings(row)),
                       key=lambda e: e.mean)
            lines.append(f"{row['name']}: no setting reaches AR's {est(ar_q)} bits/byte (best {est(best)}): "
                         f"AR is better at every cost measured")
            continue
        sec, steps, top_p, q = min(reach, key=lambda r: r[0].mean)
        lines.append(f"{row['name']} reaches AR's quality at T={steps}, top-p {top_p:g} ({est(q)}) in "
                     f"{est(sec)} s/sample vs AR's {est(ar_s)}: AR faster {stats.less(ar_s, sec).text()}")
    return Claim(f"AR with a KV cache is faster at equal quality ({ar['name']}: {est(ar_s)} s/sample at "
                 f"{est(ar_q)} {judge} bits/byte)", lines)


def sample_section(results: dict) -> list[str]:
    lines = ["## Samples (seed 0, largest T, no nucleus, first sample)", ""]
    for row in results["rows"]:
        keys = [k for k in settings(row) if k[1] == 1.0] or settings(row)
        if not keys or not runs(row):
            continue
        gens = [g for g in runs(row)[0]["generation"] if (g["steps"], g["top_p"]) == keys[-1]]
        if gens and gens[0]["samples"]:
            text = gens[0]["samples"][0].replace("\n", " ").replace("|", "/")
            at = f" (T={keys[-1][0]})" if _class(row).has_steps else ""
            lines.append(f"- **{row['name']}**{at}: {text[:300]}")
    return lines + [""]


# ---- plots ------------------------------------------------------------------------------------
def write_plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    rows = [r for r in results["rows"] if likelihood(r) is not None]
    if rows:
        paths.append(_likelihood_plot(results, rows, out / "bpc.png", plt))
    judge = first_judge(results)
    if judge:
        for key, xlabel, name in (("nfe", "NFE per batch (log)", "quality_vs_nfe"),
                                  ("seconds_per_sample", "seconds per sample (log)", "quality_vs_seconds")):
            paths.append(_quality_plot(results, judge, key, xlabel, out / f"{name}.png", plt))
        paths.append(_entropy_plot(results, judge, out / "entropy_vs_steps.png", plt))
    from ddlm.errors import DataError
    from ddlm.eval.plots import plot_validation_curves, validation_curve

    curves = {}
    for row in results["rows"]:
        run_dir = Path(out) / "runs" / row["name"]
        try:
            validation_curve(run_dir)
        except DataError:  # not trained here, or validated by its loss (no BPC)
            continue
        curves[row["name"]] = run_dir
    if curves:
        paths.append(plot_validation_curves(curves, out / "validation.png",
                                            title=f"{results['recipe']}: validation during training (seed 0)"))
    return paths


def _likelihood_plot(results, rows, path, plt):
    """One dot per row (mean over seeds) with a ±2 s.e. bar, and each seed as a small mark; no
    bars on a truncated axis."""
    fig, ax = plt.subplots(figsize=(7.0, 0.45 * len(rows) + 1.4), dpi=120)
    for i, row in enumerate(rows):
        e = likelihood(row)
        exact = runs(row)[0]["likelihood"]["exact"]
        color = "tab:blue" if exact else "tab:orange"
        ax.errorbar(e.mean, i, xerr=stats.Z * e.se, fmt="o", color=color, capsize=3)
        ax.plot(e.values, [i] * len(e.values), "|", color=color, markersize=9, alpha=0.6)
    ax.set_yticks(range(len(rows)), [r["name"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"test BPC (dot: mean over seeds, bar: ±{stats.Z:g} s.e., ticks: seeds; "
                  "blue exact, orange upper bound)", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"{results['recipe']}: likelihood (lower is better)", fontsize=10)
    return _save(fig, path, plt)


def row_colour(i: int, rows: int):
    """A distinct colour per row: matplotlib's 10-colour cycle, or 20 colours past 10 rows."""
    import matplotlib

    if rows <= 10:
        return f"C{i}"
    return matplotlib.colormaps["tab20"](i % 20)


def _quality_plot(results, judge, key, xlabel, path, plt):
    """Bits per byte under `judge` against cost with ±2 s.e. bars; dashed: top-p; grey: held-out text."""
    fig, ax = plt.subplots(figsize=(9.0, 4.4), dpi=120)
    for i, row in enumerate(results["rows"]):
        for nucleus, style in ((False, "-"), (True, "--")):
            pts = []
            for steps, top_p in settings(row):
                if (top_p < 1.0) != nucleus:
                    continue
                gens = generations(row, steps, top_p)
                e = judged(gens, judge, "bits_per_byte")
                if e is not None:
                    pts.append((float(np.mean([g[key] for g in gens])), e))
            if pts:
                pts.sort(key=lambda p: p[0])
                ax.errorbar([p[0] for p in pts], [p[1].mean for p in pts],
                            yerr=[stats.Z * p[1].se for p in pts], fmt=style, marker="o", markersize=3,
                            capsize=2, color=row_colour(i, len(results["rows"])),
                            label=row["name"] + (" (top-p)" if nucleus else ""))
    ref = reference(results, judge, "bits_per_byte")
    if ref is not None:
        ax.axhline(ref.mean, color="grey", linestyle=":", label="held-out text")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{judge} bits per byte of the text")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(f"{results['recipe']}: quality against cost (lower is better; bars ±{stats.Z:g} s.e.)",
                 fontsize=10)
    return _save(fig, path, plt)


def _entropy_plot(results, judge, path, plt):
    fig, ax = plt.subplots(figsize=(8.0, 4.0), dpi=120)
    for i, row in enumerate(results["rows"]):
        pts = _series(row, judge, "unigram_entropy")
        if pts and _class(row).has_steps:
            ax.errorbar([p[0] for p in pts], [p[1].mean for p in pts], yerr=[stats.Z * p[1].se for p in pts],
                        marker="o", markersize=3, capsize=2, color=row_colour(i, len(results["rows"])), label=row["name"])
        elif pts:
            ax.axhline(pts[0][1].mean, color=row_colour(i, len(results["rows"])), linestyle="-.",
                       label=f"{row['name']} (no steps)")
    ref = reference(results, judge, "unigram_entropy")
    if ref is not None:
        ax.axhline(ref.mean, color="grey", linestyle=":", label="held-out text")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("denoising steps T (log)")
    ax.set_ylabel("unigram entropy per sample (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(f"{results['recipe']}: diversity against steps (no nucleus; bars ±{stats.Z:g} s.e.)", fontsize=10)
    return _save(fig, path, plt)


def _save(fig, path: Path, plt) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
