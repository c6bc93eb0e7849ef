"""`ddlm export DIR --to hf OUT`: a ddlm run as a Hugging Face folder, and such a folder read back.

What a run becomes (docs/export.md):
  ar, plain rotary block    GPTNeoXForCausalLM, native (no remote code): ddlm's plain block is NeoX's
                            sequential-residual layer with full rotary, GELU tanh, and zero biases
                            where NeoX has them; q|k|v rows regrouped per head
  ar, learned positions     GPT2LMHeadModel, native (ddlm/interop/gpt2.py)
  ar, gated block           DdlmForCausalLM, remote code (AutoModelForCausalLM)
  mdlm, sedd, bd3           DdlmForMaskedLM, remote code (AutoModelForMaskedLM): backbone, the
                            method's parameterisation and its sampler (`generate`)
  edlm                      refused: export its MDLM denoiser and its energy's run instead
Every folder also holds the tokenizer for transformers (a `tokenizers` JSON with the mask token,
where the tokenizer can be written as one), ddlm's own `ddlm_config.json` and
`ddlm_tokenizer.json`, from which `import_export` rebuilds the run exactly. Weights are safetensors.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ddlm.config import RunConfig
from ddlm.errors import CheckpointError, ConfigError

HF_CODE = Path(__file__).parent / "hf_code"
CODE_FILES = ("configuration_ddlm.py", "modeling_ddlm.py")
RUN_FILE = "ddlm_config.json"  # ddlm's RunConfig: what marks a folder as a ddlm export
TOKENIZER_FILE = "ddlm_tokenizer.json"  # ddlm's Tokenizer.to_dict()
DIFFUSION = ("mdlm", "sedd", "bd3")
SPECIAL_NAMES = ("<|bos|>", "<|mask|>", "<|pad|>")


def export_hf(run_dir: str | Path, out: str | Path, *, overwrite: bool = False) -> dict:
    """Write run `run_dir` (its inference weights, in float32) as a transformers folder `out`; returns
    what was written. `out` must be new or empty, or (with `overwrite`) an earlier export."""
    from ddlm.build import load_for_inference

    out = Path(out)
    check_target(out, overwrite)
    loaded = load_for_inference(run_dir, torch.device("cpu"))
    method = loaded.run.method
    if method not in ("ar", *DIFFUSION):
        raise ConfigError(f"method {method!r} does not export: an EDLM run is a composite of a frozen MDLM "
                          f"denoiser and an energy; export the MDLM run it was built on (and an AR energy's run)")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        info = write_model(loaded, tmp)
        info["tokenizer"] = write_tokenizer(loaded, tmp)
        (tmp / RUN_FILE).write_text(loaded.run.to_json() + "\n")
        (tmp / TOKENIZER_FILE).write_text(json.dumps(loaded.tokenizer.to_dict()) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**info, "out": str(out), "method": method, "checkpoint": str(loaded.path), "step": loaded.step}


def check_target(out: Path, overwrite: bool) -> None:
    """`out` may be new, an empty folder, or with `overwrite` a folder holding an earlier export."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"export target '{out}' exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"export target '{out}' is not empty; choose a new folder or pass --overwrite")
    if not (out / RUN_FILE).is_file():
        raise ConfigError(f"export target '{out}' does not hold a ddlm export; refusing to overwrite it")


def write_model(loaded, out: Path) -> dict:
    """config.json + model.safetensors (+ the modeling code) of the run's network."""
    cfg, method = loaded.run.model, loaded.run.method
    if method == "ar" and getattr(cfg, "positions", "rotary") == "learned":
        from ddlm.interop.gpt2 import export_gpt2, is_gpt2_shaped

        if is_gpt2_shaped(cfg):
            info = export_gpt2(loaded, out)
            return {"architecture": info.get("architecture", "GPT2LMHeadModel"), "remote_code": False}
    if method == "ar" and neox_fits(cfg):
        return write_neox(loaded, out)
    return write_remote_code(loaded, out)


# ---------------------------------------------------------------------------------- GPT-NeoX


def neox_fits(cfg) -> bool:
    """Whether GPTNeoXForCausalLM computes this backbone exactly: the plain block with rotary
    positions on the whole head, no noise conditioning, every id an output, an integer MLP width."""
    hidden = cfg.mlp_ratio * cfg.dim
    return (cfg.block == "plain" and getattr(cfg, "positions", "rotary") == "rotary" and not cfg.time_conditioning
            and getattr(cfg, "output_vocab", 0) in (0, cfg.vocab_size) and hidden == int(hidden))


