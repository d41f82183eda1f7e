"""Evaluation on LLaVA-format question files: exact match for short answers, object-level
precision / recall / F1 for descriptions, for any model and any TwigVLM method.

Files (the shapes world's eval split, `twig_jax.data.shapes.generate_dataset`):
  questions JSONL: {"question_id", "image" (relative to the images dir), "text", "category"}
  answers JSONL:   {"question_id", "answer" (reference text), "category"}
  predictions JSONL (written by `run_eval`, LLaVA's answer-file layout):
                   {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}

Categories: "short" answers are scored by exact match after `normalize_answer`; "description"
answers are parsed into (size, colour, shape, position) tuples (`parse_description`) and the
prediction's multiset of tuples is matched against the reference's. Precision, recall and F1 are
micro-averaged over the split (summed true positives / predicted / reference objects); the mean
of the per-answer figures is reported too.

`run_eval(model, tokenizer, questions, EvalConfig(...), twig=...)` answers the questions with a
`Pipeline` over `make_generator(model, twig, twig_cfg, method, ssd)` (greedy, batched, grouped by
category with a max_new_tokens per category), writes the predictions and returns
`(records, metrics)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Sequence

import collections
import hashlib
import math
import re
from typing import Callable, Iterable, Mapping

SHORT = "short"
DESCRIPTION = "description"
CATEGORIES = (SHORT, DESCRIPTION)
DEFAULT_MAX_NEW_TOKENS = {SHORT: 16, DESCRIPTION: 128}

from twig_jax.assets import DEFAULT_MODEL, DEFAULT_TWIG  # noqa: E402,F401  (eval's defaults)

ObjectTuple = tuple  # (size, colour, shape, position)
Parser = Callable[[str], Sequence[ObjectTuple]]


class EvalFileError(ValueError):
    """A malformed or inconsistent question / answer / prediction file (names file and line)."""


# ----------------------------------------------------------------------------------------------
# Files


@dataclasses.dataclass(frozen=True)
class Question:
    question_id: Any  # as written in the file (str or int); matched by str(question_id)
    image: str
    text: str
    category: str | None

    @property
    def key(self) -> str:
        return str(self.question_id)


@dataclasses.dataclass(frozen=True)
class Reference:
    question_id: Any
    answer: str
    category: str


def _read_jsonl(path: str, required: Sequence[str], what: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; EvalFileError on bad JSON or missing keys."""
    if not os.path.isfile(path):
        raise EvalFileError(f"{what} file not found: {path}")
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalFileError(f"{path}:{i}: not valid JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise EvalFileError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
            missing = [k for k in required if k not in obj]
            if missing:
                raise EvalFileError(f"{path}:{i}: {what} line lacks key(s) {missing} (has {sorted(obj)})")
            rows.append((i, obj))
    if not rows:
        raise EvalFileError(f"{path}: empty {what} file")
    return rows


def _check_category(path: str, line: int, cat: Any) -> str:
    if cat not in CATEGORIES:
        raise EvalFileError(f"{path}:{line}: unknown category {cat!r}; expected one of {list(CATEGORIES)}")
    return cat


def _unique(path: str, rows: Iterable[tuple[int, Any]]) -> None:
    seen: dict[str, int] = {}
    for line, qid in rows:
        k = str(qid)
        if k in seen:
            raise EvalFileError(f"{path}:{line}: duplicate question_id {qid!r} (first on line {seen[k]})")
        seen[k] = line


def read_questions(path: str) -> list[Question]:
    """LLaVA question file -> Questions (file order). Category is optional here (the answer file
    carries it too); when present it must be a known one."""
    rows = _read_jsonl(path, ("question_id", "image", "text"), "question")
    _unique(path, ((i, r["question_id"]) for i, r in rows))
    out = []
    for i, r in rows:
        cat = r.get("category")
        if cat is not None:
            _check_category(path, i, cat)
        out.append(Question(r["question_id"], str(r["image"]), str(r["text"]), cat))
    return out


def read_answers(path: str) -> dict[str, Reference]:
    """Reference answer file -> {str(question_id): Reference}."""
    rows = _read_jsonl(path, ("question_id", "answer", "category"), "answer")
    _unique(path, ((i, r["question_id"]) for i, r in rows))
    return {str(r["question_id"]): Reference(r["question_id"], str(r["answer"]),
                                             _check_category(path, i, r["category"])) for i, r in rows}


def read_predictions(path: str) -> dict[str, str]:
    """Answer JSONL (LLaVA layout: question_id + text) -> {str(question_id): text}."""
    rows = _read_jsonl(path, ("question_id", "text"), "prediction")
    _unique(path, ((i, r["question_id"]) for i, r in rows))
    return {str(r["question_id"]): str(r["text"]) for _, r in rows}


def attach_categories(questions: Sequence[Question], answers: Mapping[str, Reference],
                      questions_path: str = "questions", answers_path: str = "answers") -> list[Question]:
    """Check that questions and references agree and give every question its category.

    Every question needs a reference; a reference whose id is in no question is an error too
    (the two files do not belong together); categories must agree where both give one.
    """
    qkeys = {q.key for q in questions}
    unknown = [a.question_id for k, a in answers.items() if k not in qkeys]
    if unknown:
        raise EvalFileError(f"{answers_path}: {len(unknown)} answer(s) for question ids not in {questions_path}: "
                            f"{unknown[:5]}")
    out = []
    for q in questions:
        ref = answers.get(q.key)
        if ref is None:
            raise EvalFileError(f"{answers_path}: no reference answer for question_id {q.question_id!r}")
        if q.category is not None and q.category != ref.category:
            raise EvalFileError(f"question_id {q.question_id!r}: category {q.category!r} in {questions_path} but "
                                f"{ref.category!r} in {answers_path}")
        out.append(dataclasses.replace(q, category=ref.category))
    return out


# ----------------------------------------------------------------------------------------------
# Metrics

_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
    """Lower case, punctuation -> space, articles dropped, number words -> digits, single spaces
    (the usual VQA-style normalisation; "Two." == "2", "the red one" == "red one")."""
    words = _PUNCT.sub(" ", str(text).lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def default_parser() -> Parser:
    from twig_jax.data.shapes import parse_description

    return parse_description


@dataclasses.dataclass(frozen=True)
class ObjectScore:
    tp: int  # matched objects (multiset intersection)
    n_pred: int
    n_ref: int

    @property
    def precision(self) -> float:
        return self.tp / self.n_pred if self.n_pred else (1.0 if self.n_ref == 0 else 0.0)

    @property
    def recall(self) -> float:
        return self.tp / self.n_ref if self.n_ref else (1.0 if self.n_pred == 0 else 0.0)

    @property
    def f1(self) -> float:
        return f1_score(self.precision, self.recall)


def f1_score(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def object_score(prediction: str, reference: str, parser: Parser | None = None) -> ObjectScore:
    """Multiset match of the (size, colour, shape, position) tuples the two descriptions mention.

    An empty prediction against an empty reference scores 1 / 1 / 1; an empty prediction against
    objects scores precision 0 (nothing right was said), recall 0.
    """
    parse = parser or default_parser()
    pred = collections.Counter(tuple(t) for t in parse(prediction))
    ref = collections.Counter(tuple(t) for t in parse(reference))
    return ObjectScore(sum((pred & ref).values()), sum(pred.values()), sum(ref.values()))


def score(predictions: Mapping[str, str], answers: Mapping[str, Reference], parser: Parser | None = None,
          *, require_all: bool = True) -> dict:
    """Metrics of predictions {str(question_id): text} against references.

    Predictions for ids without a reference are an error. With require_all, so is a reference
    without a prediction; otherwise only the predicted ids are scored (e.g. a --limit run).
    Returns {"questions", "short": {n, correct, em}, "description": {n, tp, pred_objects,
    ref_objects, precision, recall, f1, mean_precision, mean_recall, mean_f1}}; a category with no
    question has n = 0 and NaN figures.
    """
    unknown = [k for k in predictions if k not in answers]
    if unknown:
        raise EvalFileError(f"predictions for {len(unknown)} unknown question id(s): {unknown[:5]}")
    keys = list(answers) if require_all else [k for k in answers if k in predictions]
    if require_all:
        missing = [k for k in keys if k not in predictions]
        if missing:
            raise EvalFileError(f"no prediction for {len(missing)} question id(s): {missing[:5]}")
    nan = float("nan")
    correct = n_short = 0
    scores: list[ObjectScore] = []
    parse = None
    for k in keys:
        ref = answers[k]
        if ref.category == SHORT:
            n_short += 1
            correct += exact_match(predictions[k], ref.answer)
        else:
            parse = parse or parser or default_parser()
            scores.append(object_score(predictions[k], ref.answer, parse))
    tp = sum(s.tp for s in scores)
    n_pred = sum(s.n_pred for s in scores)
    n_ref = sum(s.n_ref for s in scores)
    if scores:
        micro = ObjectScore(tp, n_pred, n_ref)
        p, r = micro.precision, micro.recall
        desc = dict(n=len(scores), tp=tp, pred_objects=n_pred, ref_objects=n_ref, precision=p, recall=r,
                    f1=f1_score(p, r), mean_precision=sum(s.precision for s in scores) / len(scores),
                    mean_recall=sum(s.recall for s in scores) / len(scores),
                    mean_f1=sum(s.f1 for s in scores) / len(scores))
    else:
        desc = dict(n=0, tp=0, pred_objects=0, ref_objects=0, precision=nan, recall=nan, f1=nan,
                    mean_precision=nan, mean_recall=nan, mean_f1=nan)
    return {"questions": len(keys),
            "short": dict(n=n_short, correct=correct, em=correct / n_short if n_short else nan),
            "description": desc}


def accuracy(metrics: Mapping, category: str) -> float:
    """The one accuracy figure per category: EM for short answers, micro F1 for descriptions."""
    return metrics[SHORT]["em"] if category == SHORT else metrics[DESCRIPTION]["f1"]


def score_files(predictions_path: str, answers_path: str, parser: Parser | None = None,
                require_all: bool = False) -> dict:
    return score(read_predictions(predictions_path), read_answers(answers_path), parser, require_all=require_all)


# ----------------------------------------------------------------------------------------------
# Running a model


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    method: str = "none"  # none | twig | fastv | random
    R: int | None = None  # kept visual tokens (default: the twig's config; required for fastv/random without one)
    K: int | None = None  # trunk depth / FastV scoring layer (default: the twig's; else 2, or 1 for L <= 2)
    Kf: int | None = None  # FinalWipe layer (default: the twig's; else round(0.75 L))
    score_rows: str | None = None  # TTP / FastV query rows: "last" | "text" (default: the twig's; else "last")
    select: str | None = None  # keep-set rule: "top" | "cover" | "sample" (P-head) (default: the twig's for
    # twig / phead, "top" for fastv / random: the published baselines)
    ssd: bool = False  # self-speculative decoding (needs a twig; greedy output is unchanged)
    batch_size: int = 16
    max_new_tokens: Mapping[str, int] = dataclasses.field(default_factory=lambda: dict(DEFAULT_MAX_NEW_TOKENS))
    seed: int = 0  # only the random method uses it (greedy decoding)
    fixed_batch: bool = True  # pad every batch to one size: one compiled shape per category


def resolve_twig_config(model, twig=None, cfg: EvalConfig = EvalConfig()):
    """The TwigConfig a method runs with (None for plain decoding without SSD); see
    twig.config.resolve_twig_config."""
    from twig_jax.twig.config import TwigOverrides
    from twig_jax.twig.config import resolve_twig_config as resolve

    over = TwigOverrides(K=cfg.K, Kf=cfg.Kf, R=cfg.R, score_rows=cfg.score_rows, select=cfg.select)
    return resolve(model.cfg.text.num_hidden_layers, model.cfg.num_image_tokens, method=cfg.method, ssd=cfg.ssd,
                   twig_cfg=None if twig is None else twig.twig_cfg,
                   has_p_head=twig is not None and twig.p_head is not None, overrides=over)


def build_generator(model, twig=None, cfg: EvalConfig = EvalConfig(), batch_buckets: Sequence[int] | None = None):
    """make_generator for cfg (twig passed only where it is used: the twig method or SSD)."""
    from twig_jax.decode.generator import make_generator

    tc = resolve_twig_config(model, twig, cfg)
    from twig_jax.twig.config import needs_twig

    use_twig = twig if (needs_twig(cfg.method) or cfg.ssd) else None
    kw = {} if batch_buckets is None else {"batch_buckets": tuple(batch_buckets)}
    return make_generator(model, use_twig, tc, method=cfg.method, ssd=cfg.ssd, **kw)


def _answer_id(*parts: Any) -> str:
    return hashlib.sha1("\x1f".join(map(str, parts)).encode()).hexdigest()[:22]


def run_eval(model, tokenizer, questions: Sequence[Question], cfg: EvalConfig = EvalConfig(), *,
             images_dir: str = "", twig=None, image_processor=None, answers: Mapping[str, Reference] | None = None,
             parser: Parser | None = None, model_id: str = "model", out_path: str | None = None,
             generator=None, image_cache: dict | None = None, log: Any = None) -> tuple[list[dict], dict]:
    """Answer `questions` (categories attached, see attach_categories) greedily in batches grouped
    by category; write LLaVA answer JSONL to out_path (if given); return (records, metrics).

    metrics = score(...) (when `answers` is given) plus run figures: method, R, ssd, K, Kf,
    generated_tokens, seconds (generate calls, compilation included), wall_seconds, batches.
    `generator`: reuse an already built (compiled) generator for cfg; `image_cache`: a dict
    path -> PIL image shared across runs, so images are read once.
    """
    from twig_jax.pipeline import Pipeline
    from twig_jax.data.preprocess import load_image
    from twig_jax.decode.sampling import SamplingConfig

    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
    groups: dict[str, list[Question]] = {}
    for q in questions:
        if q.category is None:
            raise EvalFileError(f"question_id {q.question_id!r} has no category (attach the answer file's)")
        if q.category not in cfg.max_new_tokens:
            raise EvalFileError(f"no max_new_tokens for category {q.category!r} (have {dict(cfg.max_new_tokens)})")
        groups.setdefault(q.category, []).append(q)
    if not groups:
        raise EvalFileError("no questions to run")
    if generator is None:
        b = min(cfg.batch_size, max(len(g) for g in groups.values()))
        generator = build_generator(model, twig, cfg, batch_buckets=(b,) if cfg.fixed_batch else None)
    pipe = Pipeline(model, tokenizer, image_processor, generator=generator)
    info = pipe._generator_info()
    meta_run = {"method": cfg.method, "R": info.get("R") if cfg.method != "none" else model.cfg.num_image_tokens,
                "ssd": bool(cfg.ssd), "K": info.get("K"), "Kf": info.get("Kf"), "score_rows": info.get("score_rows"),
                "select": info.get("select")}
    cache = {} if image_cache is None else image_cache

    def image(q: Question):
        path = os.path.join(images_dir, q.image)
        if path not in cache:
            cache[path] = load_image(path)
        return cache[path]

    by_key: dict[str, dict] = {}
    gen_s, n_tok, n_batches, t_wall = 0.0, 0, 0, time.perf_counter()
    for cat, qs in groups.items():
        for i in range(0, len(qs), cfg.batch_size):
            chunk = qs[i:i + cfg.batch_size]
            answers_, stats = pipe.answer([image(q) for q in chunk], [q.text for q in chunk],
                                          max_new_tokens=cfg.max_new_tokens[cat], sampling=SamplingConfig(),
                                          seed=cfg.seed)
            gen_s += stats["seconds"]
            n_tok += stats["generated_tokens"]
            n_batches += 1
            for q, a in zip(chunk, answers_):
                meta = dict(meta_run, category=cat, **{k: v for k, v in a.stats.items() if v is not None})
                by_key[q.key] = {"question_id": q.question_id, "prompt": q.text, "text": a.text,
                                 "answer_id": _answer_id(model_id, cfg.method, meta_run["R"], cfg.ssd, q.key, a.text),
                                 "model_id": model_id, "metadata": meta}
            if log is not None:
                print(f"  {cat}: {min(i + cfg.batch_size, len(qs))}/{len(qs)} ({stats['seconds']:.1f} s)",
                      file=log, flush=True)
    records = [by_key[q.key] for q in questions]  # question-file order
    if out_path:
        d = os.path.dirname(os.path.abspath(out_path))
        os.makedirs(d, exist_ok=True)
        with open(out_path, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    metrics: dict[str, Any] = {}
    if answers is not None:
        metrics = score({r_key: r["text"] for r_key, r in by_key.items()}, answers, parser, require_all=False)
    metrics["questions"] = len(records)
    metrics.update(meta_run, model_id=model_id, generated_tokens=n_tok, seconds=gen_s,
                   wall_seconds=time.perf_counter() - t_wall, batches=n_batches,
                   tokens_per_s=n_tok / max(gen_s, 1e-9))
    return records, metrics


# ----------------------------------------------------------------------------------------------
# Reporting


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{100 * x:.1f}%" if pct else f"{x:.3f}"
    return str(x)


def metrics_table(metrics: Mapping) -> str:
    """A small plain-text table of one run's metrics."""
    s, d = metrics.get(SHORT, {}), metrics.get(DESCRIPTION, {})
    if metrics.get("method") is not None:
        rows = [("method", f"{metrics['method']} (R={metrics.get('R')}, K={metrics.get('K')}, Kf={metrics.get('Kf')}, "
                           f"ssd={'on' if metrics.get('ssd') else 'off'})")]
    else:
        rows = [("predictions", str(metrics.get("predictions")))]
    if s:
        rows.append(("short: exact match", f"{_fmt(s.get('em'), True)}  ({s.get('correct')}/{s.get('n')})"))
    if d:
        rows.append(("descriptions: P / R / F1 (micro)",
                     f"{_fmt(d.get('precision'))} / {_fmt(d.get('recall'))} / {_fmt(d.get('f1'))}  "
                     f"(n={d.get('n')}, objects {d.get('tp')} matched of {d.get('pred_objects')} predicted, "
                     f"{d.get('ref_objects')} reference)"))
        rows.append(("descriptions: P / R / F1 (mean)",
                     f"{_fmt(d.get('mean_precision'))} / {_fmt(d.get('mean_recall'))} / {_fmt(d.get('mean_f1'))}"))
    if "generated_tokens" in metrics:
        rows.append(("generated tokens", f"{metrics['generated_tokens']} in {metrics['seconds']:.2f} s "
                                         f"({metrics['tokens_per_s']:.1f} tokens/s, compile included)"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


def json_safe(obj: Any) -> Any:
    """NaN -> None (strict JSON)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def eval_main(argv=None) -> int:
    """`twig-jax eval` (see cli.py)."""
    import argparse

    from twig_jax.twig.config import SELECT_RULES
    from twig_jax.twig.config import TwigConfigError

    p = argparse.ArgumentParser(prog="twig-jax eval",
                                description="Answer a LLaVA question file and score it: exact match for short "
                                            "answers, object-level P/R/F1 for descriptions.")
    p.add_argument("--questions", required=True, help="question JSONL {question_id, image, text, category}")
    p.add_argument("--images", required=True, help="folder the question file's image paths are relative to")
    p.add_argument("--answers", required=True, help="reference JSONL {question_id, answer, category}")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"converted or HF LLaVA dir (default {DEFAULT_MODEL})")
    p.add_argument("--twig", help="twig checkpoint (orbax dir or MILVLG safetensors); gives the K/Kf/R defaults "
                                  "of every method (default: the bundled twig when --model is the bundled model)")
    p.add_argument("--no-twig", action="store_true", help="do not load the bundled twig by default")
    p.add_argument("--method", choices=["none", "twig", "phead", "fastv", "random"],
                   help="visual token pruning (default: none)")
    p.add_argument("--R", type=int, help="kept visual tokens (default: the twig's)")
    p.add_argument("--K", type=int, help="trunk depth / FastV scoring layer (default: the twig's, else 2)")
    p.add_argument("--Kf", type=int, help="FinalWipe layer (default: the twig's, else 3/4 of the depth)")
    p.add_argument("--select", choices=list(SELECT_RULES),
                   help="keep-set from the pruning scores: top R (the paper), score-weighted coverage "
                        "(ttp.cover_visual), or a Gumbel-top-R draw from the P-head's scores (the policy its "
                        "RL trains); default: the twig's for twig / phead, top for fastv / random")
    p.add_argument("--score-rows", choices=["last", "text"],
                   help="pruning-score query rows: the last prompt token (the released code) or every text "
                        "token (the paper's equation); default: the twig's, else last")
    p.add_argument("--ssd", action=argparse.BooleanOptionalAction, default=False,
                   help="self-speculative decoding (needs --twig; greedy answers are unchanged)")
    p.add_argument("--batch", type=int, default=16, help="questions per generate call")
    p.add_argument("--max-new-short", type=int, default=DEFAULT_MAX_NEW_TOKENS[SHORT])
    p.add_argument("--max-new-description", type=int, default=DEFAULT_MAX_NEW_TOKENS[DESCRIPTION])
    p.add_argument("--limit", type=int, help="first N questions only")
    p.add_argument("--out", help="write the answers (LLaVA answer JSONL) here")
    p.add_argument("--metrics-json", help="write the metrics here")
    p.add_argument("--predictions", help="score this existing answer JSONL instead of running a model")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error("--batch must be >= 1")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    if args.R is not None and (args.method or "none") == "none":
        p.error("--R is the kept visual token count of a pruning method: give --method twig, fastv or random")
    try:
        questions = read_questions(args.questions)
        answers = read_answers(args.answers)
        questions = attach_categories(questions, answers, args.questions, args.answers)
    except EvalFileError as e:
        p.error(str(e))
    if args.limit:
        questions = questions[:args.limit]
    keys = {q.key for q in questions}
    subset = {k: v for k, v in answers.items() if k in keys}

    if args.predictions:
        try:
            preds = read_predictions(args.predictions)
            metrics = score(preds, subset, require_all=True)
        except EvalFileError as e:
            p.error(str(e))
        metrics["predictions"] = args.predictions
    else:
        import jax.numpy as jnp

        from twig_jax.convert.llava import load_model
        from twig_jax.pipeline import image_preprocessor_for, load_tokenizer
        from twig_jax.twig.io import load_twig_any

        if not os.path.exists(args.model):
            p.error(f"model dir not found: {args.model}")
        model = load_model(args.model, dtype=getattr(jnp, args.dtype))
        twig = None
        if args.twig is None and not args.no_twig and os.path.abspath(args.model) == DEFAULT_MODEL \
                and os.path.isdir(DEFAULT_TWIG):
            args.twig = DEFAULT_TWIG
        if args.twig:
            twig, _ = load_twig_any(args.twig, model.cfg.text, dtype=model.text.embed[...].dtype)
        method = args.method or "none"
        cfg = EvalConfig(method=method, R=args.R, K=args.K, Kf=args.Kf, score_rows=args.score_rows,
                         select=args.select, ssd=args.ssd,
                         batch_size=args.batch,
                         max_new_tokens={SHORT: args.max_new_short, DESCRIPTION: args.max_new_description})
        try:
            resolve_twig_config(model, twig, cfg)
        except TwigConfigError as e:
            p.error(str(e))
        _, metrics = run_eval(model, load_tokenizer(args.model), questions, cfg, images_dir=args.images, twig=twig,
                              image_processor=image_preprocessor_for(model, args.model), answers=subset,
                              model_id=os.path.basename(os.path.normpath(args.model)), out_path=args.out,
                              log=sys.stderr)
    print(metrics_table(metrics))
    if args.metrics_json:
        with open(args.metrics_json, "w") as f:
            json.dump(json_safe(metrics), f, indent=2)
    return 0


def read_subset(directory: str):
    """(questions with categories, {key: Reference}, images dir) of a subset dir holding
    questions.jsonl, answers.jsonl and images/."""
    from twig_jax.eval.evaluate import attach_categories, read_answers, read_questions

    qp, ap = os.path.join(directory, "questions.jsonl"), os.path.join(directory, "answers.jsonl")
    answers = read_answers(ap)
    return attach_categories(read_questions(qp), answers, qp, ap), answers, os.path.join(directory, "images")


def run_questions(model, tokenizer, image_processor, questions, images_dir: str, *, twig=None, twig_cfg=None,
                  method: str = "none", ssd: bool = False, max_new_tokens: dict | None = None,
                  generator=None, image_cache: dict | None = None) -> tuple[dict, dict]:
    """Greedy answers to `questions` (categories attached), one batch per category (one compile per
    category). Returns ({question key: pipeline.Answer}, {category: pipeline stats})."""
    from twig_jax.eval.evaluate import DEFAULT_MAX_NEW_TOKENS
    from twig_jax.pipeline import Pipeline
    from twig_jax.decode.generator import make_generator
    from twig_jax.data.preprocess import load_image

    max_new = dict(DEFAULT_MAX_NEW_TOKENS, **(max_new_tokens or {}))
    if generator is None:
        generator = make_generator(model, twig if (method in ("twig", "phead") or ssd) else None, twig_cfg, method=method,
                                   ssd=ssd)
    pipe = Pipeline(model, tokenizer, image_processor, generator=generator)
    cache = {} if image_cache is None else image_cache
    groups: dict[str, list] = {}
    for q in questions:
        groups.setdefault(q.category, []).append(q)
    out, stats = {}, {}
    for cat, qs in groups.items():
        imgs = []
        for q in qs:
            p = os.path.join(images_dir, q.image)
            if p not in cache:
                cache[p] = load_image(p)
            imgs.append(cache[p])
        answers, st = pipe.answer(imgs, [q.text for q in qs], max_new_tokens=max_new[cat])
        stats[cat] = st
        out.update({q.key: a for q, a in zip(qs, answers)})
    return out, stats


def accuracy_of(answers: dict, references: dict) -> dict:
    """{"short_em", "description_f1"} of {key: Answer} against {key: Reference}."""
    from twig_jax.eval.evaluate import score

    m = score({k: a.text for k, a in answers.items()}, {k: references[k] for k in answers}, require_all=False)
    nan_none = lambda x: None if x != x else float(x)  # noqa: E731
    return {"short_em": nan_none(m["short"]["em"]), "description_f1": nan_none(m["description"]["f1"])}
