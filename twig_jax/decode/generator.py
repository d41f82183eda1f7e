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
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from twig_jax.decode.buckets import (BATCH_BUCKETS, NEW_TOKEN_BUCKETS, PROMPT_BUCKETS, TEXT_BUCKETS, Batcher,
                                     InputError)
from twig_jax.decode.placement import Placement, constrain_cache
from twig_jax.decode.plain import decode_loop, prefill
from twig_jax.decode.prune import LayerWeights, OneTokenDecoding, kv_bytes, make_plan, ttp_prefill
from twig_jax.twig.config import needs_twig
from twig_jax.decode.sampling import SamplingConfig
from twig_jax.decode.sink import dispatch, streaming_to
from twig_jax.decode.speculative import ChainDrafter
from twig_jax.decode.tree import TreeDrafter
from twig_jax.model.cache import KVCache
from twig_jax.model.llama import unstack_layers
from twig_jax.model.llava import Llava
from twig_jax.twig.config import TwigConfig, TwigConfigError
from twig_jax.twig.module import Twig


@dataclasses.dataclass
class GenerationOutput:
    tokens: list[list[int]]  # generated tokens per row, up to and including EOS
    num_generated: np.ndarray  # [B]


def check_min_new_tokens(min_new_tokens: int, budgets: np.ndarray) -> None:
    if not 0 <= min_new_tokens <= int(budgets.min()):
        raise InputError(f"min_new_tokens={min_new_tokens} must be in [0, max_new_tokens={int(budgets.min())}]")


def base_layer_copies(model: Llava, layer_weights, layer_copies: bool):
    """The per-layer decoder weights a generator decodes from (None: the stacked arrays).

    Per-layer copies (llama.unstack_layers) are the XLA-CPU adapter: there a slice of a stacked
    [L, ...] array is copied before every matmul, which about triples a decode step's weight
    traffic. They are a second copy of the decoder weights while the caller keeps the stacked
    model; generators on the same model share one (pass another's .layer_weights).
    """
    if not layer_copies:
        return None
    if layer_weights is None:
        return unstack_layers(model.text.layers.weights())
    if len(layer_weights) != model.cfg.text.num_hidden_layers:
        raise ValueError(f"layer_weights has {len(layer_weights)} layers; the model has "
                         f"{model.cfg.text.num_hidden_layers}")
    return layer_weights


def use_layer_copies(layer_copies: bool, placement: Placement, layer_weights) -> bool:
    """Per-layer copies only on one device: on a mesh the stacked weights are the only copy."""
    if placement.mesh is None:
        return layer_copies
    if layer_weights is not None:
        raise ValueError("layer_weights (per-layer copies) cannot be shared on a mesh: sharded generators "
                         "decode from the stacked weights")
    return False


