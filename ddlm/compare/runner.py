"""`ddlm compare RECIPE`: train every row on the same data, backbone and budget, evaluate them
identically, write results and a report.

    OUT/runs/<row>/            each trained row's run directory (resumed; finished runs reused);
    OUT/runs/<row>-seed<k>/    with `seeds: N`, the run of training seed k = 1..N-1
    OUT/stages/<stage>.json    each evaluation's result, keyed by a hash of everything it depends
                               on: an interrupted compare redoes only what is missing
    OUT/results.jsonl          one record per evaluation, with the full config, seed and versions
    OUT/results.json           all rows together; OUT/report.md and OUT/*.png from it

Under torchrun (`torchrun --nproc_per_node N -m ddlm compare RECIPE`) every process runs the same
plan with one `Distributed` made here: every row is trained by all N processes, the likelihoods are
scored sharded over them (the same figures as one process), then rank 0 alone draws and judges the
samples (generation, conditional) while the others wait for it on a gloo group whose timeout is
long enough for that work (MAIN_ALONE_TIMEOUT_S). Rank 0 alone writes files and prints. Without
torchrun nothing changes: no process group, one process, the stages in plan order.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ddlm.compare.recipe import Recipe, Row, read_recipe
from ddlm.config import make_config
from ddlm.errors import ConfigError, DataError, DdlmError
from ddlm.eval.records import append_jsonl, environment
from ddlm.methods.base import method_class
from ddlm.progress import progress_bar

COLLECTIVE = ("train", "likelihood", "zero_shot")  # stages every process takes part in under torchrun
# How long the other processes wait for rank 0's generation and conditional evaluation (sampling
# every row at every step count can take hours at paper scale); the training collectives keep
# train.dist_timeout.
MAIN_ALONE_TIMEOUT_S = 72 * 3600.0
# Bumped when what an evaluation stage records changes, so `ddlm compare` redoes those stages
# (2: every sample and its per-sample judge scores are kept; seeds).
STAGE_VERSION = 2


@dataclass
class Stage:
    kind: str  # train | likelihood | zero_shot | generation | conditional
    row: Row
    spec: dict = field(default_factory=dict)
    seed: int = 0  # which of the row's training seeds (0..N-1)

    @property
    def label(self) -> str:
        detail = "".join(f" {k}={v}" for k, v in self.spec.items() if k in ("steps", "top_p", "name"))
        return f"{self.kind} {run_name(self.row.name, self.seed)}{detail}"


def run_name(row: str, seed: int) -> str:
    """The run directory's name of training seed `seed` of a row."""
    return row if seed == 0 else f"{row}-seed{seed}"


