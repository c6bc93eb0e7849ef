"""report.md and plots from a comparison's results.json (ddlm/compare/runner.py).

The report states what was measured and checks it against the papers' orderings without forcing
them: every check prints the figures it compared and says "holds" or "does NOT hold".
"""
from __future__ import annotations

import math
from pathlib import Path


def fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, float):
        return f"{x:,.{digits}f}" if abs(x) < 1e4 else f"{x:,.0f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def kind(row: dict) -> str:
    """ar | bd3-<L'> | mdlm | sedd-absorbing | sedd-uniform | edlm: what the orderings talk about."""
    cfg = row["config"]
    method = cfg["method"]
    if row["method"].startswith("mdlm +") or method == "edlm" or row["method"].startswith("edlm"):
        return "edlm"
    if method == "bd3":
        return f"bd3-{cfg['bd3']['block_size']}"
    if method == "sedd":
        return f"sedd-{cfg['sedd']['graph']}"
    return method


def first_judge(results: dict) -> str | None:
    judges = results["evaluate"]["generation"]["judges"]
    return judges[0] if judges else None


def bpc(row: dict) -> float | None:
    lik = row.get("likelihood") or {}
    return lik.get("bpc")


def write_report(results: dict, out: Path) -> Path:
    out = Path(out)
    plots = write_plots(results, out)
    lines = header(results) + likelihood_table(results) + generation_tables(results)
    lines += conditional_table(results) + checks(results) + sample_section(results)
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
    lines = [f"# ddlm compare: {results['recipe']}" + (f" ({scale['name']} scale)" if scale else ""), "",
             results.get("description") or "", "",
             f"Made with `{command}` "
             f"(ddlm {env['ddlm']}, torch {env['torch']}, {env['cpu']}, {env['threads']} threads, {env['time']}).",
             *([f"At the {scale['name']} scale this run used {scale['tokenizer_note']}.", ""]
               if scale.get("tokenizer_note") else [""]),
             "## What every row shares, and what differs", "",
             f"- data: {data.get('corpus', 'austen')}, tokenizer {data.get('tokenizer', 'char')}, "
             f"sequence length {data.get('seq_len', '?')}",
             f"- backbone: d={model.get('dim', '?')}, {model.get('n_layers', '?')} layers, "
             f"{model.get('n_heads', '?')} heads (the method's default block: gated for diffusion)",
             f"- budget: {train.get('steps', '?')} steps of batch {train.get('batch_size', '?')} "
             f"(lr {train.get('lr', '?')})"]
    for row in results["rows"]:
        differs = row["note"] or ("" if row["method"] == row["config"]["method"] else row["method"])
        if row["train"] and row["train"].get("steps") != train.get("steps") and row["method"] == row["config"]["method"]:
            differs = (differs + "; " if differs else "") + f"trained {row['train']['steps']} steps"
        if differs:
            lines.append(f"- **{row['name']}**: {differs}")
    return lines + [""]


def likelihood_table(results: dict) -> list[str]:
    lines = ["## Likelihood", "", "| row | BPC | ± s.e. | kind | PPL | tokens | train tok/s | last valid BPC |",
             "|---|---|---|---|---|---|---|---|"]
    protocols = {}
    for row in results["rows"]:
        lik, train = row.get("likelihood") or {}, row.get("train") or {}
        if "bpc" not in lik:
            lines.append(f"| {row['name']} | — | | {lik.get('skipped', 'not evaluated')} | | | | |")
            continue
        protocols.setdefault(f"{lik['split']} split, {lik['sequences']} sequences; {lik['protocol']}", []).append(row["name"])
        lines.append(f"| {row['name']} | {fmt(lik['bpc'])} | {fmt(lik['bpc_stderr'])} | "
                     f"{'exact' if lik['exact'] else 'upper bound'} | {fmt(lik['ppl'])} | "
                     f"{fmt(lik['tokens'])} | {fmt(train.get('tokens_per_second'), 0)} | "
                     f"{fmt(train.get('valid_bpc'))} |")
    lines.append("")
    lines += [f"- {', '.join(names)}: {text}." for text, names in protocols.items()]
    return lines + ["", "Train tok/s is the median over logged steps of the run the row samples from.", ""]