class Generator(Batcher):
    """Batched generation of the unpruned model: compiled prefill and decode loop per shape bucket.

    layer_copies: decode from per-layer weight copies (base_layer_copies; the faster choice on XLA
    CPU, at twice the decoder's memory). mesh: run on a ("data", "fsdp", "tensor") mesh
    (decode/placement.py); the weights are then sharded by the rule table and never copied per layer.
    """

    twig_state = None  # the plain model decodes without a twig

    def __init__(self, model: Llava, *, max_cache_len: int | None = None,
                 batch_buckets: Sequence[int] = BATCH_BUCKETS, prompt_buckets: Sequence[int] = PROMPT_BUCKETS,
                 new_token_buckets: Sequence[int] = NEW_TOKEN_BUCKETS,
                 text_buckets: Sequence[int] | None = TEXT_BUCKETS, layer_weights=None, layer_copies: bool = True,
                 mesh=None):
        self.placement = Placement(mesh)
        super().__init__(model.cfg, max_cache_len=max_cache_len, batch_buckets=batch_buckets,
                         prompt_buckets=prompt_buckets, new_token_buckets=new_token_buckets, text_buckets=text_buckets,
                         batch_multiple=self.placement.batch_multiple)
        self.graphdef, state = nnx.split(model)
        self.state = self.placement.params(state)
        self.layer_weights = base_layer_copies(model, layer_weights,
                                               use_layer_copies(layer_copies, self.placement, layer_weights))
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("capacity",))
        self._decode = jax.jit(self._decode_impl, static_argnames=("out_len", "sampling", "eos_ids", "pad_id"),
                               donate_argnames=("cache",))

    # jitted bodies: the model is rebuilt from (static graphdef, traced state) inside the trace
    def _prefill_impl(self, state, layer_weights, tokens, lengths, pixel_values, *, capacity):
        cache, logits = prefill(nnx.merge(self.graphdef, state), tokens, lengths, pixel_values, capacity,
                                layer_weights)
        return cache, self.placement.constrain_rows(logits)

    def _decode_impl(self, state, layer_weights, cache, logits, active, key, max_new_tokens, min_new_tokens, *,
                     out_len, sampling, eos_ids, pad_id):
        out, count, cache = decode_loop(nnx.merge(self.graphdef, state), cache, logits, active, key, max_new_tokens,
                                        out_len=out_len, sampling=sampling, eos_ids=eos_ids, pad_id=pad_id,
                                        layer_weights=layer_weights, min_new_tokens=min_new_tokens)
        return self.placement.constrain_rows(out), self.placement.constrain_rows(count), constrain_cache(cache)

    # --- entry points ---------------------------------------------------------------------------
    def run_prefill(self, tokens, lengths, pixel_values, capacity: int) -> tuple[KVCache, jax.Array]:
        """The compiled prefill on already padded arrays (benchmarks time it on its own)."""
        put = self.placement.rows
        with self.placement.context():
            return self._prefill(self.state, self.layer_weights, put(tokens), put(lengths),
                                 None if pixel_values is None else put(pixel_values), capacity=capacity)

    def prefill_only(self, prompts: Sequence[Sequence[int]], pixel_values=None,
                     max_new_tokens: int = 128) -> tuple[KVCache, jax.Array]:
        """The compiled prefill alone on checked, padded prompts, with the cache generate() would decode
        from: (KVCache, next-token logits [B, V]) (TwigGenerator.prefill_only's counterpart)."""
        self.check_inputs(prompts, pixel_values, max_new_tokens)
        tokens, lengths, _, pv, _, capacity = self.pad_inputs(prompts, pixel_values, max_new_tokens)
        return self.run_prefill(tokens, lengths, pv, capacity)

    def run_decode(self, cache: KVCache, logits, active, key, max_new_tokens, *, out_len: int,
                   sampling: SamplingConfig = SamplingConfig(), eos_ids: tuple[int, ...] = (), pad_id: int = 0,
                   min_new_tokens: int = 0):
        """The compiled decode loop (donates `cache`); returns tokens [B, out_len], counts [B], cache."""
        put = self.placement.rows
        with self.placement.context():
            return self._decode(self.state, self.layer_weights, cache, logits, put(active),
                                self.placement.replicated_key(key), put(max_new_tokens), jnp.int32(min_new_tokens),
                                out_len=out_len, sampling=sampling, eos_ids=eos_ids, pad_id=pad_id)

    def generate(self, prompts: Sequence[Sequence[int]], pixel_values=None, *,
                 max_new_tokens: int | Sequence[int] = 128, sampling: SamplingConfig = SamplingConfig(),
                 seed: int = 0, eos_ids: Sequence[int] | None = None, min_new_tokens: int = 0) -> GenerationOutput:
        """prompts: token id lists (image placeholders already expanded); pixel_values [B, C, H, W].
        max_new_tokens: one budget for every prompt, or one per prompt. min_new_tokens: no EOS before
        that many tokens (Hugging Face's min_new_tokens)."""
        self.check_inputs(prompts, pixel_values, max_new_tokens)
        check_min_new_tokens(min_new_tokens, self.row_budgets(max_new_tokens, len(prompts)))
        tokens, lengths, active, pv, out_len, capacity = self.pad_inputs(prompts, pixel_values, max_new_tokens)
        if eos_ids is None:
            eos_ids = () if self.cfg.text.eos_token_id is None else (self.cfg.text.eos_token_id,)
        pad_id = self.cfg.text.pad_token_id if self.cfg.text.pad_token_id is not None else 0
        cache, logits = self.run_prefill(tokens, lengths, pv, capacity)
        budgets = self.padded_budgets(max_new_tokens, len(prompts), tokens.shape[0])
        out, count, _ = self.run_decode(cache, logits, active, jax.random.key(seed), budgets,
                                        out_len=out_len, sampling=sampling,
                                        eos_ids=tuple(int(e) for e in eos_ids), pad_id=int(pad_id),
                                        min_new_tokens=min_new_tokens)
        out, count = self.placement.to_host(out), self.placement.to_host(count)
        n = len(prompts)
        return GenerationOutput([out[i, :count[i]].tolist() for i in range(n)], count[:n])


