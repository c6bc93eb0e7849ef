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

`zero_shot` (optional) scores every row, seed by seed, on other corpora with the papers' zero-shot
protocol (ddlm.eval.zero_shot), for the report's zero-shot table:

    zero_shot:
      - {name: ptb, data: hf:data/ptb_text_only}                 # detokenizer from the folder name
      - {name: lambada, data: data/lambada_test.jsonl, detokenizer: lambada, protocol: mdlm}

`seeds: N` (default 1) trains every row N times, with train.seed = the base seed + k for
k = 0..N-1 (a row may set its own `seeds`; a row sampled from another has that row's seeds). Seed k
of a row lives in runs/<row> (k = 0) or runs/<row>-seed<k>, starts from (init) and refers to ("@")
seed k of the other rows, and is evaluated and sampled like the others; the report gives every
figure as the mean over seeds with its spread.

A recipe may also name scales: sets of overrides that run the same rows at another size
(`ddlm compare RECIPE --scale NAME`), e.g. a CPU-sized smoke run of a GPU recipe:

    scales:
      tiny:
        description: the same rows on CPU in minutes   # shown in the report
        tokenizer_fallback: char   # used (and said so) when the recipe's tokenizer is not available offline
        base: {data: {corpus: austen, seq_len: 64}, model: {dim: 64, n_layers: 2, n_heads: 2}}
        seeds: 1                   # training seeds per row at this scale
        rows: {edlm-nce: {train: {steps: 5}}}     # per-row overrides of train, options, eval, ...
        evaluate: {generation: {steps: [4, 16], num: 4}}

Mappings merge key by key into what they override (base, each named row, evaluate); any other
value (a list, a number) replaces it. A scale changes sizes, budgets and options, never which rows
exist or how they are trained from one another (name, method, init, sample_of).
"""
from __future__ import annotations

import dataclasses
import json
import re
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
    model: dict = field(default_factory=dict)  # overrides of the shared backbone (e.g. block: gated)
    init: str = ""  # start from this row's run (EDLM-NCE from MDLM)
    sample_of: str = ""  # or: not trained; this row's run, sampled with `sample_options`
    imported: str = ""  # or: not trained; a published model folder (`import: SRC`), imported once
    sample_options: dict = field(default_factory=dict)  # method options at sample/eval time
    sample: dict = field(default_factory=dict)  # sampling options of this row (e.g. sampler: confidence)
    eval: dict = field(default_factory=dict)  # overrides of the likelihood protocol for this row
    note: str = ""  # what differs from the shared budget, printed in the report
    seeds: int = 0  # training seeds of this row (0: the recipe's `seeds`)


@dataclass
class Likelihood:
    split: str = "test"
    t_samples: int = 1
    max_batches: int = 0
    batch_size: int = 16
    seed: int = 0


@dataclass
class Generation:
    steps: list[int] = field(default_factory=lambda: [8, 32, 128])
    top_p: list[float] = field(default_factory=lambda: [1.0])
    num: int = 16
    length: int = 0  # 0: the context
    batch_size: int = 16
    judges: list[str] = field(default_factory=lambda: ["ar"])
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
class ZeroShot:
    name: str = ""  # the report's column (letters, digits, . _ + -)
    data: str = ""  # hf:PATH, FILE.txt (a document per line) or FILE.jsonl ({"text": ...} per line)
    detokenizer: str = ""  # "": the one the name or path says (ddlm.data.detokenizers); "none"; a name
    split: str = "valid"  # the dataset's split (a single Dataset, a file: every row)
    protocol: str = "mdlm"  # how documents become windows: mdlm, sedd, bd3 (ddlm.eval.zero_shot)


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
    scales: list[str] = field(default_factory=list)  # the scales the recipe defines
    scale: str = ""  # the scale applied ("": the recipe as written)
    tokenizer_fallback: str = ""  # the applied scale's tokenizer when the recipe's is unavailable
    seeds: int = 1  # training seeds of every row (a row may set its own)
    zero_shot: list[ZeroShot] = field(default_factory=list)  # corpora every row is also scored on

    def row(self, name: str) -> Row:
        for row in self.rows:
            if row.name == name:
                return row
        raise ConfigError(f"recipe {self.name!r} has no row named {name!r}")

    def seeds_of(self, row: Row) -> int:
        """How many training seeds the row has (a sampled row: those of the row it samples)."""
        if row.sample_of:
            row = self.row(row.sample_of)
        if row.imported:  # a published model is one training run
            return 1
        return row.seeds or self.seeds


def _import_key(row):
    """A row's `import: SRC` (a Python keyword) as the field `imported`."""
    if isinstance(row, dict) and "import" in row:
        if "imported" in row:
            raise ConfigError(f"row {row.get('name')!r} gives both import and imported")
        row = {("imported" if k == "import" else k): v for k, v in row.items()}
    return row


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
            value = _scalar(value, kind, f"{where}.{key}")
        elif typing.get_origin(kind) is list:
            item = typing.get_args(kind)[0]
            value = [_scalar(v, item, f"{where}.{key}[{i}]")
                     for i, v in enumerate(value if isinstance(value, list) else [value])]
        elif kind is dict and not isinstance(value, dict):
            raise ConfigError(f"{where}.{key} must be a mapping, got {_short(value)}")
        kwargs[key] = value
    return cls(**kwargs)


def _scalar(value, kind, name: str):
    """A recipe scalar of type `kind`: a string field takes strings only (a list or a number where
    a name belongs is a mistake), numbers take numbers."""
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{name} must be a single {kind.__name__}, got {_short(value)}")
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {_short(value)}")
    if kind is str and ("\0" in value or len(value) > MAX_TEXT):
        raise ConfigError(f"{name} must be text of at most {MAX_TEXT} characters without NUL bytes")
    return coerce(value, kind, name)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


MAX_TEXT = 4000  # characters of any recipe string (descriptions and notes are copied into reports)
MAX_NODES = 20_000  # values in a whole recipe (a YAML alias bomb expands past it)
MAX_DEPTH = 32
MAX_SEEDS = 100


def check_size(data, path: str = "") -> None:
    """Refuse a recipe that is too large, too deep or recursive (YAML aliases can make a
    718-byte file expand to millions of values, or refer to itself) before anything walks it."""
    stack, seen = [(data, 0)], 0
    while stack:
        value, depth = stack.pop()
        seen += 1
        if seen > MAX_NODES or depth > MAX_DEPTH:
            raise ConfigError(f"recipe {path!r} is too large, too deeply nested or recursive "
                              f"(at most {MAX_NODES} values, {MAX_DEPTH} levels)")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for pair in value.items() for v in pair)
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, str) and len(value) > MAX_TEXT:
            raise ConfigError(f"recipe {path!r} holds a string of {len(value)} characters "
                              f"(at most {MAX_TEXT})")


