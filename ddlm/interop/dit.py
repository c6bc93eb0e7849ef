"""The published DiT checkpoints of MDLM, BD3-LM and SEDD as ddlm runs.

Three formats share one network, the adaLN DiT of Lou et al. (SEDD) that MDLM (Sahoo et al. 2024)
and BD3-LM (Arriola et al. 2025) kept: token embedding, sinusoidal noise features (256, cos then
sin) and a two-layer SiLU MLP, blocks of weight-only LayerNorm, shift/scale/gate modulation from
c = SiLU(embed(sigma)), rotate-half RoPE (base 10,000) on q and k, bidirectional attention, a
tanh-GELU MLP of width 4D with biases, and a modulated final LayerNorm before a biased output layer.
That is ddlm's gated block exactly, so every tensor maps onto one ddlm weight (docs/import-reference.md):

    format  config                                    keys                        method
    mdlm    config.json, model_type "mdlm" (HF)       backbone.*                  mdlm (SUBS)
    bd3     config.json, model_type "bd3lm" (HF)      backbone.*, sampling_eps_*  bd3 (block_size)
    sedd    config.json / config.yaml (hydra form)    no prefix                   sedd (absorbing)

Their vocabulary is GPT-2's 50,257 tokens and the mask as the last id (50,258 outputs); ddlm's
gpt2 tokenizer adds a pad id, so the embedding and output layer get one zero row for it and
`model.output_vocab` keeps it from ever being emitted. Only `.safetensors` files are read; pickles
(.bin, .pt, .pth, .ckpt) are refused unopened.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ddlm.config import RunConfig
from ddlm.errors import CheckpointError, ConfigError, DdlmError
from ddlm.interop.rundir import Imported
from ddlm.interop.safetensors_dir import load_files, read_key_shapes, weight_files

FORMATS = ("mdlm", "bd3", "sedd")
ARCHITECTURES = {"mdlm": "mdlm-dit", "bd3": "bd3lm-dit", "sedd": "sedd-dit"}
HF_MODEL_TYPES = {"mdlm": "mdlm", "bd3lm": "bd3"}
GPT2_TOKENS = 50257
THEIR_VOCAB = GPT2_TOKENS + 1  # GPT-2's tokens, then the mask
DDLM_VOCAB = THEIR_VOCAB + 1  # ddlm's gpt2 tokenizer: ... mask 50257, pad 50258
ROPE_BASE = 10000.0
NOISE_FEATURES = 256
MLP_RATIO = 4
SAMPLING_EPS = 1e-3  # their training and evaluation times t ~ U[1e-3, 1]
LOGLINEAR_EPS = 1e-3  # MDLM's and SEDD's log-linear schedule: mask rate (1 - 1e-3) t
# BD3-LM's code masks with probability t itself (its noise returns move_chance = t, weight 1/t):
# ddlm's log-linear rate (1 - eps) t with this eps is that up to a relative 1e-9.
BD3_EPS = 1e-9
MAX_CONFIG_BYTES = 1 << 20

# (their name, ddlm's name) of the tensors outside the blocks, after the format's prefix
TOP_KEYS = (
    ("vocab_embed.embedding", "embed.weight"),
    ("sigma_map.mlp.0.weight", "noise_embed.mlp.0.weight"),
    ("sigma_map.mlp.0.bias", "noise_embed.mlp.0.bias"),
    ("sigma_map.mlp.2.weight", "noise_embed.mlp.2.weight"),
    ("sigma_map.mlp.2.bias", "noise_embed.mlp.2.bias"),
    ("output_layer.norm_final.weight", "norm.weight"),
    ("output_layer.linear.weight", "head.weight"),
    ("output_layer.linear.bias", "head.bias"),
    ("output_layer.adaLN_modulation.weight", "final_modulation.weight"),
    ("output_layer.adaLN_modulation.bias", "final_modulation.bias"),
)
# (their name, ddlm's name) inside block i: blocks.{i}.<theirs> -> blocks.{i}.<ours>
BLOCK_KEYS = (
    ("norm1.weight", "norm1.weight"),
    ("attn_qkv.weight", "qkv.weight"),
    ("attn_out.weight", "proj.weight"),
    ("norm2.weight", "norm2.weight"),
    ("mlp.0.weight", "fc.weight"),
    ("mlp.0.bias", "fc.bias"),
    ("mlp.2.weight", "fc_out.weight"),
    ("mlp.2.bias", "fc_out.bias"),
    ("adaLN_modulation.weight", "modulation.weight"),
    ("adaLN_modulation.bias", "modulation.bias"),
)
VOCAB_ROWS = ("embed.weight", "head.weight", "head.bias")  # one row per id: the pad row is appended
ROTARY_KEY = "rotary_emb.inv_freq"  # a persistent buffer of theirs: checked, not stored
BD3_WINDOW_KEYS = ("sampling_eps_min", "sampling_eps_max")  # BD3LM's own buffers, no prefix


@dataclass(frozen=True)
class DitShape:
    """The sizes a published config gives."""

    dim: int
    n_layers: int
    n_heads: int
    cond_dim: int
    length: int
    dropout: float


@dataclass
class Source:
    """What a published folder is: its format, sizes, key prefix and the options their code runs
    with (time conditioning, schedule, BD3-LM's block size, SEDD's graph)."""

    format: str
    shape: DitShape
    prefix: str
    time_conditioning: bool
    schedule: dict = field(default_factory=dict)
    block_size: int = 0


# ---- where the files are ---------------------------------------------------------------------

def snapshot_dir(src: Path) -> Path:
    """src itself, or for a huggingface_hub cache folder (models--org--name) the snapshot that
    refs/main names (or its only snapshot)."""
    snapshots = src / "snapshots"
    if not snapshots.is_dir():
        return src
    ref = src / "refs" / "main"
    if ref.is_file():
        with open(ref, "rb") as f:  # a commit hash: a few bytes, whatever the file holds
            name = f.read(256).decode("utf-8", errors="replace").strip()
        chosen = snapshots / name
        if name and "/" not in name and "\\" not in name and name not in (".", "..") and chosen.is_dir():
            return chosen
    found = sorted(p for p in snapshots.iterdir() if p.is_dir())
    if len(found) != 1:
        raise CheckpointError(f"'{src}' is a huggingface_hub cache with {len(found)} snapshots and no "
                              f"usable refs/main; pass the snapshot folder itself")
    return found[0]


def config_file(src: Path) -> Path | None:
    for name in ("config.json", "config.yaml", ".hydra/config.yaml"):
        if (src / name).is_file():
            return src / name
    return None


def read_config(src: Path) -> dict:
    """The folder's config (config.json, or a hydra config.yaml) as a dict; one line if it is
    missing, too large, or not a mapping."""
    path = config_file(src)
    if path is None:
        raise CheckpointError(f"'{src}' has no config.json or config.yaml to say what model it holds")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"config '{path}' is larger than {MAX_CONFIG_BYTES:,} bytes; not a model config")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            config = json.loads(text)
        else:
            import yaml

            config = yaml.safe_load(text)
    except RecursionError:
        raise CheckpointError(f"config '{path}' is nested too deeply to be a model config") from None
    except Exception as exc:  # JSON, YAML and decoding errors alike: the file is not a config
        raise CheckpointError(f"config '{path}' cannot be read: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"config '{path}' is not a mapping of fields (got {type(config).__name__})")
    return config


# ---- which format ----------------------------------------------------------------------------

def detect(src: Path) -> str | None:
    """Which of mdlm, bd3, sedd the folder `src` holds, from its config (HF model_type, or SEDD's
    hydra sections) or, without a config, from its key names; None when it is none of them."""
    src = snapshot_dir(Path(src))
    if config_file(src) is not None:
        return format_of_config(read_config(src))
    return format_of_keys(src)


def format_of_config(config: dict) -> str | None:
    model_type = config.get("model_type")
    if isinstance(model_type, str):
        return HF_MODEL_TYPES.get(model_type)
    model, graph = config.get("model"), config.get("graph")
    if isinstance(model, dict) and isinstance(graph, dict) and "hidden_size" in model:
        return "sedd"
    return None


def format_of_keys(src: Path) -> str | None:
    try:
        keys = set(read_key_shapes(weight_files(src)))
    except DdlmError:
        return None
    if "sampling_eps_min" in keys and "backbone.vocab_embed.embedding" in keys:
        return "bd3"
    if "backbone.vocab_embed.embedding" in keys:
        return "mdlm"
    if "vocab_embed.embedding" in keys:
        return "sedd"
    return None


# ---- their configs -> Source -----------------------------------------------------------------

def field_of(config: dict, name: str, kind: type, where: str = "config", default=None):
    """config[name] as `kind` (int, float, bool, str); one line naming the field otherwise."""
    value = config.get(name, default)
    if value is None:
        raise CheckpointError(f"{where} lacks the field '{name}'")
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif isinstance(value, kind):
        return value
    raise CheckpointError(f"{where} field '{name}' is {value!r}; expected {kind.__name__}")


def checked_shape(dim: int, n_layers: int, n_heads: int, cond_dim: int, length: int, dropout: float,
                  where: str) -> DitShape:
    for name, value in (("width", dim), ("blocks", n_layers), ("heads", n_heads), ("cond_dim", cond_dim),
                        ("length", length)):
        if value <= 0:
            raise CheckpointError(f"{where}: {name} must be positive, got {value}")
    if dim % n_heads or (dim // n_heads) % 2:
        raise CheckpointError(f"{where}: width {dim} over {n_heads} heads does not give an even head size")
    if not 0 <= dropout < 1:
        raise CheckpointError(f"{where}: dropout {dropout} is not in [0, 1)")
    return DitShape(dim, n_layers, n_heads, cond_dim, length, dropout)


def check_vocab(vocab: int, where: str) -> None:
    if vocab != THEIR_VOCAB:
        raise CheckpointError(f"{where}: vocabulary {vocab} is not GPT-2's {GPT2_TOKENS:,} tokens + mask "
                              f"({THEIR_VOCAB:,}), the only one ddlm imports these models with")


def hf_shape(config: dict, where: str) -> DitShape:
    """The sizes of an HF MDLM/BD3-LM config (MDLMConfig / BD3LMConfig fields)."""
    check_vocab(field_of(config, "vocab_size", int, where), where)
    return checked_shape(field_of(config, "hidden_dim", int, where), field_of(config, "n_blocks", int, where),
                         field_of(config, "n_heads", int, where), field_of(config, "cond_dim", int, where),
                         field_of(config, "model_length", int, where),
                         field_of(config, "dropout", float, where, default=0.1), where)


def mdlm_source(config: dict) -> Source:
    where = "MDLM config.json"
    return Source("mdlm", hf_shape(config, where), "backbone.",
                  time_conditioning=field_of(config, "time_conditioning", bool, where, default=False),
                  schedule={"schedule": "loglinear", "eps": LOGLINEAR_EPS})


def bd3_source(config: dict) -> Source:
    where = "BD3-LM config.json"
    shape = hf_shape(config, where)
    for name, needed in (("adaln", True), ("causal", False), ("cross_attn", True), ("time_conditioning", False)):
        value = field_of(config, name, bool, where, default=needed)
        if value != needed:
            raise CheckpointError(f"{where}: {name}={str(value).lower()} is not supported (only the published "
                                  f"{name}={str(needed).lower()}: ddlm's BD3-LM would not compute the same function)")
    block_size = field_of(config, "block_size", int, where)
    if block_size <= 0 or shape.length % block_size:
        raise CheckpointError(f"{where}: block_size {block_size} does not divide model_length {shape.length}")
    return Source("bd3", shape, "backbone.", time_conditioning=False,
                  schedule={"schedule": "loglinear", "eps": BD3_EPS}, block_size=block_size)


def section(config: dict, name: str, where: str) -> dict:
    value = config.get(name)
    if not isinstance(value, dict):
        raise CheckpointError(f"{where} lacks the section '{name}'")
    return value


def sedd_source(config: dict) -> Source:
    where = "SEDD config"
    model, graph, noise = (section(config, name, where) for name in ("model", "graph", "noise"))
    graph_type = field_of(graph, "type", str, f"{where} graph")
    if graph_type != "absorb":
        raise CheckpointError(f"{where}: graph type {graph_type!r} is not supported (only the published "
                              f"'absorb'; the uniform graph has no mask id)")
    if not field_of(model, "scale_by_sigma", bool, f"{where} model", default=True):
        raise CheckpointError(f"{where}: model.scale_by_sigma=false is not supported (ddlm's absorbing SEDD "
                              f"always scales the scores by sigma)")
    check_vocab(field_of(config, "tokens", int, where) + 1, where)
    shape = checked_shape(*(field_of(model, name, int, f"{where} model")
                            for name in ("hidden_size", "n_blocks", "n_heads", "cond_dim", "length")),
                          field_of(model, "dropout", float, f"{where} model", default=0.1), where)
    return Source("sedd", shape, "", time_conditioning=True, schedule=sedd_schedule(noise, where))


def sedd_schedule(noise: dict, where: str) -> dict:
    kind = field_of(noise, "type", str, f"{where} noise")
    if kind == "loglinear":  # their LogLinearNoise() ignores sigma_min/max: eps = 1e-3 always
        return {"schedule": "loglinear", "eps": LOGLINEAR_EPS}
    if kind == "geometric":
        return {"schedule": "geometric", "sigma_min": field_of(noise, "sigma_min", float, f"{where} noise"),
                "sigma_max": field_of(noise, "sigma_max", float, f"{where} noise")}
    raise CheckpointError(f"{where}: noise type {kind!r} is not one of loglinear, geometric")


SOURCES = {"mdlm": mdlm_source, "bd3": bd3_source, "sedd": sedd_source}


# ---- the key table -------------------------------------------------------------------------

def key_table(source: Source) -> dict[str, str]:
    """Their key -> ddlm's key, for every weight tensor of the format (the full published list
    besides the derived rotary buffer and BD3-LM's window buffers)."""
    p = source.prefix
    table = {p + theirs: ours for theirs, ours in TOP_KEYS}
    for i in range(source.shape.n_layers):
        table.update({f"{p}blocks.{i}.{theirs}": f"blocks.{i}.{ours}" for theirs, ours in BLOCK_KEYS})
    return table