@dataclasses.dataclass
class TwigGenerationOutput:
    tokens: list[list[int]]  # generated tokens per row, up to and including EOS
    num_generated: np.ndarray  # [B]
    stats: dict  # SSD statistics (see ssd_stats; empty when ssd=False)
    keep: np.ndarray  # [B, R] kept visual indices (ascending)


def ssd_stats(count: np.ndarray, rounds: np.ndarray, drafted: np.ndarray, accepted: np.ndarray,
              deepest: np.ndarray | None = None) -> dict:
    """Aggregate per-row SSD counters into the usual figures (docs/decoding.md, "Statistics").

    acceptance_rate = accepted drafts / drafted tokens (this project's rate: every draft the twig
    proposed counts, including those past an EOS or the budget);
    mean_accepted_per_round = accepted drafts per draft / verify round;
    mean_tokens_per_round = tokens emitted by rounds (all but the prefill's first) per round;
    tokens_per_target_pass = generated tokens / passes of the target model, the prefill counted
    as a pass that emits the first token: the mean accepted length (tau) that EAGLE-2 and
    TwigVLM++ report, comparable across implementations whatever their round structure;
    deepest = the most drafts accepted in one round (with a tree: the depth reached).
    drafted counts drafted tokens (a chain) or verified nodes (a tree).
    """
    r, d, a = int(rounds.sum()), int(drafted.sum()), int(accepted.sum())
    emitted = int(np.maximum(count - 1, 0).sum())
    passes = int((rounds + (count > 0)).sum())
    nan = float("nan")
    return {
        "rounds": r, "drafted": d, "accepted": a,
        "acceptance_rate": a / d if d else nan,
        "mean_accepted_per_round": a / r if r else nan,
        "mean_tokens_per_round": emitted / r if r else nan,
        "tokens_per_target_pass": int(count.sum()) / passes if passes else nan,
        "deepest": None if deepest is None else int(deepest.max(initial=0)),
        "per_row": {"rounds": rounds.tolist(), "drafted": drafted.tolist(), "accepted": accepted.tolist(),
                    **({} if deepest is None else {"deepest": deepest.tolist()})},
    }