SCALE_KEYS = ("description", "tokenizer_fallback", "seeds", "base", "rows", "evaluate")
FIXED_ROW_KEYS = ("name", "method", "init", "sample_of")  # what a scale may not change


def merged(base, over):
    """`over` merged into `base`: mappings key by key (recursively), anything else replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = merged(base.get(key), value)
        return out
    return json.loads(json.dumps(over))  # a copy: the recipe's own values are never shared


def check_scales(data: dict, path: str = "") -> dict:
    """The recipe's `scales` section (name -> overrides), checked for shape."""
    scales = data.get("scales") or {}
    if not isinstance(scales, dict):
        raise ConfigError(f"scales of recipe {path!r} must be a mapping of scale names to overrides")
    for name, scale in scales.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"scale name {name!r} must be a non-empty string")
        if not isinstance(scale, dict):
            raise ConfigError(f"scales.{name} must be a mapping with any of: {', '.join(SCALE_KEYS)}")
        unknown = sorted(set(scale) - set(SCALE_KEYS))
        if unknown:
            raise ConfigError(f"unknown key scales.{name}.{unknown[0]}; expected any of: {', '.join(SCALE_KEYS)}")
        for key in ("base", "rows", "evaluate"):
            if scale.get(key) is not None and not isinstance(scale[key], dict):
                raise ConfigError(f"scales.{name}.{key} must be a mapping, got {scale[key]!r}")
        for row, over in (scale.get("rows") or {}).items():
            if not isinstance(over, dict):
                raise ConfigError(f"scales.{name}.rows.{row} must be a mapping of row fields, got {over!r}")
            fixed = sorted(set(over) & set(FIXED_ROW_KEYS))
            if fixed:
                raise ConfigError(f"scales.{name}.rows.{row} may not change {fixed[0]!r}: a scale changes "
                                  f"sizes and budgets, not which rows there are or how they relate")
        fallback = scale.get("tokenizer_fallback")
        if fallback is not None and not (isinstance(fallback, str) and fallback):
            raise ConfigError(f"scales.{name}.tokenizer_fallback must be a tokenizer name, got {fallback!r}")
    return scales


