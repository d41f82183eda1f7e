"""(image, question) pairs -> answers: tokenizer, image pipeline and a compiled generator together.

`Pipeline(model, tokenizer, image_processor)` answers with the plain `Generator`; pass
`generator=TwigGenerator(...)` (or build one with `make_generator`) for TwigVLM pruning / SSD,
whose statistics (acceptance rate, tokens per round, kept visual tokens) come back per answer
and per batch. `Pipeline.stream` answers one question while printing it as it is generated.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Sequence

from typing import Callable

import numpy as np

from twig_jax.decode.generator import Generator
from twig_jax.decode.buckets import InputError
from twig_jax.model.llava import Llava
from twig_jax.data.preprocess import ImagePreprocessor, build_prompt, tokenize_with_image
from twig_jax.decode.sampling import SamplingConfig
from twig_jax.assets import BASE_SUBDIR, BUNDLE_DIR, RUN_DTYPE, TWIG_SUBDIR


@dataclasses.dataclass
class Answer:
    question: str
    text: str
    tokens: list[int]
    prompt_tokens: int
    stats: dict = dataclasses.field(default_factory=dict)  # per-answer TwigVLM figures (empty for plain)


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
    from twig_jax.data.preprocess import LLAVA15_CLIP_PARAMS

    size = model.cfg.vision.image_size
    params = dict(LLAVA15_CLIP_PARAMS, crop_size={"height": size, "width": size}, size={"shortest_edge": size})
    return ImagePreprocessor(params)




# ----------------------------------------------------------------------------------------------
# TwigVLM generators






def row_stats(out, i: int) -> dict:
    """Per-answer figures of row i of a (Twig)GenerationOutput."""
    d: dict[str, Any] = {"num_tokens": int(out.num_generated[i])}
    keep = getattr(out, "keep", None)
    if keep is not None:
        d["kept_visual_tokens"] = int(keep.shape[1])
    per = (getattr(out, "stats", None) or {}).get("per_row")
    if per:
        r, dr, a = per["rounds"][i], per["drafted"][i], per["accepted"][i]
        d.update(rounds=r, drafted=dr, accepted=a, acceptance_rate=a / dr if dr else None,
                 tokens_per_round=(d["num_tokens"] - 1) / r if r else None)
    return d


def run_settings(generator, num_visual: int) -> dict:
    """What a generator runs, for a run's report: method, ssd and kept visual tokens R (all
    num_visual of them without pruning); the trunk depth K and FinalWipe layer Kf when it prunes or
    drafts, the twig's depth T when it reads a twig, the keep rule it applies (select) when it
    prunes, the attention rows it scores from (score_rows) for TTP and FastV, and with SSD its
    draft shape (spec): a chain's draft_len and theta, or a tree's width, depth and nodes."""
    plan = getattr(generator, "plan", None)
    if plan is None:
        return {"method": "none", "ssd": False, "R": num_visual}
    method, ssd = generator.method, bool(generator.ssd)
    out = {"method": method, "ssd": ssd, "K": plan.K, "Kf": plan.Kf, "R": plan.R}
    if getattr(generator, "twig_state", None) is not None:
        out["T"] = plan.T
    if method != "none":
        out["select"] = plan.keep_rule
    if method in ("twig", "fastv"):
        out["score_rows"] = plan.score_rows
    tree = getattr(getattr(generator, "decoding", None), "tree", None)
    if ssd and tree is not None:
        out.update(spec="tree", tree_width=tree.width, tree_depth=tree.depth, tree_nodes=tree.nodes)
    elif ssd:
        out.update(spec="chain", draft_len=plan.draft_len, theta=plan.theta)
    return out


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

    def _eos(self):
        eos = self.tokenizer.eos_token_id
        return eos, (None if eos is None else (eos,))

    def _check(self, images, questions):
        if len(images) != len(questions):
            raise InputError(f"{len(images)} images but {len(questions)} questions")
        if not questions:
            raise InputError("empty batch: no (image, question) pairs given")

    def _generator_info(self) -> dict:
        g = self.generator
        if not hasattr(g, "plan"):
            return {"method": "plain", "ssd": False}
        p = g.plan
        return {"method": g.method, "ssd": bool(g.ssd), "K": p.K, "T": p.T, "Kf": p.Kf, "R": p.R,
                "draft_len": p.draft_len, "theta": p.theta, "score_rows": p.score_rows,
                "select": p.select}

    def decode_text(self, toks: Sequence[int]) -> str:
        eos, _ = self._eos()
        return self.tokenizer.decode([t for t in toks if t != eos], skip_special_tokens=True).strip()

    def answer(self, images: Sequence[Any], questions: Sequence[str], *, max_new_tokens: int = 128,
               sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
               min_new_tokens: int = 0) -> tuple[list[Answer], dict]:
        """Answer a batch; returns the answers and timing/statistics. min_new_tokens: no EOS before
        that many tokens."""
        self._check(images, questions)
        prompts = self.encode(questions)
        pixels = self.image_processor(list(images))  # [B, 3, H, W]
        _, eos_ids = self._eos()
        t0 = time.perf_counter()
        out = self.generator.generate(prompts, pixels, max_new_tokens=max_new_tokens, sampling=sampling,
                                      seed=seed, eos_ids=eos_ids, min_new_tokens=min_new_tokens)
        elapsed = time.perf_counter() - t0
        answers = [Answer(q, self.decode_text(toks), toks, len(p), row_stats(out, i))
                   for i, (q, p, toks) in enumerate(zip(questions, prompts, out.tokens))]
        n_gen = int(np.sum(out.num_generated))
        stats = dict(seconds=elapsed, generated_tokens=n_gen, tokens_per_s=n_gen / max(elapsed, 1e-9))
        stats.update(self._generator_info())
        if getattr(out, "keep", None) is not None:
            stats["kept_visual_tokens"] = int(out.keep.shape[1])
        stats.update(getattr(out, "stats", None) or {})
        return answers, stats

    def stream(self, image: Any, question: str, *, max_new_tokens: int = 128,
               sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
               on_chunk: Callable[[list[int], int], None] | None = None,
               min_new_tokens: int = 0) -> tuple[Answer, dict]:
        """Answer one question, calling on_chunk(tokens, n_accepted_drafts) as tokens are made
        (twig_jax.decode.stream); same answer as `answer` for the same generator and seed."""
        from twig_jax.decode.stream import stream_generate

        prompts = self.encode([question])
        pixels = self.image_processor([image])
        _, eos_ids = self._eos()
        t0 = time.perf_counter()
        out = stream_generate(self.generator, prompts[0], pixels, on_chunk, max_new_tokens=max_new_tokens,
                              sampling=sampling, seed=seed, eos_ids=eos_ids, min_new_tokens=min_new_tokens)
        elapsed = time.perf_counter() - t0
        toks = out.tokens[0]
        ans = Answer(question, self.decode_text(toks), toks, len(prompts[0]), row_stats(out, 0))
        stats = dict(seconds=elapsed, generated_tokens=len(toks), tokens_per_s=len(toks) / max(elapsed, 1e-9))
        stats.update(self._generator_info())
        stats["kept_visual_tokens"] = int(out.keep.shape[1])
        stats.update(out.stats or {})
        return ans, stats


@dataclasses.dataclass
class Bundle:
    model: Any  # twig_jax.model.llava.Llava
    tokenizer: Any
    image_processor: Any  # twig_jax.data.preprocess.ImagePreprocessor
    twig: Any  # twig_jax.twig.Twig (None when the dir has no twig)
    path: str

    @property
    def twig_cfg(self):
        return None if self.twig is None else self.twig.twig_cfg


def load_bundle(path: str = BUNDLE_DIR, dtype=RUN_DTYPE, twig_path: str | None = None, mesh=None) -> Bundle:
    """A bundle dir (base/ + twig/), or a plain model dir (with twig_path, or none). mesh: the
    weights are restored straight into their shards (parallel/sharding.py's rule table)."""
    import jax.numpy as jnp

    from twig_jax.convert.llava import load_model
    from twig_jax.pipeline import image_preprocessor_for, load_tokenizer
    from twig_jax.twig.io import load_twig_any

    base = os.path.join(path, BASE_SUBDIR)
    if not os.path.isdir(base):
        base = path  # a model dir itself
    if twig_path is None and os.path.isdir(os.path.join(path, TWIG_SUBDIR)):
        twig_path = os.path.join(path, TWIG_SUBDIR)
    model = load_model(base, dtype=None if dtype is None else jnp.dtype(dtype), mesh=mesh)
    twig = None
    if twig_path is not None:
        twig, _ = load_twig_any(twig_path, model.cfg.text, dtype=model.text.embed[...].dtype, mesh=mesh)
    return Bundle(model, load_tokenizer(base), image_preprocessor_for(model, base), twig, path)
