"""Typed configuration: dataclasses with a docstring per field, validated on construction.

A run is described by one `RunConfig`; it round-trips through JSON (config.json in a checkpoint),
loads from YAML recipes, and takes `--section.field=value` overrides from the command line.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddlm.errors import ConfigError
from ddlm.nn.config import BLOCKS, POSITIONS, ModelConfig  # noqa: F401  (the backbone's, re-exported)


LOG_SINKS = ("jsonl", "tensorboard", "wandb")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class DataConfig:
    """Where the tokens come from and how they are cut into sequences."""

    corpus: str = "austen"
    """austen | text8:PATH | hf:PATH | PATH.txt | prepared:DIR (tokens written by `ddlm data prepare`)"""
    tokenizer: str = "char"
    """char (text8 preprocessing) | byte | bpe | cl100k | gpt2 (GPT-2 BPE) | bert[:VOCAB] (bert-base-uncased)"""
    seq_len: int = 256
    """Sequence length L (the model's context)."""
    packing: str = "wrap"
    """wrap: contiguous blocks of L tokens; pad: one padded sentence per row with BOS/EOS."""
    bpe_vocab_size: int = 2048
    """Vocabulary size when training a BPE tokenizer on the corpus."""
    text8_download: bool = False
    """Download text8 when the given path does not exist."""

    def __post_init__(self) -> None:
        _check(self.seq_len >= 2, f"data.seq_len={self.seq_len} must be at least 2")
        _check(self.packing in ("wrap", "pad"),
               f"data.packing={self.packing!r} must be 'wrap' or 'pad'")
        _check(self.bpe_vocab_size >= 300, f"data.bpe_vocab_size={self.bpe_vocab_size} must be >= 300")


@dataclass
class TrainConfig:
    """The method-agnostic optimisation loop."""

    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 16
    """Sequences per optimizer step over all processes (the global batch)."""
    micro_batch_size: int = 0
    """Sequences per forward pass on one process (0: batch_size / processes); each process
    accumulates the gradients of batch_size / (processes x micro_batch_size) micro-batches. With
    several processes or a micro-batch set here, each micro-batch draws its noise from a seed of
    (train.seed, step, its position in the global batch), so the same global batch gives the same
    update on any number of processes."""
    parallel: str = "ddp"
    """Data parallelism under torchrun: ddp (DistributedDataParallel) | fsdp2 (fully_shard per
    block: parameters, gradients, AdamW state and EMA sharded over processes)."""
    dist_timeout: float = 600.0
    """Seconds a collective may wait for another process before the job ends (a rank that died)."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine decay, as a fraction of lr."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to norms, biases and embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.98
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    ema: float = 0.999
    """EMA decay of the weights used for evaluation and sampling (0 disables)."""
    dtype: str = "auto"
    """auto (measured once and cached) | fp32 | bf16"""
    compile: bool = False
    """Wrap the model in torch.compile."""
    seed: int = 0
    """Seed for initialisation, data order and noise."""
    init: str = ""
    """Start from the weights of this checkpoint (e.g. an MDLM run to fine-tune as BD3-LM); its
    tokenizer is used. Ignored when resuming."""
    eval_every: int = 250
    """Validate every N steps (0: only at the end)."""
    eval_batches: int = 8
    """Validation batches per evaluation."""
    ckpt_every: int = 500
    """Checkpoint every N steps (a final one is always written)."""
    keep_ckpts: int = 2
    """Checkpoints kept on disk."""
    log_every: int = 10
    """Write a metrics line every N steps."""
    log: str = "jsonl"
    """Where metrics go besides metrics.jsonl (always written): jsonl (nowhere else) | tensorboard |
    wandb (offline unless WANDB_MODE says otherwise) | tensorboard,wandb."""
    threads: int = 0
    """torch intra-op threads (0: all cores)."""
    progress: bool = True
    """Show a progress bar."""
    max_nonfinite: int = 5
    """Steps with a NaN/inf loss or gradient are skipped (counted in metrics.jsonl); this many in
    a row stop the run."""

    def __post_init__(self) -> None:
        _check(self.steps >= 1, f"train.steps={self.steps} must be >= 1")
        _check(self.threads >= 0, f"train.threads={self.threads} must be >= 0 (0: all cores)")
        _check(self.seed >= 0, f"train.seed={self.seed} must be >= 0")
        _check(self.max_nonfinite >= 1, f"train.max_nonfinite={self.max_nonfinite} must be >= 1")
        _check(self.batch_size >= 1, f"train.batch_size={self.batch_size} must be >= 1")
        _check(self.micro_batch_size >= 0, f"train.micro_batch_size={self.micro_batch_size} must be >= 0 "
                                           f"(0: train.batch_size / processes)")
        _check(self.parallel in ("ddp", "fsdp2"), f"train.parallel={self.parallel!r} must be ddp or fsdp2")
        _check(self.dist_timeout > 0, f"train.dist_timeout={self.dist_timeout} must be positive")
        _check(self.lr > 0, f"train.lr={self.lr} must be positive")
        _check(self.weight_decay >= 0, f"train.weight_decay={self.weight_decay} must be >= 0")
        _check(0 <= self.beta1 < 1, f"train.beta1={self.beta1} must be in [0, 1)")
        _check(0 <= self.beta2 < 1, f"train.beta2={self.beta2} must be in [0, 1)")
        _check(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _check(self.warmup_steps >= 0, f"train.warmup_steps={self.warmup_steps} must be >= 0")
        _check(0 <= self.ema < 1, f"train.ema={self.ema} must be in [0, 1)")
        _check(self.dtype in ("auto", "fp32", "bf16"),
               f"train.dtype={self.dtype!r} must be auto, fp32 or bf16")
        _check(self.grad_clip >= 0, f"train.grad_clip={self.grad_clip} must be >= 0")
        _check(self.keep_ckpts >= 1, f"train.keep_ckpts={self.keep_ckpts} must be >= 1")
        sinks = self.log.split(",")
        _check(all(sink in LOG_SINKS for sink in sinks) and len(set(sinks)) == len(sinks),
               f"train.log={self.log!r} must be jsonl, tensorboard, wandb or tensorboard,wandb")
        _check(self.log_every >= 1, f"train.log_every={self.log_every} must be >= 1")
        _check(self.eval_every >= 0 and self.ckpt_every >= 0 and self.eval_batches >= 1,
               "train.eval_every, train.ckpt_every must be >= 0 and train.eval_batches >= 1")


@dataclass
class EvalConfig:
    """Likelihood evaluation protocol."""

    split: str = "valid"
    """train | valid | test"""
    batch_size: int = 16
    """Sequences per evaluation batch."""
    t_samples: int = 1
    """Monte-Carlo time samples per sequence for diffusion bounds."""
    max_batches: int = 0
    """Evaluate at most this many batches (0: the whole split)."""
    seed: int = 0
    """Seed of the Monte-Carlo noise."""

    def __post_init__(self) -> None:
        _check(self.split in ("train", "valid", "validation", "test"),
               f"eval.split={self.split!r} must be train, valid or test")
        _check(self.batch_size >= 1 and self.t_samples >= 1 and self.max_batches >= 0,
               "eval.batch_size and eval.t_samples must be >= 1, eval.max_batches >= 0")
        _check(self.seed >= 0, f"eval.seed={self.seed} must be >= 0")


MAX_SAMPLES = 1_000_000  # bounds checked up front, so a typo cannot hang a run for days
MAX_SAMPLE_TOKENS = 1_000_000
MAX_SAMPLE_STEPS = 100_000


@dataclass
class SampleConfig:
    """Generation options shared by every sampler."""

    num: int = 4
    """Number of samples."""
    length: int = 0
    """Tokens to generate per sample (0: the model's context length)."""
    steps: int = 256
    """Denoising steps for diffusion samplers."""
    temperature: float = 1.0
    """Softmax temperature."""
    top_k: int = 0
    """Keep the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1: off)."""
    sampler: str = ""
    """Sampler name ('' : the method's default; mdlm / bd3: ancestral | first_hitting | remdm |
    confidence, sedd: analytic | euler)."""
    remask: str = "cap"
    """remdm (ReMDM, docs/samplers.md): the remasking schedule, cap | rescale | conf | loop."""
    eta: float = 0.02
    """remdm cap / rescale / loop: eta_cap, eta_rescale or the loop's sigma (0: the ancestral
    sampler, token for token, for cap and rescale); conf has no eta."""
    t_on: float = 0.55
    """remdm loop: remasking runs while t_off < t <= t_on, at the fixed clean fraction alpha_on."""
    t_off: float = 0.05
    """remdm loop: the end of the remasking phase."""
    alpha_on: float = 0.9
    """remdm loop: the clean fraction held during the remasking phase."""
    threshold: float = 0.9
    """confidence: decode every masked token whose drawn token has probability >= threshold (at
    least the most confident one a step; 1.0: exactly one a step). `steps` only caps its steps."""
    cache: bool = True
    """Use the method's cache (AR: KV cache; MDLM: no-change cache)."""
    t_min: float = 1e-5
    """Diffusion samplers: last time of the grid linspace(1, t_min, steps + 1)."""
    noise_removal: str = "draw"
    """MDLM ancestral: tokens still masked at t_min are drawn (a step to t = 0) | argmax."""
    seed: int = 0
    """Seed of the sampling noise."""
    batch_size: int = 16
    """Samples drawn in parallel."""
    stride: int = 0
    """Past the context, each window adds this many tokens after the last context - stride
    (0: context // 2)."""
    stop_eos: bool = False
    """Variable length (bd3): a row ends at its first generated EOS."""
    stop_entropy: float = 0.0
    """Variable length (bd3): a row ends when the unigram entropy (nats) of its last
    entropy_window tokens falls below this (0: off); that degenerate tail is cut."""
    entropy_window: int = 256
    """Tokens the entropy stop looks at."""

    def __post_init__(self) -> None:
        _check(1 <= self.num <= MAX_SAMPLES, f"sample.num={self.num} must be in 1..{MAX_SAMPLES:,}")
        _check(0 <= self.length <= MAX_SAMPLE_TOKENS,
               f"sample.length={self.length} must be in 0..{MAX_SAMPLE_TOKENS:,} (0: the context)")
        _check(1 <= self.steps <= MAX_SAMPLE_STEPS, f"sample.steps={self.steps} must be in 1..{MAX_SAMPLE_STEPS:,}")
        _check(self.seed >= 0, f"sample.seed={self.seed} must be >= 0")
        _check(self.temperature > 0, f"sample.temperature={self.temperature} must be positive")
        _check(self.top_k >= 0, f"sample.top_k={self.top_k} must be >= 0")
        _check(0 < self.top_p <= 1, f"sample.top_p={self.top_p} must be in (0, 1]")
        _check(self.batch_size >= 1, f"sample.batch_size={self.batch_size} must be >= 1")
        _check(self.stride >= 0, f"sample.stride={self.stride} must be >= 0")
        _check(self.stop_entropy >= 0 and self.entropy_window >= 1,
               f"sample.stop_entropy={self.stop_entropy} must be >= 0 and sample.entropy_window="
               f"{self.entropy_window} >= 1")
        _check(0 < self.t_min < 1, f"sample.t_min={self.t_min} must be in (0, 1)")
        _check(self.noise_removal in ("draw", "argmax"),
               f"sample.noise_removal={self.noise_removal!r} must be 'draw' or 'argmax'")
        _check(self.remask in ("cap", "rescale", "conf", "loop"),
               f"sample.remask={self.remask!r} must be one of cap, rescale, conf, loop")
        _check(0 <= self.eta <= 1, f"sample.eta={self.eta} must be in [0, 1]")
        _check(0 <= self.t_off < self.t_on <= 1,
               f"sample.t_off={self.t_off} and sample.t_on={self.t_on} must satisfy 0 <= t_off < t_on <= 1")
        _check(0 < self.alpha_on < 1, f"sample.alpha_on={self.alpha_on} must be in (0, 1)")
        _check(0 < self.threshold <= 1, f"sample.threshold={self.threshold} must be in (0, 1]")


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig,
                             "eval": EvalConfig, "sample": SampleConfig}


@dataclass
class RunConfig:
    """Everything needed to rebuild a run: method, its options, and the shared sections."""

    method: str = "ar"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    method_options: Any = None
    """The method's own config dataclass (`--<method>.<field>=value`)."""

    def __post_init__(self) -> None:
        from ddlm.methods.base import method_class

        method = method_class(self.method)
        if self.model.block == "auto":
            self.model = dataclasses.replace(self.model, block=method.default_block)
        cls = method.config_class
        if self.method_options is None:
            self.method_options = cls()
        elif isinstance(self.method_options, dict):
            self.method_options = _build(cls, self.method_options, self.method)
        self.method_options.validate()

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"method": self.method}
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        out[self.method] = dataclasses.asdict(self.method_options)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        d = dict(d)
        method = d.pop("method", "ar")
        if not isinstance(method, str):
            raise ConfigError(f"method must be a name, got {method!r}")
        sections = {name: _build(kind, d.pop(name, {}) or {}, name) for name, kind in SECTIONS.items()}
        options = d.pop(method, {}) or {}
        from ddlm.methods.base import method_names

        key = next(iter(d), None)
        if key in method_names():
            raise ConfigError(f"options of method {key!r} (--{key}.*) do not apply to method {method!r}")
        if key is not None:
            raise ConfigError(f"unknown config section {key!r}; expected one of: "
                              f"method, {', '.join(SECTIONS)}, {method}")
        return cls(method=method, method_options=options, **sections)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _build(cls: type, values: dict, section: str):
    if not isinstance(values, dict):
        raise ConfigError(f"config section {section!r} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(_unknown_key(f"{section}.{key}", [f"{section}.{n}" for n in names]))
        kwargs[key] = coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


def section_config(base, section: str, values: dict, extra: list[str]):
    """A copy of one section's config with `values` and `--section.field=value` args applied."""
    merged = dataclasses.asdict(base)
    merged.update({k: v for k, v in values.items() if v is not None})
    for key, value in parse_overrides(extra).items():
        prefix, _, name = key.partition(".")
        if prefix != section:
            raise ConfigError(f"option --{key} does not apply here; use --{section}.<field>")
        merged[name] = value
    return _build(type(base), merged, section)


def split_sections(extra: list[str], section: str) -> tuple[list[str], dict[str, str]]:
    """Split `--a.b=value` arguments into those of `section` (as arguments) and the rest
    ({'a.b': 'value'}: method options given at sample or eval time)."""
    own, other = [], {}
    for key, value in parse_overrides(extra).items():
        if key.partition(".")[0] == section:
            own.append(f"--{key}={value}")
        else:
            other[key] = value
    return own, other


def _unknown_key(key: str, known: list[str]) -> str:
    near = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean --{near[0]}?)" if near else ""
    return f"unknown option --{key}{hint}"


