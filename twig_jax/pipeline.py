"""(image, question) pairs -> answers: tokenizer, image pipeline and a compiled generator together.

`Pipeline(model, tokenizer, image_processor)` answers with the plain `Generator`; pass
`generator=TwigGenerator(...)` (or build one with `make_generator`) for TwigVLM pruning / SSD,
whose statistics (acceptance rate, tokens per round, kept visual tokens) come back per answer
and per batch. `Pipeline.stream` answers one question while printing it as it is generated.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Callable, Sequence

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
    from twig_jax.preprocess import LLAVA15_CLIP_PARAMS

    size = model.cfg.vision.image_size
    params = dict(LLAVA15_CLIP_PARAMS, crop_size={"height": size, "width": size}, size={"shortest_edge": size})
    return ImagePreprocessor(params)


def save_converted_model(model: Llava, directory: str, tokenizer=None, preprocessor_from: str | None = None) -> str:
    """Write an in-memory model as a converted twig_jax checkpoint dir (as `convert.convert` does:
    orbax params/, config.json, the marker written last) plus the tokenizer when given, and the
    image preprocessing (preprocessor_config.json) of the model dir `preprocessor_from` if it has one."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from flax import nnx

    from twig_jax.config import save_config
    from twig_jax.convert import MARKER_FILE, MARKER_FORMAT, MARKER_VERSION, PARAMS_DIR

    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, PARAMS_DIR), nnx.state(model))
        ckptr.wait_until_finished()
    save_config(model.cfg, os.path.join(directory, "config.json"))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if preprocessor_from is not None:
        pre = os.path.join(preprocessor_from, "preprocessor_config.json")
        if os.path.exists(pre):
            shutil.copy(pre, directory)
    marker = {"format": MARKER_FORMAT, "version": MARKER_VERSION,
              "dtype": jnp.dtype(model.text.embed[...].dtype).name, "source": "in-memory", "vision_dir": None,
              "copied_files": []}
    with open(os.path.join(directory, MARKER_FILE), "w") as f:
        json.dump(marker, f, indent=2)
    return directory


# ----------------------------------------------------------------------------------------------
# TwigVLM generators


def load_twig_any(path: str, text_cfg, dtype=None):
    """(Twig, TwigConfig) from an orbax twig dir (save_twig) or MILVLG safetensors (export_milvlg,
    whose metadata carries the TwigConfig)."""
    from twig_jax.twig import TwigConfig
    from twig_jax.twig_io import TWIG_CONFIG_FILE, TwigFormatError, import_milvlg, load_twig

    if os.path.isdir(path) and os.path.isfile(os.path.join(path, TWIG_CONFIG_FILE)):
        twig = load_twig(path, text_cfg, dtype=dtype)
        return twig, twig.twig_cfg
    files = [path] if os.path.isfile(path) else (
        sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if os.path.isdir(path) else [])
    if not files:
        raise TwigFormatError(f"{path}: neither an orbax twig dir ({TWIG_CONFIG_FILE}) nor MILVLG safetensors")
    from safetensors import safe_open

    with safe_open(files[0], framework="numpy") as f:
        meta = f.metadata() or {}
    if "twig_config" not in meta:
        raise TwigFormatError(f"{files[0]}: MILVLG safetensors without a twig_config in its metadata; "
                              f"convert it to an orbax twig dir (twig_io.save_twig) with its TwigConfig first")
    twig_cfg = TwigConfig(**json.loads(meta["twig_config"]))
    import jax.numpy as jnp

    twig = import_milvlg(path, text_cfg, twig_cfg, dtype=jnp.float32 if dtype is None else dtype)
    return twig, twig_cfg


def make_generator(model: Llava, twig=None, twig_cfg=None, method: str | None = None, ssd: bool | None = None,
                   **kwargs):
    """A generator for (method, ssd): the plain `Generator` for ("none", no SSD) without a twig
    (unless `force_twig_generator`), else a `TwigGenerator`. method defaults to "twig" with a twig,
    "none" without; ssd defaults to "a twig is given". Raises TwigConfigError for SSD / "twig"
    without a twig."""
    from twig_jax.twig import TwigConfig, TwigConfigError
    from twig_jax.twig_generate import TwigGenerator

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
               sampling: SamplingConfig = SamplingConfig(), seed: int = 0) -> tuple[list[Answer], dict]:
        """Answer a batch; returns the answers and timing/statistics."""
        self._check(images, questions)
        prompts = self.encode(questions)
        pixels = self.image_processor(list(images))  # [B, 3, H, W]
        _, eos_ids = self._eos()
        t0 = time.perf_counter()
        out = self.generator.generate(prompts, pixels, max_new_tokens=max_new_tokens, sampling=sampling,
                                      seed=seed, eos_ids=eos_ids)
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
               on_chunk: Callable[[list[int], int], None] | None = None) -> tuple[Answer, dict]:
        """Answer one question, calling on_chunk(tokens, n_accepted_drafts) as tokens are made
        (twig_jax.stream); same answer as `answer` for the same generator and seed."""
        from twig_jax.stream import stream_generate

        prompts = self.encode([question])
        pixels = self.image_processor([image])
        _, eos_ids = self._eos()
        t0 = time.perf_counter()
        out = stream_generate(self.generator, prompts[0], pixels, on_chunk, max_new_tokens=max_new_tokens,
                              sampling=sampling, seed=seed, eos_ids=eos_ids)
        elapsed = time.perf_counter() - t0
        toks = out.tokens[0]
        ans = Answer(question, self.decode_text(toks), toks, len(prompts[0]), row_stats(out, 0))
        stats = dict(seconds=elapsed, generated_tokens=len(toks), tokens_per_s=len(toks) / max(elapsed, 1e-9))
        stats.update(self._generator_info())
        stats["kept_visual_tokens"] = int(out.keep.shape[1])
        stats.update(out.stats or {})
        return ans, stats