def qkv_to_neox(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """ddlm's fused rows q | k | v, each heads-major (3, H, hd, ...), -> NeoX's per-head
    interleaved rows (H, 3, hd, ...): head h's q, k, v follow one another."""
    rest = weight.shape[1:]
    return weight.reshape(3, heads, -1, *rest).transpose(0, 1).reshape(weight.shape).contiguous()


def qkv_from_neox(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `qkv_to_neox`."""
    rest = weight.shape[1:]
    return weight.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(weight.shape).contiguous()


NEOX_BLOCK = (("norm1", "input_layernorm"), ("qkv", "attention.query_key_value"), ("proj", "attention.dense"),
              ("norm2", "post_attention_layernorm"), ("fc", "mlp.dense_h_to_4h"), ("fc_out", "mlp.dense_4h_to_h"))


def neox_names(cfg) -> list[tuple[str, str]]:
    """(ddlm module, NeoX module) of every layer with weights."""
    names = [("embed", "gpt_neox.embed_in"), ("norm", "gpt_neox.final_layer_norm")]
    for i in range(cfg.n_layers):
        names += [(f"blocks.{i}.{ours}", f"gpt_neox.layers.{i}.{theirs}") for ours, theirs in NEOX_BLOCK]
    if not getattr(cfg, "tie_embeddings", False):
        names.append(("head", "lm_head"))
    return names


def neox_config(loaded) -> dict:
    cfg, tok = loaded.run.model, loaded.tokenizer
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, intermediate_size=int(cfg.mlp_ratio * cfg.dim),
                hidden_act="gelu_pytorch_tanh", max_position_embeddings=cfg.max_len, layer_norm_eps=1e-5,
                use_parallel_residual=False, attention_bias=bool(getattr(cfg, "bias", False)),
                rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_base),
                                 "partial_rotary_factor": 1.0},
                tie_word_embeddings=bool(getattr(cfg, "tie_embeddings", False)), hidden_dropout=0.0,
                attention_dropout=0.0, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)


def write_neox(loaded, out: Path) -> dict:
    """GPTNeoXForCausalLM: weights mapped tensor by tensor (NeoX's biases zero where ddlm has none)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = loaded.run.model
    ours = loaded.model.state_dict()
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**neox_config(loaded)))
    slots = model.state_dict()
    theirs = {}
    for our, their in neox_names(cfg):
        for kind in ("weight", "bias"):
            if f"{their}.{kind}" not in slots:
                continue
            tensor = ours.get(f"{our}.{kind}")  # None: a bias NeoX has and ddlm's block has not
            tensor = torch.zeros_like(slots[f"{their}.{kind}"]) if tensor is None else tensor.detach().float()
            theirs[f"{their}.{kind}"] = qkv_to_neox(tensor, cfg.n_heads) if our.endswith(".qkv") else tensor
    if getattr(cfg, "tie_embeddings", False) and "lm_head.weight" in slots:
        theirs["lm_head.weight"] = theirs["gpt_neox.embed_in.weight"]
    unmatched = sorted(set(slots) ^ set(theirs))
    if unmatched:
        raise CheckpointError(f"GPT-NeoX mapping left tensor {unmatched[0]} unmatched")
    model.load_state_dict(theirs, strict=True)
    model.save_pretrained(out)
    return {"architecture": "GPTNeoXForCausalLM", "remote_code": False}


def weights_from_neox(theirs: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """NeoX tensors -> ddlm's: the zero biases NeoX adds where ddlm has none are dropped (they must
    be zero: a fine-tuned NeoX bias has no place in ddlm's block)."""
    theirs = {("lm_head." + k.removeprefix("embed_out.")) if k.startswith("embed_out.") else k: v
              for k, v in theirs.items()}  # transformers saves NeoX's output layer under its old name
    reference = reference_state(cfg)
    ours = {}
    for our, their in neox_names(cfg):
        for kind in ("weight", "bias"):
            tensor = theirs.get(f"{their}.{kind}")
            if tensor is None:
                continue
            if our.endswith(".qkv"):
                tensor = qkv_from_neox(tensor, cfg.n_heads)
            if f"{our}.{kind}" in reference:
                ours[f"{our}.{kind}"] = tensor.float().contiguous()
            elif bool(tensor.any()):
                raise CheckpointError(f"GPT-NeoX tensor {their}.{kind} is not zero; ddlm's plain block has no "
                                      f"bias there")
    return ours


# ---------------------------------------------------------------------------------- remote code


def remote_class(method: str) -> str:
    return "DdlmForCausalLM" if method == "ar" else "DdlmForMaskedLM"


def ddlm_hf_config(loaded):
    """The DdlmConfig of `loaded`: backbone, method options, special ids and sampling defaults."""
    import dataclasses

    from ddlm.interop.hf_code.configuration_ddlm import DdlmConfig
    from ddlm.nn import transformer

    cfg, run, tok = loaded.run.model, loaded.run, loaded.tokenizer
    auto = "AutoModelForCausalLM" if run.method == "ar" else "AutoModelForMaskedLM"
    return DdlmConfig(
        method=run.method, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, mlp_ratio=float(cfg.mlp_ratio),
        rope_base=float(cfg.rope_base), block=cfg.block, cond_dim=cfg.cond_dim, vocab_size=cfg.vocab_size,
        max_len=cfg.max_len, time_conditioning=bool(cfg.time_conditioning),
        positions=getattr(cfg, "positions", "rotary"), bias=bool(getattr(cfg, "bias", False)),
        tie_embeddings=bool(getattr(cfg, "tie_embeddings", False)), output_vocab=int(getattr(cfg, "output_vocab", 0)),
        output_floor=float(getattr(transformer, "LOGIT_FLOOR", -1e4)), mask_id=tok.mask_id,
        method_options=dataclasses.asdict(run.method_options), sample_defaults=dataclasses.asdict(run.sample),
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
        architectures=[remote_class(run.method)],
        auto_map={"AutoConfig": "configuration_ddlm.DdlmConfig", auto: f"modeling_ddlm.{remote_class(run.method)}"})


def write_remote_code(loaded, out: Path) -> dict:
    """DdlmForMaskedLM / DdlmForCausalLM: ddlm's tensors under `backbone.`, with the modeling code."""
    from ddlm.interop.hf_code import modeling_ddlm

    config = ddlm_hf_config(loaded)
    model = getattr(modeling_ddlm, remote_class(loaded.run.method))(config)
    weights = {f"backbone.{k}": v.detach().float() for k, v in loaded.model.state_dict().items()}
    model.load_state_dict(weights, strict=True)
    model.save_pretrained(out)
    for name in CODE_FILES:
        shutil.copyfile(HF_CODE / name, out / name)
    return {"architecture": remote_class(loaded.run.method), "remote_code": True}


# ---------------------------------------------------------------------------------- tokenizer


def backend_tokenizer(tok):
    """ddlm's tokenizer as a `tokenizers.Tokenizer` with the same ids (specials included), or None
    where it cannot be written as one."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    if tok.name in ("bpe", "bert"):
        return Tokenizer.from_str(tok._hf.to_str())
    if tok.name == "char":
        pieces = {p: i for i, p in enumerate(" abcdefghijklmnopqrstuvwxyz")}
        pieces.update(zip(SPECIAL_NAMES, (tok.bos_id, tok.mask_id, tok.pad_id)))
        hf = Tokenizer(models.WordLevel(pieces, unk_token="<|pad|>"))
        hf.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex("[^a-z]+"), " ")])
        hf.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        hf.decoder = decoders.Fuse()
        return hf
    if tok.name == "byte":
        from ddlm.interop.gpt2 import byte_symbols

        vocab = {symbol: b for b, symbol in enumerate(byte_symbols())}
        vocab.update(zip(SPECIAL_NAMES, (tok.bos_id, tok.mask_id, tok.pad_id)))
        hf = Tokenizer(models.BPE(vocab, []))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = decoders.ByteLevel()
        return hf
    if tok.name in ("gpt2", "cl100k"):
        return tiktoken_backend(tok)
    return None


def tiktoken_backend(tok):
    """A tiktoken encoding (gpt2, cl100k) as byte-level BPE: its pre-tokenizer regex, then the
    byte-level symbols, its ranks as the vocabulary and, for every token, the merge of the two
    lower-ranked parts the encoder joins to make it; ddlm's specials at their ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from ddlm.data.tokenizers import CL100K_PAT, GPT2_PAT
    from ddlm.interop.gpt2 import _split_by_lower_ranks, byte_symbols

    symbols = byte_symbols()

    def spell(token: bytes) -> str:
        return "".join(symbols[b] for b in token)

    ranks = tok._enc._mergeable_ranks
    vocab = {spell(token): rank for token, rank in ranks.items()}
    vocab.update({"<|endoftext|>": tok.bos_id, "<|mask|>": tok.mask_id, "<|pad|>": tok.pad_id})
    merges = [tuple(spell(part) for part in _split_by_lower_ranks(token, rank, ranks))
              for token, rank in sorted(ranks.items(), key=lambda item: item[1]) if len(token) > 1]
    hf = Tokenizer(models.BPE(vocab, merges))
    pattern = GPT2_PAT if tok.name == "gpt2" else CL100K_PAT
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    return hf


def special_tokens(tok, hf) -> dict[str, str]:
    """PreTrainedTokenizerFast's special-token arguments: the names of ddlm's special ids."""
    name = hf.id_to_token
    specials = {"bos_token": name(tok.bos_id), "eos_token": name(tok.eos_id), "mask_token": name(tok.mask_id),
                "pad_token": name(tok.pad_id)}
    if tok.name == "bert":
        specials.update(cls_token=name(tok.bos_id), sep_token=name(tok.eos_id), unk_token="[UNK]")
    return specials


def write_tokenizer(loaded, out: Path) -> str:
    """The tokenizer files transformers reads (`AutoTokenizer.from_pretrained(out)`), with the mask
    token; text that spells a special token is tokenized as text, as ddlm does. Returns what was
    written: 'tokenizers' or, where no `tokenizers` JSON expresses it, 'ddlm only'."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    tok = loaded.tokenizer
    if (out / "tokenizer_config.json").is_file():  # the GPT-2 writer's own
        return "gpt2 (vocab.json, merges.txt)"
    hf = backend_tokenizer(tok)
    if hf is None:
        return f"ddlm only ({TOKENIZER_FILE}; {tok.name} has no tokenizers JSON here)"
    specials = special_tokens(tok, hf)
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sorted(set(specials.values()))])
    fast = PreTrainedTokenizerFast(tokenizer_object=hf, model_max_length=loaded.run.model.max_len,
                                   split_special_tokens=True, **specials)
    fast.save_pretrained(out)
    return "tokenizers"


# ---------------------------------------------------------------------------------- reading back


def reference_state(cfg) -> dict[str, torch.Tensor]:
    """The state dict of ddlm's backbone for `cfg`, built on the meta device (names and shapes)."""
    from ddlm.nn.transformer import Transformer

    with torch.device("meta"):
        return Transformer(cfg).state_dict()


def detect_export(src: Path) -> bool:
    """Whether `src` is a folder `export_hf` wrote (its config.json beside ddlm's own)."""
    src = Path(src)
    return (src / RUN_FILE).is_file() and (src / "config.json").is_file()


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"cannot read '{path}': {str(err).splitlines()[0][:120]}") from None


def import_export(src: Path):
    """The run an exported folder holds, as `Imported` (ddlm.interop.rundir): ddlm's config and
    tokenizer from ddlm_config.json / ddlm_tokenizer.json, the weights mapped back from the
    architecture config.json names (safetensors only)."""
    from ddlm.interop.rundir import Imported
    from ddlm.interop.safetensors_dir import read_safetensors_dir

    src = Path(src)
    run = RunConfig.from_dict(read_json(src / RUN_FILE))
    tokenizer = read_json(src / TOKENIZER_FILE)
    architecture = (read_json(src / "config.json").get("architectures") or [""])[0]
    theirs = read_safetensors_dir(src)
    if architecture in ("DdlmForMaskedLM", "DdlmForCausalLM"):
        weights = {k.removeprefix("backbone."): v.float() for k, v in theirs.items()}
    elif architecture == "GPTNeoXForCausalLM":
        weights = weights_from_neox(theirs, run.model)
    elif architecture == "GPT2LMHeadModel":
        from ddlm.interop.gpt2 import map_weights

        weights = map_weights(theirs, run.model, src)
    else:
        raise CheckpointError(f"'{src}': architecture {architecture!r} is not one ddlm exports")
    reference = reference_state(run.model)
    misfit = next((k for k in sorted(set(reference) ^ set(weights))), None) or next(
        (k for k in reference if tuple(weights[k].shape) != tuple(reference[k].shape)), None)
    if misfit:
        raise CheckpointError(f"'{src}': tensor {misfit} is missing, unexpected or of the wrong shape for "
                              f"the model {RUN_FILE} describes")
    return Imported(run=run, weights=weights, tokenizer_dict=tokenizer, source=str(src), architecture=architecture)