class Comparison:
    def __init__(self, recipe: Recipe, out: str | Path, *, quiet: bool = False, dist=None,
                 notes: dict | None = None) -> None:
        """`dist`: the Distributed of a torchrun job (None: one process, as without torchrun).
        `notes`: what the report says about the scale (its tokenizer)."""
        self.recipe, self.out, self.quiet = recipe, Path(out), quiet
        self.dist = dist
        self.is_main = dist is None or dist.is_main
        self.notes = notes or {}
        self.runs = self.out / "runs"
        self.stage_dir = self.out / "stages"
        self._loaded: dict[str, object] = {}
        self._judges: dict[str, object] = {}
        self._imported: dict[str, object] = {}  # imported rows' run configs
        self._references: dict[str, dict] = {}
        self.wait_group = None
        if dist is not None and dist.active and dist.world_size > 1:
            import datetime

            import torch.distributed

            self.wait_group = torch.distributed.new_group(
                backend="gloo", timeout=datetime.timedelta(seconds=MAIN_ALONE_TIMEOUT_S))

    # ---- the plan ---------------------------------------------------------------------------
    def plan(self) -> list[Stage]:
        recipe = self.recipe
        trained = [r for r in recipe.rows if r.method or r.imported]
        trained.sort(key=lambda r: bool(r.init))  # a row started from another comes after it
        stages = [Stage("train", r, seed=k) for k in range(recipe.seeds) for r in trained
                  if k < recipe.seeds_of(r)]
        stages += [Stage("train", r, seed=k) for r in trained for k in range(recipe.seeds, recipe.seeds_of(r))]
        for row in recipe.rows:
            for k in range(recipe.seeds_of(row)):
                stages += self.evaluations(row, k)
        return stages

    def evaluations(self, row: Row, k: int) -> list[Stage]:
        recipe, gen = self.recipe, self.recipe.generation
        stages = []
        if not (row.sample and not row.sample_options):  # a sampler alone does not change the bound
            stages.append(Stage("likelihood", row, {**dataclasses.asdict(recipe.likelihood), **row.eval}, k))
        stages += [Stage("zero_shot", row, {**dataclasses.asdict(recipe.likelihood), **row.eval,
                                            **dataclasses.asdict(corpus)}, k) for corpus in recipe.zero_shot]
        src = self.source(row)
        method = self.imported_config(src).method if src.imported else src.method
        steps_list = gen.steps if method_class(method).has_steps else gen.steps[:1]
        sampling = {"sample": row.sample} if row.sample else {}  # (absent: earlier stages' fingerprints hold)
        for steps in steps_list:
            for top_p in gen.top_p:
                stages.append(Stage("generation", row, {**dataclasses.asdict(gen), "steps": int(steps),
                                                        "top_p": float(top_p), **sampling}, k))
        if recipe.conditional.prompts:
            stages.append(Stage("conditional", row, {**dataclasses.asdict(recipe.conditional), **sampling}, k))
        return stages

    def run_dir(self, row: str, seed: int = 0) -> Path:
        return self.runs / run_name(row, seed)

    def run_config(self, row: Row, seed: int = 0, *, inherit: bool = True):
        """The run config of training seed `seed` of a trained row: the shared base, its method
        and options, train.seed shifted by `seed` (and, with `inherit`, the method options of the
        run it starts from: seed `seed` of that row)."""
        if row.imported:
            return self.imported_config(row)
        base = json.loads(json.dumps(self.recipe.base))
        base["method"] = row.method
        base[row.method] = {**base.get(row.method, {}), **self.resolve(row.options, seed)}
        base["train"] = {**base.get("train", {}), **row.train}
        base["model"] = {**base.get("model", {}), **row.model}
        if seed:
            from ddlm.config import TrainConfig, coerce

            first = coerce(base["train"].get("seed", TrainConfig.seed), int, "train.seed")
            base["train"]["seed"] = first + seed
        if row.init and inherit:
            from ddlm.build import init_base

            inherited = init_base(self.run_dir(row.init, seed), row.method)
            base[row.method] = {**inherited.get(row.method, {}), **base[row.method]}
            base["train"]["init"] = str(self.run_dir(row.init, seed))
        base["train"].setdefault("progress", not self.quiet)
        return make_config(base=base)

    def imported_config(self, row: Row):
        """An imported row's run config: its run directory's, or the folder's mapped config before
        the import (read once)."""
        if row.name not in self._imported:
            from ddlm.checkpoint import load_checkpoint
            from ddlm.interop.import_ import read_source

            run_dir = self.run_dir(row.name)
            self._imported[row.name] = load_checkpoint(run_dir).config if (run_dir / "latest").is_file() \
                else read_source(row.imported).run
        return self._imported[row.name]

    def resolve(self, options: dict, seed: int = 0) -> dict:
        """'@name' -> the run directory of seed `seed` of that row, in option values."""
        out = {}
        for key, value in options.items():
            if isinstance(value, str) and "@" in value:
                head, _, name = value.rpartition("@")
                if seed >= self.recipe.seeds_of(self.recipe.row(name)):
                    raise ConfigError(f"option {key}={value!r} refers to row {name!r}, which has no seed {seed}")
                value = f"{head}{self.run_dir(name, seed)}"
            out[key] = value
        return out

    def source(self, row: Row) -> Row:
        return self.recipe.row(row.sample_of) if row.sample_of else row

    def fingerprint(self, stage: Stage) -> str:
        """A hash of what the stage's result depends on: the run's config, the options, the spec."""
        src = self.source(stage.row)
        payload = {"kind": stage.kind, "run": stage_config(self.run_config(src, stage.seed)), "spec": stage.spec,
                   "sample_options": self.resolve(stage.row.sample_options, stage.seed)}
        if stage.kind in ("generation", "conditional"):
            payload["judges"] = {j: self.judge_identity(j, stage.seed) for j in self.judge_names(stage)}
            payload["version"] = STAGE_VERSION
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def judge_names(self, stage: Stage) -> list[str]:
        return stage.spec["judges"] if stage.kind == "generation" else [stage.spec["judge"]]

    def judge_seed(self, name: str, seed: int) -> int:
        """The seed of judge row `name` that scores the samples of training seed `seed`: with N > 1
        seeds of the judge, seed (seed + 1) mod N, so that no run is judged by itself and no
        EDLM row by the energy it was sampled with (same seed); with one seed, seed 0 (the
        report marks the cells judged by their own model)."""
        n = self.recipe.seeds_of(self.recipe.row(name))
        return (seed + 1) % n if n > 1 else 0

    def judge_identity(self, name: str, seed: int = 0):
        from ddlm.eval.judges import PROTOCOL

        if name in [r.name for r in self.recipe.rows]:
            k = self.judge_seed(name, seed)
            return {"run": stage_config(self.run_config(self.recipe.row(name), k)), "protocol": PROTOCOL}
        return {"spec": name, "protocol": PROTOCOL}

    def self_judged(self, row: Row, judge: str, seed: int = 0) -> bool:
        """Whether `judge` is a model the row's samples came from: the row's own run, or a run
        its sample options name (EDLM's AR energy), at the judge seed used."""
        if judge not in [r.name for r in self.recipe.rows]:
            return False
        used = self.run_dir(judge, self.judge_seed(judge, seed))
        mine = {self.run_dir(self.source(row).name, seed)}
        mine |= {Path(str(v).rpartition(":")[2]) for v in self.resolve(row.sample_options, seed).values()
                 if isinstance(v, str)}
        return used in mine

    def check(self) -> None:
        """Every trained row's run config, validated before anything is trained: a bad option in
        the last row is a one-line error now, not after the first rows' training."""
        for row in self.recipe.rows:
            if row.method or row.imported:
                try:
                    self.run_config(row, inherit=False)
                except DdlmError as err:
                    raise ConfigError(f"row {row.name!r}: {err}") from None
            for k in range(self.recipe.seeds_of(row)):
                self.resolve(row.sample_options, k)
            if row.sample:
                from ddlm.config import SampleConfig, section_config

                try:
                    section_config(SampleConfig(), "sample", {}, [f"--sample.{k}={v}" for k, v in row.sample.items()])
                except DdlmError as err:
                    raise ConfigError(f"row {row.name!r}: {err}") from None

    # ---- running ----------------------------------------------------------------------------
    def run(self) -> dict | None:
        """Every stage; the assembled results on rank 0 (None on the other ranks of a torchrun job)."""
        self.check()
        stages = self.plan()
        if self.is_main:
            self.provenance = provenance(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
        results: dict[str, list] = {r.name: [{"seed": k, "generation": []}
                                             for k in range(self.recipe.seeds_of(r))] for r in self.recipe.rows}
        bar = progress_bar(total=len(stages), desc="compare", disable=self.quiet or not self.is_main,
                           dynamic_ncols=True)

        def do(stage: Stage, collective: bool) -> None:
            bar.set_description(f"compare: {stage.label}")
            result = self.run_stage(stage, collective=collective)
            slot = results[stage.row.name][stage.seed]
            if stage.kind == "generation" and "skipped" in result:
                slot.setdefault("skipped", []).append(result)
            elif stage.kind == "generation":
                slot["generation"].append(result)
            elif stage.kind == "zero_shot":
                slot.setdefault("zero_shot", {})[stage.spec["name"]] = result
            else:
                slot[stage.kind] = result
            bar.update(1)

        try:
            if self.dist is None:
                for stage in stages:
                    do(stage, collective=False)
            else:  # every process trains and scores; then rank 0 alone samples
                for stage in stages:
                    if stage.kind in COLLECTIVE:
                        do(stage, collective=True)
                self.main_alone(lambda: [do(s, collective=False) for s in stages if s.kind not in COLLECTIVE])
            if self.is_main:
                self.references = {judge: self.held_out_reference(judge) for judge in self.recipe.generation.judges}
        finally:
            bar.close()
        return self.assemble(results) if self.is_main else None

    def main_alone(self, func) -> None:
        """func() on rank 0 while the other processes wait for it (up to MAIN_ALONE_TIMEOUT_S, on
        a gloo group of their own); rank 0's error, if any, ends every process."""
        if self.wait_group is None:
            func()
            return
        import torch.distributed

        error = None
        if self.is_main:
            try:
                func()
            except BaseException as err:  # noqa: BLE001 - the others must hear of it, then re-raised
                error = err
        box = [None if error is None else (str(error) or type(error).__name__)]
        torch.distributed.broadcast_object_list(box, src=0, group=self.wait_group)
        if error is not None:
            raise error
        if box[0] is not None:
            raise DdlmError(f"rank 0 stopped in the evaluation it runs alone: {box[0]}")

    def shared(self, func, collective: bool):
        """func() everywhere in one process; under torchrun, for a stage every process takes part
        in, rank 0's answer on every rank (files are read and written by rank 0 only)."""
        if self.dist is None or not collective:
            return func()
        return self.dist.on_main(func)

    def run_stage(self, stage: Stage, *, collective: bool = False) -> dict:
        if stage.kind == "train":
            return self.train(stage.row, stage.seed)
        name = run_name(stage.row.name, stage.seed)
        path = self.stage_dir / f"{stage.kind}-{name}-{self.fingerprint(stage)}.json"
        done = self.shared(lambda: read_stage(path), collective)
        if done is not None:
            return done
        result = getattr(self, stage.kind)(stage)
        if self.is_main:
            record = {"kind": stage.kind, "row": stage.row.name, "seed": stage.seed, "recipe": self.recipe.name,
                      "spec": stage.spec, "sample_options": self.resolve(stage.row.sample_options, stage.seed),
                      "config": self.run_config(self.source(stage.row), stage.seed).to_dict(),
                      "environment": environment(), "result": result}
            write_json(path, record)
            append_jsonl(self.out / "results.jsonl", record)
        return result

    def import_row(self, row: Row) -> dict:
        """An `import: SRC` row: the folder imported into runs/<row> once (rank 0 writes)."""
        from ddlm.interop.import_ import import_model

        run_dir = self.run_dir(row.name)

        def write() -> dict:
            if not (run_dir / "latest").is_file():
                import_model(row.imported, run_dir, overwrite=run_dir.exists())
            return {"steps": 0, "imported": row.imported}

        return self.shared(write, collective=True) if self.dist is not None else write()

    def train(self, row: Row, seed: int = 0) -> dict:
        from ddlm.train.loop import train

        if row.imported:
            return self.import_row(row)

        run, run_dir = self.run_config(row, seed), self.run_dir(row.name, seed)
        if self.dist is None:
            result = train(run, run_dir, quiet=self.quiet)
        else:
            result = train(run, run_dir, quiet=self.quiet, dist=self.dist)
        if result.interrupted:
            raise KeyboardInterrupt
        summary = training_summary(run_dir) if self.is_main else {}
        if self.is_main:
            from ddlm.build import load_for_inference
            from ddlm.eval.speed import measured_train_flops_per_token

            summary["flops_per_token"] = measured_train_flops_per_token(load_for_inference(run_dir, torch_cpu()))
        return {"steps": result.step, **summary, "dtype": result.dtype}

    def loaded(self, row: Row, seed: int = 0):
        key = run_name(row.name, seed)
        if key not in self._loaded:
            from ddlm.build import load_for_inference

            src = self.source(row)
            options = {k: str(v) for k, v in self.resolve(row.sample_options, seed).items()}
            device = self.dist.device if self.dist is not None else None
            self._loaded = {key: load_for_inference(self.run_dir(src.name, seed), device,
                                                    method_options=options or None)}
        return self._loaded[key]

    def judge(self, name: str, seed: int = 0):
        """The judge `name` for the samples of training seed `seed` (a row: its judge seed)."""
        rows = [r.name for r in self.recipe.rows]
        key = run_name(name, self.judge_seed(name, seed)) if name in rows else name
        if key not in self._judges:
            from ddlm.eval.judges import ArJudge, load_judge

            if name in rows:
                from ddlm.build import load_for_inference

                self._judges[key] = ArJudge(load_for_inference(self.runs / key), name)
            else:
                self._judges[key] = load_judge(name)
        return self._judges[key]

    def likelihood(self, stage: Stage) -> dict:
        from ddlm.commands.evaluate import evaluate_checkpoint

        row, spec = stage.row, stage.spec
        loaded = self.loaded(row, stage.seed)
        if not loaded.method.has_likelihood:
            return {"skipped": f"method {loaded.run.method!r} defines no likelihood"}
        args = [f"--eval.{k}={v}" for k, v in spec.items() if k != "split"]
        args += [f"--{k}={v}" for k, v in self.resolve(row.sample_options, stage.seed).items()]
        if self.dist is None:
            return evaluate_checkpoint(self.run_dir(self.source(row).name, stage.seed), split=spec["split"],
                                       overrides=args)
        return self.sharded_likelihood(loaded, spec["split"], args)

    def sharded_likelihood(self, loaded, split: str, args: list[str]) -> dict:
        """What `evaluate_checkpoint` reports, with the batches scored by every process (each
        batch's noise is keyed to its index, so the figure is the one-process figure)."""
        from ddlm import runtime
        from ddlm.config import section_config, split_sections
        from ddlm.eval.likelihood import evaluate_likelihood
        from ddlm.commands.evaluate import protocol_text

        eval_args, _ = split_sections(args, "eval")
        run, dist = loaded.run, self.dist
        cfg = section_config(run.eval, "eval", {"split": split}, eval_args)
        datasets = self.datasets(run, loaded.tokenizer)
        key = "valid" if cfg.split == "validation" else cfg.split
        if len(datasets[key]) == 0:
            raise DataError(f"split {key!r} of corpus {run.data.corpus!r} holds no full sequence")
        dtype = runtime.DTYPES[dist.on_main(
            lambda: runtime.dtype_name(runtime.resolve_dtype(run.train.dtype, dist.device)))]
        result = evaluate_likelihood(loaded.method, loaded.model, datasets[key], batch_size=cfg.batch_size,
                                     n_samples=cfg.t_samples, max_batches=cfg.max_batches, seed=cfg.seed,
                                     dtype=dtype, dist=dist)
        return {"method": run.method, "corpus": run.data.corpus, "split": key,
                "tokenizer": run.data.tokenizer, "step": loaded.step, **result.as_dict(),
                "protocol": protocol_text(loaded.method, cfg, result.exact), "checkpoint": str(loaded.path)}

    def zero_shot(self, stage: Stage) -> dict:
        """The row's likelihood on a zero-shot corpus (ddlm.eval.zero_shot), with the recipe's
        likelihood settings; sharded over the processes under torchrun."""
        from ddlm import runtime
        from ddlm.config import section_config
        from ddlm.eval.zero_shot import evaluate_zero_shot

        spec, loaded = stage.spec, self.loaded(stage.row, stage.seed)
        if not loaded.method.has_likelihood:
            return {"skipped": f"method {loaded.run.method!r} defines no likelihood"}
        run = loaded.run
        fields = {f.name for f in dataclasses.fields(run.eval)}
        cfg = section_config(run.eval, "eval", {k: v for k, v in spec.items() if k in fields}, [])
        if self.dist is None:
            dtype = runtime.resolve_dtype(run.train.dtype, next(loaded.model.parameters()).device)
        else:
            dtype = runtime.DTYPES[self.dist.on_main(
                lambda: runtime.dtype_name(runtime.resolve_dtype(run.train.dtype, self.dist.device)))]
        return evaluate_zero_shot(loaded, spec["data"], cfg, dtype=dtype, detokenizer=spec["detokenizer"] or None,
                                  protocol=spec["protocol"], dist=self.dist)

    def datasets(self, run, tokenizer) -> dict:
        """The run's splits: rank 0 reads the corpus (and writes any token cache) first, then the
        others read what it wrote."""
        from ddlm.build import prepare_data

        first: dict = {}
        self.dist.on_main(lambda: first.setdefault("main", prepare_data(run, tokenizer)), share=False)
        return (first.get("main") or prepare_data(run, tokenizer))[1]

    def generation(self, stage: Stage) -> dict:
        from ddlm.eval.quality import Setting, unconditional

        spec, loaded = stage.spec, self.loaded(stage.row, stage.seed)
        judges = {name: self.judge(name, stage.seed) for name in spec["judges"]}
        length = spec["length"] or loaded.run.model.max_len
        setting = Setting(spec["steps"], spec["top_p"], spec.get("sample", {}))
        try:
            result = unconditional(loaded, setting, judges, num=spec["num"], length=length,
                                   seed=spec["seed"] + stage.seed, batch_size=spec["batch_size"])
            result["self_judged"] = [j for j in judges if self.self_judged(stage.row, j, stage.seed)]
            return result
        except ConfigError as err:
            if spec["top_p"] >= 1:
                raise
            return {"steps": spec["steps"], "top_p": spec["top_p"], "skipped": str(err)}  # e.g. SEDD

    def held_out_reference(self, judge: str) -> dict:
        """The judge's scores of held-out test text of the generation length (as many texts as
        the samples of one setting over every seed): the reference line of the quality plots."""
        from ddlm.build import prepare_data
        from ddlm.eval.quality import held_out_text

        gen = self.recipe.generation
        first = next(r for r in self.recipe.rows if r.method)
        loaded = self.loaded(first)
        length = gen.length or loaded.run.model.max_len
        num = gen.num * max(self.recipe.seeds_of(r) for r in self.recipe.rows)
        payload = {"judge": self.judge_identity(judge), "data": loaded.run.data.__dict__, "num": num,
                   "length": length, "version": STAGE_VERSION}
        key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]
        path = self.stage_dir / f"reference-{judge.replace(':', '_').replace('/', '_')}-{key}.json"
        done = read_stage(path)
        if done is not None:
            return done
        _, datasets = prepare_data(loaded.run, loaded.tokenizer)
        result = held_out_text(loaded.tokenizer, datasets["test"], self.judge(judge), num=num, length=length)
        write_json(path, {"kind": "reference", "judge": judge, "result": result})
        return result

    def conditional(self, stage: Stage) -> dict:
        from ddlm.build import prepare_data
        from ddlm.eval.quality import Setting, conditional, held_out_prompts

        spec, loaded = stage.spec, self.loaded(stage.row, stage.seed)
        _, datasets = prepare_data(loaded.run, loaded.tokenizer)
        prompts, truths = held_out_prompts(datasets["test"], spec["prompts"], spec["prompt_tokens"],
                                           spec["length"])
        judge = self.judge(spec["judge"], stage.seed)
        reference = self._references.setdefault(run_name(spec["judge"], self.judge_seed(spec["judge"], stage.seed))
                                                if spec["judge"] in [r.name for r in self.recipe.rows]
                                                else spec["judge"], {})
        result = conditional(loaded, prompts, truths, judge, setting=Setting(spec["steps"], spec["top_p"],
                                                                             spec.get("sample", {})),
                             seed=spec["seed"] + stage.seed, batch_size=spec["batch_size"], reference=reference)
        result["self_judged"] = self.self_judged(stage.row, spec["judge"], stage.seed)
        return result

    # ---- output -----------------------------------------------------------------------------
    def assemble(self, results: dict) -> dict:
        rows = []
        for row in self.recipe.rows:
            src = self.source(row)
            config = self.run_config(src)
            options = {**row.sample_options, **row.sample}
            method = row.method or (config.method if row.imported else
                                    f"{config.method} + {', '.join(f'{k}={v}' for k, v in options.items())}")
            runs = [{**run, "train": results[src.name][run["seed"]].get("train")} for run in results[row.name]]
            rows.append({"name": row.name, "method": method, "note": row.note, "trained_as": src.name,
                         "config": config.to_dict(), "seeds": runs})
        payload = {"recipe": self.recipe.name, "description": self.recipe.description,
                   "recipe_path": self.recipe.path, "base": self.recipe.base,
                   "evaluate": {"likelihood": dataclasses.asdict(self.recipe.likelihood),
                                "generation": dataclasses.asdict(self.recipe.generation),
                                "conditional": dataclasses.asdict(self.recipe.conditional),
                                "zero_shot": [dataclasses.asdict(z) for z in self.recipe.zero_shot]},
                   "environment": environment(), "rows": rows, "seeds": self.recipe.seeds,
                   "provenance": getattr(self, "provenance", None) or provenance(self.out),
                   "reference": getattr(self, "references", {})}
        if self.recipe.scale:
            payload["scale"] = {"name": self.recipe.scale, **self.notes}
        if self.dist is not None and self.dist.world_size > 1:
            payload["processes"] = self.dist.world_size
        write_json(self.out / "results.json", payload, wrap=False)
        from ddlm.compare.report import write_report

        write_report(payload, self.out)
        return payload


