"""A comparison recipe: one shared run config (data, tokenizer, backbone, budget), the rows (methods
with their options) and how every row is evaluated. See recipes/*.yaml.

    name: austen-char
    base:                      # a run config every row starts from (data, model, train, eval)
      data: {corpus: austen, tokenizer: char, seq_len: 128}
      model: {dim: 256, n_layers: 4, n_heads: 4}
      train: {steps: 600, batch_size: 16, lr: 0.001}
    rows:
      - {name: ar, method: ar}
      - {name: sedd-uniform, method: sedd, options: {graph: uniform}}
      - {name: edlm-nce, method: edlm, init: mdlm, options: {energy: nce}, train: {steps: 200}}
      - {name: edlm-ar, sample_of: mdlm, sample_options: {edlm.energy: "ar:@ar"}}
    evaluate:
      likelihood: {split: test, t_samples: 1, max_batches: 20}
      generation: {steps: [8, 32, 128], top_p: [1.0, 0.9], num: 16, length: 128, judges: [ar]}
      conditional: {prompts: 32, prompt_tokens: 32, length: 64, steps: 64, judge: ar}

"@NAME" in an option names another row's run directory; the judge "ar" is the row named ar.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ddlm.config import coerce, load_recipe
from ddlm.errors import ConfigError


@dataclass
class Row:
    name: str
    method: str = ""  # trained with this method ...
    options: dict = field(default_factory=dict)  # ... and these --<method>.* options
    train: dict = field(default_factory=dict)  # overrides of the shared train section
    init: str = ""  # start from this row's run (EDLM-NCE from MDLM)
    sample_of: str = ""  # or: not trained; this row's run, sampled with `sample_options`
    sample_options: dict = field(default_factory=dict)  # method options at sample/eval time
    eval: dict = field(default_factory=dict)  # overrides of the likelihood protocol for this row
    note: str = ""  # what differs from the shared budget, printed in the report


@dataclass
class Likelihood:
    split: str = "test"
    t_samples: int = 1
    max_batches: int = 0
    batch_size: int = 16
    seed: int = 0


@dataclass
class Generation:
    steps: list = field(default_factory=lambda: [8, 32, 128])
    top_p: list = field(default_factory=lambda: [1.0])
    num: int = 16
    length: int = 0  # 0: the context
    batch_size: int = 16
    judges: list = field(default_factory=lambda: ["ar"])
    seed: int = 0


@dataclass
class Conditional:
    prompts: int = 0  # 0: no conditional table
    prompt_tokens: int = 32
    length: int = 64
    steps: int = 64
    top_p: float = 1.0
    judge: str = "ar"
    batch_size: int = 16
    seed: int = 0


@dataclass
class Recipe:
    name: str
    base: dict
    rows: list[Row]
    likelihood: Likelihood
    generation: Generation
    conditional: Conditional
    description: str = ""
    path: str = ""

    def row(self, name: str) -> Row:
        for row in self.rows:
            if row.name == name:
                return row
        raise ConfigError(f"recipe {self.name!r} has no row named {name!r}")


def _section(cls, values, where: str):
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown key {where}.{unknown[0]}; expected one of: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in values.items():
        kind = hints[key]
        if kind in (int, float, bool, str):
            value = coerce(value, kind, f"{where}.{key}")
        elif kind is list and not isinstance(value, list):
            value = [value]
        elif kind is dict and not isinstance(value, dict):
            raise ConfigError(f"{where}.{key} must be a mapping, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def parse_recipe(data: dict, path: str = "") -> Recipe:
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path!r} must be a mapping")
    known = {"name", "description", "base", "rows", "evaluate"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown recipe key {unknown[0]!r}; expected one of: {', '.join(sorted(known))}")
    raw_rows = data.get("rows") or []
    if not isinstance(raw_rows, list) or not raw_rows:
        raise ConfigError(f"recipe {path!r} needs a list of rows")
    rows = [_section(Row, r, f"rows[{i}]") for i, r in enumerate(raw_rows)]
    evaluate = data.get("evaluate") or {}
    if not isinstance(evaluate, dict):
        raise ConfigError("evaluate must be a mapping")
    unknown = sorted(set(evaluate) - {"likelihood", "generation", "conditional"})
    if unknown:
        raise ConfigError(f"unknown key evaluate.{unknown[0]}; expected likelihood, generation, conditional")
    recipe = Recipe(name=str(data.get("name") or Path(path).stem or "compare"), base=data.get("base") or {},
                    rows=rows, description=str(data.get("description") or ""), path=str(path),
                    likelihood=_section(Likelihood, evaluate.get("likelihood"), "evaluate.likelihood"),
                    generation=_section(Generation, evaluate.get("generation"), "evaluate.generation"),
                    conditional=_section(Conditional, evaluate.get("conditional"), "evaluate.conditional"))
    check_rows(recipe)
    return recipe


def check_rows(recipe: Recipe) -> None:
    from ddlm.methods.base import method_names

    names = [r.name for r in recipe.rows]
    for row in recipe.rows:
        if not row.name or "/" in row.name or row.name.startswith("."):
            raise ConfigError(f"row name {row.name!r} must be a plain name")
        if names.count(row.name) > 1:
            raise ConfigError(f"row name {row.name!r} appears twice")
        if bool(row.method) == bool(row.sample_of):
            raise ConfigError(f"row {row.name!r} needs either method (trained) or sample_of (not both)")
        if row.method and row.method not in method_names():
            raise ConfigError(f"row {row.name!r}: unknown method {row.method!r}; "
                              f"choose one of: {', '.join(method_names())}")
        for other in (row.init, row.sample_of):
            if other and (other not in names or recipe.row(other).sample_of):
                raise ConfigError(f"row {row.name!r} refers to {other!r}, which is not a trained row")
    for judge in [*recipe.generation.judges, recipe.conditional.judge]:
        if ":" not in judge and judge not in ("smollm2",) and judge not in names:
            raise ConfigError(f"judge {judge!r} is neither a row of the recipe nor a judge spec "
                              f"(ar:DIR, smollm2, hf:DIR)")


def read_recipe(path: str | Path) -> Recipe:
    """A recipe from a YAML file (recipes/*.yaml)."""
    return parse_recipe(load_recipe(path), str(path))