def apply_scale(data: dict, scale: str, path: str = "") -> dict:
    """The recipe `data` with scale `scale`'s overrides applied (and its `scales` section kept)."""
    scales = check_scales(data, path)
    if scale not in scales:
        name = data.get("name") or Path(path).stem or "compare"
        raise ConfigError(f"recipe {name!r} has no scale {scale!r}; its scales: {', '.join(scales) or 'none'}")
    over = scales[scale]
    out = dict(data)
    out["base"] = merged(data.get("base") or {}, over.get("base") or {})
    out["evaluate"] = merged(data.get("evaluate") or {}, over.get("evaluate") or {})
    rows = [dict(r) if isinstance(r, dict) else r for r in (data.get("rows") or [])]
    names = [r.get("name") for r in rows if isinstance(r, dict)]
    for row_name, row_over in (over.get("rows") or {}).items():
        if row_name not in names:
            raise ConfigError(f"scales.{scale}.rows names {row_name!r}, which is not a row of the recipe "
                              f"(rows: {', '.join(map(str, names))})")
        i = names.index(row_name)
        rows[i] = merged(rows[i], row_over)
    out["rows"] = rows
    if "seeds" in over:
        out["seeds"] = over["seeds"]
    if over.get("description"):
        out["description"] = f"[{scale} scale] {over['description']} {data.get('description') or ''}".strip()
    return out