def generation_tables(results: dict) -> list[str]:
    gen = results["evaluate"]["generation"]
    lines = ["## Unconditional generation", "",
             f"{gen['num']} samples per setting, seed {gen['seed']}; NFE per batch of "
             f"{gen['batch_size']}; seconds per sample include every network call. Gen PPL is "
             "token-weighted over all samples under the judge (re-tokenised); bits per byte is the "
             "judge's NLL per UTF-8 byte of the text and does not depend on its tokeniser.", ""]
    for judge in gen["judges"]:
        lines += [f"### Judge: {judge}", "",
                  "| row | T | top-p | NFE | s/sample | tok/s | gen PPL | bits/byte | entropy | distinct-4 | repetition | tokens kept |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in results["rows"]:
            for g in row["generation"]:
                j = g["judges"][judge]
                steps = "—" if kind(row) == "ar" else g["steps"]
                lines.append(f"| {row['name']} | {steps} | {g['top_p']:g} | {fmt(g['nfe'], 1)} | "
                             f"{fmt(g['seconds_per_sample'])} | {fmt(g['tokens_per_second'], 0)} | "
                             f"{fmt(j['gen_ppl'], 2)} | {fmt(j['bits_per_byte'])} | "
                             f"{fmt(g['unigram_entropy'])} | {fmt(g['distinct']['4'] if '4' in g['distinct'] else g['distinct'].get(4))} | "
                             f"{fmt(g['repetition'])} | {fmt(g.get('mean_tokens'), 1)} |")
        lines.append("")
    skipped = {r["name"]: r["skipped"][0]["skipped"] for r in results["rows"] if r.get("skipped")}
    lines += [f"Not run for {name}: {reason}." for name, reason in skipped.items()]
    if any(kind(r).startswith("bd3") for r in results["rows"]):
        lines += ["", "BD3 rows: T is the number of denoising steps inside each block (as in the public code), "
                      "so their NFE grows with the number of blocks; compare rows by NFE and seconds."]
    lines += ["", "AR draws one token per network call with a KV cache; it has no steps. Tokens kept: "
              "mean tokens per sample before its first EOS (what follows is another document and "
              "is not judged). Entropy is per sample, in nats.", ""]
    return lines


def conditional_table(results: dict) -> list[str]:
    rows = [r for r in results["rows"] if r.get("conditional")]
    if not rows:
        return []
    c = rows[0]["conditional"]
    lines = ["## Conditional generation", "",
             f"{c['prompts']} held-out test prompts of {c['prompt_tokens']} tokens, each continued by "
             f"{c['length']} tokens at T={c['steps']}; MAUVE against the true continuations with "
             f"{c['judge']} features; the judge's perplexity of each continuation given its prompt. "
             f"True continuations: gen PPL {fmt(c['reference_gen_ppl'], 2)}, "
             f"{fmt(c['reference_bits_per_byte'])} bits/byte.", "",
             "| row | MAUVE | gen PPL | bits/byte | NFE | s/sample |", "|---|---|---|---|---|---|"]
    for row in rows:
        c = row["conditional"]
        lines.append(f"| {row['name']} | {fmt(c['mauve'])} | {fmt(c['gen_ppl'], 2)} | "
                     f"{fmt(c['bits_per_byte'])} | {fmt(c['nfe'], 1)} | {fmt(c['seconds_per_sample'])} |")
    return lines + [""]


def _verdict(ok: bool) -> str:
    return "holds" if ok else "**does NOT hold**"


def checks(results: dict) -> list[str]:
    """The papers' orderings, each checked against the measured figures."""
    lines = ["## Against the papers' orderings", ""]
    by_kind = {}
    for row in results["rows"]:
        by_kind.setdefault(kind(row), row)
    order = ["ar"] + sorted((k for k in by_kind if k.startswith("bd3-")), key=lambda k: int(k[4:]))
    order += ["mdlm", "sedd-absorbing", "sedd-uniform"]
    measured = [(k, bpc(by_kind[k])) for k in order if k in by_kind and bpc(by_kind[k]) is not None]
    for (a, x), (b, y) in zip(measured, measured[1:]):
        if {a, b} == {"mdlm", "sedd-absorbing"}:
            se = max((by_kind[k]["likelihood"]["bpc_stderr"] for k in (a, b)), default=0)
            lines.append(f"- BPC {a} ≈ {b} (within 5% or 3 s.e.): {fmt(x)} vs {fmt(y)} (difference "
                         f"{fmt(abs(x - y))}, s.e. {fmt(se)}): {_verdict(abs(x - y) <= max(0.05 * y, 3 * se))}")
        else:
            lines.append(f"- BPC {a} < {b}: {fmt(x)} vs {fmt(y)}: {_verdict(x < y)}")
    judge = first_judge(results)
    if judge:
        lines += trend_checks(results, judge) + edlm_check(results, by_kind, judge)
        lines += speed_check(results, by_kind, judge)
    return lines + [""]


def _series(row: dict, judge: str, top_p: float = 1.0) -> list[tuple[int, float, float]]:
    """(steps, bits/byte, entropy) of a row's unconditional settings at one top-p, by steps."""
    pts = [(g["steps"], g["judges"][judge]["bits_per_byte"], g["unigram_entropy"])
           for g in row["generation"] if g["top_p"] == top_p]
    return sorted(pts)


def trend_checks(results: dict, judge: str) -> list[str]:
    lines = []
    for row in results["rows"]:
        if kind(row) == "ar":
            continue
        pts = _series(row, judge)
        if len(pts) < 2:
            continue
        (s0, q0, e0), (s1, q1, e1) = pts[0], pts[-1]
        lines.append(f"- {row['name']}: judge bits/byte falls with steps ({s0}→{s1}: {fmt(q0)}→{fmt(q1)}): "
                     f"{_verdict(q1 < q0)}; unigram entropy falls too ({fmt(e0)}→{fmt(e1)}): {_verdict(e1 < e0)}")
    return lines


def edlm_check(results: dict, by_kind: dict, judge: str) -> list[str]:
    lines = []
    mdlm = by_kind.get("mdlm")
    for row in results["rows"]:
        if kind(row) != "edlm" or mdlm is None:
            continue
        base = {s: q for s, q, _ in _series(mdlm, judge)}
        pairs = [(s, base[s], q) for s, q, _ in _series(row, judge) if s in base]
        if pairs:
            text = ", ".join(f"T={s}: {fmt(q)} vs {fmt(b)}" for s, b, q in pairs)
            lines.append(f"- {row['name']} below MDLM at equal steps (bits/byte, {text}): "
                         f"{_verdict(all(q < b for _, b, q in pairs))}")
    return lines


def speed_check(results: dict, by_kind: dict, judge: str) -> list[str]:
    """AR (KV cache) per sample against each diffusion sampler's fastest setting that reaches AR's
    quality (judge bits/byte at most AR's)."""
    ar = by_kind.get("ar")
    if ar is None or not ar["generation"]:
        return []
    ar_gen = min(ar["generation"], key=lambda g: g["seconds_per_sample"])
    ar_q, ar_s = ar_gen["judges"][judge]["bits_per_byte"], ar_gen["seconds_per_sample"]
    lines = [f"- AR with KV cache: {fmt(ar_s)} s/sample at {fmt(ar_q)} bits/byte."]
    for row in results["rows"]:
        if kind(row) == "ar" or not row["generation"]:
            continue
        good = [g for g in row["generation"] if g["judges"][judge]["bits_per_byte"] <= ar_q]
        if good:
            g = min(good, key=lambda g: g["seconds_per_sample"])
            lines.append(f"  - {row['name']} reaches it at T={g['steps']} in {fmt(g['seconds_per_sample'])} "
                         f"s/sample: AR faster {_verdict(ar_s < g['seconds_per_sample'])}")
        else:
            best = min(g["judges"][judge]["bits_per_byte"] for g in row["generation"])
            lines.append(f"  - {row['name']} never reaches AR's quality (best {fmt(best)} bits/byte): "
                         f"AR faster at equal quality holds")
    return lines


def sample_section(results: dict) -> list[str]:
    lines = ["## Samples (largest T, no nucleus, first sample)", ""]
    for row in results["rows"]:
        gens = [g for g in row["generation"] if g["top_p"] == 1.0] or row["generation"]
        if gens and gens[-1]["samples"]:
            text = gens[-1]["samples"][0].replace("\n", " ").replace("|", "/")
            at = "" if kind(row) == "ar" else f" (T={gens[-1]['steps']})"
            lines.append(f"- **{row['name']}**{at}: {text[:300]}")
    return lines + [""]


# ---- plots ------------------------------------------------------------------------------------
def write_plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    rows = [r for r in results["rows"] if bpc(r) is not None]
    if rows:
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
        values = [bpc(r) for r in rows]
        errs = [r["likelihood"]["bpc_stderr"] for r in rows]
        colors = ["tab:blue" if r["likelihood"]["exact"] else "tab:orange" for r in rows]
        ax.bar([r["name"] for r in rows], values, yerr=errs, color=colors, capsize=3)
        ax.set_ylabel(f"{rows[0]['likelihood']['split']} BPC (orange: upper bound)")
        ax.set_ylim(min(values) * 0.9, max(values) * 1.05)
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"{results['recipe']}: likelihood", fontsize=10)
        paths.append(_save(fig, out / "bpc.png", plt))
    judge = first_judge(results)
    if judge:
        for key, xlabel, name in (("nfe", "NFE per batch (log)", "genppl_vs_nfe"),
                                  ("seconds_per_sample", "seconds per sample (log)", "genppl_vs_seconds")):
            paths.append(_quality_plot(results, judge, key, xlabel, out / f"{name}.png", plt))
        paths.append(_entropy_plot(results, out / "entropy_vs_steps.png", plt))
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
                                            title=f"{results['recipe']}: validation during training"))
    return paths


