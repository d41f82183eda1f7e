"""`twig-jax` command line: thin commands over the library (`twig-jax --help` lists them).

Errors: bad input (a missing or malformed file, a question file's bad line, a setting the run would
ignore or cannot use) is one line on stderr naming the problem and its file / line / question_id,
with exit status 2; anything else is one line with exit status 1. `twig-jax --debug COMMAND ...`
lets the exception through, with its trace.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
from typing import Any, Callable

from twig_jax.cli.mesh_args import add_mesh_args, mesh_from_args
from twig_jax.cli.twig_args import FLAGS, TWIG_FIELDS, add_twig_args, unused_settings  # noqa: F401


class CliInputError(ValueError):
    """Bad input to a command found after its arguments parse: a flag combination, a question
    file's line, an output file in the way."""


# Exceptions that mean bad input (exit status 2), as (module, class). They are looked up in
# sys.modules: an exception can only be of a class whose module is loaded, so classifying an error
# never imports anything.
INPUT_ERRORS = (
    ("twig_jax.decode.buckets", "InputError"),
    ("twig_jax.decode.sampling", "SamplingConfigError"),
    ("twig_jax.convert.llava", "ConversionError"),
    ("twig_jax.twig.io", "TwigFormatError"),
    ("twig_jax.twig.config", "TwigConfigError"),
    ("twig_jax.eval.evaluate", "EvalFileError"),
    ("twig_jax.model.config", "ConfigError"),
    ("twig_jax.data.llava_data", "NoUsableSamples"),
    ("twig_jax.parallel.sharding", "MeshError"),
)
MAX_MESSAGE = 1000  # characters of an error message shown (--debug shows all of it)


def is_input_error(e: BaseException) -> bool:
    """Whether `e` reports bad input (a user's file or setting) rather than a fault of the program."""
    if isinstance(e, (CliInputError, OSError, json.JSONDecodeError, UnicodeDecodeError)):
        return True
    return any(isinstance(e, cls) for cls in (getattr(sys.modules.get(m), name, None) for m, name in INPUT_ERRORS)
               if cls is not None)


