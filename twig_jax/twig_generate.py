"""Host driver for TwigVLM generation: TTP-pruned prefill + SSD (or plain pruned) decoding.

Mirrors `generate.Generator`: the same input checks (InputError), the same right-padding into
(batch, prompt, new-token) buckets, one compiled executable per bucket and option set. Padding
rows of a batch bucket are copies of the first prompt (marked inactive), so the static image
gathers always see N placeholders per row.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from twig_jax.generate import BATCH_BUCKETS, NEW_TOKEN_BUCKETS, PROMPT_BUCKETS, TEXT_BUCKETS, Generator, InputError
from twig_jax.model.llava import Llava
from twig_jax.sampling import SamplingConfig
from twig_jax.ssd import ssd_extra_slots, ssd_generate
from twig_jax.model.llama import unstack_layers
from twig_jax.ttp import LayerWeights, kv_bytes, make_plan, needs_twig, pruned_generate, ttp_prefill
from twig_jax.twig import Twig, TwigConfig, TwigConfigError


@dataclasses.dataclass
class TwigGenerationOutput:
    tokens: list[list[int]]  # generated tokens per row, up to and including EOS
    num_generated: np.ndarray  # [B]
    stats: dict  # SSD statistics (see ssd_stats; empty when ssd=False)
    keep: np.ndarray  # [B, R] kept visual indices (ascending)


def ssd_stats(count: np.ndarray, rounds: np.ndarray, drafted: np.ndarray, accepted: np.ndarray) -> dict:
    """Aggregate per-row SSD counters into the usual figures.

    acceptance_rate = accepted / drafted; mean_accepted_per_round = accepted drafts per round;
    mean_tokens_per_round = tokens emitted by rounds (all but the prefill's) per round.
    """
    r, d, a = int(rounds.sum()), int(drafted.sum()), int(accepted.sum())
    emitted = int(np.maximum(count - 1, 0).sum())
    nan = float("nan")
    return {
        "rounds": r, "drafted": d, "accepted": a,
        "acceptance_rate": a / d if d else nan,
        "mean_accepted_per_round": a / r if r else nan,
        "mean_tokens_per_round": emitted / r if r else nan,
        "per_row": {"rounds": rounds.tolist(), "drafted": drafted.tolist(), "accepted": accepted.tolist()},
    }


class TwigGenerator(Generator):
    """Batched TwigVLM generation: method in ("twig", "phead", "fastv", "random", "none"), ssd on/off."""

    # Prefill and decode read per-layer copies of the base decoder's and the twig's layer weights
    # (ttp.LayerWeights, made once here) and keep every cache group per layer, as Generator does.
    per_layer_decode = True

    def __init__(self, base_model: Llava, twig: Twig | None, twig_cfg: TwigConfig, method: str = "twig",
                 ssd: bool = True, *, max_cache_len: int | None = None,
                 batch_buckets: Sequence[int] = BATCH_BUCKETS, prompt_buckets: Sequence[int] = PROMPT_BUCKETS,
                 new_token_buckets: Sequence[int] = NEW_TOKEN_BUCKETS,
                 text_buckets: Sequence[int] | None = TEXT_BUCKETS, layer_weights=None):
        """text_buckets: see Generator. layer_weights: per-layer base decoder weights to share with
        another generator on the same model (its .layer_weights), instead of making a copy."""
        super().__init__(base_model, max_cache_len=max_cache_len, batch_buckets=batch_buckets,
                         prompt_buckets=prompt_buckets, new_token_buckets=new_token_buckets,
                         text_buckets=text_buckets, layer_weights=layer_weights)
        self.plan = make_plan(base_model.cfg, twig_cfg, method)
        self.method, self.ssd = method, ssd
        if twig is None and (ssd or needs_twig(method)):
            raise TwigConfigError(f"method={method!r}, ssd={ssd} needs a twig")
        self.twig_graphdef, self.twig_state = nnx.split(twig) if twig is not None else (None, None)
        self.twig_layer_weights = None if twig is None else self._unstack_twig(twig)
        self.itemsize = jnp.dtype(base_model.text.embed[...].dtype).itemsize
        self._last_shapes: tuple[int, int] | None = None
        self._gen = jax.jit(self._gen_impl, static_argnames=("out_len", "sampling", "eos_ids", "pad_id"))
        self._score = jax.jit(self._score_impl)
        self._prefill_only = jax.jit(self._prefill_only_impl, static_argnames=("extra",))

    def _unstack_twig(self, twig: Twig):
        return unstack_layers(twig.layers.weights()) if self.per_layer_decode else None

    @property
    def weights(self) -> LayerWeights:
        """The per-layer weights the compiled functions read (a pytree argument)."""
        return LayerWeights(self.layer_weights, self.twig_layer_weights)

    def set_twig(self, twig: Twig) -> None:
        """Swap in other twig weights of the same structure, keeping the compiled executables."""
        state = nnx.state(twig)
        shapes = lambda st: jax.tree.map(lambda a: (a.shape, a.dtype), st)  # noqa: E731
        if self.twig_state is None or shapes(state) != shapes(self.twig_state):
            raise TwigConfigError("set_twig needs a twig with the same structure (T, shapes, dtype)")
        self.twig_state = state
        self.twig_layer_weights = self._unstack_twig(twig)

    # --- jitted bodies -------------------------------------------------------------------------
    def _twig(self, twig_state):
        return None if twig_state is None else nnx.merge(self.twig_graphdef, twig_state)

    def _gen_impl(self, state, twig_state, weights, tokens, lengths, pixel_values, active, key, max_new_tokens, *,
                  out_len, sampling, eos_ids, pad_id):
        model, twig = nnx.merge(self.graphdef, state), self._twig(twig_state)
        kw = dict(out_len=out_len, sampling=sampling, eos_ids=eos_ids, pad_id=pad_id, weights=weights)
        if self.ssd:
            out, pre = ssd_generate(model, twig, self.plan, tokens, lengths, pixel_values, active, key,
                                    max_new_tokens, **kw)
            return out.tokens, out.count, out.rounds, out.drafted, out.accepted, pre.keep
        out, count, pre = pruned_generate(model, twig, self.plan, tokens, lengths, pixel_values, active, key,
                                          max_new_tokens, **kw)
        z = jnp.zeros_like(count)
        return out, count, z, z, z, pre.keep

    def _score_impl(self, state, twig_state, weights, tokens, lengths, pixel_values, key):
        model, twig = nnx.merge(self.graphdef, state), self._twig(twig_state)
        pre = ttp_prefill(model, twig if needs_twig(self.plan.method) else None, self.plan, tokens, lengths,
                          pixel_values, extra=1, key=key, weights=weights)
        return pre.scores, pre.keep

    def _prefill_only_impl(self, state, twig_state, weights, tokens, lengths, pixel_values, key, *, extra):
        model, twig = nnx.merge(self.graphdef, state), self._twig(twig_state)
        use = twig if (self.ssd or needs_twig(self.plan.method)) else None
        pre = ttp_prefill(model, use, self.plan, tokens, lengths, pixel_values, extra=extra, key=key,
                          weights=weights)
        return pre.caches, pre.logits

    # --- inputs --------------------------------------------------------------------------------
    def _prepare(self, prompts, pixel_values, max_new_tokens):
        if pixel_values is None:
            raise InputError("TwigVLM generation needs an image per prompt (pixel_values is None)")
        self.check_inputs(prompts, pixel_values, max_new_tokens)
        if self.plan.Kf < self.plan.L:
            for i, p in enumerate(prompts):
                if p[-1] == self.cfg.image_token_index:
                    raise InputError(f"prompt {i} ends with an image placeholder; FinalWipe (Kf={self.plan.Kf} "
                                     f"< L={self.plan.L}) needs a text token last")
        tokens, lengths, active, pv, out_len, _ = self.pad_inputs(prompts, pixel_values, max_new_tokens)
        n = len(prompts)
        tokens[n:], lengths[n:], pv[n:] = tokens[0], lengths[0], pv[0]  # padding rows copy row 0
        return tokens, lengths, active, pv, out_len

    # --- entry points ----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], pixel_values=None, *, max_new_tokens: int = 128,
                 sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                 eos_ids: Sequence[int] | None = None) -> TwigGenerationOutput:
        """prompts: token id lists with the N image placeholders expanded; pixel_values [B, C, H, W]."""
        tokens, lengths, active, pv, out_len = self._prepare(prompts, pixel_values, max_new_tokens)
        if eos_ids is None:
            eos_ids = () if self.cfg.text.eos_token_id is None else (self.cfg.text.eos_token_id,)
        pad_id = self.cfg.text.pad_token_id if self.cfg.text.pad_token_id is not None else 0
        self._last_shapes = (tokens.shape[1], out_len)
        res = self._gen(self.state, self.twig_state, self.weights, tokens, lengths, pv, active, jax.random.key(seed),
                        jnp.int32(max_new_tokens), out_len=out_len, sampling=sampling,
                        eos_ids=tuple(int(e) for e in eos_ids), pad_id=int(pad_id))
        out, count, rounds, drafted, accepted, keep = (np.asarray(x) for x in res)
        n = len(prompts)
        stats = ssd_stats(count[:n], rounds[:n], drafted[:n], accepted[:n]) if self.ssd else {}
        return TwigGenerationOutput([out[i, :count[i]].tolist() for i in range(n)], count[:n], stats, keep[:n])

    def prune_scores(self, prompts: Sequence[Sequence[int]], pixel_values,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Pruning scores [B, N] over the visual tokens and the kept indices [B, R] (for pictures)."""
        tokens, lengths, _, pv, _ = self._prepare(prompts, pixel_values, 1)
        scores, keep = self._score(self.state, self.twig_state, self.weights, tokens, lengths, pv, jax.random.key(seed))
        n = len(prompts)
        return np.asarray(scores)[:n], np.asarray(keep)[:n]

    def prefill_only(self, prompts: Sequence[Sequence[int]], pixel_values, max_new_tokens: int = 128,
                     seed: int = 0):
        """The compiled TTP prefill alone, with the caches generate() would decode from (benchmarks
        time it on its own); returns (TwigCaches, target next-token logits [B, V])."""
        tokens, lengths, _, pv, out_len = self._prepare(prompts, pixel_values, max_new_tokens)
        extra = ssd_extra_slots(self.plan, out_len) if self.ssd else out_len + 1
        return self._prefill_only(self.state, self.twig_state, self.weights, tokens, lengths, pv,
                                  jax.random.key(seed), extra=extra)

    def kv_bytes_per_sequence(self, prompt_len: int | None = None, max_new_tokens: int | None = None) -> dict[str, int]:
        """KV-cache bytes per sequence per group ("trunk", "twig", "mid", "tail") and "total".

        Defaults to the padded shapes of the last generate() call (else N + 64 prompt tokens and
        128 new tokens). The twig group counts only with ssd=True (only drafting keeps it).
        """
        if prompt_len is None or max_new_tokens is None:
            s, out_len = self._last_shapes or (self.plan.N + 64, 128)
            prompt_len = s if prompt_len is None else prompt_len
            max_new_tokens = out_len if max_new_tokens is None else max_new_tokens
        extra = ssd_extra_slots(self.plan, max_new_tokens) if self.ssd else max_new_tokens + 1
        return kv_bytes(self.cfg, self.plan, prompt_len, extra, self.itemsize, with_twig=self.ssd)