def _quality_plot(results, judge, key, xlabel, path, plt):
    """Gen PPL (left) and bits per byte (right) under `judge` against cost; dashed: top-p."""
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.0), dpi=120)
    for metric, ax in zip(("gen_ppl", "bits_per_byte"), axes):
        for i, row in enumerate(results["rows"]):
            for nucleus, style in ((False, "-"), (True, "--")):
                pts = sorted((g[key], g["judges"][judge][metric]) for g in row["generation"]
                             if (g["top_p"] < 1.0) == nucleus)
                if pts:
                    label = row["name"] + (" (top-p)" if nucleus else "")
                    ax.plot(*zip(*pts), style, marker="o", markersize=3, color=f"C{i % 10}", label=label)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_yscale("log")
    axes[0].set_ylabel(f"gen PPL under {judge} (log)")
    axes[1].set_ylabel(f"{judge} bits per byte of the text")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{results['recipe']}: quality against cost (lower is better)", fontsize=10)
    return _save(fig, path, plt)


def _entropy_plot(results, path, plt):
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for i, row in enumerate(results["rows"]):
        pts = sorted((g["steps"], g["unigram_entropy"]) for g in row["generation"] if g["top_p"] == 1.0)
        if pts and kind(row) != "ar":
            ax.plot(*zip(*pts), marker="o", markersize=3, color=f"C{i % 10}", label=row["name"])
        elif pts:
            ax.axhline(pts[0][1], color=f"C{i % 10}", linestyle=":", label=f"{row['name']} (no steps)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("denoising steps T (log)")
    ax.set_ylabel("unigram entropy per sample (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"{results['recipe']}: diversity against steps", fontsize=10)
    return _save(fig, path, plt)


def _save(fig, path: Path, plt) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