def reference_shapes(source: Source) -> dict[str, tuple[int, ...]]:
    """Every tensor of the published format with its shape (their names): the weights of
    `key_table`, the rotary buffer and, for BD3-LM, its two window scalars."""
    s, V, p = source.shape, THEIR_VOCAB, source.prefix
    D, C, M = s.dim, s.cond_dim, MLP_RATIO * s.dim
    top = {"vocab_embed.embedding": (V, D), "sigma_map.mlp.0.weight": (C, NOISE_FEATURES),
           "sigma_map.mlp.0.bias": (C,), "sigma_map.mlp.2.weight": (C, C), "sigma_map.mlp.2.bias": (C,),
           "output_layer.norm_final.weight": (D,), "output_layer.linear.weight": (V, D),
           "output_layer.linear.bias": (V,), "output_layer.adaLN_modulation.weight": (2 * D, C),
           "output_layer.adaLN_modulation.bias": (2 * D,), ROTARY_KEY: (D // s.n_heads // 2,)}
    block = {"norm1.weight": (D,), "attn_qkv.weight": (3 * D, D), "attn_out.weight": (D, D),
             "norm2.weight": (D,), "mlp.0.weight": (M, D), "mlp.0.bias": (M,), "mlp.2.weight": (D, M),
             "mlp.2.bias": (D,), "adaLN_modulation.weight": (6 * D, C), "adaLN_modulation.bias": (6 * D,)}
    shapes = {p + k: v for k, v in top.items()}
    for i in range(s.n_layers):
        shapes.update({f"{p}blocks.{i}.{k}": v for k, v in block.items()})
    if source.format == "bd3":
        shapes.update({k: () for k in BD3_WINDOW_KEYS})
    return shapes


def optional_keys(source: Source) -> set[str]:
    """Tensors a published file may leave out: buffers, which not every saver keeps."""
    return {source.prefix + ROTARY_KEY} | (set(BD3_WINDOW_KEYS) if source.format == "bd3" else set())


# ---- reading and checking the tensors ------------------------------------------------------

def check_keys(found: dict[str, tuple], source: Source) -> None:
    """One line for the first unexpected key, missing key or wrong shape."""
    expected = reference_shapes(source)
    name = ARCHITECTURES[source.format]
    for key in sorted(found):
        if key not in expected:
            raise CheckpointError(f"unexpected key '{key}' in a {name} checkpoint")
    for key in expected:
        if key not in found and key not in optional_keys(source):
            raise CheckpointError(f"missing key '{key}' of a {name} checkpoint")
    for key, (shape, _) in found.items():
        if tuple(shape) != expected[key] and not (key in BD3_WINDOW_KEYS and math.prod(shape) == 1):
            raise CheckpointError(f"key '{key}' has shape {tuple(shape)}; the config implies {expected[key]}")


def load_tensors(found: dict[str, tuple]) -> dict[str, torch.Tensor]:
    tensors = load_files(sorted({p for _, p in found.values()}))
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"key '{key}' holds {tensor.dtype} values; expected floating point")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"key '{key}' holds non-finite values (nan or inf)")
    return tensors


