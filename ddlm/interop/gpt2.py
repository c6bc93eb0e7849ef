"""GPT-2 both ways: a transformers `GPT2LMHeadModel` folder into an `ar` run, and such a run back
into a folder that `AutoModelForCausalLM` loads natively (no remote code).

ddlm's plain block with `positions=learned`, `bias` and `tie_embeddings` is GPT-2's block: pre-norm
LayerNorm (eps 1e-5), fused q|k|v with biases, GELU's tanh form (GPT-2's `gelu_new`), learned
absolute positions, the output layer the token embedding. GPT-2 stores its linear maps as Conv1D
(in, out), the transpose of nn.Linear. ddlm's gpt2 tokenizer adds a mask (50257) and a pad (50258)
id after GPT-2's 50257; their embedding rows are zero and `output_vocab` floors their logits, so
the first 50257 logits equal GPT-2's.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ddlm.config import ModelConfig, RunConfig
from ddlm.errors import CheckpointError
from ddlm.interop.dit import read_config
from ddlm.interop.rundir import Imported
from ddlm.interop.safetensors_dir import read_safetensors_dir

GPT2_VOCAB = 50257
GPT2_EPS = 1e-5
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
IGNORED = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers that old checkpoints saved
# (ddlm name, GPT-2 name without the "transformer." prefix, Conv1D: stored transposed)
BLOCK_KEYS = (("norm1.weight", "ln_1.weight", False), ("norm1.bias", "ln_1.bias", False),
              ("qkv.weight", "attn.c_attn.weight", True), ("qkv.bias", "attn.c_attn.bias", False),
              ("proj.weight", "attn.c_proj.weight", True), ("proj.bias", "attn.c_proj.bias", False),
              ("norm2.weight", "ln_2.weight", False), ("norm2.bias", "ln_2.bias", False),
              ("fc.weight", "mlp.c_fc.weight", True), ("fc.bias", "mlp.c_fc.bias", False),
              ("fc_out.weight", "mlp.c_proj.weight", True), ("fc_out.bias", "mlp.c_proj.bias", False))
TOP_KEYS = (("embed.weight", "wte.weight"), ("pos_embed.weight", "wpe.weight"),
            ("norm.weight", "ln_f.weight"), ("norm.bias", "ln_f.bias"))


def detect(src: Path) -> bool:
    """Whether `src` holds a transformers GPT-2 (config.json with model_type gpt2)."""
    if not (src / "config.json").is_file():
        return False
    try:
        config = read_config(src)
    except CheckpointError:
        return False
    return config.get("model_type") == "gpt2" or "GPT2LMHeadModel" in (config.get("architectures") or [])


def _int(config: dict, key: str, src: Path) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CheckpointError(f"'{src / 'config.json'}': {key}={value!r} must be a positive integer")
    return value


def model_config(config: dict, src: Path) -> ModelConfig:
    """ddlm's ModelConfig for a GPT-2 config.json; options GPT-2 variants use that ddlm's block
    does not express are refused by name."""
    dim, layers, heads = (_int(config, k, src) for k in ("n_embd", "n_layer", "n_head"))
    vocab, positions = _int(config, "vocab_size", src), _int(config, "n_positions", src)
    inner = config.get("n_inner") or 4 * dim
    unsupported = {
        "vocab_size": vocab != GPT2_VOCAB,
        "activation_function": config.get("activation_function", "gelu_new") not in TANH_GELUS,
        "layer_norm_epsilon": abs(float(config.get("layer_norm_epsilon", GPT2_EPS)) - GPT2_EPS) > 1e-12,
        "scale_attn_weights": config.get("scale_attn_weights", True) is not True,
        "scale_attn_by_inverse_layer_idx": bool(config.get("scale_attn_by_inverse_layer_idx", False)),
        "tie_word_embeddings": config.get("tie_word_embeddings", True) is not True,
        "n_inner": not isinstance(inner, int) or inner <= 0,
    }
    bad = next((key for key, is_bad in unsupported.items() if is_bad), None)
    if bad:
        raise CheckpointError(f"'{src / 'config.json'}': {bad}={config.get(bad)!r} is not GPT-2's "
                              "(ddlm imports GPT-2's own architecture and its 50257-id tokenizer)")
    if dim % heads:
        raise CheckpointError(f"'{src / 'config.json'}': n_embd={dim} is not divisible by n_head={heads}")
    from ddlm.data.tokenizers import GPT2Tokenizer

    return ModelConfig(dim=dim, n_layers=layers, n_heads=heads, mlp_ratio=inner / dim, dropout=0.0,
                       block="plain", vocab_size=GPT2Tokenizer.vocab_size, max_len=positions,
                       positions="learned", bias=True, tie_embeddings=True, output_vocab=GPT2_VOCAB)


def gpt2_names(layers: int) -> list[tuple[str, str, bool]]:
    """(ddlm name, GPT-2 name, transposed) for every tensor of a model with `layers` blocks."""
    names = [(ours, theirs, False) for ours, theirs in TOP_KEYS]
    for i in range(layers):
        names += [(f"blocks.{i}.{ours}", f"h.{i}.{theirs}", t) for ours, theirs, t in BLOCK_KEYS]
    return names


def _strip_prefix(weights: dict[str, torch.Tensor], src: Path) -> dict[str, torch.Tensor]:
    """GPT-2 names without "transformer."; the LM head (tied: equal to wte) and mask buffers dropped."""
    out = {}
    for name, tensor in weights.items():
        if name == "lm_head.weight" or name.endswith(IGNORED):
            continue
        out[name.removeprefix("transformer.")] = tensor
    if "lm_head.weight" in weights and "wte.weight" in out and not torch.equal(weights["lm_head.weight"],
                                                                              out["wte.weight"]):
        raise CheckpointError(f"'{src}': lm_head.weight differs from wte.weight; GPT-2 ties them")
    return out


def map_weights(theirs: dict[str, torch.Tensor], cfg: ModelConfig, src: Path) -> dict[str, torch.Tensor]:
    """GPT-2 tensors -> ddlm's, every key accounted for and every shape checked."""
    theirs = _strip_prefix(theirs, src)
    expected = gpt2_names(cfg.n_layers)
    missing = next((t for _, t, _ in expected if t not in theirs), None)
    if missing:
        raise CheckpointError(f"'{src}': GPT-2 tensor {missing} is missing")
    unexpected = sorted(set(theirs) - {t for _, t, _ in expected})
    if unexpected:
        raise CheckpointError(f"'{src}': unexpected tensor {unexpected[0]} for a {cfg.n_layers}-layer GPT-2")
    reference = reference_shapes(cfg)
    ours = {}
    for name, their_name, transposed in expected:
        tensor = theirs[their_name].to(torch.float32)
        tensor = tensor.t() if transposed else tensor
        if name == "embed.weight":
            tensor = _pad_rows(tensor, cfg.vocab_size)
        if tuple(tensor.shape) != reference[name]:
            shape = tuple(theirs[their_name].shape)
            raise CheckpointError(f"'{src}': tensor {their_name} has shape {shape}, which does not fit "
                                  f"n_embd={cfg.dim}, n_positions={cfg.max_len}, mlp {int(cfg.mlp_ratio * cfg.dim)}")
        ours[name] = tensor.contiguous()
    return ours


