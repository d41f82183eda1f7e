"""Streaming one answer to the terminal as it is generated, accepted drafts highlighted.

The decode loops keep their one-`while_loop` structure: the streaming executable is a separate
compilation of the same `ttp_prefill` + `ssd_loop` / `pruned_decode_loop` with their static
`on_round` / `on_token` hook set, which calls an ordered `jax.experimental.io_callback` once per
round (SSD) or token (plain pruned decode). The non-streaming `TwigGenerator.generate` traces no
callback. Tokens, counts and statistics equal `generate`'s for the same generator and seed
(same keys, same ops).
"""

from __future__ import annotations

import sys
import threading
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from twig_jax.decode.generator import Generator
from twig_jax.decode.sampling import SamplingConfig
from twig_jax.decode.speculative import ssd_extra_slots, ssd_loop
from twig_jax.decode.prune import needs_twig, pruned_decode_loop, ttp_prefill
from twig_jax.decode.generator import TwigGenerationOutput, TwigGenerator, ssd_stats

# The host sink of the stream in progress. One stream at a time (the lock); the callback runs
# on an XLA runtime thread, so a thread-local would not reach it.
_LOCK = threading.Lock()
_SINK: list[Callable | None] = [None]


def _dispatch(tokens, n_emit, n_acc) -> None:
    sink = _SINK[0]
    if sink is not None:
        n = int(n_emit[0])
        if n > 0:
            sink([int(t) for t in np.asarray(tokens)[0, :n]], min(int(n_acc[0]), n))


def _as_twig_generator(gen) -> TwigGenerator:
    """Streaming runs through TwigGenerator; a plain Generator becomes method 'none', no SSD."""
    if isinstance(gen, TwigGenerator):
        return gen
    if not isinstance(gen, Generator):
        raise TypeError(f"cannot stream with {type(gen).__name__}")
    twin = getattr(gen, "_stream_twin", None)
    if twin is None:
        from twig_jax.twig.config import TwigConfig

        model = nnx.merge(gen.graphdef, gen.state)
        tc = TwigConfig(K=1, T=1, Kf=gen.cfg.text.num_hidden_layers, R=gen.cfg.num_image_tokens)
        twin = TwigGenerator(model, None, tc, method="none", ssd=False, max_cache_len=gen.max_cache_len,
                             batch_buckets=gen.batch_buckets, prompt_buckets=gen.prompt_buckets,
                             new_token_buckets=gen.new_token_buckets, text_buckets=gen.text_buckets,
                             layer_weights=gen.layer_weights)
        gen._stream_twin = twin
    return twin


def _stream_fn(gen: TwigGenerator):
    fn = getattr(gen, "_stream_jit", None)
    if fn is not None:
        return fn

    def impl(state, twig_state, weights, tokens, lengths, pv, active, key, max_new_tokens, *, out_len, sampling,
             eos_ids, pad_id):
        # Mirrors ssd_generate / pruned_generate (same key splits), with the host hook set.
        model, twig = nnx.merge(gen.graphdef, state), gen._twig(twig_state)
        plan = gen.plan
        kw = dict(out_len=out_len, sampling=sampling, eos_ids=eos_ids, pad_id=pad_id, weights=weights)
        key_prune, key_dec = jax.random.split(key)
        if gen.ssd:
            pre = ttp_prefill(model, twig, plan, tokens, lengths, pv, extra=ssd_extra_slots(plan, out_len),
                              key=key_prune, weights=weights)
            out = ssd_loop(model, twig, plan, pre.caches, pre.logits, active, key_dec, max_new_tokens,
                           on_round=_dispatch, **kw)
            return out.tokens, out.count, out.rounds, out.drafted, out.accepted, pre.keep
        pre = ttp_prefill(model, twig if needs_twig(plan.method) else None, plan, tokens, lengths, pv,
                          extra=out_len + 1, key=key_prune, weights=weights)
        out, count, _ = pruned_decode_loop(model, plan, pre.caches, pre.logits, active, key_dec, max_new_tokens,
                                           on_token=_dispatch, **kw)
        z = count * 0
        return out, count, z, z, z, pre.keep

    fn = jax.jit(impl, static_argnames=("out_len", "sampling", "eos_ids", "pad_id"))
    gen._stream_jit = fn
    return fn