def check_rotary(tensors: dict[str, torch.Tensor], source: Source) -> None:
    """Their stored inv_freq must be RoPE base 10,000 over the head size (the frequencies ddlm's
    Rotary computes); ddlm recomputes them rather than storing them."""
    stored = tensors.get(source.prefix + ROTARY_KEY)
    if stored is None:
        return
    hd = source.shape.dim // source.shape.n_heads
    want = 1.0 / ROPE_BASE ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    if not torch.allclose(stored.double(), want, rtol=1e-5, atol=0):
        raise CheckpointError(f"key '{source.prefix}{ROTARY_KEY}' is not RoPE base {ROPE_BASE:g} "
                              f"(max difference {float((stored.double() - want).abs().max()):.3g})")


# ---- their tensors <-> ddlm's weights ------------------------------------------------------

def to_ddlm(tensors: dict[str, torch.Tensor], source: Source) -> dict[str, torch.Tensor]:
    """ddlm's weights from theirs: renamed by the key table, a zero pad row appended to the
    per-id tensors (embedding, output weight and bias)."""
    weights = {}
    for theirs, ours in key_table(source).items():
        tensor = tensors[theirs].to(torch.float32)
        if ours in VOCAB_ROWS:
            tensor = torch.cat([tensor, tensor.new_zeros(1, *tensor.shape[1:])])
        weights[ours] = tensor.contiguous()
    return weights


