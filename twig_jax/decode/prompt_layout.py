"""Where the pruned prefill's activations live: whole, or with the prompt's length split over the
mesh's "sequence" axis (a sequence-sharded prefill, docs/design.md, "Sharding").

A sequence-sharded prefill runs the trunk and the twig on the full prompt with each device holding
a contiguous slice of the positions, at their original RoPE positions; attention reads every key
because XLA all-gathers each layer's keys and values over "sequence" (the hidden states carry the
constraint, keys and values follow). The prompt is right-padded to a multiple of the shards
first: with uneven shards XLA gave `jnp.nonzero` positions shifted by one (jax 0.10.2, CPU, a
("data", "sequence") mesh). The kept set comes from `keep_sharded.exact_keep` over "sequence"
(the unsharded rule's indices), and the pruned sequence (text + R kept tokens, short) is
gathered whole for the middle and the tail. The switch is the mesh: a "sequence" axis above 1
set with `jax.set_mesh` around the trace (the generators do that with their mesh).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from twig_jax.parallel.sharding import SEQUENCE_ACT_AXES, context_constraint, sequence_shards
from twig_jax.twig.keep import KEEP_RULES
from twig_jax.twig.config import TwigConfigError
from twig_jax.twig.keep_sharded import exact_keep, local_keep


@dataclasses.dataclass(frozen=True)
class SequenceShardedKeep:
    """A keep rule with the visual tokens split over the mesh's "sequence" axis
    (twig/keep_sharded.exact_keep): the unsharded rule's kept indices, ties included."""

    rule_name: str  # a key of twig.keep.KEEP_RULES

    def keep(self, scores: jax.Array, feats: jax.Array, r: int, key: jax.Array | None) -> jax.Array:  # [B, R]
        feats = feats if self.rule_name == "cover" else None  # only coverage reads the features
        return exact_keep(self.rule_name, scores, feats, r, key, mesh=jax.sharding.get_abstract_mesh(),
                          axis="sequence")


@dataclasses.dataclass(frozen=True)
class LocalShardKeep:
    """Each "sequence" shard keeps the top R / S of its own visual tokens (twig/keep_sharded.local_keep):
    no communication, an approximation of the global top R whose cost in accuracy
    research/shard_prune.py measures. Only for the top-R rule."""

    rule_name: str

    def keep(self, scores: jax.Array, feats: jax.Array, r: int, key: jax.Array | None) -> jax.Array:  # [B, R]
        if self.rule_name != "top":
            raise TwigConfigError(f"shard_keep='local' keeps the top R / S of each shard; the keep rule "
                                  f"{self.rule_name!r} has no local form (use shard_keep='exact')")
        keep = local_keep(scores, r, mesh=jax.sharding.get_abstract_mesh(), axis="sequence")
        return context_constraint(keep, ("batch", None))  # every device reads the whole kept set


SHARD_KEEP_RULES = {"exact": SequenceShardedKeep, "local": LocalShardKeep}


@dataclasses.dataclass(frozen=True)
class PromptLayout:
    """shards 1: every activation whole (one device, or a mesh without a "sequence" axis);
    shards > 1: the full prompt's activations split evenly over "sequence"."""

    shards: int = 1

    @staticmethod
    def of_mesh() -> "PromptLayout":
        """The layout the mesh set with `jax.set_mesh` asks for (shards 1 without one)."""
        return PromptLayout(sequence_shards())

    @property
    def sharded(self) -> bool:
        return self.shards > 1

    def padded_length(self, length: int) -> int:
        """The prompt length the trunk and the twig run on: a multiple of the shards."""
        return -(-length // self.shards) * self.shards

    def pad_prompt(self, tokens: jax.Array, image_token: int) -> jax.Array:  # [B, padded_length(S)]
        """tokens right-padded to padded_length with a token that is not the image placeholder:
        the padding sits after every row's valid tokens, as a batch's right padding does."""
        extra = self.padded_length(tokens.shape[1]) - tokens.shape[1]
        if not extra:
            return tokens
        return jnp.pad(tokens, ((0, 0), (0, extra)), constant_values=int(image_token == 0))

    def prompt(self, x: jax.Array) -> jax.Array:  # [B, S, D]
        """Full-prompt hidden states with their length on "sequence"."""
        return context_constraint(x, SEQUENCE_ACT_AXES) if self.sharded else x

    def pruned(self, x: jax.Array) -> jax.Array:  # [B, M, D]
        """The pruned sequence (text + kept tokens) whole on every device: it is short, and the
        middle and tail caches it fills are whole along their length as decoding wants them."""
        return context_constraint(x, ("batch", "length", "act_embed")) if self.sharded else x

    def probs_query(self, query: jax.Array, length: int) -> jax.Array:
        """run_layers' probs_query: a row index [B] becomes one-hot weights [B, S] when sharded, so
        the attention row is read by a sum over the split query axis (exact: one nonzero term)
        instead of a gather across shards."""
        if not self.sharded or not jnp.issubdtype(query.dtype, jnp.integer):
            return query
        return (jnp.arange(length)[None] == query[:, None]).astype(jnp.float32)

    def keep_rule(self, rule_name: str, shard_keep: str = "exact"):
        """The keep rule this layout runs, chosen once per prefill: .keep(scores, feats, r, key).
        shard_keep ("exact" / "local") picks the rule across shards; unsharded, the rule itself."""
        return SHARD_KEEP_RULES[shard_keep](rule_name) if self.sharded else KEEP_RULES[rule_name]
