"""Host drivers: input checks, right-padding into (batch, prompt, new-token) buckets, and one compiled
executable per bucket and option set.

`Generator` runs the unpruned model (prefill + `plain.decode_loop`); `TwigGenerator` runs the
four-group pruned prefill (`prune.ttp_prefill`) and then plain pruned decoding or self-speculative
decoding (`speculative.ssd_loop`). `make_generator` picks one for a (method, ssd) pair. Padding rows
of a batch bucket are copies of the first prompt (marked inactive), so the static image gathers
always see N placeholders per row.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from twig_jax.decode.buckets import BATCH_BUCKETS, NEW_TOKEN_BUCKETS, PROMPT_BUCKETS, TEXT_BUCKETS, InputError, bucket
from twig_jax.decode.plain import decode_loop, prefill
from twig_jax.decode.prune import LayerWeights, kv_bytes, make_plan, needs_twig, pruned_generate, ttp_prefill
from twig_jax.decode.sampling import SamplingConfig
from twig_jax.decode.speculative import ssd_extra_slots, ssd_generate
from twig_jax.model.cache import KVCache
from twig_jax.model.llama import unstack_layers
from twig_jax.model.llava import Llava
from twig_jax.twig.config import TwigConfig, TwigConfigError
from twig_jax.twig.module import Twig


@dataclasses.dataclass
class GenerationOutput:
    tokens: list[list[int]]  # generated tokens per row, up to and including EOS
    num_generated: np.ndarray  # [B]


class Generator:
    """Batched generation with compiled prefill and decode loop, cached per shape bucket."""

    per_layer_decode = True  # decode from per-layer weight copies (faster on XLA CPU, 2x decoder memory)

    def __init__(self, model: Llava, *, max_cache_len: int | None = None,
                 batch_buckets: Sequence[int] = BATCH_BUCKETS, prompt_buckets: Sequence[int] = PROMPT_BUCKETS,
                 new_token_buckets: Sequence[int] = NEW_TOKEN_BUCKETS,
                 text_buckets: Sequence[int] | None = TEXT_BUCKETS, layer_weights=None):
        """text_buckets: prompts with an image pad to N visual tokens + a text bucket (None: every
        prompt pads to a prompt bucket)."""
        self.cfg = model.cfg
        self.graphdef, self.state = nnx.split(model)
        # Decoder weights as separate per-layer buffers (see llama.unstack_layers). They are a
        # second copy of the decoder weights while the caller also keeps the stacked model;
        # generators on the same model can share one copy (pass another's .layer_weights).
        if not self.per_layer_decode:
            layer_weights = None
        elif layer_weights is None:
            layer_weights = unstack_layers(model.text.layers.weights())
        elif len(layer_weights) != self.cfg.text.num_hidden_layers:
            raise ValueError(f"layer_weights has {len(layer_weights)} layers; the model has "
                             f"{self.cfg.text.num_hidden_layers}")
        self.layer_weights = layer_weights
        self.max_cache_len = max_cache_len or self.cfg.text.max_position_embeddings
        self.batch_buckets = tuple(batch_buckets)
        self.prompt_buckets = tuple(prompt_buckets)
        self.new_token_buckets = tuple(new_token_buckets)
        self.text_buckets = None if text_buckets is None else tuple(text_buckets)
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("capacity",))
        self._decode = jax.jit(self._decode_impl, static_argnames=("out_len", "sampling", "eos_ids", "pad_id"),
                               donate_argnames=("cache",))

    # jitted bodies: the model is rebuilt from (static graphdef, traced state) inside the trace
    def _prefill_impl(self, state, layer_weights, tokens, lengths, pixel_values, *, capacity):
        return prefill(nnx.merge(self.graphdef, state), tokens, lengths, pixel_values, capacity, layer_weights)

    def _decode_impl(self, state, layer_weights, cache, logits, active, key, max_new_tokens, *, out_len, sampling,
                     eos_ids, pad_id):
        return decode_loop(nnx.merge(self.graphdef, state), cache, logits, active, key, max_new_tokens,
                           out_len=out_len, sampling=sampling, eos_ids=eos_ids, pad_id=pad_id,
                           layer_weights=layer_weights)

    # --- input checks -------------------------------------------------------------------------
    def check_inputs(self, prompts: Sequence[Sequence[int]], pixel_values, max_new_tokens: int) -> None:
        cfg = self.cfg
        if len(prompts) == 0:
            raise InputError("empty batch: no prompts given")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        n_img = cfg.num_image_tokens
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise InputError(f"prompt {i} is empty")
            bad = [t for t in p if not 0 <= t < cfg.text.vocab_size]
            if bad:
                raise InputError(f"prompt {i} has token ids outside the vocabulary [0, {cfg.text.vocab_size}): {bad[:5]}")
            if len(p) + max_new_tokens > self.max_cache_len:
                raise InputError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that needs "
                    f"{len(p) + max_new_tokens} cache slots, over the cache capacity {self.max_cache_len}")
            count = sum(1 for t in p if t == cfg.image_token_index)
            want = 0 if pixel_values is None else n_img
            if count != want:
                what = "no image given" if pixel_values is None else "one image per prompt"
                raise InputError(
                    f"prompt {i} has {count} image placeholder tokens (id {cfg.image_token_index}); "
                    f"expected {want} ({what}, {n_img} visual tokens per image)")
        if pixel_values is not None:
            v = cfg.vision
            want_shape = (len(prompts), v.num_channels, v.image_size, v.image_size)
            if tuple(pixel_values.shape) != want_shape:
                raise InputError(
                    f"pixel_values has shape {tuple(pixel_values.shape)}; expected {want_shape} "
                    f"([batch, channels, image_size, image_size])")

    def prompt_bucket(self, longest: int, with_image: bool) -> int:
        """Padded prompt length for a batch whose longest prompt has `longest` tokens: the smaller of
        its prompt bucket and (with an image and text_buckets) N + its text's bucket."""
        fits = []
        if longest <= self.prompt_buckets[-1]:
            fits.append(bucket(longest, self.prompt_buckets, "prompt length"))
        n_img = self.cfg.num_image_tokens
        if with_image and self.text_buckets is not None and longest - n_img <= self.text_buckets[-1]:
            fits.append(n_img + bucket(longest - n_img, self.text_buckets, "prompt text length"))
        if not fits:
            raise InputError(f"prompt length {longest} exceeds the largest prompt bucket {self.prompt_buckets[-1]}"
                             + (f" (and its text, {longest - n_img} tokens besides the image, the largest text "
                                f"bucket {self.text_buckets[-1]})" if with_image and self.text_buckets else ""))
        return min(fits)

    def pad_inputs(self, prompts, pixel_values, max_new_tokens: int):
        """Right-pad prompts into (batch, prompt) buckets; returns arrays plus the bucket sizes."""
        n = len(prompts)
        b = bucket(n, self.batch_buckets, "batch size")
        s = self.prompt_bucket(max(len(p) for p in prompts), pixel_values is not None)
        new = bucket(max_new_tokens, self.new_token_buckets, "max_new_tokens")
        capacity = min(s + new, max(s, self.max_cache_len))
        pad = self.cfg.text.pad_token_id or 0
        tokens = np.full((b, s), pad, np.int32)
        lengths = np.ones((b,), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
            lengths[i] = len(p)
        active = np.arange(b) < n
        pv = None
        if pixel_values is not None:
            pv = np.zeros((b,) + tuple(pixel_values.shape[1:]), np.float32)
            pv[:n] = np.asarray(pixel_values, np.float32)
        return tokens, lengths, active, pv, new, capacity

    # --- entry points ---------------------------------------------------------------------------
    def run_prefill(self, tokens, lengths, pixel_values, capacity: int) -> tuple[KVCache, jax.Array]:
        """The compiled prefill on already padded arrays (benchmarks time it on its own)."""
        return self._prefill(self.state, self.layer_weights, tokens, lengths, pixel_values, capacity=capacity)

    def run_decode(self, cache: KVCache, logits, active, key, max_new_tokens, *, out_len: int,
                   sampling: SamplingConfig = SamplingConfig(), eos_ids: tuple[int, ...] = (), pad_id: int = 0):
        """The compiled decode loop (donates `cache`); returns tokens [B, out_len], counts [B], cache."""
        return self._decode(self.state, self.layer_weights, cache, logits, active, key, max_new_tokens,
                            out_len=out_len, sampling=sampling, eos_ids=eos_ids, pad_id=pad_id)

    def generate(self, prompts: Sequence[Sequence[int]], pixel_values=None, *, max_new_tokens: int = 128,
                 sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                 eos_ids: Sequence[int] | None = None) -> GenerationOutput:
        """prompts: token id lists (image placeholders already expanded); pixel_values [B, C, H, W]."""
        self.check_inputs(prompts, pixel_values, max_new_tokens)
        tokens, lengths, active, pv, out_len, capacity = self.pad_inputs(prompts, pixel_values, max_new_tokens)
        if eos_ids is None:
            eos_ids = () if self.cfg.text.eos_token_id is None else (self.cfg.text.eos_token_id,)
        pad_id = self.cfg.text.pad_token_id if self.cfg.text.pad_token_id is not None else 0
        cache, logits = self.run_prefill(tokens, lengths, pv, capacity)
        out, count, _ = self.run_decode(cache, logits, active, jax.random.key(seed), jnp.int32(max_new_tokens),
                                        out_len=out_len, sampling=sampling,
                                        eos_ids=tuple(int(e) for e in eos_ids), pad_id=int(pad_id))
        out, count = np.asarray(out), np.asarray(count)
        n = len(prompts)
        return GenerationOutput([out[i, :count[i]].tolist() for i in range(n)], count[:n])


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


def make_generator(model: Llava, twig=None, twig_cfg=None, method: str | None = None, ssd: bool | None = None,
                   **kwargs):
    """A generator for (method, ssd): the plain `Generator` for ("none", no SSD) without a twig
    (unless `force_twig_generator`), else a `TwigGenerator`. method defaults to "twig" with a twig,
    "none" without; ssd defaults to "a twig is given". Raises TwigConfigError for SSD / "twig"
    without a twig."""
    from twig_jax.twig.config import TwigConfig, TwigConfigError
    from twig_jax.decode.generator import TwigGenerator

    force = kwargs.pop("force_twig_generator", False)
    # TTP by default with a twig: the TwigVLM++ P-head when the twig has one, else its attention.
    method = method or (("phead" if twig.p_head is not None else "twig") if twig is not None else "none")
    ssd = (twig is not None) if ssd is None else ssd
    if twig is None and ssd:
        raise TwigConfigError("--ssd (self-speculative decoding) needs a twig: the twig is the draft model; "
                              "give --twig DIR or use --no-ssd")
    if twig is None and method in ("twig", "phead"):
        raise TwigConfigError(f"method {method!r} (TTP) needs a twig (--twig DIR); without one use fastv, random "
                              "or none")
    if method == "none" and not ssd and not force:
        return Generator(model, **kwargs)
    if twig_cfg is None:
        twig_cfg = twig.twig_cfg if twig is not None else TwigConfig(K=1, T=1, Kf=model.cfg.text.num_hidden_layers,
                                                                     R=model.cfg.num_image_tokens)
    return TwigGenerator(model, twig, twig_cfg, method=method, ssd=ssd, **kwargs)