def to_reference(weights: dict[str, torch.Tensor], source: Source) -> dict[str, torch.Tensor]:
    """The inverse of `to_ddlm`: their key names, the pad row dropped (weights only; the derived
    rotary buffer and BD3-LM's window are not weights)."""
    out = {}
    for theirs, ours in key_table(source).items():
        tensor = weights[ours]
        out[theirs] = tensor[:THEIR_VOCAB] if ours in VOCAB_ROWS else tensor
    return out


# ---- the ddlm run --------------------------------------------------------------------------

def target_method(fmt: str, method: str | None) -> str:
    """The method the run is imported as: the format's own unless `method` names another."""
    method = method or fmt
    if method not in FORMATS:
        raise ConfigError(f"a {ARCHITECTURES[fmt]} checkpoint imports as one of {', '.join(FORMATS)}, not {method!r}")
    return method


def bd3_window(tensors: dict[str, torch.Tensor], block_size: int) -> dict:
    """BD3-LM's clipped training window from its sampling_eps_min/max buffers, as bd3 options:
    none for the full window; else the window with the public code's mask resampling
    (`clip_mode=mask`), or `time` where no masked count of a block falls inside it."""
    from ddlm.methods.bd3 import allowed_counts

    if BD3_WINDOW_KEYS[0] not in tensors:
        return {}
    lo, hi = (float(tensors[k].reshape(())) for k in BD3_WINDOW_KEYS)
    if lo <= SAMPLING_EPS * (1 + 1e-6) and hi >= 1.0:  # (1e-3, 1) stored in float32: the full window
        return {}
    if not 0.0 <= lo <= hi <= 1.0:
        raise CheckpointError(f"BD3-LM window sampling_eps_min={lo}, sampling_eps_max={hi} is not inside [0, 1]")
    mode = "mask" if allowed_counts(block_size, (lo, hi))[1:].any() else "time"
    return {"clip_min": lo, "clip_max": hi, "clip_mode": mode}


