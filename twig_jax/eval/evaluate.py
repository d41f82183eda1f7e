"""Evaluation on LLaVA-format question files: exact match for short answers, object-level
precision / recall / F1 for descriptions, for any model and any TwigVLM method.

Files (the shapes world's eval split, `twig_jax.data.shapes.generate_dataset`):
  questions JSONL: {"question_id", "image" (relative to the images dir), "text", "category"}
  answers JSONL:   {"question_id", "answer" (reference text), "category"}
  predictions JSONL (written by `run_eval`, LLaVA's answer-file layout):
                   {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}

Categories: "short" answers are scored by exact match after `normalize_answer`; shapes-world
"description" answers are parsed into (size, colour, shape, position) tuples (`parse_description`)
and the prediction's multiset of tuples is matched against the reference's. Precision, recall and
F1 are micro-averaged over the split (summed true positives / predicted / reference objects); the
mean of the per-answer figures is reported too. Any other category (LLaVA-Bench's conv / detail /
complex, none at all), and descriptions that are not shapes-world text, are answered and counted
but not scored: `twig-jax eval` answers any LLaVA question file, with or without references.

`run_eval(model, tokenizer, questions, EvalConfig(...), twig=...)` answers the questions with a
`Pipeline` over `make_generator(model, twig, twig_cfg, method, ssd)` (greedy, batched, grouped by
category with a max_new_tokens per category), writes the predictions and returns
`(records, metrics)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Sequence

import collections
import hashlib
import math
import re
from typing import Callable, Iterable, Mapping

SHORT = "short"
DESCRIPTION = "description"
CATEGORIES = (SHORT, DESCRIPTION)  # the categories this module scores (the shapes world's)
DEFAULT_MAX_NEW_TOKENS = {SHORT: 16, DESCRIPTION: 128}
DEFAULT_MAX_NEW_OTHER = 128  # any other category, and questions without one
UNCATEGORIZED = "uncategorized"  # how metrics name the questions without a category

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
    line: int | None = dataclasses.field(default=None, compare=False)  # line in the question file

    @property
    def key(self) -> str:
        return str(self.question_id)


@dataclasses.dataclass(frozen=True)
class Reference:
    question_id: Any
    answer: str
    category: str | None  # None: the question file's category, if any (answers-only files may omit it)


def _read_jsonl(path: str, required: Sequence[str], what: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; EvalFileError on text that is not UTF-8,
    bad JSON or missing keys."""
    if not os.path.isfile(path):
        raise EvalFileError(f"{what} file not found: {path}")
    rows = []
    with open(path, "rb") as f:
        data = f.read()
    for i, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise EvalFileError(f"{path}:{i}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})") \
                from e
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


def _check_category(path: str, line: int, cat: Any, known: Sequence[str] | None = CATEGORIES) -> str | None:
    """cat if it is one of `known` (any string, or none, when known is None); else EvalFileError."""
    if known is None:
        if cat is not None and not isinstance(cat, str):
            raise EvalFileError(f"{path}:{line}: category {cat!r} is not a string")
        return cat
    if cat not in known:
        raise EvalFileError(f"{path}:{line}: unknown category {cat!r}; expected one of {list(known)}")
    return cat


def _unique(path: str, rows: Iterable[tuple[int, Any]]) -> None:
    seen: dict[str, int] = {}
    for line, qid in rows:
        k = str(qid)
        if k in seen:
            raise EvalFileError(f"{path}:{line}: duplicate question_id {qid!r} (first on line {seen[k]})")
        seen[k] = line


def read_questions(path: str, known_categories: Sequence[str] | None = CATEGORIES) -> list[Question]:
    """LLaVA question file -> Questions (file order), each with its line. Category is optional
    here (the answer file carries it too); when present it must be one of known_categories (the
    shapes world's by default; None accepts any, as LLaVA-Bench's conv / detail / complex)."""
    rows = _read_jsonl(path, ("question_id", "image", "text"), "question")
    _unique(path, ((i, r["question_id"]) for i, r in rows))
    out = []
    for i, r in rows:
        cat = r.get("category")
        if cat is not None:
            _check_category(path, i, cat, known_categories)
        out.append(Question(r["question_id"], str(r["image"]), str(r["text"]), cat, line=i))
    return out


def read_answers(path: str, known_categories: Sequence[str] | None = CATEGORIES) -> dict[str, Reference]:
    """Reference answer file -> {str(question_id): Reference}. With the default known_categories
    every line needs one of them; with None a category is optional and may be any string."""
    required = ("question_id", "answer") + (("category",) if known_categories is not None else ())
    rows = _read_jsonl(path, required, "answer")
    _unique(path, ((i, r["question_id"]) for i, r in rows))
    return {str(r["question_id"]): Reference(r["question_id"], str(r["answer"]),
                                             _check_category(path, i, r.get("category"), known_categories))
            for i, r in rows}