# Config fields added after stage fingerprints existed: at their default they leave a stage's
# identity unchanged, so a new option that keeps the old behaviour does not redo finished stages.
LATER_FIELDS = {"model": ("positions", "bias", "tie_embeddings", "output_vocab"), "train": ("log",),
                "sample": ("remask", "eta", "t_on", "t_off", "alpha_on", "threshold")}


# Fields that change what a run shows, never what it computes: a stage is identified with their
# default, so a quiet (--json) compare reuses the stages a verbose one finished, and the other way.
DISPLAY_FIELDS = {"train": ("progress",)}


def stage_config(run) -> dict:
    """run.to_dict() without the LATER_FIELDS that hold their default value, and with the
    DISPLAY_FIELDS at their default."""
    from ddlm.config import SECTIONS

    out = run.to_dict()
    for section, names in DISPLAY_FIELDS.items():
        out[section].update({name: getattr(SECTIONS[section](), name) for name in names})
    for section, names in LATER_FIELDS.items():
        default = SECTIONS[section]()
        for name in names:
            if name in out[section] and out[section][name] == getattr(default, name):
                del out[section][name]
    return out


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


def read_stage(path: Path) -> dict | None:
    """A finished stage's result, or None (missing, torn by a kill, or damaged: redo the stage)."""
    if not path.is_file():
        return None
    try:
        stage = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # ValueError: not JSON, or not UTF-8
        return None
    result = stage.get("result") if isinstance(stage, dict) else None
    return result if isinstance(result, dict) else None


