"""(image, question) pairs -> answers: tokenizer, image pipeline and a compiled generator together."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

import numpy as np

from twig_jax.generate import Generator, InputError
from twig_jax.model.llava import Llava
from twig_jax.preprocess import ImagePreprocessor, build_prompt, tokenize_with_image
from twig_jax.sampling import SamplingConfig


@dataclasses.dataclass
class Answer:
    question: str
    text: str
    tokens: list[int]
    prompt_tokens: int


def load_tokenizer(model_dir: str):
    """The HF tokenizer saved beside a model (never downloads)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # transformers raises many types here; name the directory
        raise InputError(f"no usable tokenizer in {model_dir}: {e}") from e


def image_preprocessor_for(model: Llava, model_dir: str | None) -> ImagePreprocessor:
    """preprocessor_config.json from the model dir, else CLIP defaults at the tower's image size."""
    if model_dir and os.path.exists(os.path.join(model_dir, "preprocessor_config.json")):
        return ImagePreprocessor.from_pretrained(model_dir)
    from twig_jax.preprocess import LLAVA15_CLIP_PARAMS

    size = model.cfg.vision.image_size
    params = dict(LLAVA15_CLIP_PARAMS, crop_size={"height": size, "width": size}, size={"shortest_edge": size})
    return ImagePreprocessor(params)


class Pipeline:
    def __init__(self, model: Llava, tokenizer, image_processor: ImagePreprocessor | None = None,
                 generator: Any = None, conv: str = "vicuna_v1"):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor or image_preprocessor_for(model, None)
        self.generator = generator or Generator(model)
        self.conv = conv

    def encode(self, questions: Sequence[str]) -> list[list[int]]:
        cfg = self.model.cfg
        return [tokenize_with_image(self.tokenizer, build_prompt(q, self.conv), cfg.image_token_index,
                                    cfg.num_image_tokens) for q in questions]

    def answer(self, images: Sequence[Any], questions: Sequence[str], *, max_new_tokens: int = 128,
               sampling: SamplingConfig = SamplingConfig(), seed: int = 0) -> tuple[list[Answer], dict]:
        """Answer a batch; returns the answers and timing/statistics."""
        if len(images) != len(questions):
            raise InputError(f"{len(images)} images but {len(questions)} questions")
        if not questions:
            raise InputError("empty batch: no (image, question) pairs given")
        prompts = self.encode(questions)
        pixels = self.image_processor(list(images))  # [B, 3, H, W]
        eos = self.tokenizer.eos_token_id
        t0 = time.perf_counter()
        out = self.generator.generate(prompts, pixels, max_new_tokens=max_new_tokens, sampling=sampling,
                                      seed=seed, eos_ids=None if eos is None else (eos,))
        elapsed = time.perf_counter() - t0
        answers = []
        for q, p, toks in zip(questions, prompts, out.tokens):
            text_toks = [t for t in toks if t != eos]
            answers.append(Answer(q, self.tokenizer.decode(text_toks, skip_special_tokens=True).strip(), toks, len(p)))
        n_gen = int(np.sum(out.num_generated))
        stats = dict(seconds=elapsed, generated_tokens=n_gen, tokens_per_s=n_gen / max(elapsed, 1e-9))
        stats.update(getattr(out, "stats", None) or {})
        return answers, stats
