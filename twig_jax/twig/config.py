"""TwigConfig: the twig's shape (K, T) and its inference settings (Kf, R, drafting, keep rule).

Importable without jax (the CLI reads SELECT_RULES before loading anything heavy).
"""

from __future__ import annotations

import dataclasses
import math


SELECT_RULES = ("top", "cover", "sample")
SPECS = ("chain", "tree")  # speculative draft shapes  # keep-set rules of TwigConfig.select (importable without jax)
SHARD_KEEPS = ("exact", "local")  # how a sequence-sharded prefill chooses its kept tokens


class TwigConfigError(ValueError):
    """Invalid twig / pruning hyper-parameters."""


@dataclasses.dataclass(frozen=True)
class TreeShape:
    """The static shape of a draft tree (docs/design.md, "Tree drafting")."""

    width: int  # E: children per expanded node, and the frontier size
    depth: int  # D: levels below the root
    nodes: int  # N: nodes kept for verification

    def __post_init__(self):
        if self.width < 1 or self.depth < 1:
            raise TwigConfigError(f"tree width {self.width} and depth {self.depth} must be >= 1")
        if self.nodes < self.depth:
            raise TwigConfigError(f"tree nodes {self.nodes} < depth {self.depth}: a full-depth path needs "
                                  f"{self.depth} nodes")
        if self.nodes > self.pool:
            raise TwigConfigError(f"tree nodes {self.nodes} > the {self.pool} candidates a width-{self.width}, "
                                  f"depth-{self.depth} tree drafts (E + (D-1) E^2)")

    @property
    def pool(self) -> int:
        return self.width + (self.depth - 1) * self.width ** 2

    @property
    def draft_scratch(self) -> int:
        """Scratch slots drafting writes past the committed tokens: the root, then each expanded frontier."""
        return 1 + (self.depth - 1) * self.width

    def extra_slots(self, out_len: int) -> int:
        """Cache slots each group needs beyond the prompt: the new tokens, a round's commit and the
        larger of the draft and verification scratch regions."""
        return out_len + self.depth + 1 + max(self.draft_scratch, self.nodes + 1)


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
    spec: str = "chain"  # speculative drafts: "chain" (draft_len, theta) or "tree" (TwigVLM++ / EAGLE-2)
    tree_width: int = 10  # E: children per expanded node and frontier size (the TwigVLM++ setting)
    tree_depth: int = 4  # D: levels below the root
    tree_nodes: int = 60  # N: nodes verified per round
    shard_keep: str = "exact"  # with the prompt split over a "sequence" mesh axis: "exact" (the unsharded
    # keep set, candidates gathered across shards) or "local" (each shard keeps R / S of its own tokens)

    @property
    def tree_shape(self) -> "TreeShape":
        return TreeShape(self.tree_width, self.tree_depth, self.tree_nodes)

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
        if self.spec not in SPECS:
            raise TwigConfigError(f"spec={self.spec!r} must be one of {SPECS}")
        if self.shard_keep not in SHARD_KEEPS:
            raise TwigConfigError(f"shard_keep={self.shard_keep!r} must be one of {SHARD_KEEPS}")
        if self.spec == "tree":
            self.tree_shape  # noqa: B018 (validates the shape)
        self.kept_count(num_layers, num_visual)
        return self


# ----------------------------------------------------------------------------------------------
# Pruning methods and the one place a run's TwigConfig is resolved

METHODS = ("twig", "phead", "fastv", "random", "none")  # pruning methods; "twig" is TTP (the twig's attention)
TWIG_METHODS = ("twig", "phead")  # methods whose scores come from the twig
PRUNING_FIELDS = ("Kf", "R", "R_bar", "score_rows", "select")  # settings that only matter when pruning


def needs_twig(method: str) -> bool:
    """Whether pruning with `method` reads the twig (else the twig is only needed for drafting)."""
    return method in TWIG_METHODS


def baseline_keep_rule(twig_cfg: TwigConfig, method: str | None, select: str | None = None) -> TwigConfig:
    """twig_cfg as `method` runs it: a twig's keep-set rule (select) is for its own scores, so the
    baselines FastV and random keep their published top R unless a rule is asked for (select)."""
    if select is None and method in ("fastv", "random") and twig_cfg.select != "top":
        return dataclasses.replace(twig_cfg, select="top")
    return twig_cfg