class TwigGenerator(Batcher):
    """Batched TwigVLM generation: method in ("twig", "phead", "fastv", "random", "none"), ssd on/off.

    With layer_copies (the default), prefill and decode read per-layer copies of the base decoder's
    and the twig's layer weights (prune.LayerWeights, made once here) and keep every cache group
    per layer, as Generator does.
    """

    def __init__(self, base_model: Llava, twig: Twig | None, twig_cfg: TwigConfig, method: str = "twig",
                 ssd: bool = True, *, max_cache_len: int | None = None,
                 batch_buckets: Sequence[int] = BATCH_BUCKETS, prompt_buckets: Sequence[int] = PROMPT_BUCKETS,
                 new_token_buckets: Sequence[int] = NEW_TOKEN_BUCKETS,
                 text_buckets: Sequence[int] | None = TEXT_BUCKETS, layer_weights=None, layer_copies: bool = True,
                 mesh=None):
        """text_buckets: see Batcher. layer_weights: per-layer base decoder weights to share with
        another generator on the same model (its .layer_weights), instead of making a copy.
        mesh: run on a ("data", "fsdp", "tensor") mesh (decode/placement.py), from the stacked
        weights sharded by the rule table."""
        self.placement = Placement(mesh)
        super().__init__(base_model.cfg, max_cache_len=max_cache_len, batch_buckets=batch_buckets,
                         prompt_buckets=prompt_buckets, new_token_buckets=new_token_buckets, text_buckets=text_buckets,
                         batch_multiple=self.placement.batch_multiple)
        self.graphdef, state = nnx.split(base_model)
        self.state = self.placement.params(state)
        self.layer_copies = use_layer_copies(layer_copies, self.placement, layer_weights)
        self.layer_weights = base_layer_copies(base_model, layer_weights, self.layer_copies)
        self.plan = make_plan(base_model.cfg, twig_cfg, method)
        self.method, self.ssd = method, ssd
        # The decode after the pruned prefill: a drafter (chain SSD) or one token per step.
        if not ssd:
            self.decoding = OneTokenDecoding()
        elif twig_cfg.spec == "tree":
            self.decoding = TreeDrafter(twig_cfg.tree_shape)
        else:
            self.decoding = ChainDrafter()
        if twig is None and (ssd or needs_twig(method)):
            raise TwigConfigError(f"method={method!r}, ssd={ssd} needs a twig")
        self.twig_graphdef, twig_state = nnx.split(twig) if twig is not None else (None, None)
        self.twig_state = None if twig_state is None else self.placement.params(twig_state)
        self.twig_layer_weights = None if twig is None else self._unstack_twig(twig)
        self.itemsize = jnp.dtype(base_model.text.embed[...].dtype).itemsize
        self._last_shapes: tuple[int, int] | None = None
        self._gen = jax.jit(self._gen_impl, static_argnames=("out_len", "sampling", "eos_ids", "pad_id", "on_step"))
        self._score = jax.jit(self._score_impl)
        self._prefill_only = jax.jit(self._prefill_only_impl, static_argnames=("extra",))

    def _unstack_twig(self, twig: Twig):
        return unstack_layers(twig.layers.weights()) if self.layer_copies else None

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
        self.twig_state = self.placement.params(state)
        self.twig_layer_weights = self._unstack_twig(twig)

    # --- jitted bodies -------------------------------------------------------------------------
    def _twig(self, twig_state):
        return None if twig_state is None else nnx.merge(self.twig_graphdef, twig_state)

    def _gen_impl(self, state, twig_state, weights, tokens, lengths, pixel_values, active, key, max_new_tokens,
                  min_new_tokens, *, out_len, sampling, eos_ids, pad_id, on_step):
        # on_step (static): the streaming hook the decode loop calls once per round or token through
        # an ordered io_callback (decode/sink.py); None traces no callback.
        model, twig = nnx.merge(self.graphdef, state), self._twig(twig_state)
        kw = dict(out_len=out_len, sampling=sampling, eos_ids=eos_ids, pad_id=pad_id, weights=weights,
                  on_step=on_step, min_new_tokens=min_new_tokens)
        out, pre = self.decoding.generate(model, twig, self.plan, tokens, lengths, pixel_values, active, key,
                                          max_new_tokens, **kw)
        return self.placement.constrain_rows(
            (out.tokens, out.count, out.rounds, out.drafted, out.accepted, out.deepest, pre.keep))

    def _score_impl(self, state, twig_state, weights, tokens, lengths, pixel_values, key):
        model, twig = nnx.merge(self.graphdef, state), self._twig(twig_state)
        pre = ttp_prefill(model, twig if self.plan.scorer.reads_twig else None, self.plan, tokens, lengths,
                          pixel_values, extra=1, key=key, weights=weights)
        return self.placement.constrain_rows((pre.scores, pre.keep))

    def _prefill_only_impl(self, state, twig_state, weights, tokens, lengths, pixel_values, key, *, extra):
        model, twig = nnx.merge(self.graphdef, state), self._twig(twig_state)
        use = twig if (self.decoding.uses_twig or self.plan.scorer.reads_twig) else None
        pre = ttp_prefill(model, use, self.plan, tokens, lengths, pixel_values, extra=extra, key=key,
                          weights=weights)
        return pre.caches, self.placement.constrain_rows(pre.logits)

    # --- inputs --------------------------------------------------------------------------------
    def prepare(self, prompts, pixel_values, max_new_tokens):
        """Checked, padded arrays for a call: (tokens [B, S], lengths [B], active [B], pixel values
        [B, C, H, W], out_len), padding rows copying row 0."""
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
    def generate(self, prompts: Sequence[Sequence[int]], pixel_values=None, *,
                 max_new_tokens: int | Sequence[int] = 128, sampling: SamplingConfig = SamplingConfig(),
                 seed: int = 0, eos_ids: Sequence[int] | None = None,
                 on_chunk: Callable[[list[int], int], None] | None = None,
                 min_new_tokens: int = 0) -> TwigGenerationOutput:
        """prompts: token id lists with the N image placeholders expanded; pixel_values [B, C, H, W].
        max_new_tokens: one budget for every prompt, or one per prompt.
        min_new_tokens: no EOS before that many tokens (Hugging Face's min_new_tokens).

        on_chunk (streaming, one prompt): called as on_chunk(tokens, n_accepted) with the first token
        and then with every round's tokens (SSD: the first n_accepted are drafts the target accepted)
        or every token (no SSD), from the same loop as a call without it; see decode/stream.py.
        """
        if on_chunk is not None and len(prompts) != 1:
            raise InputError(f"streaming answers one prompt at a time; got {len(prompts)}")
        tokens, lengths, active, pv, out_len = self.prepare(prompts, pixel_values, max_new_tokens)
        check_min_new_tokens(min_new_tokens, self.row_budgets(max_new_tokens, len(prompts)))
        budgets = self.padded_budgets(max_new_tokens, len(prompts), tokens.shape[0])
        if eos_ids is None:
            eos_ids = () if self.cfg.text.eos_token_id is None else (self.cfg.text.eos_token_id,)
        pad_id = self.cfg.text.pad_token_id if self.cfg.text.pad_token_id is not None else 0
        self._last_shapes = (tokens.shape[1], out_len)
        put = self.placement.rows
        with streaming_to(on_chunk), self.placement.context():
            res = self._gen(self.state, self.twig_state, self.weights, put(tokens), put(lengths), put(pv),
                            put(active), self.placement.replicated_key(jax.random.key(seed)), put(budgets),
                            jnp.int32(min_new_tokens), out_len=out_len, sampling=sampling,
                            eos_ids=tuple(int(e) for e in eos_ids), pad_id=int(pad_id),
                            on_step=None if on_chunk is None else dispatch)
            out, count, rounds, drafted, accepted, deepest, keep = (self.placement.to_host(x) for x in res)
        n = len(prompts)
        stats = ssd_stats(count[:n], rounds[:n], drafted[:n], accepted[:n], deepest[:n]) if self.ssd else {}
        return TwigGenerationOutput([out[i, :count[i]].tolist() for i in range(n)], count[:n], stats, keep[:n])

    def prune_scores(self, prompts: Sequence[Sequence[int]], pixel_values,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Pruning scores [B, N] over the visual tokens and the kept indices [B, R] (for pictures)."""
        tokens, lengths, _, pv, _ = self.prepare(prompts, pixel_values, 1)
        put = self.placement.rows
        with self.placement.context():
            scores, keep = self._score(self.state, self.twig_state, self.weights, put(tokens), put(lengths), put(pv),
                                       self.placement.replicated_key(jax.random.key(seed)))
        n = len(prompts)
        return self.placement.to_host(scores)[:n], self.placement.to_host(keep)[:n]

    def prefill_only(self, prompts: Sequence[Sequence[int]], pixel_values, max_new_tokens: int = 128,
                     seed: int = 0):
        """The compiled TTP prefill alone, with the caches generate() would decode from (benchmarks
        time it on its own); returns (TwigCaches, target next-token logits [B, V])."""
        tokens, lengths, _, pv, out_len = self.prepare(prompts, pixel_values, max_new_tokens)
        extra = self.decoding.extra_slots(self.plan, out_len)
        put = self.placement.rows
        with self.placement.context():
            return self._prefill_only(self.state, self.twig_state, self.weights, put(tokens), put(lengths), put(pv),
                                      self.placement.replicated_key(jax.random.key(seed)), extra=extra)

    def kv_bytes_per_sequence(self, prompt_len: int | None = None, max_new_tokens: int | None = None) -> dict[str, int]:
        """KV-cache bytes per sequence per group ("trunk", "twig", "mid", "tail") and "total".

        Defaults to the padded shapes of the last generate() call (else N + 64 prompt tokens and
        128 new tokens). The twig group counts only with ssd=True (only drafting keeps it).
        """
        if prompt_len is None or max_new_tokens is None:
            s, out_len = self._last_shapes or (self.plan.N + 64, 128)
            prompt_len = s if prompt_len is None else prompt_len
            max_new_tokens = out_len if max_new_tokens is None else max_new_tokens
        extra = self.decoding.extra_slots(self.plan, max_new_tokens)
        return kv_bytes(self.cfg, self.plan, prompt_len, extra, self.itemsize, with_twig=self.decoding.uses_twig)


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