def method_options(source: Source, method: str, window: dict) -> dict:
    """The ddlm method options under which ddlm's method computes what their code does."""
    options = {**source.schedule, "sampling_eps": SAMPLING_EPS, "time_conditioning": source.time_conditioning}
    if method == "sedd":
        options["graph"] = "absorbing"
    if method == "bd3":
        # another format as BD3-LM: one block of the whole context, which is MDLM exactly
        options["block_size"] = source.block_size or source.shape.length
        options.update(window)
    return options


def run_config(source: Source, method: str, window: dict) -> RunConfig:
    s = source.shape
    options = method_options(source, method, window)
    model = {"dim": s.dim, "n_layers": s.n_layers, "n_heads": s.n_heads, "cond_dim": s.cond_dim,
             "mlp_ratio": float(MLP_RATIO), "dropout": s.dropout, "rope_base": ROPE_BASE, "block": "gated",
             "vocab_size": DDLM_VOCAB, "output_vocab": THEIR_VOCAB, "max_len": s.length,
             "time_conditioning": options["time_conditioning"]}
    data = {"tokenizer": "gpt2", "seq_len": s.length, "packing": "wrap"}
    try:
        return RunConfig.from_dict({"method": method, "model": model, "data": data, method: options})
    except ConfigError as exc:
        raise CheckpointError(f"the {ARCHITECTURES[source.format]} config does not map onto ddlm: {exc}") from None


