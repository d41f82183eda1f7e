"""Streaming one answer to the terminal as it is generated, accepted drafts highlighted.

Streaming is a callback of the same loop: `TwigGenerator.generate(..., on_chunk=f)` compiles the
same prefill and decode loop with its static step hook set (decode/sink.py), which calls an
ordered `jax.experimental.io_callback` once per round (SSD) or token (plain pruned decode). A call
without on_chunk traces no callback. Tokens, counts and statistics equal a call without it for the
same generator and seed (same keys, same ops).
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from flax import nnx

from twig_jax.decode.generator import Generator
from twig_jax.decode.sampling import SamplingConfig
from twig_jax.decode.generator import TwigGenerationOutput, TwigGenerator

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


def stream_generate(generator, prompt: Sequence[int], pixel_values, on_chunk: Callable[[list[int], int], None] | None,
                    *, max_new_tokens: int = 128, sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                    eos_ids: Sequence[int] | None = None, min_new_tokens: int = 0) -> TwigGenerationOutput:
    """Generate one answer, calling on_chunk(tokens, n_accepted) for the first token and then for
    every round (SSD: the first n_accepted of `tokens` are drafts the target accepted, the last
    is the target's own) or token (no SSD: n_accepted = 0). pixel_values: [1, C, H, W]."""
    gen = _as_twig_generator(generator)
    return gen.generate([list(prompt)], pixel_values, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                        eos_ids=eos_ids, on_chunk=on_chunk, min_new_tokens=min_new_tokens)


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