def one_line(message: Any) -> str:
    """The message with its line breaks and runs of spaces collapsed, cut to MAX_MESSAGE characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 3] + "..."


def _one_line_usage_error(parser: argparse.ArgumentParser, message: str):
    """ArgumentParser.error without the usage block: the problem in one line, exit status 2."""
    parser.exit(2, f"{parser.prog}: error: {one_line(message)}\n")


@contextlib.contextmanager
def one_line_usage_errors():
    """Every argument parser of a command (its own and the library's it calls) reports a usage
    error in one line while the command runs."""
    original = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _one_line_usage_error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original


# ----------------------------------------------------------------------------------------------
# Twig and pruning settings

def _given_twig_settings(args) -> dict:
    return {k: getattr(args, k) for k in TWIG_FIELDS if getattr(args, k, None) is not None}


def _twig_setup(p: argparse.ArgumentParser, args, model, mesh=None):
    """(twig or None, TwigConfig or None) from --twig and the override flags; p.error on misuse
    (twig.config.resolve_twig_config decides what a run uses)."""
    from twig_jax.twig.config import TwigConfigError, TwigOverrides, resolve_twig_config
    from twig_jax.twig.io import load_twig_any

    L, N = model.cfg.text.num_hidden_layers, model.cfg.num_image_tokens
    given = _given_twig_settings(args)
    twig = None
    if args.twig:
        # An official MILVLG checkpoint carries no TwigConfig: its K and pruning budget come from the
        # flags. SSD alone (method none) prunes nothing, so it needs no budget.
        budget = {"R": N} if args.method == "none" else {k: given.get(k) for k in ("R", "R_bar")}
        twig, _ = load_twig_any(args.twig, model.cfg.text, dtype=model.text.embed[...].dtype, K=given.get("K"),
                                Kf=given.get("Kf"), mesh=mesh, **budget)
    method = args.method or (("phead" if twig.p_head is not None else "twig") if twig is not None else "none")
    ssd = (twig is not None) if args.ssd is None else args.ssd
    problem = unused_settings(given, method=method, ssd=ssd, twig_given=bool(args.twig))
    if problem:
        p.error(problem)
    try:
        twig_cfg = resolve_twig_config(L, N, method=method, ssd=ssd, twig_cfg=None if twig is None else twig.twig_cfg,
                                       has_p_head=twig is not None and twig.p_head is not None,
                                       overrides=TwigOverrides(**given))
    except TwigConfigError as e:
        p.error(f"{e} (this model: L={L} layers, N={N} visual tokens)")
    drafting = [FLAGS[k] for k in ("draft_len", "theta") if k in given]
    if ssd and drafting and getattr(twig_cfg, "spec", "chain") == "tree":
        p.error(f"{'/'.join(drafting)} set chain drafting, and this twig drafts a tree (its TwigConfig's spec)")
    if twig is not None and twig_cfg is not None and twig_cfg != twig.twig_cfg:
        twig.twig_cfg = twig_cfg
    return twig, twig_cfg


# ----------------------------------------------------------------------------------------------
# generate: question rows, checked before the model loads


@dataclasses.dataclass(frozen=True)
class Row:
    """One question: a line of the --jsonl file, or --image / --prompt."""

    line: int | None  # 1-based line of the question file (None for --image / --prompt)
    fields: dict  # the row as written; its answer record carries these fields
    image_path: str
    question: str

    @property
    def question_id(self) -> Any:
        return self.fields.get("question_id")


@dataclasses.dataclass(frozen=True)
class BadRow:
    line: int | None
    question_id: Any
    problem: str


def where(path: str | None, line: int | None, question_id: Any = None) -> str:
    """'FILE:LINE (question_id X)', as much of it as is known."""
    at = f"{path}:{line}" if path and line is not None else (path or "the question")
    return at + (f" (question_id {question_id!r})" if question_id is not None else "")


def read_question_rows(path: str, images_dir: str) -> tuple[list[Row], list[BadRow]]:
    """The rows of a question JSONL file ({image, question} or LLaVA's {question_id, image, text}),
    each checked before any model loads: UTF-8, a JSON object, an image and a question, an image
    file that opens. Returns (good rows, bad rows with their problem), in file order."""
    from twig_jax.eval.evaluate import image_problem

    with open(path, "rb") as f:
        data = f.read()
    rows, bad = [], []
    for i, raw in enumerate(data.split(b"\n"), 1):
        try:
            text = raw.decode("utf-8-sig" if i == 1 else "utf-8")
        except UnicodeDecodeError as e:
            bad.append(BadRow(i, None, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})"))
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            bad.append(BadRow(i, None, f"not valid JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(obj, dict):
            bad.append(BadRow(i, None, f"expected a JSON object, got {type(obj).__name__}"))
            continue
        question = obj.get("question", obj.get("text"))
        if not isinstance(obj.get("image"), str) or not isinstance(question, str):
            bad.append(BadRow(i, obj.get("question_id"), "needs 'image' and 'question' (or 'text') strings"))
            continue
        image_path = os.path.join(images_dir, obj["image"])
        problem = image_problem(image_path)
        if problem:
            bad.append(BadRow(i, obj.get("question_id"), problem))
            continue
        rows.append(Row(i, obj, image_path, question))
    return rows, bad


def read_answered_ids(path: str) -> tuple[set[str], int]:
    """(question_ids answered in an answer file, bytes of it to keep) for --resume. A last line
    cut short by a killed run is left out of the bytes to keep; any other line that is not an
    answer with a question_id is an error naming it."""
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    ids, pos = set(), 0
    for i, raw in enumerate(lines, 1):
        if raw.strip():
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                if i == len(lines):  # no newline after it: a write cut short
                    return ids, pos
                raise CliInputError(f"{path}:{i}: not a JSON answer line; --resume continues a file of answers "
                                    "written by twig-jax generate")
            if not isinstance(obj, dict) or "question_id" not in obj:
                raise CliInputError(f"{path}:{i}: an answer line without a question_id; --resume matches answers "
                                    "to questions by question_id")
            ids.add(str(obj["question_id"]))
        pos += len(raw) + 1
    return ids, len(data)


def _check_resumable(path: str, rows: list[Row]) -> None:
    """--resume matches answers to questions by question_id: every row needs a distinct one."""
    first: dict[str, int | None] = {}
    for r in rows:
        if r.question_id is None:
            raise CliInputError(f"{where(path, r.line)}: no question_id; --resume matches answers to questions "
                                "by question_id")
        key = str(r.question_id)
        if key in first:
            raise CliInputError(f"{where(path, r.line, r.question_id)}: the question_id of line {first[key]} "
                                "again; --resume needs distinct question_ids")
        first[key] = r.line


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return f.read().count(b"\n")


@contextlib.contextmanager
def answer_file(path: str | None, *, append: bool, prog: str, keep_bytes: int | None = None):
    """Where answer lines go. Without a path: stdout. append (--resume): the file itself, cut to
    keep_bytes (dropping a torn last line) and appended to. Otherwise a temporary file beside
    `path`, renamed onto it when the block completes. If the block fails, an existing file is left
    as it was; a new one receives the answers finished so far (so --resume can go on)."""
    if path is None:
        yield sys.stdout
        return
    if append:
        with open(path, "ab") as f:
            if keep_bytes is not None:
                f.truncate(keep_bytes)
                if keep_bytes and _last_byte(path, keep_bytes) != b"\n":
                    f.write(b"\n")
        with open(path, "a", encoding="utf-8") as f:
            yield f
        return
    existed = os.path.exists(path)
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # an ordinary file's mode, not mkstemp's owner-only one
    f = os.fdopen(fd, "w", encoding="utf-8")
    try:
        yield f
    except BaseException:
        f.close()
        n = _count_lines(tmp)
        if n and not existed:
            os.replace(tmp, path)
            print(f"{prog}: stopped after {n} answers; they are in {path} (--resume answers the rest)",
                  file=sys.stderr)
        else:
            os.remove(tmp)
            if n:
                print(f"{prog}: stopped after {n} answers; {path} is left as it was", file=sys.stderr)
        raise
    f.close()
    os.replace(tmp, path)


def _last_byte(path: str, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1)


def _check_generate_flags(p: argparse.ArgumentParser, args) -> None:
    """Flag combinations refused before anything is read or loaded."""
    single = args.image is not None or args.prompt is not None
    if args.jsonl and single:
        p.error("--jsonl answers a question file and --image/--prompt one question: give one or the other")
    if not args.jsonl and (args.image is None or args.prompt is None):
        p.error("give --image and --prompt, or --jsonl")
    if args.images is not None and not args.jsonl:
        p.error("--images is the folder of --jsonl's image paths; with --image give the image's path itself")
    if args.skip_bad and not args.jsonl:
        p.error("--skip-bad skips the bad rows of a --jsonl question file")
    if args.force and args.resume:
        p.error("--force replaces --out and --resume continues it: give one")
    for flag, on in (("--force", args.force), ("--resume", args.resume)):
        if on and not args.out:
            p.error(f"{flag} is about the answer file: give --out FILE")
    if args.resume and (args.stream or not args.jsonl):
        p.error("--resume continues a --jsonl run's --out file")
    if args.no_color and not args.stream:
        p.error("--no-color changes --stream's markers; without --stream nothing is coloured")
    if args.stream and args.warmup:
        p.error("--warmup times --jsonl batches; --stream answers one question")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not 0 <= args.min_new_tokens <= args.max_new_tokens:
        p.error(f"--min-new-tokens must be in [0, --max-new-tokens {args.max_new_tokens}], got {args.min_new_tokens}")
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        p.error("--top-k/--top-p shape sampling, and --temperature 0 (the default) decodes greedily: give "
                "--temperature > 0")
    if args.ssd and not args.twig:
        p.error("--ssd needs --twig: self-speculative decoding drafts with the twig (give --twig DIR, or --no-ssd)")
    if args.method in ("twig", "phead") and not args.twig:
        p.error(f"--method {args.method} (TTP) needs --twig DIR; without a twig use --method fastv, random or none")
    problem = unused_settings(_given_twig_settings(args), method=args.method or ("twig" if args.twig else "none"),
                              ssd=bool(args.twig) if args.ssd is None else args.ssd, twig_given=bool(args.twig))
    if problem:
        p.error(problem)


def _sampling(p: argparse.ArgumentParser, args):
    from twig_jax.decode.sampling import SamplingConfig, SamplingConfigError

    try:
        return SamplingConfig(args.temperature, 0 if args.top_k is None else args.top_k,
                              1.0 if args.top_p is None else args.top_p)
    except SamplingConfigError as e:
        p.error(str(e))


def _question_rows(p: argparse.ArgumentParser, args, prog: str) -> tuple[list[Row], int]:
    """(rows to answer, bad rows skipped); bad rows are an error naming the first unless --skip-bad."""
    if not args.jsonl:
        from twig_jax.eval.evaluate import image_problem

        problem = image_problem(args.image)
        if problem:
            p.error(problem)
        return [Row(None, {"image": args.image}, args.image, args.prompt)], 0
    if not os.path.isfile(args.jsonl):
        p.error(f"--jsonl {args.jsonl}: no such file")
    rows, bad = read_question_rows(args.jsonl, args.images or "")
    if bad and (not args.skip_bad or not rows):
        b = bad[0]
        more = f"; {len(bad)} bad rows in all" if len(bad) > 1 else ""
        advice = " (--skip-bad answers the other rows)" if rows else " (no row can be answered)"
        raise CliInputError(f"{where(args.jsonl, b.line, b.question_id)}: {b.problem}{more}{advice}")
    if not rows:
        p.error(f"{args.jsonl}: no questions")
    shown = 10
    for b in bad[:shown]:
        print(f"{prog}: skipping {where(args.jsonl, b.line, b.question_id)}: {b.problem}", file=sys.stderr)
    if len(bad) > shown:
        print(f"{prog}: skipping {len(bad) - shown} more bad rows", file=sys.stderr)
    return rows, len(bad)


def _answer_rows(pipe, rows: list[Row], **kw) -> tuple[list[tuple[Row, Any, dict]], list[tuple[Row, str]]]:
    """One batch: ([(row, Answer, stats of the generate call that answered it)], [(bad row, problem)]).
    A row whose image does not load, or that the generator refuses (InputError: a prompt past the
    buckets or the cache), is bad and the others are answered; a refused batch is answered row by
    row to find which rows it refuses."""
    from twig_jax.data.preprocess import load_image
    from twig_jax.decode.buckets import InputError

    images, ok, bad = [], [], []
    for r in rows:
        try:
            images.append(load_image(r.image_path))
            ok.append(r)
        except (ValueError, OSError) as e:
            bad.append((r, str(e)))
    if not ok:
        return [], bad
    try:
        answers, stats = pipe.answer(images, [r.question for r in ok], **kw)
        stats = dict(stats, rows=len(ok))
        return [(r, a, stats) for r, a in zip(ok, answers)], bad
    except InputError as e:
        if len(ok) == 1:
            return [], bad + [(ok[0], str(e))]
    answered = []
    for r, image in zip(ok, images):
        try:
            (a,), stats = pipe.answer([image], [r.question], **kw)
        except InputError as e:
            bad.append((r, str(e)))
            continue
        answered.append((r, a, dict(stats, rows=1)))
    return answered, bad


# What pipe.answer's statistics say of the generator; a run reports pipeline.run_settings instead.
GENERATOR_KEYS = ("method", "ssd", "K", "T", "Kf", "R", "draft_len", "theta", "score_rows", "select")


def _summary(stats: dict, ran: dict, counts: dict) -> dict:
    return dict({k: v for k, v in stats.items() if k not in GENERATOR_KEYS and k != "per_row"}, **ran, **counts)


def _generate(argv) -> int:
    prog = "twig-jax generate"
    p = argparse.ArgumentParser(prog=prog, description="Answer (image, question) pairs.")
    p.add_argument("--model", required=True, help="converted or Hugging Face LLaVA directory")
    p.add_argument("--vision-dir", help="CLIP checkpoint dir (liuhaotian layout only)")
    p.add_argument("--image", help="image path (single question mode)")
    p.add_argument("--prompt", help="question text (single question mode)")
    p.add_argument("--jsonl", help="batch input: JSONL of {image, question} (or LLaVA's {question_id, image, text})")
    p.add_argument("--images", help="folder that --jsonl image paths are relative to (default: the current one)")
    p.add_argument("--out", help="write answers JSONL here (default: stdout); an existing file needs --force or "
                                 "--resume")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out (the new file takes its place when the run completes)")
    p.add_argument("--resume", action="store_true",
                   help="append to --out the answers of the question_ids it does not hold yet")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip --jsonl rows that cannot be answered (each reported; the summary counts them)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per generate call (--jsonl)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--min-new-tokens", type=int, default=0, help="no EOS before this many tokens (default 0)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (the default) decodes greedily")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens (with --temperature > 0)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1] (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--stream", action="store_true",
                   help="print one answer as it is generated, drafted-and-accepted tokens highlighted")
    p.add_argument("--no-color", action="store_true", help="with --stream: [..] markers instead of ANSI colour")
    p.add_argument("--warmup", action="store_true",
                   help="run the first batch once untimed first (else its timing includes compilation)")
    add_twig_args(p)
    add_mesh_args(p)
    args = p.parse_args(argv)
    _check_generate_flags(p, args)
    sampling = _sampling(p, args)
    if args.out and os.path.exists(args.out) and not (args.force or args.resume):
        raise CliInputError(f"--out {args.out} exists: --force replaces it, --resume answers only the questions it "
                            "does not hold yet")
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise CliInputError(f"--out {args.out}: no such directory {os.path.dirname(os.path.abspath(args.out))}")
    rows, skipped = _question_rows(p, args, prog)
    if args.stream and len(rows) != 1:
        p.error(f"--stream answers a single question; got {len(rows)}")
    done, keep_bytes = set(), None
    if args.resume:
        _check_resumable(args.jsonl, rows)
        if os.path.exists(args.out):
            done, keep_bytes = read_answered_ids(args.out)
    todo = [r for r in rows if str(r.question_id) not in done]
    counts = {"questions": len(rows) + skipped, "answered": 0, "skipped": skipped, "resumed": len(rows) - len(todo)}
    if not todo:
        print(json.dumps(counts), file=sys.stderr)
        return 0

    with answer_file(args.out, append=args.resume, prog=prog, keep_bytes=keep_bytes) as out:
        return _run_generate(p, args, prog, todo, sampling, out, counts)


def _run_generate(p, args, prog: str, rows: list[Row], sampling, out, counts: dict) -> int:
    import jax.numpy as jnp

    from twig_jax.convert.llava import load_model
    from twig_jax.decode.generator import make_generator
    from twig_jax.pipeline import Pipeline, image_preprocessor_for, load_tokenizer, run_settings
    from twig_jax.progress import Progress

    mesh = mesh_from_args(args)
    model = load_model(args.model, dtype=getattr(jnp, args.dtype), vision_dir=args.vision_dir, mesh=mesh)
    twig, twig_cfg = _twig_setup(p, args, model, mesh)
    gen = make_generator(model, twig, twig_cfg, args.method, args.ssd, force_twig_generator=args.stream, mesh=mesh)
    pipe = Pipeline(model, load_tokenizer(args.model), image_preprocessor_for(model, args.model), generator=gen)
    ran = run_settings(gen, model.cfg.num_image_tokens)
    kw = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
              min_new_tokens=args.min_new_tokens)

    if args.stream:
        from twig_jax.decode.stream import StreamPrinter

        printer = StreamPrinter(pipe.tokenizer, color=False if args.no_color else None)
        ans, stats = pipe.stream(rows[0].image_path, rows[0].question, on_chunk=printer, **kw)
        printer.finish()
        if getattr(gen, "ssd", False):
            print(printer.legend(), file=sys.stderr)
        if out is not sys.stdout:
            out.write(json.dumps(_record(rows[0], ans)) + "\n")
        print(json.dumps(_summary(stats, ran, dict(counts, answered=1))), file=sys.stderr)
        return 0

    if args.warmup:
        _answer_rows(pipe, rows[:args.batch_size], **kw)
    batch_stats: dict[int, dict] = {}  # id -> the statistics of each generate call
    seen_sizes = {len(rows[:args.batch_size])} if args.warmup else set()  # a new batch shape compiles
    bad_at_run = 0
    with Progress(len(rows), "rows", label="generate", enabled=bool(args.jsonl)) as progress:
        for i in range(0, len(rows), args.batch_size):
            chunk = rows[i:i + args.batch_size]
            answered, bad = _answer_rows(pipe, chunk, **kw)
            for r, a, stats in answered:
                rec = _record(r, a)
                rec["stats"].update(batch_seconds=stats["seconds"], batch_size=stats["rows"],
                                    includes_compile=stats["rows"] not in seen_sizes)
                out.write(json.dumps(rec) + "\n")
                batch_stats[id(stats)] = stats
            out.flush()
            seen_sizes.update(stats["rows"] for stats in batch_stats.values())
            counts["answered"] += len(answered)
            if bad and not args.skip_bad:
                r, problem = bad[0]
                raise CliInputError(f"{where(args.jsonl, r.line, r.question_id)}: {problem} (--skip-bad answers the "
                                    "other rows)")
            for r, problem in bad:
                print(f"{prog}: skipping {where(args.jsonl, r.line, r.question_id)}: {problem}", file=sys.stderr)
            bad_at_run += len(bad)
            progress.advance(len(chunk), extra=f"{counts['skipped'] + bad_at_run} skipped" if bad_at_run else "")
    counts["skipped"] += bad_at_run
    print(json.dumps(_summary(_merge_stats(list(batch_stats.values())), ran, counts)), file=sys.stderr)
    return 0


def _record(row: Row, ans) -> dict:
    rec = {k: v for k, v in row.fields.items() if k != "question"}
    rec.update(prompt=ans.question, text=ans.text, num_tokens=len(ans.tokens), stats=dict(ans.stats))
    return rec


def _merge_stats(all_stats: list[dict]) -> dict:
    """Batch statistics summed over the batches (each with its "rows")."""
    if not all_stats:
        return {}
    out = {k: v for k, v in all_stats[0].items() if k != "rows"}
    for k in ("seconds", "generated_tokens", "rounds", "drafted", "accepted"):
        if k in out:
            out[k] = sum(s[k] for s in all_stats)
    out["tokens_per_s"] = out["generated_tokens"] / max(out["seconds"], 1e-9)
    if "drafted" in out:
        nan = float("nan")
        rows = sum(s["rows"] for s in all_stats)
        out["acceptance_rate"] = out["accepted"] / out["drafted"] if out["drafted"] else nan
        out["mean_accepted_per_round"] = out["accepted"] / out["rounds"] if out["rounds"] else nan
        emitted = out["generated_tokens"] - rows  # the first token of each comes from prefill
        out["mean_tokens_per_round"] = emitted / out["rounds"] if out["rounds"] else nan
        passes = out["rounds"] + rows  # the prefill is a target pass too
        out["tokens_per_target_pass"] = out["generated_tokens"] / passes if passes else nan
    out["batches"] = len(all_stats)
    return out


def _prune_viz(argv) -> int:
    p = argparse.ArgumentParser(prog="twig-jax prune-viz",
                                description="Picture which visual tokens TTP (twig) and FastV keep.")
    p.add_argument("--model", required=True, help="converted or Hugging Face LLaVA directory")
    p.add_argument("--vision-dir", help="CLIP checkpoint dir (liuhaotian layout only)")
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    add_twig_args(p, decoding=False)
    args = p.parse_args(argv)
    if args.R is None and args.R_bar is None and not args.twig:
        p.error("give --R (or --R-bar): the kept visual token count")
    from twig_jax.eval.evaluate import image_problem

    problem = image_problem(args.image)
    if problem:
        p.error(problem)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        p.error(f"--out {args.out}: no such directory {out_dir}")
    # The picture shows TTP (and the P-head) with a twig, FastV always: resolve as the twig reads it.
    args.method, args.ssd = ("twig" if args.twig else "fastv"), False

    import jax.numpy as jnp

    from twig_jax.convert.llava import load_model
    from twig_jax.pipeline import image_preprocessor_for, load_tokenizer
    from twig_jax.eval.viz import prune_picture

    model = load_model(args.model, dtype=getattr(jnp, args.dtype), vision_dir=args.vision_dir)
    twig, twig_cfg = _twig_setup(p, args, model)
    info = prune_picture(model, load_tokenizer(args.model), args.image, args.prompt, args.out, twig_cfg,
                         twig=twig, image_processor=image_preprocessor_for(model, args.model))
    print(json.dumps(info))
    return 0


def _bench_twig(argv) -> int:
    from twig_jax.bench.methods import main

    return main(argv) or 0


def _convert(argv) -> int:
    from twig_jax.convert.llava import convert_main

    return convert_main(argv) or 0


def _demo(argv) -> int:
    from twig_jax.cli.demo import main

    return main(argv)


def _bench(argv) -> int:
    if any(a == "--methods" or a.startswith("--methods=") for a in argv):
        return _bench_twig(argv)  # TwigVLM methods on the same weights (twig_jax/bench/methods.py)
    from twig_jax.bench.hf import main

    return main(argv) or 0


def _train(argv) -> int:
    from twig_jax.cli.train import main

    return main(argv) or 0


def _eval(argv) -> int:
    from twig_jax.cli.eval import eval_main

    return eval_main(argv)


def _data(argv) -> int:
    if not argv or argv[0] != "shapes":
        print("usage: twig-jax data shapes --out DIR --n N [--n-eval M] [--seed S]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from twig_jax.data.shapes import main

    try:
        return main(argv[1:])
    except ValueError as e:  # generate_dataset's checks of its arguments
        raise CliInputError(str(e)) from e


def _train_phead(argv) -> int:
    from twig_jax.train.prune_rl import main

    return main(argv) or 0


def _bench_mesh(argv) -> int:
    from twig_jax.bench.mesh import main

    return main(argv)


def _plan(argv) -> int:
    from twig_jax.cli.plan import main

    return main(argv)


@dataclasses.dataclass(frozen=True)
class Command:
    run: Callable[[list[str]], int]
    summary: str  # one line for `twig-jax --help`


COMMANDS = {
    "convert": Command(_convert, "convert a Hugging Face LLaVA-1.5 checkpoint into a twig_jax model directory"),
    "generate": Command(_generate, "answer questions about images: plain, pruned (TTP, P-head, FastV, random), SSD"),
    "eval": Command(_eval, "answer a LLaVA question file and score it (exact match, object F1)"),
    "demo": Command(_demo, "the bundled shapes-world LLaVA + twig on the bundled demo set, against plain decoding"),
    "train": Command(_train, "train a twig (self-distillation from the frozen base) or the whole model"),
    "train-phead": Command(_train_phead, "train a twig's P-head (attention distillation, then REINFORCE)"),
    "bench": Command(_bench, "decode speed against Hugging Face transformers on the same weights"),
    "bench-twig": Command(_bench_twig, "TwigVLM methods side by side: plain, FastV, TTP, SSD, TTP+SSD, P-head"),
    "bench-mesh": Command(_bench_mesh, "decoding on device meshes beside one device: compile time, memory, "
                                       "tokens equal"),
    "prune-viz": Command(_prune_viz, "picture which visual tokens a pruning method keeps"),
    "data": Command(_data, "generate the shapes-world data set (images, questions, answers)"),
    "plan": Command(_plan, "per-device memory of generation on a mesh (parameters, KV cache, activations)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: twig-jax [--debug] COMMAND [args...]   (twig-jax COMMAND --help for its options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {c.summary}" for name, c in COMMANDS.items()]
    lines += ["", "--debug: show the trace of an error, not only its one-line message"]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = bool(argv) and argv[0] == "--debug"
    if debug:
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name = argv[0]
    if name not in COMMANDS:
        print(f"twig-jax: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    prog = f"twig-jax {name}"
    try:
        with one_line_usage_errors():
            return COMMANDS[name].run(argv[1:])
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error becomes one line (--debug: the trace)
        if debug:
            raise
        if is_input_error(e):
            print(f"{prog}: error: {one_line(e) or type(e).__name__}", file=sys.stderr)
            return 2
        print(f"{prog}: internal error: {type(e).__name__}: {one_line(e)} (twig-jax --debug {name} ... shows "
              "the trace)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