def _pad_rows(embedding: torch.Tensor, rows: int) -> torch.Tensor:
    """GPT-2's (50257, D) embedding with zero rows for ddlm's mask and pad ids."""
    if embedding.dim() != 2 or embedding.shape[0] >= rows:
        return embedding
    return torch.cat([embedding, embedding.new_zeros(rows - embedding.shape[0], embedding.shape[1])])


def reference_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of ddlm's model for `cfg`, built on the meta device."""
    from ddlm.nn.transformer import Transformer

    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}


def import_gpt2(src: str | Path) -> Imported:
    """A transformers GPT-2 folder (config.json + safetensors) as an `ar` run on GPT-2's tokenizer
    with L = n_positions."""
    from ddlm.data.tokenizers import GPT2Tokenizer

    src = Path(src)
    cfg = model_config(read_config(src), src)
    weights = map_weights(read_safetensors_dir(src), cfg, src)
    run = RunConfig.from_dict({"method": "ar", "model": {**cfg.__dict__},
                               "data": {"tokenizer": "gpt2", "seq_len": cfg.max_len}})
    return Imported(run=run, weights=weights, tokenizer_dict=GPT2Tokenizer().to_dict(), source=str(src),
                    architecture="gpt2")


def is_gpt2_shaped(cfg: ModelConfig) -> bool:
    """Whether a ddlm model is GPT-2's block (and so exports to GPT2LMHeadModel natively)."""
    return (cfg.block == "plain" and cfg.positions == "learned" and cfg.bias and cfg.tie_embeddings
            and not cfg.time_conditioning and abs(cfg.mlp_ratio * cfg.dim - round(cfg.mlp_ratio * cfg.dim)) < 1e-9)