def parse_recipe(data: dict, path: str = "", *, scale: str | None = None) -> Recipe:
    """A Recipe from its mapping; with `scale`, that scale's overrides applied first."""
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path!r} must be a mapping")
    check_size(data, path)
    if scale:
        data = apply_scale(data, scale, path)
    for key in ("base", "evaluate"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise ConfigError(f"{key} of recipe {path!r} must be a mapping, got {_short(data[key])}")
    known = {"name", "description", "base", "rows", "evaluate", "scales", "seeds", "zero_shot"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown recipe key {unknown[0]!r}; expected one of: {', '.join(sorted(known))}")
    raw_rows = data.get("rows") or []
    if not isinstance(raw_rows, list) or not raw_rows:
        raise ConfigError(f"recipe {path!r} needs a list of rows")
    rows = [_section(Row, _import_key(r), f"rows[{i}]") for i, r in enumerate(raw_rows)]
    evaluate = data.get("evaluate") or {}
    unknown = sorted(set(evaluate) - {"likelihood", "generation", "conditional"})
    if unknown:
        raise ConfigError(f"unknown key evaluate.{unknown[0]}; expected likelihood, generation, conditional")
    scales = check_scales(data, path)
    recipe = Recipe(name=_scalar(data.get("name") or Path(path).stem or "compare", str, "name"),
                    base=data.get("base") or {}, rows=rows, path=str(path),
                    description=_scalar(data.get("description") or "", str, "description"),
                    seeds=_scalar(data.get("seeds", 1), int, "seeds"),
                    likelihood=_section(Likelihood, evaluate.get("likelihood"), "evaluate.likelihood"),
                    generation=_section(Generation, evaluate.get("generation"), "evaluate.generation"),
                    conditional=_section(Conditional, evaluate.get("conditional"), "evaluate.conditional"),
                    scales=list(scales), scale=scale or "",
                    tokenizer_fallback=str(scales[scale].get("tokenizer_fallback") or "") if scale else "",
                    zero_shot=zero_shot_corpora(data.get("zero_shot"), path))
    check_rows(recipe)
    return recipe


def zero_shot_corpora(values, path: str = "") -> list[ZeroShot]:
    """The recipe's `zero_shot` list: named corpora with a known detokenizer, split and protocol."""
    from ddlm.data.detokenizers import DETOKENIZERS
    from ddlm.eval.zero_shot import PROTOCOLS

    if values is None:
        return []
    if not isinstance(values, list):
        raise ConfigError(f"zero_shot of recipe {path!r} must be a list of {{name, data}} mappings, "
                          f"got {_short(values)}")
    corpora = [_section(ZeroShot, v, f"zero_shot[{i}]") for i, v in enumerate(values)]
    names = [z.name for z in corpora]
    for i, z in enumerate(corpora):
        where = f"zero_shot[{i}]"
        if not ROW_NAME.fullmatch(z.name) or names.count(z.name) > 1:
            raise ConfigError(f"{where}.name {z.name[:60]!r} must be a plain name (letters, digits, . _ + -; "
                              f"at most 64), used once")
        if not z.data.strip():
            raise ConfigError(f"{where}.data must name a corpus (hf:PATH, FILE.txt or FILE.jsonl)")
        if z.detokenizer not in ("", "none", *DETOKENIZERS):
            raise ConfigError(f"{where}.detokenizer={z.detokenizer!r} must be empty (from the name), none, or "
                              f"one of: {', '.join(DETOKENIZERS)}")
        if z.split not in ("train", "valid", "validation", "test"):
            raise ConfigError(f"{where}.split={z.split!r} must be train, valid or test")
        if z.protocol not in PROTOCOLS:
            raise ConfigError(f"{where}.protocol={z.protocol!r} must be one of: {', '.join(PROTOCOLS)}")
    return corpora


ROW_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
SEED_SUFFIX = re.compile(r"-seed\d+$")


def check_rows(recipe: Recipe) -> None:
    from ddlm.methods.base import method_names

    names = [r.name for r in recipe.rows]
    if not 1 <= recipe.seeds <= MAX_SEEDS:
        raise ConfigError(f"seeds={recipe.seeds} must be between 1 and {MAX_SEEDS}")
    for row in recipe.rows:
        if not ROW_NAME.fullmatch(row.name) or SEED_SUFFIX.search(row.name):
            raise ConfigError(f"row name {row.name[:60]!r} must be a plain name (letters, digits, . _ + -; "
                              f"at most 64) not ending in -seed<k> (the run of seed k)")
        if not 0 <= row.seeds <= MAX_SEEDS or (row.seeds and row.sample_of):
            raise ConfigError(f"row {row.name!r}: seeds={row.seeds} must be between 1 and {MAX_SEEDS}, "
                              f"on a trained row (a sampled row has the seeds of the row it samples)")
        if names.count(row.name) > 1:
            raise ConfigError(f"row name {row.name!r} appears twice")
        if sum(map(bool, (row.method, row.sample_of, row.imported))) != 1:
            raise ConfigError(f"row {row.name!r} needs one of method (trained), sample_of or import (not trained)")
        if row.imported and (row.init or row.options or row.train or row.model or row.seeds):
            raise ConfigError(f"row {row.name!r} imports {row.imported!r}: it takes no init, options, train, "
                              "model or seeds (its config comes from the folder)")
        if row.method and row.method not in method_names():
            raise ConfigError(f"row {row.name!r}: unknown method {row.method!r}; "
                              f"choose one of: {', '.join(method_names())}")
        for other in (row.init, row.sample_of):
            if other and (other not in names or recipe.row(other).sample_of):
                raise ConfigError(f"row {row.name!r} refers to {other!r}, which is not a trained row")
            if other and recipe.seeds_of(recipe.row(other)) < recipe.seeds_of(row):
                raise ConfigError(f"row {row.name!r} has {recipe.seeds_of(row)} seeds but starts from "
                                  f"{other!r}, which has {recipe.seeds_of(recipe.row(other))}")
    for judge in [*recipe.generation.judges, recipe.conditional.judge]:
        if ":" not in judge and judge not in ("smollm2",) and judge not in names:
            raise ConfigError(f"judge {judge!r} is neither a row of the recipe nor a judge spec "
                              f"(ar:DIR, smollm2, hf:DIR)")


def read_recipe(path: str | Path, scale: str | None = None) -> Recipe:
    """A recipe from a YAML file (recipes/*.yaml), at scale `scale` when given."""
    return parse_recipe(load_recipe(path), str(path), scale=scale)
