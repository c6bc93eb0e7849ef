"""A ddlm model in a Hugging Face folder: the backbone, the method's parameterisation and its sampler,
in plain torch + transformers (no ddlm import), for `trust_remote_code=True`.

    model = AutoModelForMaskedLM.from_pretrained(OUT, trust_remote_code=True)   # mdlm, sedd, bd3
    model = AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)   # ar (gated block)
    out = model(input_ids, t=t)           # out.logits: the backbone's; out.log_probs: the method's
    tokens = model.generate(num_samples=4, length=64, steps=128, top_p=0.9, seed=0)

The network is ddlm's one transformer (ddlm/nn/transformer.py) with ddlm's parameter names under
`backbone.`: rotary positions (rotate-half), pre-norm blocks that are either plain or adaLN-zero
(shift, scale and gate of each branch from SiLU(embed(sigma))), a noise-level embedding of
sinusoidal features and an MLP. What the network's logits mean is the method's:
    mdlm, bd3  SUBS (Sahoo et al. 2024, §3.2.3): log x_theta(z_t), the MASK column at -inf at masked
               positions, the one-hot of the token elsewhere; BD3-LM's training pass reads
               z_t (+) x_0 under the block-diffusion mask (Arriola et al. 2025, §3.2)
    sedd       log concrete scores (Lou et al. 2024): logits - log expm1(sigma_bar) - log(V - 1) for
               the absorbing graph, the logits for the uniform one; -inf at y = x_t
    ar         next-token logits under the causal mask (the input starts with BOS)
`generate` runs the method's default sampler as `ddlm sample` does, drawing the same random numbers
in the same order from one torch.Generator seeded with `seed` (batches of `batch_size` rows), so the
same seed gives the same tokens as `ddlm sample --seed` (up to float rounding of the network, which
moves a Gumbel argmax only when two candidates tie to ~1e-6).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_ddlm import DdlmConfig

# --------------------------------------------------------------------------------- the backbone


def rotary_tables(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (L,) -> cos, sin (L, hd) of RoPE's angles, both halves equal (rotate-half form)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim
    inv_freq = 1.0 / base ** exponent  # (hd/2,)
    angles = positions.float()[:, None] * inv_freq  # (L, hd/2)
    both = torch.cat([angles, angles], dim=-1)
    return both.cos(), both.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, hd) rotated: halves (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([torch.addcmul(x1 * c, x2, s, value=-1.0), torch.addcmul(x2 * c, x1, s)], dim=-1)


def modulated_norm(norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """shift + norm(x) * (1 + scale) for one shift and scale (D,), as one LayerNorm."""
    weight = 1 + scale if norm.weight is None else norm.weight * (1 + scale)
    return F.layer_norm(x, norm.normalized_shape, weight, shift, norm.eps)


def gated_linear(layer: nn.Linear, x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """gate * layer(x) for a gate (D_out,): the gate folded into the weight when there are more
    tokens than input features (the order of operations ddlm's backbone uses)."""
    if gate is None:
        return layer(x)
    if x.numel() <= x.shape[-1] * layer.in_features:
        return layer(x) * gate
    bias = None if layer.bias is None else layer.bias * gate
    return F.linear(x, layer.weight * gate[:, None], bias)


def per_position(values: torch.Tensor, length: int) -> torch.Tensor:
    """(B, K, ...) per-group values -> (B, 1 or L, ...): K = 1 broadcasts, K | L repeats each of the K
    contiguous groups of L/K positions."""
    K = values.shape[1]
    if K in (1, length):
        return values
    return values.repeat_interleave(length // K, dim=1)


class KVCache:
    """Keys and values (B, H, P, hd) of every layer; `length` counts the stored positions."""

    def __init__(self, n_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.length = 0

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor, write: bool):
        """(stored keys ++ k, stored values ++ v); kept when `write`."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        if write:
            self.keys[layer], self.values[layer] = k, v
        return k, v

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.keys = [k if k is None else k[rows] for k in self.keys]
        self.values = [v if v is None else v[rows] for v in self.values]


def attention(q, k, v, mask) -> torch.Tensor:
    """SDPA; mask 'causal' (queries are the last Lq of Lk positions), 'bidirectional', or bool (Lq, Lk)."""
    if isinstance(mask, str) and mask == "bidirectional":
        return F.scaled_dot_product_attention(q, k, v)
    if isinstance(mask, str):
        q_len, k_len = q.shape[2], k.shape[2]
        if q_len == k_len:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if q_len == 1:  # one new query sees every stored key
            return F.scaled_dot_product_attention(q, k, v)
        rows = torch.arange(q_len, device=q.device)[:, None] + (k_len - q_len)
        mask = torch.arange(k_len, device=q.device)[None, :] <= rows
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def make_norm(cfg: DdlmConfig) -> nn.LayerNorm:
    """Gated: a weight and no bias; plain: affine, or none when modulated by the noise level."""
    if cfg.block == "gated":
        return nn.LayerNorm(cfg.dim, bias=False)
    return nn.LayerNorm(cfg.dim, elementwise_affine=not cfg.time_conditioning)


class Block(nn.Module):
    """Pre-norm attention + MLP (GELU tanh), adaLN-modulated when it has a conditioning vector."""

    def __init__(self, cfg: DdlmConfig, layer: int) -> None:
        super().__init__()
        gated = cfg.block == "gated"
        hidden = int(cfg.mlp_ratio * cfg.dim)
        self.layer, self.n_heads = layer, cfg.n_heads
        self.norm1 = make_norm(cfg)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)
        self.norm2 = make_norm(cfg)
        self.fc = nn.Linear(cfg.dim, hidden, bias=gated or cfg.bias)
        self.fc_out = nn.Linear(hidden, cfg.dim, bias=gated or cfg.bias)
        conditioned = gated or cfg.time_conditioning
        self.modulation = nn.Linear(cfg.cond_dim, 6 * cfg.dim) if conditioned else None

    def forward(self, h, cos, sin, mask, cond, cache: KVCache | None, write: bool) -> torch.Tensor:
        """h (B, L, D) -> (B, L, D); cond (B or 1, K, C) or None."""
        if self.modulation is None:
            h = h + self.attend(self.norm1(h), cos, sin, mask, cache, write)
            return h + self.mlp(self.norm2(h))
        mod = self.modulation(cond)
        if mod.shape[:2] == (1, 1):  # one modulation for every row and position (sigma = 0)
            shift1, scale1, gate1, shift2, scale2, gate2 = mod.view(6, -1)
            h = h + self.attend(modulated_norm(self.norm1, h, shift1, scale1), cos, sin, mask, cache, write, gate1)
            return h + self.mlp(modulated_norm(self.norm2, h, shift2, scale2), gate2)
        shift1, scale1, gate1, shift2, scale2, gate2 = per_position(mod, h.shape[1]).chunk(6, dim=-1)
        y = self.attend(torch.addcmul(shift1, self.norm1(h), 1 + scale1), cos, sin, mask, cache, write)
        h = torch.addcmul(h, gate1, y)
        return torch.addcmul(h, gate2, self.mlp(torch.addcmul(shift2, self.norm2(h), 1 + scale2)))

    def mlp(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        return gated_linear(self.fc_out, F.gelu(self.fc(x), approximate="tanh"), gate)

    def attend(self, x, cos, sin, mask, cache, write, gate: torch.Tensor | None = None) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, L, hd) each
        if cos is not None:
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.extend(self.layer, k, v, write)
        y = attention(q, k, v, mask)  # (B, H, L, hd)
        return gated_linear(self.proj, y.transpose(1, 2).reshape(B, L, D), gate)


class NoiseEmbedding(nn.Module):
    """sigma (...) -> (..., C): cos/sin of sigma at 128 frequencies, then Linear-SiLU-Linear."""

    def __init__(self, cond_dim: int, n_freq: int = 256) -> None:
        super().__init__()
        self.n_freq = n_freq
        self.mlp = nn.Sequential(nn.Linear(n_freq, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        half = self.n_freq // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigma.device) / half)
        args = sigma.float()[..., None] * freqs
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1))


class Backbone(nn.Module):
    """tokens (B, L) -> logits (B, L, V) float32: ddlm's Transformer, parameter for parameter."""

    def __init__(self, cfg: DdlmConfig) -> None:
        super().__init__()
        self.cfg = cfg
        conditioned = cfg.block == "gated" or cfg.time_conditioning
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embed = nn.Embedding(cfg.max_len, cfg.dim) if cfg.positions == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        tied = cfg.tie_embeddings
        self.head = None if tied else nn.Linear(cfg.dim, cfg.vocab_size, bias=cfg.block == "gated")
        self.noise_embed = NoiseEmbedding(cfg.cond_dim) if conditioned else None
        self.final_modulation = nn.Linear(cfg.cond_dim, 2 * cfg.dim) if conditioned else None

    def forward(self, tokens: torch.Tensor, *, sigma: torch.Tensor | None = None, mask="causal",
                positions: torch.Tensor | None = None, cache: KVCache | None = None,
                write: bool = True) -> torch.Tensor:
        """sigma (B,), (B, K) with K | L, or None (sigma = 0); positions (L,) (default: after the
        cache); with a cache the tokens' keys and values follow the stored ones (kept when `write`)."""
        B, L = tokens.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + L, device=tokens.device)
        cond = self.conditioning(sigma, B, tokens.device)
        h = self.embed(tokens)
        if self.pos_embed is None:
            cos, sin = rotary_tables(positions, self.cfg.head_dim, self.cfg.rope_base)
        else:
            cos = sin = None
            h = h + self.pos_embed(positions)
        for block in self.blocks:
            h = block(h, cos, sin, mask, cond, cache, write)
        if self.final_modulation is None:
            h = self.norm(h)
        elif cond.shape[:2] == (1, 1):
            shift, scale = self.final_modulation(cond).view(2, -1)
            h = modulated_norm(self.norm, h, shift, scale)
        else:
            shift, scale = per_position(self.final_modulation(cond), L).chunk(2, dim=-1)
            h = torch.addcmul(shift, self.norm(h), 1 + scale)
        if cache is not None and write:
            cache.length += L
        logits = (F.linear(h, self.embed.weight) if self.head is None else self.head(h)).float()
        if self.cfg.output_vocab:
            logits[..., self.cfg.output_vocab:] = self.cfg.output_floor
        return logits

    def conditioning(self, sigma, batch: int, device) -> torch.Tensor | None:
        """SiLU(embed(sigma)) as (B or 1, K, C); None when the blocks are not modulated."""
        if self.noise_embed is None:
            return None
        if sigma is None:
            return F.silu(self.noise_embed(torch.zeros(1, 1, device=device)))
        sigma = torch.as_tensor(sigma, device=device)
        if sigma.dim() < 2:
            sigma = sigma.reshape(-1, 1)
        return F.silu(self.noise_embed(sigma.expand(batch, -1)))


# --------------------------------------------------------------------------------- the process


class Schedule:
    """sigma_bar(t) of ddlm's schedules (ddlm/process/schedules.py), float64 in, float64 out."""

    def __init__(self, name: str, options: dict) -> None:
        self.name = name
        self.eps = float(options.get("eps", 1e-3))
        self.sigma_min = float(options.get("sigma_min", 1e-4))
        self.sigma_max = float(options.get("sigma_max", 20.0))
        if name == "linear":
            self.sigma_max = -math.log(self.eps)

    def total_noise(self, t):
        if self.name == "loglinear":
            return -torch.log1p(-(1 - self.eps) * t)
        if self.name == "cosine":
            return -torch.log(self.eps + (1 - self.eps) * torch.cos(t * (math.pi / 2)))
        if self.name == "linear":
            return self.sigma_max * t
        return self.sigma_min ** (1 - t) * self.sigma_max ** t

    def rate(self, t):
        if self.name == "loglinear":
            return (1 - self.eps) / (1 - (1 - self.eps) * t)
        if self.name == "cosine":
            slope = (1 - self.eps) * torch.sin(t * (math.pi / 2)) * (math.pi / 2)
            return slope / (self.eps + (1 - self.eps) * torch.cos(t * (math.pi / 2)))
        if self.name == "linear":
            return torch.full_like(t, self.sigma_max)
        return self.total_noise(t) * math.log(self.sigma_max / self.sigma_min)

    def mask_prob(self, t):
        if self.name == "loglinear":
            return (1 - self.eps) * t
        if self.name == "cosine":
            return (1 - self.eps) * 2 * torch.sin(t * (math.pi / 4)) ** 2
        return -torch.expm1(-self.total_noise(t))

    def time_of(self, p):
        if self.name == "loglinear":
            return p / (1 - self.eps)
        if self.name == "cosine":
            return (4 / math.pi) * torch.asin(torch.sqrt(p / (2 * (1 - self.eps))).clamp(max=1.0))
        if self.name == "linear":
            return -torch.log1p(-p) / self.sigma_max
        sigma_bar = -torch.log1p(-p)
        return (torch.log(sigma_bar / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)).clamp(0.0, 1.0)


class Graph:
    """SEDD's forward CTMC (ddlm/process/graphs.py) on V ids: absorbing (every token jumps to MASK)
    or uniform (over the V - 1 ids other than MASK)."""

    def __init__(self, kind: str, vocab: int, mask_id: int) -> None:
        self.kind, self.vocab, self.mask_id = kind, vocab, mask_id
        self.tokens = torch.ones(vocab, dtype=torch.bool)
        self.tokens[mask_id] = False
        self.member = torch.ones(vocab, dtype=torch.bool) if kind == "absorbing" else self.tokens.clone()
        self.n = vocab - 1  # absorbing: tokens; uniform: states

    def one_hot(self, x, dtype=torch.float64):
        return F.one_hot(x, self.vocab).to(dtype)

    def rate_into(self, xt, dtype=torch.float64):
        """Q(x_t, y) (..., V): the rate from y into x_t."""
        if self.kind == "absorbing":
            return ((xt == self.mask_id)[..., None] & self.tokens.to(xt.device)).to(dtype)
        rate = self.member.to(xt.device, dtype).expand(*xt.shape, self.vocab) / self.n
        return rate * (1 - self.one_hot(xt, dtype))

    def exp_apply(self, v, a):
        """exp(a Q) v along the last axis."""
        a = a.to(v.dtype)[..., None]
        if self.kind == "absorbing":
            tokens = self.tokens.to(v.device)
            out = torch.where(tokens, v * torch.exp(-a), torch.zeros_like(v))
            out[..., self.mask_id] = v[..., self.mask_id] - torch.expm1(-a[..., 0]) * (v * tokens).sum(-1)
            return out
        member = self.member.to(v.device).to(v.dtype)
        spread = -torch.expm1(-a) * (v * member).sum(-1, keepdim=True) / self.n
        return (v * torch.exp(-a) + spread) * member

    def exp_into(self, xt, a):
        """exp(a Q)(x_t, y) (..., V)."""
        a = a.to(torch.float64)[..., None]
        if self.kind == "absorbing":
            into_mask = -torch.expm1(-a) * self.tokens.to(xt.device) \
                + self.one_hot(torch.full_like(xt, self.mask_id))
            stay = self.one_hot(xt) * torch.exp(-a)
            return torch.where((xt == self.mask_id)[..., None], into_mask, stay)
        member = self.member.to(xt.device).to(torch.float64)
        return self.one_hot(xt) * torch.exp(-a) - torch.expm1(-a) * member / self.n

    def sample_base(self, shape, generator, device):
        if self.kind == "absorbing":
            return torch.full(shape, self.mask_id, dtype=torch.long, device=device)
        states = self.member.nonzero().squeeze(1).to(device)
        return states[torch.randint(0, self.n, shape, generator=generator, device=device)]


# --------------------------------------------------------------------------------- draws


def uniform(shape, generator, device) -> torch.Tensor:
    return torch.rand(shape, dtype=torch.float64, generator=generator, device=device)


def gumbel_argmax(logp: torch.Tensor, generator) -> torch.Tensor:
    """A draw from Cat(softmax(logp)) over the last axis with float64 Gumbel noise."""
    logp = logp.double()
    u = uniform(logp.shape, generator, logp.device)
    return (logp - torch.log(-torch.log(u.clamp_min(1e-300)))).argmax(dim=-1)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, top-k, then nucleus filtering (the smallest set of mass >= p); float64 log-probs."""
    logits = logits.double() / max(temperature, 1e-8)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)
    if top_p < 1.0:
        ordered, order = torch.sort(logp, dim=-1, descending=True)
        mass_before = ordered.exp().cumsum(dim=-1) - ordered.exp()
        drop = torch.zeros_like(mass_before, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)
    return logp


# --------------------------------------------------------------------------------- the models


@dataclass
class DdlmOutput(ModelOutput):
    """logits (B, L, V): the backbone's; log_probs (B, L, V): the method's parameterisation (AR: the
    log-softmax; MDLM, BD3-LM: SUBS log x_theta; SEDD: log scores)."""

    logits: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None


class DdlmPreTrainedModel(PreTrainedModel):
    config_class = DdlmConfig
    base_model_prefix = "backbone"
    _supports_sdpa = True

    def __init__(self, config: DdlmConfig) -> None:
        super().__init__(config)
        self.backbone = Backbone(config)
        options = config.method_options or {}
        self.schedule = Schedule(options.get("schedule", "loglinear"), options) if config.method != "ar" else None
        self._graph = None
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' loading, then every tensor copied into memory of its own: the weights come
        memory-mapped from the safetensors file, and on such unaligned memory the CPU's matrix
        kernels round differently (logits moved by ~1e-6 of their size); ddlm computes on copies."""
        model = super().from_pretrained(*args, **kwargs)
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.data = tensor.data.clone()
        return model

    @property
    def graph(self) -> Graph:
        """SEDD's graph, made on first use (from_pretrained builds the model on the meta device)."""
        if self._graph is None:
            options = self.config.method_options or {}
            self._graph = Graph(options.get("graph", "absorbing"), self.config.vocab_size, self.config.mask_id)
        return self._graph

    def _init_weights(self, module) -> None:
        """Fresh weights as ddlm initialises them: N(0, 0.02), zero biases, zero modulations."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        if isinstance(module, Block) and module.modulation is not None:
            nn.init.zeros_(module.modulation.weight)
            nn.init.zeros_(module.modulation.bias)

    # ---- the method's parameterisation -----------------------------------------------------

    def sigma_of(self, t) -> torch.Tensor | None:
        """The noise level the backbone reads: sigma_bar(t) (float32) when time-conditioned."""
        if t is None or not self.config.time_conditioning:
            return None
        return self.schedule.total_noise(torch.as_tensor(t, dtype=torch.float64)).float()

    def log_probs_from(self, logits: torch.Tensor, z: torch.Tensor, t) -> torch.Tensor:
        """The method's log-probabilities (B, L, V) float32 from the backbone's logits at input z."""
        method, mask_id = self.config.method, self.config.mask_id
        if method == "ar":
            return torch.log_softmax(logits.float(), dim=-1)
        if method == "sedd":
            return self.log_scores(logits, z, t)
        masked_logits = logits.float().clone()
        masked_logits[..., mask_id] = float("-inf")
        logp = torch.log_softmax(masked_logits, dim=-1)
        carried = torch.full_like(logp, float("-inf")).scatter_(-1, z[..., None], 0.0)
        return torch.where((z != mask_id)[..., None], carried, logp)

    def log_scores(self, logits: torch.Tensor, z: torch.Tensor, t, dtype=torch.float32) -> torch.Tensor:
        """SEDD: log s_theta (B, L, V) in `dtype`; -inf at y = z and outside the graph."""
        sigma_bar = self.schedule.total_noise(self.times(t, z))  # (B, 1) or (B, L) float64
        log_s = logits.to(torch.promote_types(logits.dtype, dtype))
        if self.graph.kind == "absorbing":
            offset = torch.log(torch.expm1(sigma_bar.to(log_s.dtype))) + math.log(self.graph.n)
            log_s = log_s - offset[..., None]
        allowed = self.graph.member.to(z.device) & ~F.one_hot(z, self.config.vocab_size).bool()
        return log_s.masked_fill(~allowed, float("-inf"))

    @staticmethod
    def times(t, z: torch.Tensor) -> torch.Tensor:
        """t (scalar, (B,), (B, K) or (B, L)) -> (B, 1) or (B, L) float64."""
        t = torch.as_tensor(t, dtype=torch.float64, device=z.device)
        t = t.reshape(-1, 1).expand(z.shape[0], -1) if t.dim() < 2 else t
        return per_position(t, z.shape[1])

    def forward(self, input_ids: torch.Tensor, t=None, clean_ids: torch.Tensor | None = None,
                attention_mask=None, **_) -> DdlmOutput:
        """input_ids (B, L): x_t (diffusion) or [BOS, x_1 ..] (AR); t the diffusion time in [0, 1]
        ((), (B,), or (B, K) one per block of L/K positions); clean_ids (B, L) for BD3-LM: x_0,
        scored as in training (one pass over x_t (+) x_0 under the block-diffusion mask)."""
        method = self.config.method
        if method == "ar":
            logits = self.backbone(input_ids, mask="causal")
        elif method == "bd3" and clean_ids is not None:
            logits = self.block_diffusion_logits(input_ids, clean_ids, t)
        else:
            if t is None and method == "sedd":
                raise ValueError("sedd scores depend on the time: pass t")
            t = 1.0 if t is None else t
            logits = self.backbone(input_ids, sigma=self.sigma_of(self.times(t, input_ids)) if t is not None
                                   else None, mask="bidirectional")
        return DdlmOutput(logits=logits, log_probs=self.log_probs_from(logits, input_ids, t))

    def block_diffusion_logits(self, zt: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
        """BD3-LM's training pass (Arriola et al. 2025, §3.2): z_t (+) x_0, both halves at positions
        0..L-1; a noisy block sees itself and the clean blocks before it, a clean block the clean
        blocks up to itself. Returns the z_t half's logits (B, L, V)."""
        B, L = zt.shape
        n = self.config.method_options["block_size"]
        block = torch.arange(L, device=zt.device) // n
        q, k = block[:, None], block[None, :]
        mask = torch.cat([torch.cat([k == q, k < q], dim=1),
                          torch.cat([torch.zeros_like(k == q), k <= q], dim=1)], dim=0)
        sigma = None
        if self.config.time_conditioning:
            noisy = self.sigma_of(self.times(t, zt)).expand(B, L)
            sigma = torch.cat([noisy, torch.zeros_like(noisy)], dim=1)
        logits = self.backbone(torch.cat([zt, x0], dim=1), sigma=sigma, mask=mask,
                               positions=torch.arange(L, device=zt.device).repeat(2))
        return logits[:, :L]

    # ---- sampling ---------------------------------------------------------------------------

    def sampling_options(self, overrides: dict) -> dict:
        """The run's sampling defaults, with the arguments given (None: the default) applied."""
        options = dict(self.config.sample_defaults or {})
        options.update({k: v for k, v in overrides.items() if v is not None})
        return options

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, *, num_samples: int = 1,
                 length: int | None = None, max_new_tokens: int | None = None, steps: int | None = None,
                 sampler: str | None = None, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, batch_size: int | None = None,
                 t_min: float | None = None, noise_removal: str | None = None, **_) -> torch.Tensor:
        """(num_samples, Lp + length) tokens drawn with the method's sampler, as `ddlm sample` draws
        them: input_ids (1 or n, Lp) a prompt (without BOS) that is continued; length (or
        max_new_tokens) new tokens (default: the rest of the context); steps, sampler, temperature,
        top_k, top_p, t_min, noise_removal as `--sample.*` (default: the run's); one generator
        seeded with `seed` for all batches of `batch_size` rows."""
        opts = self.sampling_options(dict(steps=steps, sampler=sampler, temperature=temperature, top_k=top_k,
                                          top_p=top_p, seed=seed, batch_size=batch_size, t_min=t_min,
                                          noise_removal=noise_removal))
        device = self.backbone.embed.weight.device
        prompt = torch.empty(1, 0, dtype=torch.long) if input_ids is None else torch.as_tensor(input_ids).long()
        prompt = (prompt[None] if prompt.dim() == 1 else prompt).to(device)
        length = length if length is not None else max_new_tokens
        length = self.config.max_len - prompt.shape[1] if length is None else length
        if prompt.shape[1] + length > self.config.max_len:
            raise ValueError(f"prompt ({prompt.shape[1]}) + length ({length}) is past the context of "
                             f"{self.config.max_len} tokens; `ddlm sample` slides windows past it")
        if prompt.shape[0] not in (1, num_samples):
            raise ValueError(f"input_ids has {prompt.shape[0]} rows; expected 1 or num_samples={num_samples}")
        generator = torch.Generator(device=device).manual_seed(int(opts.get("seed", 0)))
        rows, batch = [], int(opts.get("batch_size", 16))
        for start in range(0, num_samples, batch):
            n = min(batch, num_samples - start)
            first = prompt.expand(num_samples, -1)[start:start + n].clone()
            rows.append(self.sample_batch(first, length, opts, generator))
        return torch.cat(rows, dim=0)

    def sample_batch(self, prompt: torch.Tensor, length: int, opts: dict, generator) -> torch.Tensor:
        method = self.config.method
        if method == "ar":
            return self.sample_ar(prompt, length, opts, generator)
        masks = torch.full((prompt.shape[0], length), self.config.mask_id, dtype=torch.long, device=prompt.device)
        if method == "sedd":
            return self.sample_sedd(torch.cat([prompt, masks], dim=1), opts, generator)
        if method == "bd3":
            return self.sample_blocks(prompt, length, opts, generator)
        return self.fill_masks(self.prefixed(None), torch.cat([prompt, masks], dim=1), opts, generator)

    # AR (ddlm/sampling/ar.py): BOS + prompt, then one token per step from the KV cache; MASK and PAD banned
    def sample_ar(self, prompt, length, opts, generator) -> torch.Tensor:
        bos = torch.full((prompt.shape[0], 1), self.config.bos_token_id, dtype=torch.long, device=prompt.device)
        seq = torch.cat([bos, prompt], dim=1)
        cache = KVCache(self.config.n_layers)
        logits = self.backbone(seq, mask="causal", cache=cache)[:, -1]
        banned = [self.config.mask_id, self.config.pad_token_id]
        for i in range(length):
            logits = logits.clone()
            logits[:, banned] = float("-inf")
            logp = filter_logits(logits, opts.get("temperature", 1.0), opts.get("top_k", 0), opts.get("top_p", 1.0))
            seq = torch.cat([seq, gumbel_argmax(logp, generator)[:, None]], dim=1)
            if i + 1 < length:
                logits = self.backbone(seq[:, -1:], mask="causal", cache=cache)[:, -1]
        return seq[:, 1:]

    # MDLM (ddlm/sampling/ancestral.py): draw x_0 from x_theta(z_t), then q(z_s | z_t, x_0)
    def prefixed(self, cache: KVCache | None):
        """The denoiser's network call: z (B, N), t (B, 1) -> logits, reading a clean prefix's keys
        and values from `cache` when given (BD3-LM)."""
        def call(z, t):
            return self.backbone(z, sigma=self.sigma_of(t), mask="bidirectional", cache=cache, write=False)
        return call

    def denoiser(self, network, z, t: float | torch.Tensor, opts: dict) -> torch.Tensor:
        """log x_theta(z_t) (B, L, V) float64 under SUBS, filtered by temperature / top-k / top-p."""
        t = torch.as_tensor(t, dtype=torch.float64, device=z.device).expand(z.shape[0])[:, None]
        logits = network(z, t).double()
        logits[..., self.config.mask_id] = float("-inf")
        logp = torch.log_softmax(logits, dim=-1)
        carried = torch.full_like(logp, float("-inf")).scatter_(-1, z[..., None], 0.0)
        logp = torch.where((z == self.config.mask_id)[..., None], logp, carried)
        temperature, top_k, top_p = opts.get("temperature", 1.0), opts.get("top_k", 0), opts.get("top_p", 1.0)
        if temperature != 1.0 or top_k or top_p < 1.0:
            logp = filter_logits(logp, temperature, top_k, top_p)
        return logp

    def unmasking(self, z, t, s, generator) -> torch.Tensor:
        """(B, L) bool: the MASKs that the step t -> s unmasks, each with chance (m_t - m_s) / m_t."""
        t = torch.as_tensor(t, dtype=torch.float64, device=z.device).expand(z.shape[0])[:, None]
        s = torch.as_tensor(s, dtype=torch.float64, device=z.device).expand(z.shape[0])[:, None]
        m_t = self.schedule.mask_prob(t)
        m_s = torch.where(s > 0, self.schedule.mask_prob(s), torch.zeros_like(s))
        masked = z == self.config.mask_id
        return masked & (uniform(z.shape, generator, z.device) * m_t >= m_s)

    def reverse_step(self, z, t, s, logp, generator) -> torch.Tensor:
        x0 = gumbel_argmax(logp, generator)
        return torch.where(self.unmasking(z, t, s, generator), x0, z)

    def fill_masks(self, network, z, opts, generator) -> torch.Tensor:
        """Every MASK of z (B, L) replaced by the MDLM sampler that `opts['sampler']` names."""
        if (opts.get("sampler") or "ancestral") == "first_hitting":
            return self.first_hitting(network, z, opts, generator)
        if opts.get("sampler") not in ("", None, "ancestral"):
            raise ValueError(f"unknown {self.config.method} sampler {opts['sampler']!r}: ancestral | first_hitting")
        mask_id, t_min, steps = self.config.mask_id, opts.get("t_min", 1e-5), int(opts.get("steps", 256))
        reuse = opts.get("cache", True) and not self.config.time_conditioning  # the no-change cache
        times = torch.linspace(1.0, t_min, steps + 1, dtype=torch.float64).tolist()
        logp = None
        for t, s in zip(times[:-1], times[1:]):
            if not (z == mask_id).any():
                break
            if logp is None or not reuse:
                logp = self.denoiser(network, z, t, opts)
            z_next = self.reverse_step(z, t, s, logp, generator)
            if not torch.equal(z_next, z):
                logp = None
            z = z_next
        if (z == mask_id).any():
            if logp is None or not reuse:
                logp = self.denoiser(network, z, times[-1], opts)
            if opts.get("noise_removal", "draw") == "argmax":
                z = torch.where(z == mask_id, logp.argmax(-1), z)
            else:
                z = self.reverse_step(z, times[-1], 0.0, logp, generator)
        return z

    def first_hitting(self, network, z, opts, generator) -> torch.Tensor:
        """Zheng et al. 2024: one token unmasks per call, at the first of the n masked tokens' times."""
        B, mask_id = z.shape[0], self.config.mask_id
        rows = torch.arange(B, device=z.device)
        t = torch.ones(B, dtype=torch.float64, device=z.device)
        while True:
            masked = z == mask_id
            n = masked.sum(1)
            active = n > 0
            if not active.any():
                return z
            u = uniform((B,), generator, z.device)
            t = torch.where(active, self.schedule.time_of(self.schedule.mask_prob(t) * u ** (1.0 / n.clamp_min(1))), t)
            logp = self.denoiser(network, z, t, opts)
            pos = uniform(masked.shape, generator, z.device).masked_fill(~masked, -1).argmax(1)
            x0 = gumbel_argmax(logp, generator)
            z = z.clone()
            z[rows, pos] = torch.where(active, x0[rows, pos], z[rows, pos])

    # BD3-LM (ddlm/sampling/block.py): blocks left to right, each filled by MDLM's sampler given the
    # clean prefix's keys and values, then written to the cache (block-causal, as training's x_0 half)
    def sample_blocks(self, prompt, length, opts, generator) -> torch.Tensor:
        n = self.config.method_options["block_size"]
        Lp = prompt.shape[1]
        goal = Lp + length
        masks = torch.full((prompt.shape[0], math.ceil(goal / n) * n - Lp), self.config.mask_id,
                           dtype=torch.long, device=prompt.device)
        seq = torch.cat([prompt, masks], dim=1)
        clean = Lp // n * n
        cache = KVCache(self.config.n_layers)
        if clean:
            self.append_blocks(seq[:, :clean], cache)
        for b0 in range(clean, seq.shape[1], n):
            seq[:, b0:b0 + n] = self.fill_masks(self.prefixed(cache), seq[:, b0:b0 + n], opts, generator)
            if b0 + n < seq.shape[1]:
                self.append_blocks(seq[:, b0:b0 + n], cache)
        return seq[:, :goal]

    def append_blocks(self, blocks: torch.Tensor, cache: KVCache) -> None:
        n, N = self.config.method_options["block_size"], blocks.shape[1]
        block = torch.arange(N, device=blocks.device) // n
        mask = block[None, :] <= block[:, None]
        if cache.length:
            mask = torch.cat([torch.ones(N, cache.length, dtype=torch.bool, device=blocks.device), mask], dim=1)
        self.backbone(blocks, mask=mask, cache=cache, write=True)

    # SEDD (ddlm/sampling/score.py): the reverse CTMC, analytic (Tweedie tau-leaping) or Euler steps
    def sample_sedd(self, fixed, opts, generator) -> torch.Tensor:
        if opts.get("top_k", 0) or opts.get("top_p", 1.0) < 1.0:
            raise ValueError("sedd samplers take a temperature but not top-k/top-p (scores are not a "
                             "distribution over tokens)")
        predictor = opts.get("sampler") or "analytic"
        if predictor not in ("analytic", "euler"):
            raise ValueError(f"unknown sedd sampler {predictor!r}: analytic | euler")
        n, device, steps = fixed.shape[0], fixed.device, int(opts.get("steps", 256))
        given = fixed != self.config.mask_id
        z = torch.where(given, fixed, self.graph.sample_base(fixed.shape, generator, device))
        times = torch.linspace(1.0, opts.get("t_min", 1e-5), steps + 1, dtype=torch.float64)
        sigma_bars = self.schedule.total_noise(times)
        for i in range(steps):
            s = self.scores(z, times[i].expand(n).to(device))
            if predictor == "euler":
                rate = self.schedule.rate(torch.tensor(times[i].item(), dtype=torch.float64)).item()
                jump = (times[i] - times[i + 1]).item() * rate * self.graph.rate_into(z) * s
                stay = (1.0 - jump.sum(-1)).clamp_min(0.0)
                weights = jump.scatter(-1, z[..., None], stay[..., None])
            else:
                weights = self.analytic(z, s, (sigma_bars[i] - sigma_bars[i + 1]).to(device))
            z = torch.where(given, fixed, self.draw_weights(weights, opts, generator))
        weights = self.analytic(z, self.scores(z, times[-1].expand(n).to(device)), sigma_bars[-1].to(device))
        weights[..., self.config.mask_id] = 0.0
        return torch.where(given, fixed, self.draw_weights(weights, opts, generator))

    def scores(self, z, t) -> torch.Tensor:
        """(B, L, V) float64 s_theta(z, t) with s_z = 1; t (B,)."""
        logits = self.backbone(z, sigma=self.sigma_of(t[:, None]), mask="bidirectional")
        s = torch.exp(self.log_scores(logits, z, t[:, None], dtype=torch.float64))
        return s.scatter(-1, z[..., None], 1.0)

    def analytic(self, z, s, d) -> torch.Tensor:
        """p(x_s = y | x_t) up to a constant: [exp(-d Q) s]_y exp(d Q)(x_t, y) (SEDD Thm 4.2)."""
        d = d.expand(z.shape)
        return self.graph.exp_apply(s, -d) * self.graph.exp_into(z, d)

    def draw_weights(self, weights, opts, generator) -> torch.Tensor:
        logp = torch.log(weights.clamp_min(0.0))
        temperature = opts.get("temperature", 1.0)
        if temperature != 1.0:
            logp = logp / temperature
        return gumbel_argmax(logp, generator)


class DdlmForMaskedLM(DdlmPreTrainedModel):
    """A ddlm diffusion model (mdlm, sedd, bd3): `forward` scores x_t, `generate` samples."""


class DdlmForCausalLM(DdlmPreTrainedModel):
    """A ddlm AR model with the gated block: `forward` gives next-token logits, `generate` samples
    with ddlm's AR sampler (not transformers' GenerationMixin)."""