def gpt2_tokenizer_dict() -> dict:
    from ddlm.data.tokenizers import GPT2Tokenizer

    return GPT2Tokenizer().to_dict()


def read_source(src: Path) -> Source:
    """The folder's format and config, or one line saying why it is none of the three."""
    fmt = detect(src)
    if fmt is None:
        path = config_file(src)
        what = f"config '{path}' (model_type {read_config(src).get('model_type')!r})" if path else f"'{src}'"
        raise CheckpointError(f"unknown architecture: {what} is not an MDLM, BD3-LM or SEDD DiT checkpoint")
    return SOURCES[fmt](read_config(src))


def import_dit(src: Path, method: str | None = None) -> Imported:
    """A published MDLM, BD3-LM or SEDD folder (config + safetensors; a huggingface_hub cache folder
    too) as a ddlm run: the config mapped onto ddlm's, every key mapped or refused in one line."""
    src = snapshot_dir(Path(src))
    if not src.is_dir():
        raise CheckpointError(f"'{src}' is not a folder")
    source = read_source(src)
    method = target_method(source.format, method)
    found = read_key_shapes(weight_files(src))
    check_keys(found, source)
    tensors = load_tensors(found)
    check_rotary(tensors, source)
    window = bd3_window(tensors, source.block_size) if method == "bd3" and source.format == "bd3" else {}
    run = run_config(source, method, window)
    return Imported(run=run, weights=to_ddlm(tensors, source), tokenizer_dict=gpt2_tokenizer_dict(),
                    source=str(src), architecture=ARCHITECTURES[source.format])