def stream_generate(generator, prompt: Sequence[int], pixel_values, on_chunk: Callable[[list[int], int], None] | None,
                    *, max_new_tokens: int = 128, sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                    eos_ids: Sequence[int] | None = None) -> TwigGenerationOutput:
    """Generate one answer, calling on_chunk(tokens, n_accepted) for the first token and then for
    every round (SSD: the first n_accepted of `tokens` are drafts the target accepted, the last
    is the target's own) or token (no SSD: n_accepted = 0). pixel_values: [1, C, H, W]."""
    gen = _as_twig_generator(generator)
    tokens, lengths, active, pv, out_len = gen._prepare([list(prompt)], pixel_values, max_new_tokens)
    if eos_ids is None:
        eos_ids = () if gen.cfg.text.eos_token_id is None else (gen.cfg.text.eos_token_id,)
    pad_id = gen.cfg.text.pad_token_id if gen.cfg.text.pad_token_id is not None else 0
    gen._last_shapes = (tokens.shape[1], out_len)
    fn = _stream_fn(gen)
    with _LOCK:
        _SINK[0] = on_chunk
        try:
            res = fn(gen.state, gen.twig_state, gen.weights, tokens, lengths, pv, active, jax.random.key(seed),
                     np.int32(max_new_tokens), out_len=out_len, sampling=sampling,
                     eos_ids=tuple(int(e) for e in eos_ids), pad_id=int(pad_id))
            out, count, rounds, drafted, accepted, keep = (np.asarray(x) for x in res)
            jax.effects_barrier()  # every callback has run
        finally:
            _SINK[0] = None
    stats = ssd_stats(count[:1], rounds[:1], drafted[:1], accepted[:1]) if gen.ssd else {}
    return TwigGenerationOutput([out[0, :count[0]].tolist()], count[:1], stats, keep[:1])


# ----------------------------------------------------------------------------------------------
# Terminal printer

ACCEPT_ON = "\x1b[1;32m"  # bold green: drafted by the twig and accepted by the target
ANSI_OFF = "\x1b[0m"


class StreamPrinter:
    """on_chunk sink that prints the decoded text incrementally.

    Accepted draft tokens are shown in bold green (color=True) or inside [..] markers
    (color=False: not a TTY, or --no-color). Text is re-decoded from all tokens so far, so
    multi-token characters and SentencePiece spaces come out right.
    """

    def __init__(self, tokenizer, *, color: bool | None = None, out=None, eos_id: int | None = None):
        self.tok = tokenizer
        self.out = out or sys.stdout
        self.color = (hasattr(self.out, "isatty") and self.out.isatty()) if color is None else color
        self.eos = tokenizer.eos_token_id if eos_id is None else eos_id
        self.tokens: list[int] = []
        self.text = ""
        self.pieces: list[tuple[str, bool]] = []  # (text, accepted draft) as printed

    def _decode(self, toks) -> str:
        return self.tok.decode([t for t in toks if t != self.eos], skip_special_tokens=True)

    def _emit(self, upto: list[int], accepted: bool) -> None:
        text = self._decode(upto)
        if not text.startswith(self.text):  # rare: decoding changed earlier text; print the new tail
            common = 0
            while common < min(len(text), len(self.text)) and text[common] == self.text[common]:
                common += 1
            self.text = self.text[:common]
        piece = text[len(self.text):]
        self.text = text
        if not piece:
            return
        self.pieces.append((piece, accepted))
        if accepted:
            piece = f"{ACCEPT_ON}{piece}{ANSI_OFF}" if self.color else f"[{piece}]"
        self.out.write(piece)
        self.out.flush()

    def __call__(self, tokens: list[int], n_accepted: int) -> None:
        if n_accepted:
            self.tokens = self.tokens + tokens[:n_accepted]
            self._emit(self.tokens, True)
        self.tokens = self.tokens + tokens[n_accepted:]
        self._emit(self.tokens, False)

    def finish(self) -> None:
        self.out.write("\n")
        self.out.flush()

    def legend(self) -> str:
        mark = f"{ACCEPT_ON}green{ANSI_OFF}" if self.color else "[..]"
        return f"({mark} = drafted by the twig and accepted by the target)"