def coerce(value: Any, kind: Any, name: str) -> Any:
    """Convert a string (CLI) or JSON/YAML scalar to the field's declared type; a float field
    takes finite numbers only (nan, inf and 1e400 are refused here, whatever its range)."""
    if kind is Any:
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}={value!r} is not a boolean (use true or false)")
    if kind in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be a number")
        try:
            number = float(value) if kind is float else _as_int(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int('1e400')
            raise ConfigError(f"{name}={value!r} is not a{'n integer' if kind is int else ' number'}") from None
        if kind is float and not math.isfinite(number):
            raise ConfigError(f"{name}={value!r} is not a finite number")
        return number
    if kind is str:
        return str(value)
    return value


def _as_int(value: Any) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)


def apply_overrides(base: dict, overrides: dict[str, str]) -> dict:
    """Return a copy of a RunConfig dict with `section.field` overrides applied (values still raw)."""
    out = json.loads(json.dumps(base))
    for key, value in overrides.items():
        if key == "method":
            out["method"] = value
            continue
        section, _, name = key.partition(".")
        if not name:
            raise ConfigError(f"option --{key} must look like --section.field=value")
        out.setdefault(section, {})
        if not isinstance(out[section], dict):
            raise ConfigError(f"config section {section!r} is not a mapping")
        out[section][name] = value
    return out


