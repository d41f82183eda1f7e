"""TwigConfig: the twig's shape (K, T) and its inference settings (Kf, R, drafting, keep rule).

Importable without jax (the CLI reads SELECT_RULES before loading anything heavy).
"""

from __future__ import annotations

import dataclasses
import math


SELECT_RULES = ("top", "cover", "sample")  # keep-set rules of TwigConfig.select (importable without jax)


class TwigConfigError(ValueError):
    """Invalid twig / pruning hyper-parameters."""


@dataclasses.dataclass(frozen=True)
class TwigConfig:
    K: int = 2  # the twig reads the hidden state entering base layer K
    T: int = 3  # twig decoder layers
    Kf: int = 24  # FinalWipe: base layers Kf..L-1 see text tokens only
    R: int | None = None  # kept visual tokens; or give R_bar
    R_bar: float | None = None  # average visual tokens per layer (paper's budget)
    draft_len: int = 5  # delta: most tokens drafted per round
    theta: float = 0.6  # stop drafting when the draft's top probability falls below this
    score_rows: str = "last"  # "last": last prompt token's attention row; "text": sum over text rows
    p_head: bool = False  # TwigVLM++ pruning head (P-head) on the last twig layer's attention input
    select: str = "top"  # keep-set rule over the scores: "top" (top R, the paper), "cover" (score-weighted
    # coverage: ttp.cover_visual; any scored method) or "sample" (the P-head only: a Gumbel-top-R draw
    # from its scores, with the generation key: the policy P-head RL trains; TTP / FastV then use top R)

    def kept_count(self, num_layers: int, num_visual: int) -> int:
        """R, from R directly or from R_bar via R = ceil((L*R_bar - K*N) / (Kf - K))."""
        if (self.R is None) == (self.R_bar is None):
            raise TwigConfigError("give exactly one of R (kept visual tokens) and R_bar (average budget)")
        if self.R is not None:
            r = self.R
        else:
            r = math.ceil((num_layers * self.R_bar - self.K * num_visual) / (self.Kf - self.K))
            if r < 1:
                raise TwigConfigError(
                    f"R_bar={self.R_bar} gives R={r} < 1 for L={num_layers}, K={self.K}, Kf={self.Kf}, "
                    f"N={num_visual}: the budget is spent by the first K layers; give R directly")
        if not 1 <= r <= num_visual:
            raise TwigConfigError(f"R={r} must be in [1, {num_visual}] (the visual token count)")
        return r

    def validate(self, num_layers: int, num_visual: int) -> "TwigConfig":
        if not 0 < self.K:
            raise TwigConfigError(f"K={self.K} must be > 0")
        if self.T < 1:
            raise TwigConfigError(f"T={self.T} must be >= 1")
        if self.K + self.T > num_layers:
            raise TwigConfigError(f"K + T = {self.K + self.T} exceeds the base depth L={num_layers}")
        if not self.K < self.Kf <= num_layers:
            raise TwigConfigError(f"Kf={self.Kf} must satisfy K={self.K} < Kf <= L={num_layers}")
        if self.draft_len < 1:
            raise TwigConfigError(f"draft_len={self.draft_len} must be >= 1")
        if not 0.0 <= self.theta <= 1.0:
            raise TwigConfigError(f"theta={self.theta} must be in [0, 1]")
        if self.score_rows not in ("last", "text"):
            raise TwigConfigError(f"score_rows={self.score_rows!r} must be 'last' or 'text'")
        if self.select not in SELECT_RULES:
            raise TwigConfigError(f"select={self.select!r} must be one of {SELECT_RULES}")
        self.kept_count(num_layers, num_visual)
        return self