def write_json(path: Path, payload: dict, *, wrap: bool = True) -> None:
    """Write atomically (temp file + rename): a kill never leaves a torn result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1 if not wrap else None, sort_keys=True, default=str))
    os.replace(tmp, path)


def torch_cpu():
    import torch

    return torch.device("cpu")


def provenance(out: Path) -> dict:
    """The git commit of the ddlm source that ran, and whether its tree was clean (tracked files
    unchanged, the comparison's own output directory left out); None where it is not a checkout."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return {"commit": None, "clean": None, "source": str(root)}
    exclude = []
    try:
        exclude = [f":(exclude){Path(out).resolve().relative_to(root)}"]
    except ValueError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=30, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no",
                                  "--", ".", *exclude], capture_output=True, text=True, timeout=30,
                                 check=True).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "clean": None, "source": str(root)}
    changed = [line[3:] for line in changed if line.strip()]
    return {"commit": commit, "clean": not changed, "changed": changed[:20], "source": str(root)}


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def choose_tokenizer(recipe: Recipe) -> dict:
    """At a scale with a `tokenizer_fallback`: the recipe's tokenizer when it can be built offline
    here, else the fallback (recipe.base is changed to it). Returns what the report says."""
    if not recipe.tokenizer_fallback:
        return {}
    data = recipe.base.setdefault("data", {})
    wanted = str(data.get("tokenizer") or "char")
    if wanted.partition(":")[0] == "bpe":  # trained on the corpus: always available
        return {"tokenizer": wanted, "tokenizer_note": f"the recipe's tokenizer {wanted}"}
    from ddlm.data.tokenizers import build_tokenizer

    try:
        build_tokenizer(wanted)
    except DdlmError as err:
        data["tokenizer"] = recipe.tokenizer_fallback
        return {"tokenizer": recipe.tokenizer_fallback,
                "tokenizer_note": f"the {recipe.tokenizer_fallback} tokenizer in place of the recipe's "
                                  f"{wanted}, which is not available offline here ({err})"}
    return {"tokenizer": wanted, "tokenizer_note": f"the recipe's tokenizer {wanted} (available offline)"}