def read_predictions(path: str) -> dict[str, str]:
    """Answer JSONL (LLaVA layout: question_id + text) -> {str(question_id): text}."""
    rows = _read_jsonl(path, ("question_id", "text"), "prediction")
    _unique(path, ((i, r["question_id"]) for i, r in rows))
    return {str(r["question_id"]): str(r["text"]) for _, r in rows}


def attach_categories(questions: Sequence[Question], answers: Mapping[str, Reference],
                      questions_path: str = "questions", answers_path: str = "answers") -> list[Question]:
    """Check that questions and references agree and give every question its category.

    Every question needs a reference; a reference whose id is in no question is an error too
    (the two files do not belong together); categories must agree where both give one, and either
    file may give it (a question neither gives one to keeps None).
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
        if q.category is not None and ref.category is not None and q.category != ref.category:
            raise EvalFileError(f"question_id {q.question_id!r}: category {q.category!r} in {questions_path} but "
                                f"{ref.category!r} in {answers_path}")
        out.append(dataclasses.replace(q, category=ref.category if ref.category is not None else q.category))
    return out


def image_problem(path: str) -> str | None:
    """Why `path` cannot be read as an image, or None: whether it exists and its header opens (the
    pixels are not decoded, so checking a whole question file is cheap)."""
    if not os.path.exists(path):
        return f"image not found: {path}"
    if os.path.isdir(path):
        return f"image path is a directory: {path}"
    from PIL import Image

    try:
        with Image.open(path):
            pass
    except Exception as e:  # noqa: BLE001 - PIL raises several types for a file that is not an image
        return f"not a readable image: {path} ({e})"
    return None


def check_images(questions: Sequence[Question], images_dir: str, questions_path: str = "questions") -> None:
    """EvalFileError naming the first question whose image cannot be read (and how many such there
    are), before any model loads."""
    bad = [(q, p) for q in questions if (p := image_problem(os.path.join(images_dir, q.image)))]
    if bad:
        q, problem = bad[0]
        at = f"{questions_path}:{q.line}" if q.line is not None else questions_path
        more = f"; {len(bad)} questions in all have an image that cannot be read" if len(bad) > 1 else ""
        raise EvalFileError(f"{at} (question_id {q.question_id!r}): {problem}{more}")


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
    ref_objects, precision, recall, f1, mean_precision, mean_recall, mean_f1}, "unscored":
    {category: n}}; a category with no question has n = 0 and NaN figures.

    Object F1 is the shapes world's metric: descriptions are scored with it when a parser is given,
    or when every reference description names an object the shapes parser reads; otherwise (other
    data's descriptions, where both sides would parse to nothing and score a perfect 1) they are
    counted in "unscored", with every category but short and description (UNCATEGORIZED: none).
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
    unscored: dict[str, int] = {}
    descriptions = [k for k in keys if answers[k].category == DESCRIPTION]
    parse = parser
    if descriptions and parse is None:
        shapes = default_parser()
        parse = shapes if all(shapes(answers[k].answer) for k in descriptions) else None
    for k in keys:
        ref = answers[k]
        if ref.category == SHORT:
            n_short += 1
            correct += exact_match(predictions[k], ref.answer)
        elif ref.category == DESCRIPTION and parse is not None:
            scores.append(object_score(predictions[k], ref.answer, parse))
        else:
            cat = UNCATEGORIZED if ref.category is None else ref.category
            unscored[cat] = unscored.get(cat, 0) + 1
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
            "description": desc, "unscored": unscored}


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
    spec: str | None = None  # SSD draft shape: "chain" | "tree" (default: the twig's)
    tree_width: int | None = None  # tree drafting's E, D and N (default: the twig's)
    tree_depth: int | None = None
    tree_nodes: int | None = None
    batch_size: int = 16
    max_new_tokens: Mapping[str, int] = dataclasses.field(default_factory=lambda: dict(DEFAULT_MAX_NEW_TOKENS))
    max_new_other: int = DEFAULT_MAX_NEW_OTHER  # categories not in max_new_tokens, and no category
    seed: int = 0  # only the random method uses it (greedy decoding)
    fixed_batch: bool = True  # pad every batch to one size: one compiled shape per category


def resolve_twig_config(model, twig=None, cfg: EvalConfig = EvalConfig()):
    """The TwigConfig a method runs with (None for plain decoding without SSD); see
    twig.config.resolve_twig_config."""
    from twig_jax.twig.config import TwigOverrides
    from twig_jax.twig.config import resolve_twig_config as resolve

    over = TwigOverrides(K=cfg.K, Kf=cfg.Kf, R=cfg.R, score_rows=cfg.score_rows, select=cfg.select, spec=cfg.spec,
                         tree_width=cfg.tree_width, tree_depth=cfg.tree_depth, tree_nodes=cfg.tree_nodes)
    return resolve(model.cfg.text.num_hidden_layers, model.cfg.num_image_tokens, method=cfg.method, ssd=cfg.ssd,
                   twig_cfg=None if twig is None else twig.twig_cfg,
                   has_p_head=twig is not None and twig.p_head is not None, overrides=over)


def build_generator(model, twig=None, cfg: EvalConfig = EvalConfig(), batch_buckets: Sequence[int] | None = None,
                    mesh=None):
    """make_generator for cfg (twig passed only where it is used: the twig method or SSD), on
    `mesh` when one is given."""
    from twig_jax.decode.generator import make_generator

    tc = resolve_twig_config(model, twig, cfg)
    from twig_jax.twig.config import needs_twig

    use_twig = twig if (needs_twig(cfg.method) or cfg.ssd) else None
    kw = {} if batch_buckets is None else {"batch_buckets": tuple(batch_buckets)}
    return make_generator(model, use_twig, tc, method=cfg.method, ssd=cfg.ssd, mesh=mesh, **kw)


def _answer_id(*parts: Any) -> str:
    return hashlib.sha1("\x1f".join(map(str, parts)).encode()).hexdigest()[:22]


def category_counts(questions: Sequence[Question]) -> dict[str, int]:
    """{category: questions} in first-seen order (UNCATEGORIZED for questions without one)."""
    out: dict[str, int] = {}
    for q in questions:
        cat = UNCATEGORIZED if q.category is None else q.category
        out[cat] = out.get(cat, 0) + 1
    return out


def write_jsonl_atomic(path: str, records: Iterable[dict]) -> None:
    """Write JSON lines to a temporary file beside `path` and rename it onto `path`: a failed
    write leaves what was there."""
    import tempfile

    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # an ordinary file's mode, not mkstemp's owner-only one
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def run_eval(model, tokenizer, questions: Sequence[Question], cfg: EvalConfig = EvalConfig(), *,
             images_dir: str = "", twig=None, image_processor=None, answers: Mapping[str, Reference] | None = None,
             parser: Parser | None = None, model_id: str = "model", out_path: str | None = None,
             generator=None, image_cache: dict | None = None, log: Any = None,
             mesh=None) -> tuple[list[dict], dict]:
    """Answer `questions` greedily in batches grouped by category (any category, or none: see
    attach_categories); write LLaVA answer JSONL to out_path (if given, atomically); return
    (records, metrics).

    metrics = score(...) (when `answers` is given) plus run figures: categories (questions per
    category), what ran (pipeline.run_settings: method, R, ssd, K, Kf, score_rows, select, ...),
    generated_tokens, seconds (generate calls, compilation included), wall_seconds, batches.
    `generator`: reuse an already built (compiled) generator for cfg (else one is built, on
    `mesh` when given); `image_cache`: a dict
    path -> PIL image shared across runs, so images are read once; `log`: a stream for a progress
    line (twig_jax.progress).
    """
    from twig_jax.pipeline import Pipeline, run_settings
    from twig_jax.data.preprocess import load_image
    from twig_jax.decode.sampling import SamplingConfig
    from twig_jax.progress import Progress

    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
    groups: dict[str | None, list[Question]] = {}
    for q in questions:
        groups.setdefault(q.category, []).append(q)
    if not groups:
        raise EvalFileError("no questions to run")
    if generator is None:
        b = min(cfg.batch_size, max(len(g) for g in groups.values()))
        generator = build_generator(model, twig, cfg, batch_buckets=(b,) if cfg.fixed_batch else None, mesh=mesh)
    pipe = Pipeline(model, tokenizer, image_processor, generator=generator)
    ran = run_settings(generator, model.cfg.num_image_tokens)
    meta_run = {k: ran.get(k) for k in ("method", "R", "ssd", "K", "Kf", "score_rows", "select")}
    meta_run.update(ran)
    cache = {} if image_cache is None else image_cache

    def image(q: Question):
        path = os.path.join(images_dir, q.image)
        if path not in cache:
            try:
                cache[path] = load_image(path)
            except (ValueError, OSError) as e:
                raise EvalFileError(f"question_id {q.question_id!r}: {e}") from e
        return cache[path]

    by_key: dict[str, dict] = {}
    gen_s, n_tok, n_batches, t_wall = 0.0, 0, 0, time.perf_counter()
    progress = Progress(len(questions), "questions", label="eval", stream=log, enabled=log is not None)
    with progress:
        for cat, qs in groups.items():
            max_new = cfg.max_new_tokens.get(cat, cfg.max_new_other) if cat is not None else cfg.max_new_other
            for i in range(0, len(qs), cfg.batch_size):
                chunk = qs[i:i + cfg.batch_size]
                answers_, stats = pipe.answer([image(q) for q in chunk], [q.text for q in chunk],
                                              max_new_tokens=max_new, sampling=SamplingConfig(), seed=cfg.seed)
                gen_s += stats["seconds"]
                n_tok += stats["generated_tokens"]
                n_batches += 1
                for q, a in zip(chunk, answers_):
                    meta = dict(meta_run, category=cat, **{k: v for k, v in a.stats.items() if v is not None})
                    by_key[q.key] = {"question_id": q.question_id, "prompt": q.text, "text": a.text,
                                     "answer_id": _answer_id(model_id, cfg.method, meta_run["R"], cfg.ssd, q.key,
                                                             a.text),
                                     "model_id": model_id, "metadata": meta}
                progress.advance(len(chunk), extra=f"category {UNCATEGORIZED if cat is None else cat}")
    records = [by_key[q.key] for q in questions]  # question-file order
    if out_path:
        write_jsonl_atomic(out_path, records)
    metrics: dict[str, Any] = {}
    if answers is not None:
        metrics = score({r_key: r["text"] for r_key, r in by_key.items()}, answers, parser, require_all=False)
    metrics["questions"] = len(records)
    metrics["categories"] = category_counts(questions)
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


def _counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{c} {n}" for c, n in counts.items())


def metrics_table(metrics: Mapping) -> str:
    """A small plain-text table of one run's metrics."""
    s, d = metrics.get(SHORT, {}), metrics.get(DESCRIPTION, {})
    if metrics.get("method") is not None:
        ran = [f"{k}={metrics[k]}" for k in ("R", "K", "Kf", "select", "score_rows") if metrics.get(k) is not None]
        ran.append("ssd=" + ("on" if metrics.get("ssd") else "off"))
        rows = [("method", f"{metrics['method']} ({', '.join(ran)})")]
    else:
        rows = [("predictions", str(metrics.get("predictions")))]
    if metrics.get("categories"):
        rows.append(("questions", f"{metrics.get('questions')} ({_counts(metrics['categories'])})"))
    if s.get("n"):
        rows.append(("short: exact match", f"{_fmt(s.get('em'), True)}  ({s.get('correct')}/{s.get('n')})"))
    if d.get("n"):
        rows.append(("descriptions: P / R / F1 (micro)",
                     f"{_fmt(d.get('precision'))} / {_fmt(d.get('recall'))} / {_fmt(d.get('f1'))}  "
                     f"(n={d.get('n')}, objects {d.get('tp')} matched of {d.get('pred_objects')} predicted, "
                     f"{d.get('ref_objects')} reference)"))
        rows.append(("descriptions: P / R / F1 (mean)",
                     f"{_fmt(d.get('mean_precision'))} / {_fmt(d.get('mean_recall'))} / {_fmt(d.get('mean_f1'))}"))
    if SHORT not in metrics:
        rows.append(("not scored", "every answer (no --answers: answers only)"))
    elif metrics.get("unscored"):
        rows.append(("not scored", f"{_counts(metrics['unscored'])} (no metric here for these categories; "
                                   "object F1 is for shapes-world descriptions)"))
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
                try:
                    cache[p] = load_image(p)
                except (ValueError, OSError) as e:
                    raise EvalFileError(f"question_id {q.question_id!r}: {e}") from e
            imgs.append(cache[p])
        answers, st = pipe.answer(imgs, [q.text for q in qs], max_new_tokens=max_new.get(cat, DEFAULT_MAX_NEW_OTHER))
        stats[cat] = st
        out.update({q.key: a for q, a in zip(qs, answers)})
    return out, stats


def accuracy_of(answers: dict, references: dict) -> dict:
    """{"short_em", "description_f1"} of {key: Answer} against {key: Reference}."""
    from twig_jax.eval.evaluate import score

    m = score({k: a.text for k, a in answers.items()}, {k: references[k] for k in answers}, require_all=False)
    nan_none = lambda x: None if x != x else float(x)  # noqa: E731
    return {"short_em": nan_none(m["short"]["em"]), "description_f1": nan_none(m["description"]["f1"])}
