"""EDLM's parallel importance sampler: MDLM's ancestral sampler whose x_0 draw, inside a window of
early steps t in [1 - window, 1], is importance-resampled under the method's energy (EDLM Alg. 1).

A step t -> s (docs/methods.md §6.2.2):
  1. which MASKs unmask (each with probability (m_t - m_s)/m_t, independent of x_0); a row where
     none does keeps z_t and spends nothing (equal in law to drawing x_0 and not using it);
  2. for the other rows, k proposals x^1..x^k ~ q(. | z_t) from one denoiser pass (the no-change
     cache reuses it while z_t is unchanged), their energies in one batched pass, log-weights
     -E / tau in float64, self-normalised over the row's own k proposals, and one index
     J ~ Cat(softmax(-E / tau)) per row (float64 Gumbel, from the row's own generator when given
     one per row);
  3. the posterior step with x_0* = x^J at the unmasking positions.
Outside the window, and with k = 1, it is MDLM's step. NFE counts the energy's passes: k per step
in which some row resampled (each row's k proposals are k sequence passes).

Temperature tau, top-k and top-p (docs/methods.md §6.2.2): q is the denoiser at temperature tau cut
to the tokens top-k / top-p keep at each masked position (the set S), as for MDLM, and the weights
exp(-E / tau) make the step target the residual EBM at temperature tau on S,
p_phi(x_0 | z_t)^(1/tau) restricted to S (`EDLM.proposal_log_weights`). With an AR energy this is
p_AR^(1/tau) on S: the weights do not cancel the temperature, and top-p keeps its cut.
"""
from __future__ import annotations

import torch

from ddlm.sampling.ancestral import AncestralSampler
from ddlm.sampling.base import gumbel_argmax


class ImportanceSampler(AncestralSampler):
    def __init__(self, method, *, k: int = 4, window: float = 1.0, **kw) -> None:
        super().__init__(method, **kw)
        if k < 1 or not 0.0 <= window <= 1.0:
            raise ValueError(f"k={k} must be >= 1 and window={window} in [0, 1]")
        self.k, self.window = k, window
        self.energy_passes = 0  # energy passes of the last fill (included in its NFE)

    def fill(self, model, z, generator):
        self.energy_passes = 0
        tokens, nfe = super().fill(model, z, generator)
        return tokens, nfe + self.energy_passes

    def spent(self, nfe: int) -> int:
        return nfe + self.energy_passes

    def step_note(self) -> dict:
        chosen, self.chosen = getattr(self, "chosen", None), None
        return {} if chosen is None else {"chosen": chosen, "k": self.k}

    def in_window(self, t: float) -> bool:
        return self.k > 1 and self.window > 0 and t >= 1.0 - self.window - 1e-12

    def step(self, model, z, t, s, logp, generator):
        if not self.in_window(t):
            return super().step(model, z, t, s, logp, generator)
        unmask = self.unmasking(z, t, s, generator)
        rows = unmask.any(1)
        if not rows.any():
            return z
        x0 = self.resampled_x0(model, z, t, logp, generator, rows)
        return torch.where(unmask, x0, z)

    def resampled_x0(self, model, z, t, logp, generator, rows: torch.Tensor) -> torch.Tensor:
        """(B, L) x_0* for the `rows` that need one (the others keep z): k proposals per row,
        weights exp(-E / tau), one resampled."""
        method, k = self.method, self.k
        props = method.proposals(logp, k, generator, active=rows)  # (B, k, L)
        index = rows.nonzero().squeeze(1)
        times = torch.full((index.numel(),), float(t), dtype=torch.float64, device=z.device)
        log_w = method.proposal_log_weights(model, props[index], z[index], times, logp[index],
                                            temperature=self.temperature)  # (n, k)
        self.energy_passes += k
        row_gens = [generator[int(i)] for i in index] if isinstance(generator, (list, tuple)) else generator
        choice = gumbel_argmax(torch.log_softmax(log_w, dim=1), row_gens)  # (n,)
        x0 = z.clone()
        x0[index] = props[index, choice]
        if self.recorder is not None:  # which proposal each row kept, for the viewer
            self.chosen = {int(row): int(j) for row, j in zip(index.tolist(), choice.tolist())}
        return x0