def export_weights(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """ddlm tensors -> GPT2LMHeadModel's (the ids past output_vocab dropped), the inverse of map_weights."""
    vocab = cfg.output_vocab or cfg.vocab_size
    out = {}
    for name, their_name, transposed in gpt2_names(cfg.n_layers):
        tensor = weights[name].detach().to(torch.float32).cpu()
        tensor = tensor[:vocab] if name == "embed.weight" else tensor
        out["transformer." + their_name] = (tensor.t() if transposed else tensor).contiguous()
    return out


def export_config(cfg: ModelConfig) -> dict:
    """config.json of the GPT2LMHeadModel equal to ddlm model `cfg`."""
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "vocab_size": cfg.output_vocab or cfg.vocab_size, "n_positions": cfg.max_len, "n_embd": cfg.dim,
            "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": round(cfg.mlp_ratio * cfg.dim),
            "activation_function": "gelu_new", "layer_norm_epsilon": GPT2_EPS, "resid_pdrop": 0.0,
            "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True, "tie_word_embeddings": True,
            "bos_token_id": GPT2_VOCAB - 1, "eos_token_id": GPT2_VOCAB - 1, "torch_dtype": "float32"}


def export_gpt2(loaded, out: str | Path) -> dict:
    """Write `loaded` (ddlm.build.Loaded, an AR run of GPT-2's shape) as config.json +
    model.safetensors that `AutoModelForCausalLM.from_pretrained(out)` loads natively."""
    from safetensors.torch import save_file

    cfg = loaded.run.model
    if loaded.run.method != "ar" or not is_gpt2_shaped(cfg):
        raise CheckpointError(f"'{loaded.path}' is not an AR run of GPT-2's shape (positions=learned, bias, "
                              "tie_embeddings, plain block)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = export_weights(loaded.model.state_dict() | {"head.weight": loaded.model.head.weight}, cfg)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(export_config(cfg), indent=2) + "\n")
    if loaded.tokenizer.name == "gpt2":
        write_tokenizer(out)
    return {"out": str(out), "architecture": "GPT2LMHeadModel", "remote_code": False}


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255 (vocab.json and merges.txt spell tokens in
    them): printable Latin-1 bytes stand for themselves, the others for chr(256 + n) in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def _split_by_lower_ranks(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts whose merge makes `token`: byte-pair merging of its bytes with the merges of
    lower rank only, lowest rank first, as the encoder itself merges."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        best, i = min(pairs)
        if best >= rank:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise CheckpointError(f"GPT-2 rank {rank} is not the merge of two lower ranks")
    return parts[0], parts[1]


def tokenizer_files(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[str]]:
    """(vocab.json, merges.txt lines) of transformers' GPT-2 tokenizer from tiktoken's ranks."""
    symbols = byte_symbols()

    def spell(token: bytes) -> str:
        return "".join(symbols[b] for b in token)

    vocab = {spell(token): rank for token, rank in ranks.items()}
    vocab["<|endoftext|>"] = GPT2_VOCAB - 1
    merges = [" ".join(spell(part) for part in _split_by_lower_ranks(token, rank, ranks))
              for token, rank in sorted(ranks.items(), key=lambda item: item[1]) if len(token) > 1]
    return vocab, merges


def write_tokenizer(out: Path) -> None:
    """vocab.json, merges.txt and tokenizer_config.json of GPT-2's tokenizer, from the ranks file
    ddlm's gpt2 tokenizer reads (offline)."""
    from ddlm.data.tokenizers import GPT2Tokenizer

    ranks = GPT2Tokenizer()._enc._mergeable_ranks
    vocab, merges = tokenizer_files(ranks)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = "<|endoftext|>"
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "bos_token": special, "eos_token": special,
        "unk_token": special, "add_prefix_space": False}, indent=2) + "\n")