@dataclasses.dataclass(frozen=True)
class TwigOverrides:
    """Settings a user gave (None: not given), applied over a twig's own TwigConfig."""

    K: int | None = None
    T: int | None = None
    Kf: int | None = None
    R: int | None = None
    R_bar: float | None = None
    draft_len: int | None = None
    theta: float | None = None
    score_rows: str | None = None
    select: str | None = None
    spec: str | None = None
    tree_width: int | None = None
    tree_depth: int | None = None
    tree_nodes: int | None = None

    def given(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


def default_trunk_depth(num_layers: int) -> int:
    """K without a twig: the paper's K = 2 where the model has room for it."""
    return 2 if num_layers > 2 else 1


def resolve_twig_config(num_layers: int, num_visual: int, *, method: str, ssd: bool, twig_cfg: TwigConfig | None,
                        has_p_head: bool = False, overrides: TwigOverrides = TwigOverrides()) -> TwigConfig | None:
    """The TwigConfig a run uses, or None for plain decoding (method "none" without SSD).

    twig_cfg: the twig checkpoint's own config (None without a twig). With a twig, every setting
    defaults to the twig's, so FastV / random prune at the same layers as TTP; a twig's T cannot
    change, nor its K when the twig is read (TTP, P-head or SSD). Without a twig, K defaults to 2,
    Kf to 3/4 of the depth (the paper's 24 of 32), and FastV / random need R or R_bar. A setting
    that would be ignored (pruning settings with method "none", select="sample" with any scores
    but the P-head's) is refused. Raises TwigConfigError.
    """
    if method not in METHODS:
        raise TwigConfigError(f"unknown pruning method {method!r}; have {', '.join(METHODS)}")
    given = overrides.given()
    if twig_cfg is None and ssd:
        raise TwigConfigError("SSD needs a twig (self-speculative decoding: the twig is the draft model)")
    if twig_cfg is None and needs_twig(method):
        raise TwigConfigError(f"method {method!r} needs a twig; without one use fastv, random or none")
    if method == "phead" and not has_p_head:
        raise TwigConfigError("method 'phead' needs a twig with a P-head (train one with twig-jax train-phead)")
    ignored = sorted(k for k in given if k in PRUNING_FIELDS) if method == "none" else []
    if ignored:
        raise TwigConfigError(f"{', '.join(ignored)} given but method 'none' prunes nothing; choose a pruning "
                              f"method ({', '.join(m for m in METHODS if m != 'none')})")
    if given.get("select") == "sample" and method != "phead":
        raise TwigConfigError(f"select='sample' draws from the P-head's scores; method {method!r} would run top R")
    if method == "none" and not ssd:
        return None
    if twig_cfg is not None:
        base = twig_cfg
        if "T" in given and given["T"] != base.T:
            raise TwigConfigError(f"T={given['T']} does not match the twig checkpoint (T={base.T})")
        if "K" in given and given["K"] != base.K and (needs_twig(method) or ssd):
            raise TwigConfigError(f"K={given['K']} differs from the twig's K={base.K}: the twig reads base layer "
                                  f"{base.K}; leave K unset for the twig's methods and SSD")
    else:
        k = given.get("K", default_trunk_depth(num_layers))
        base = TwigConfig(K=k, T=1, Kf=max(k + 1, round(0.75 * num_layers)), R=num_visual)
        if method != "none" and "R" not in given and "R_bar" not in given:
            raise TwigConfigError(f"method {method!r} without a twig needs R or R_bar (of N = {num_visual} "
                                  f"visual tokens)")
    if "R" in given or "R_bar" in given:
        base = dataclasses.replace(base, R=None, R_bar=None)
    tc = baseline_keep_rule(dataclasses.replace(base, **given), method, given.get("select"))
    return tc.validate(num_layers, num_visual)


# ----------------------------------------------------------------------------------------------
# The pruning budget a trained twig carries by default

PAPER_LAYERS, PAPER_VISUAL, PAPER_KF, PAPER_KEPT = 32, 576, 24, 41  # LLaVA-1.5-7B: R-bar 64 of 576 is R = 41


def default_pruning(num_layers: int, num_visual: int, K: int) -> dict:
    """{"Kf", "R"}: the paper's budget (Kf = 24 of 32 layers, R = 41 of 576 visual tokens) scaled
    to a model of `num_layers` layers and `num_visual` visual tokens, Kf clamped to K < Kf <= L."""
    kf = min(num_layers, max(K + 1, round(PAPER_KF / PAPER_LAYERS * num_layers)))
    r = min(num_visual, max(1, round(PAPER_KEPT / PAPER_VISUAL * num_visual)))
    return {"Kf": kf, "R": r}
