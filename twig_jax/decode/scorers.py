"""Where each pruning method's scores over the N visual tokens come from.

A scorer says what the pruned prefill must compute for it (an attention row of base layer K-1,
of the last twig layer, or the P-head's input) and turns what was computed into scores [B, N].
`SCORERS` maps the method names of twig.config.METHODS to them; the prefill asks the plan's
scorer instead of comparing method names.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from twig_jax.twig.config import TwigConfigError
from twig_jax.twig.keep import scores_from_probs


@flax.struct.dataclass
class ScoreInputs:
    """What the prefill computed that a scorer may read (None where its scorer did not ask)."""

    img_pos: jax.Array  # [B, N] sequence positions of the visual tokens
    trunk_probs: jax.Array | None  # [B, H, S] base layer K-1's attention over the prompt, score rows
    twig_probs: jax.Array | None  # [B, H, S] the last twig layer's attention, score rows
    phead_scores: jax.Array | None  # [B, N] the P-head's distribution over the visual tokens
    key: jax.Array | None  # PRNG key (random scores)


@dataclasses.dataclass(frozen=True)
class Scorer:
    reads_twig: bool = False  # the scores come from the twig (the prefill needs one)
    trunk_attention: bool = False  # the prefill returns base layer K-1's attention rows
    twig_attention: bool = False  # the prefill returns the last twig layer's attention rows
    p_head: bool = False  # the prefill runs the P-head on the last twig layer's input
    scored: bool = True  # False: no scores (no pruning)

    def scores(self, inputs: ScoreInputs) -> jax.Array:  # [B, N] float32
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class TwigAttention(Scorer):
    """TTP: head-averaged attention of the last twig layer onto the visual tokens."""

    reads_twig: bool = True
    twig_attention: bool = True

    def scores(self, inputs: ScoreInputs) -> jax.Array:
        return scores_from_probs(inputs.twig_probs, inputs.img_pos)


@dataclasses.dataclass(frozen=True)
class FastVAttention(Scorer):
    """FastV: the same read of base layer K-1, the last trunk layer (no twig needed)."""

    trunk_attention: bool = True

    def scores(self, inputs: ScoreInputs) -> jax.Array:
        return scores_from_probs(inputs.trunk_probs, inputs.img_pos)


@dataclasses.dataclass(frozen=True)
class PHeadScores(Scorer):
    """TwigVLM++: the P-head's re-weighted attention of the last twig layer."""

    reads_twig: bool = True
    p_head: bool = True

    def scores(self, inputs: ScoreInputs) -> jax.Array:
        return inputs.phead_scores


@dataclasses.dataclass(frozen=True)
class RandomScores(Scorer):
    """Uniform random scores from the generation key (the random keep-R baseline)."""

    def scores(self, inputs: ScoreInputs) -> jax.Array:
        if inputs.key is None:
            raise TwigConfigError("method 'random' needs a PRNG key")
        return jax.random.uniform(inputs.key, inputs.img_pos.shape, jnp.float32)


@dataclasses.dataclass(frozen=True)
class NoScores(Scorer):
    """No pruning: every visual token is kept (R = N)."""

    scored: bool = False

    def scores(self, inputs: ScoreInputs) -> jax.Array:
        return jnp.zeros(inputs.img_pos.shape, jnp.float32)


SCORERS: dict[str, Scorer] = {"twig": TwigAttention(), "phead": PHeadScores(), "fastv": FastVAttention(),
                              "random": RandomScores(), "none": NoScores()}
