"""`ddlm compare RECIPE`: train every row on the same data, backbone and budget, evaluate them
identically, write results and a report.

    OUT/runs/<row>/            each trained row's run directory (resumed; finished runs reused)
    OUT/stages/<stage>.json    each evaluation's result, keyed by a hash of everything it depends
                               on: an interrupted compare redoes only what is missing
    OUT/results.jsonl          one record per evaluation, with the full config, seed and versions
    OUT/results.json           all rows together; OUT/report.md and OUT/*.png from it
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ddlm.compare.recipe import Recipe, Row, read_recipe
from ddlm.config import make_config
from ddlm.errors import ConfigError
from ddlm.eval.records import append_jsonl, environment
from ddlm.progress import progress_bar


@dataclass
class Stage:
    kind: str  # train | likelihood | generation | conditional
    row: Row
    spec: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        detail = "".join(f" {k}={v}" for k, v in self.spec.items() if k in ("steps", "top_p"))
        return f"{self.kind} {self.row.name}{detail}"


class Comparison:
    def __init__(self, recipe: Recipe, out: str | Path, *, quiet: bool = False) -> None:
        self.recipe, self.out, self.quiet = recipe, Path(out), quiet
        self.runs = self.out / "runs"
        self.stage_dir = self.out / "stages"
        self._loaded: dict[str, object] = {}
        self._judges: dict[str, object] = {}
        self._references: dict[str, dict] = {}

    # ---- the plan ---------------------------------------------------------------------------
    def plan(self) -> list[Stage]:
        recipe = self.recipe
        trained = [r for r in recipe.rows if r.method]
        trained.sort(key=lambda r: bool(r.init))  # a row started from another comes after it
        stages = [Stage("train", r) for r in trained]
        for row in recipe.rows:
            stages.append(Stage("likelihood", row, {**dataclasses.asdict(recipe.likelihood), **row.eval}))
            gen = recipe.generation
            steps_list = gen.steps if self.source(row).method != "ar" else gen.steps[:1]  # AR has no steps
            for steps in steps_list:
                for top_p in gen.top_p:
                    stages.append(Stage("generation", row, {**dataclasses.asdict(gen), "steps": int(steps),
                                                            "top_p": float(top_p)}))
            if recipe.conditional.prompts:
                stages.append(Stage("conditional", row, dataclasses.asdict(recipe.conditional)))
        return stages

    def run_config(self, row: Row):
        """The run config a trained row trains with: the shared base, its method and options."""
        base = json.loads(json.dumps(self.recipe.base))
        base["method"] = row.method
        base[row.method] = {**base.get(row.method, {}), **self.resolve(row.options)}
        base["train"] = {**base.get("train", {}), **row.train}
        if row.init:
            from ddlm.build import init_base

            inherited = init_base(self.runs / row.init, row.method)
            base[row.method] = {**inherited.get(row.method, {}), **base[row.method]}
            base["train"]["init"] = str(self.runs / row.init)
        base["train"].setdefault("progress", not self.quiet)
        return make_config(base=base)

    def resolve(self, options: dict) -> dict:
        """'@name' -> that row's run directory, in option values."""
        out = {}
        for key, value in options.items():
            if isinstance(value, str) and "@" in value:
                head, _, name = value.rpartition("@")
                self.recipe.row(name)
                value = f"{head}{self.runs / name}"
            out[key] = value
        return out

    def source(self, row: Row) -> Row:
        return self.recipe.row(row.sample_of) if row.sample_of else row

    def fingerprint(self, stage: Stage) -> str:
        """A hash of what the stage's result depends on: the run's config, the options, the spec."""
        src = self.source(stage.row)
        payload = {"kind": stage.kind, "run": self.run_config(src).to_dict(), "spec": stage.spec,
                   "sample_options": self.resolve(stage.row.sample_options)}
        if stage.kind in ("generation", "conditional"):
            payload["judges"] = {j: self.judge_identity(j) for j in self.judge_names(stage)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def judge_names(self, stage: Stage) -> list[str]:
        return stage.spec["judges"] if stage.kind == "generation" else [stage.spec["judge"]]

    def judge_identity(self, name: str):
        from ddlm.eval.judges import PROTOCOL

        if name in [r.name for r in self.recipe.rows]:
            return {"run": self.run_config(self.recipe.row(name)).to_dict(), "protocol": PROTOCOL}
        return {"spec": name, "protocol": PROTOCOL}

    # ---- running ----------------------------------------------------------------------------
    def run(self) -> dict:
        stages = self.plan()
        self.out.mkdir(parents=True, exist_ok=True)
        results: dict[str, dict] = {r.name: {"generation": []} for r in self.recipe.rows}
        bar = progress_bar(total=len(stages), desc="compare", disable=self.quiet, dynamic_ncols=True)
        try:
            for stage in stages:
                bar.set_description(f"compare: {stage.label}")
                result = self.run_stage(stage)
                slot = results[stage.row.name]
                if stage.kind == "generation" and "skipped" in result:
                    slot.setdefault("skipped", []).append(result)
                elif stage.kind == "generation":
                    slot["generation"].append(result)
                else:
                    slot[stage.kind] = result
                bar.update(1)
        finally:
            bar.close()
        return self.assemble(results)

    def run_stage(self, stage: Stage) -> dict:
        if stage.kind == "train":
            return self.train(stage.row)
        path = self.stage_dir / f"{stage.kind}-{stage.row.name}-{self.fingerprint(stage)}.json"
        if path.is_file():
            try:
                return json.loads(path.read_text())["result"]
            except (json.JSONDecodeError, KeyError):
                pass  # a torn file: redo the stage
        result = getattr(self, stage.kind)(stage)
        record = {"kind": stage.kind, "row": stage.row.name, "recipe": self.recipe.name,
                  "spec": stage.spec, "sample_options": self.resolve(stage.row.sample_options),
                  "config": self.run_config(self.source(stage.row)).to_dict(),
                  "environment": environment(), "result": result}
        write_json(path, record)
        append_jsonl(self.out / "results.jsonl", record)
        return result

    def train(self, row: Row) -> dict:
        from ddlm.train.loop import train

        run = self.run_config(row)
        result = train(run, self.runs / row.name, quiet=self.quiet)
        if result.interrupted:
            raise KeyboardInterrupt
        return {"steps": result.step, **training_summary(self.runs / row.name), "dtype": result.dtype}

    def loaded(self, row: Row):
        if row.name not in self._loaded:
            from ddlm.build import load_for_inference

            src = self.source(row)
            options = {k: str(v) for k, v in self.resolve(row.sample_options).items()}
            self._loaded = {row.name: load_for_inference(self.runs / src.name, method_options=options or None)}
        return self._loaded[row.name]

    def judge(self, name: str):
        if name not in self._judges:
            from ddlm.eval.judges import ArJudge, load_judge

            if name in [r.name for r in self.recipe.rows]:
                from ddlm.build import load_for_inference

                self._judges[name] = ArJudge(load_for_inference(self.runs / name), name)
            else:
                self._judges[name] = load_judge(name)
        return self._judges[name]

    def likelihood(self, stage: Stage) -> dict:
        from ddlm.eval.run import evaluate_checkpoint

        row, spec = stage.row, stage.spec
        loaded = self.loaded(row)
        if not loaded.method.has_likelihood:
            return {"skipped": f"method {loaded.run.method!r} defines no likelihood"}
        args = [f"--eval.{k}={v}" for k, v in spec.items() if k != "split"]
        args += [f"--{k}={v}" for k, v in self.resolve(row.sample_options).items()]
        return evaluate_checkpoint(self.runs / self.source(row).name, split=spec["split"], overrides=args)

    def generation(self, stage: Stage) -> dict:
        from ddlm.eval.quality import Setting, unconditional

        spec, loaded = stage.spec, self.loaded(stage.row)
        judges = {name: self.judge(name) for name in spec["judges"]}
        length = spec["length"] or loaded.run.model.max_len
        setting = Setting(spec["steps"], spec["top_p"])
        try:
            return unconditional(loaded, setting, judges, num=spec["num"], length=length, seed=spec["seed"],
                                 batch_size=spec["batch_size"])
        except ConfigError as err:
            if spec["top_p"] >= 1:
                raise
            return {"steps": spec["steps"], "top_p": spec["top_p"], "skipped": str(err)}  # e.g. SEDD

    def conditional(self, stage: Stage) -> dict:
        from ddlm.build import prepare_data
        from ddlm.eval.quality import Setting, conditional, held_out_prompts

        spec, loaded = stage.spec, self.loaded(stage.row)
        _, datasets = prepare_data(loaded.run, loaded.tokenizer)
        prompts, truths = held_out_prompts(datasets["test"], spec["prompts"], spec["prompt_tokens"],
                                           spec["length"])
        reference = self._references.setdefault(spec["judge"], {})
        return conditional(loaded, prompts, truths, self.judge(spec["judge"]),
                           setting=Setting(spec["steps"], spec["top_p"]), seed=spec["seed"],
                           batch_size=spec["batch_size"], reference=reference)

    # ---- output -----------------------------------------------------------------------------
    def assemble(self, results: dict) -> dict:
        rows = []
        for row in self.recipe.rows:
            src = self.source(row)
            config = self.run_config(src)
            method = row.method or f"{config.method} + {', '.join(f'{k}={v}' for k, v in row.sample_options.items())}"
            rows.append({"name": row.name, "method": method, "note": row.note, "trained_as": src.name,
                         "config": config.to_dict(), "train": results.get(src.name, {}).get("train"),
                         **results[row.name]})
        payload = {"recipe": self.recipe.name, "description": self.recipe.description,
                   "recipe_path": self.recipe.path, "base": self.recipe.base,
                   "evaluate": {"likelihood": dataclasses.asdict(self.recipe.likelihood),
                                "generation": dataclasses.asdict(self.recipe.generation),
                                "conditional": dataclasses.asdict(self.recipe.conditional)},
                   "environment": environment(), "rows": rows}
        write_json(self.out / "results.json", payload, wrap=False)
        from ddlm.compare.report import write_report

        write_report(payload, self.out)
        return payload


def training_summary(run_dir: Path) -> dict:
    """From a run's metrics.jsonl: median training tokens/s, the last validation BPC, tokens seen."""
    from ddlm.eval.records import read_jsonl

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = read_jsonl(path)
    rates = sorted(r["tokens_per_s"] for r in rows if "tokens_per_s" in r)
    valid = [r for r in rows if "val_bpc" in r]
    out = {"tokens_per_second": rates[len(rates) // 2] if rates else None,
           "tokens": max((r.get("tokens", 0) for r in rows), default=0)}
    if valid:
        out["valid_bpc"] = valid[-1]["val_bpc"]
    return out


def write_json(path: Path, payload: dict, *, wrap: bool = True) -> None:
    """Write atomically (temp file + rename): a kill never leaves a torn result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1 if not wrap else None, sort_keys=True, default=str))
    os.replace(tmp, path)


def compare(recipe_path: str | Path, out: str | Path, *, quiet: bool = False) -> dict:
    recipe = read_recipe(recipe_path)
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"--out '{out}' is a file, not a directory")
    return Comparison(recipe, out, quiet=quiet).run()