def compare(recipe_path: str | Path, out: str | Path, *, quiet: bool = False, scale: str | None = None,
            dist=None) -> dict | None:
    """Run the recipe (at `scale`, when given) into `out`. Under torchrun every process calls this;
    rank 0 gets the results, the other ranks None. `dist` defaults to torchrun's process group
    when torchrun started this process, else none at all (one process)."""
    recipe = read_recipe(recipe_path, scale=scale)
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"--out '{out}' is a file, not a directory")
    owned = dist is None and launched_by_torchrun()
    if owned:
        from ddlm import runtime
        from ddlm.distributed import Distributed

        shared = make_config(base=json.loads(json.dumps(recipe.base))).train
        dist = Distributed.from_environment(runtime.device(), timeout_s=shared.dist_timeout,
                                            parallel=shared.parallel)
    try:
        if dist is None:
            notes = choose_tokenizer(recipe)
        else:  # rank 0 decides, every rank follows
            notes = dist.on_main(lambda: choose_tokenizer(recipe))
            if notes:
                recipe.base.setdefault("data", {})["tokenizer"] = notes["tokenizer"]
        main = dist is None or dist.is_main
        if notes and main and not quiet:
            print(f"ddlm compare: scale {recipe.scale}: {notes['tokenizer_note']}")
        return Comparison(recipe, out, quiet=quiet, dist=dist, notes=notes).run()
    finally:
        if owned:
            dist.close()