def parse_overrides(args: list[str]) -> dict[str, str]:
    """Parse `--a.b=value` and `--a.b value` pairs into {'a.b': 'value'}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"unexpected argument {arg!r}; options look like --section.field=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"option --{key} needs a value")
            value = args[i + 1]
            i += 1
        out[key.replace("-", "_")] = value
        i += 1
    return out


MAX_RECIPE_BYTES = 1 << 20  # recipes are a few kB; a bound read before parsing
MAX_RECIPE_VALUES = 100_000  # values once aliases are expanded: an alias bomb stops here


def load_recipe(path: str | Path) -> dict:
    """Read a YAML or JSON recipe into a RunConfig dict. A file past MAX_RECIPE_BYTES, nesting past
    the recursion limit, an alias that refers to itself, or aliases that expand past
    MAX_RECIPE_VALUES values (a "billion laughs") are one line, refused before anything uses them."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} not found")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise ConfigError(f"recipe {str(path)!r} holds {path.stat().st_size:,} bytes, more than a recipe's "
                          f"{MAX_RECIPE_BYTES:,}")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"recipe {str(path)!r} is nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(path)!r} must hold a mapping of sections")
    _check_expansion(data, str(path))
    return data


def _check_expansion(data: Any, name: str) -> None:
    """Walk the recipe as its readers will, each alias expanded: refuse a value that contains
    itself, or more than MAX_RECIPE_VALUES values in all."""
    count, stack = 0, [(data, ())]
    while stack:
        value, above = stack.pop()
        count += 1
        if count > MAX_RECIPE_VALUES:
            raise ConfigError(f"recipe {name!r} expands to more than {MAX_RECIPE_VALUES:,} values (YAML aliases "
                              f"repeated inside one another); write the values out")
        if isinstance(value, (dict, list)):
            if id(value) in above:
                raise ConfigError(f"recipe {name!r} refers to itself (a YAML alias inside its own anchor)")
            children = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((child, (*above, id(value))) for child in children)


def make_config(*, recipe: str | None = None, overrides: dict[str, str] | None = None,
                base: dict | None = None) -> RunConfig:
    """Defaults <- base dict (e.g. a checkpoint's) <- recipe <- CLI overrides, validated."""
    d = base if base is not None else {}
    if recipe:
        d = _merge(d, load_recipe(recipe))
    d = apply_overrides(d, overrides or {})
    return RunConfig.from_dict(d)


def _merge(a: dict, b: dict) -> dict:
    out = json.loads(json.dumps(a))
    for key, value in b.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out
