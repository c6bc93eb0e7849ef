"""MAUVE (Pillutla et al., 2021) between generated and reference texts, with features from a judge.

Each text is embedded as the judge's final-layer state at its last token (the text cut to the
judge's context), as the reference implementation does with GPT-2; the `mauve-text` package then
quantises both feature sets jointly (PCA + k-means) and integrates the divergence frontier. No
model is downloaded: the features are computed here and handed to `mauve.compute_mauve`.
"""
from __future__ import annotations

import numpy as np
import torch

from ddlm.errors import ConfigError


def featurize(judge, texts: list[str]) -> np.ndarray:
    """(len(texts), D) float32: the judge's last-token state after its start token and the text."""
    rows = [[judge.start_id] + judge.encode(text)[: judge.context - 1] for text in texts]
    return torch.stack([h.cpu() for h in judge.last_hidden_many(rows)]).numpy().astype(np.float32)


def mauve_score(p_features: np.ndarray, q_features: np.ndarray, *, seed: int = 25,
                buckets: int | str = "auto") -> float:
    """MAUVE of two feature sets (p: generated, q: reference), in (0, 1]; 1 when they coincide."""
    try:
        import mauve
    except ImportError:
        raise ConfigError("MAUVE needs the mauve-text package: pip install 'ddlm[judge]'") from None
    if len(p_features) < 2 or len(q_features) < 2:
        raise ConfigError("MAUVE needs at least 2 texts on each side")
    out = mauve.compute_mauve(p_features=p_features, q_features=q_features, num_buckets=buckets,
                              seed=seed, verbose=False)
    return float(out.mauve)
