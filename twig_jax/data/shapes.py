"""The shapes world: procedural scenes, questions with short answers, and descriptions.

A scene is 1-6 objects (shape, colour, size) on the cells of a 3x3 grid, drawn over a cluttered
grey background (gradient, noise, stripes, specks) so that most image patches carry nothing and a
few carry the answer. From a scene come

  * short questions: colour of a shape, shape of a colour, counts by colour / shape / in all,
    existence (yes/no), position, size, left-of / above relations; every question asked has one
    well-defined answer;
  * a description ("Describe the image."): every object with size, colour, shape and position,
    in reading order, which `parse_description` turns back into the scene's objects.

`generate_dataset` writes LLaVA's instruction format (train.json + images/) and an eval split in
LLaVA's question-file format (eval/questions.jsonl) with the answers kept apart
(eval/answers.jsonl). Everything is deterministic per seed. `build_tokenizer` is the word-level
Hugging Face tokenizer of this vocabulary (every word the data can contain, plus the vicuna_v1
prompt).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
GRID = 3
# Row-major cell names of the 3x3 grid.
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
MAX_OBJECTS = 6

RGB = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 225),
    "yellow": (235, 215, 30),
    "purple": (145, 45, 200),
    "orange": (245, 135, 15),
}

IMAGE_SIZE = 96  # pixels; with 8-pixel patches the ViT sees a 12 x 12 grid = 144 visual tokens
DESCRIBE = "describe the image ."


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    cell: int  # 0..8, row-major

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    @property
    def row(self) -> int:
        return self.cell // GRID

    @property
    def col(self) -> int:
        return self.cell % GRID

    def key(self) -> tuple[str, str, str, str]:
        return (self.size, self.colour, self.shape, self.position)

    @staticmethod
    def from_key(key) -> "ShapeObject":
        """The inverse of key(): (size, colour, shape, position), as a record's "objects" hold it."""
        size, colour, shape, position = key
        return ShapeObject(shape, colour, size, POSITIONS.index(position))


# ----------------------------------------------------------------------------------------------
# Scenes and pictures


def sample_scene(rng: np.random.Generator) -> list[ShapeObject]:
    """1..6 objects on distinct grid cells, sorted in reading order."""
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = sorted(rng.choice(GRID * GRID, size=n, replace=False).tolist())
    return [ShapeObject(SHAPES[rng.integers(len(SHAPES))], COLOURS[rng.integers(len(COLOURS))],
                        SIZES[rng.integers(len(SIZES))], c) for c in cells]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-saturation clutter: gradient + stripes + noise + specks.  # [H, W, 3] float"""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(80, 170)
    angle = rng.uniform(0, 2 * np.pi)
    grad = rng.uniform(-35, 35) * (np.cos(angle) * xx + np.sin(angle) * yy - 0.5)
    freq, phase, theta = rng.uniform(4, 14), rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)
    stripes = rng.uniform(0, 14) * np.sin(2 * np.pi * freq * (np.cos(theta) * xx + np.sin(theta) * yy) + phase)
    grey = base + grad + stripes + rng.normal(0, rng.uniform(4, 12), (size, size))
    tint = rng.uniform(-8, 8, size=3)
    img = grey[..., None] + tint[None, None, :]
    # Grey specks: small distractor blobs that are neither coloured nor on the grid.
    for _ in range(int(rng.integers(5, 20))):
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(0.8, 2.5)
        m = (yy * size - cy) ** 2 + (xx * size - cx) ** 2 <= r * r
        img[m] = rng.uniform(40, 220)
    return img


def _shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "square":
        s = 0.82 * r
        return (np.abs(dy) <= s) & (np.abs(dx) <= s)
    if shape == "triangle":  # pointing up: apex at -r, base at +r
        return (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) * 0.62)
    if shape == "cross":
        w = 0.34 * r
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def render_scene(objects: Sequence[ShapeObject], rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """The scene as uint8 RGB.  # [H, W, 3]"""
    img = _background(rng, size)
    cell = size / GRID
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for o in objects:
        r = cell * (0.38 if o.size == "large" else 0.2) * rng.uniform(0.92, 1.08)
        jitter = cell / 2 - r - 1.0  # stay inside the cell
        cy = (o.row + 0.5) * cell + rng.uniform(-jitter, jitter) * 0.6
        cx = (o.col + 0.5) * cell + rng.uniform(-jitter, jitter) * 0.6
        m = _shape_mask(o.shape, yy - cy, xx - cx, r)
        colour = np.asarray(RGB[o.colour], np.float32) + rng.uniform(-12, 12, size=3)
        img[m] = colour + rng.normal(0, 5, (int(m.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Descriptions


def describe(objects: Sequence[ShapeObject]) -> str:
    """Every object with size, colour, shape and position, in reading order."""
    n = len(objects)
    head = "there is one object ." if n == 1 else f"there are {NUMBERS[n]} objects ."
    parts = [head] + [f"a {o.size} {o.colour} {o.shape} is at the {o.position} of the image ." for o in objects]
    return " ".join(parts)


_WORD = re.compile(r"[a-z]+")
_POSITIONS_LONGEST_FIRST = sorted(POSITIONS, key=lambda p: -len(p.split()))


def parse_description(text: str) -> list[tuple[str, str, str, str]]:
    """(size, colour, shape, position) of every object a description mentions (a multiset).

    Sentences are split at '.'; a sentence counts when it names a size, a colour, a shape and one
    of the nine positions (longest phrase first: 'top left' before 'top'). Other sentences (the
    object count, anything garbled) are ignored.
    """
    found = []
    for sentence in text.lower().split("."):
        words = _WORD.findall(sentence)
        size = next((w for w in words if w in SIZES), None)
        colour = next((w for w in words if w in COLOURS), None)
        shape = next((w for w in words if w in SHAPES), None)
        if size is None or colour is None or shape is None:
            continue
        tail = " ".join(words[words.index(shape) + 1:])
        tail = f" {tail} "
        pos = next((p for p in _POSITIONS_LONGEST_FIRST if f" {p} " in tail), None)
        if pos is not None:
            found.append((size, colour, shape, pos))
    return found


# ----------------------------------------------------------------------------------------------
# Short questions


def _unique(objects, **attrs) -> ShapeObject | None:
    hits = [o for o in objects if all(getattr(o, k) == v for k, v in attrs.items())]
    return hits[0] if len(hits) == 1 else None


def short_questions(objects: Sequence[ShapeObject], rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """Every well-defined short question of the scene as (kind, question, answer), one or more per
    kind that applies; the caller samples from them."""
    qs: list[tuple[str, str, str]] = []
    qs.append(("count_all", "how many objects are there ?", NUMBERS[len(objects)]))
    c = COLOURS[rng.integers(len(COLOURS))]
    qs.append(("count_colour", f"how many {c} objects are there ?", NUMBERS[sum(o.colour == c for o in objects)]))
    s = SHAPES[rng.integers(len(SHAPES))]
    qs.append(("count_shape", f"how many {PLURALS[s]} are there ?", NUMBERS[sum(o.shape == s for o in objects)]))
    # Existence, balanced yes / no.
    present = {(o.colour, o.shape) for o in objects}
    if rng.random() < 0.5:
        c, s = sorted(present)[rng.integers(len(present))]
        qs.append(("exists", f"is there a {c} {s} ?", "yes"))
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        c, s = absent[rng.integers(len(absent))]
        qs.append(("exists", f"is there a {c} {s} ?", "no"))
    for o in objects:
        if _unique(objects, shape=o.shape):
            qs.append(("colour_of", f"what colour is the {o.shape} ?", o.colour))
        elif _unique(objects, shape=o.shape, size=o.size):
            qs.append(("colour_of", f"what colour is the {o.size} {o.shape} ?", o.colour))
        if _unique(objects, colour=o.colour):
            qs.append(("shape_of", f"what shape is the {o.colour} object ?", o.shape))
        if _unique(objects, colour=o.colour, shape=o.shape):
            qs.append(("position", f"where is the {o.colour} {o.shape} ?", o.position))
            qs.append(("size_of", f"what size is the {o.colour} {o.shape} ?", o.size))
    uniq = [o for o in objects if _unique(objects, colour=o.colour, shape=o.shape)]
    for a in uniq:
        for b in uniq:
            if a is b:
                continue
            if a.col != b.col:
                qs.append(("left_of", f"is the {a.colour} {a.shape} left of the {b.colour} {b.shape} ?",
                           "yes" if a.col < b.col else "no"))
            if a.row != b.row:
                qs.append(("above", f"is the {a.colour} {a.shape} above the {b.colour} {b.shape} ?",
                           "yes" if a.row < b.row else "no"))
    return qs


def pick_questions(objects, rng: np.random.Generator, n: int) -> list[tuple[str, str, str]]:
    """n short questions of distinct kinds where possible (kinds uniformly, then a question of it)."""
    by_kind: dict[str, list] = {}
    for q in short_questions(objects, rng):
        by_kind.setdefault(q[0], []).append(q)
    kinds = sorted(by_kind)
    order = rng.permutation(len(kinds)).tolist()
    out = []
    for i in range(n):
        group = by_kind[kinds[order[i % len(kinds)]]]
        out.append(group[rng.integers(len(group))])
    # Drop exact repeats (possible once kinds run out).
    seen, uniq = set(), []
    for q in out:
        if q[1] not in seen:
            seen.add(q[1])
            uniq.append(q)
    return uniq


def key_words() -> list[str]:
    """The words a short question names an object by (attention_target's key words)."""
    return list(COLOURS) + list(SHAPES) + list(PLURALS.values()) + list(SIZES)


RELATION_WORDS = ("left", "above")  # the word that splits a relation question into its two objects


def _question_text(question: str) -> str:
    words = question.replace("<image>", " ").split()
    if words and words[-1] in ("?", "."):
        words = words[:-1]
    return " ".join(words)


def _named(phrase: str) -> dict | None:
    """The attributes a phrase names an object by: "C S", "size S", "S", "C object"."""
    p = phrase.split()
    if len(p) == 2 and p[0] in COLOURS and p[1] in SHAPES:
        return {"colour": p[0], "shape": p[1]}
    if len(p) == 2 and p[0] in SIZES and p[1] in SHAPES:
        return {"size": p[0], "shape": p[1]}
    if len(p) == 2 and p[0] in COLOURS and p[1] == "object":
        return {"colour": p[0]}
    if len(p) == 1 and p[0] in SHAPES:
        return {"shape": p[0]}
    return None


def _matching(objects: Sequence[ShapeObject], **attrs) -> list[int]:
    return [o.cell for o in objects if all(getattr(o, k) == v for k, v in attrs.items())]


def relation_cells(question: str, objects: Sequence[ShapeObject]) -> tuple[int, int] | None:
    """(subject cell, reference cell) of a left_of / above question ("is the A left of the B ?")
    whose two objects are each unique in the scene; None otherwise."""
    text = _question_text(question)
    for rel in (" left of the ", " above the "):
        if text.startswith("is the ") and rel in text:
            a, b = text[len("is the "):].split(rel, 1)
            ca, cb = _named(a), _named(b)
            if ca is None or cb is None:
                return None
            ma, mb = _matching(objects, **ca), _matching(objects, **cb)
            return (ma[0], mb[0]) if len(ma) == 1 and len(mb) == 1 else None
    return None


def question_cells(question: str, objects: Sequence[ShapeObject]) -> list[int] | None:
    """The grid cells of the objects a short question is about, for a training-only attention
    target (`research.attention_target`): the named object for colour_of / shape_of / position / size_of,
    both for left_of / above, the matching objects for exists ("yes") and the two counts by colour
    or shape (when any match). None for questions no object answers (describe, count_all, a "no"
    to exists, a zero count) and for text this world does not ask."""
    text = _question_text(question)
    for prefix in ("what colour is the ", "what shape is the ", "where is the ", "what size is the "):
        if text.startswith(prefix):
            attrs = _named(text[len(prefix):])
            cells = _matching(objects, **attrs) if attrs else []
            return cells if len(cells) == 1 else None
    if text.startswith("is the "):
        pair = relation_cells(question, objects)
        return None if pair is None else sorted(pair)
    if text.startswith("is there a "):
        attrs = _named(text[len("is there a "):])
        cells = _matching(objects, **attrs) if attrs else []
        return cells or None
    if text.startswith("how many ") and text.endswith(" are there"):
        what = text[len("how many "):-len(" are there")]
        if what.endswith(" objects") and what.split()[0] in COLOURS and len(what.split()) == 2:
            cells = _matching(objects, colour=what.split()[0])
        else:
            shape = {v: k for k, v in PLURALS.items()}.get(what)
            cells = _matching(objects, shape=shape) if shape else []
        return cells or None
    return None


FIND = "describe the {} ."


def find_questions(objects, rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """n training-only "describe the K ." turns (K names one object uniquely: its shape, its
    colour, its colour and shape, or its size and shape), answered key first:
    "K size colour shape position ." (e.g. "red object large red circle top left .").

    Why: the eval's short answers need the prompt's last token to look up the object the question
    names, two hops (bring the key to the last token, then match it against the patches), and a
    from-scratch model trained on them alone stays at the even share over objects. Here the key is
    the token being read when the first attribute is predicted, so matching it against the patches
    is one hop with a direct gradient; the question's key tokens then carry the object's attributes
    for the short answers to read. Never asked by the eval."""
    keyed = []
    for o in objects:
        if _unique(objects, shape=o.shape):
            keyed.append((o, o.shape))
        if _unique(objects, colour=o.colour):
            keyed.append((o, f"{o.colour} object"))
        if _unique(objects, colour=o.colour, shape=o.shape):
            keyed.append((o, f"{o.colour} {o.shape}"))
        if _unique(objects, size=o.size, shape=o.shape):
            keyed.append((o, f"{o.size} {o.shape}"))
    out = []
    for j in rng.permutation(len(keyed))[:n].tolist():
        o, key = keyed[j]
        out.append((FIND.format(key), f"{key} {o.size} {o.colour} {o.shape} {o.position} ."))
    return out


# ----------------------------------------------------------------------------------------------
# Datasets


def _save_png(arr: np.ndarray, path: str) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path, optimize=False, compress_level=6)


def make_record(idx: int, split: str, rng: np.random.Generator, image_dir: str, n_short: int):
    objects = sample_scene(rng)
    name = f"{split}_{idx:06d}.png"
    _save_png(render_scene(objects, rng), os.path.join(image_dir, name))
    return name, objects, pick_questions(objects, rng, n_short)


def generate_dataset(out_dir: str, n_train: int, n_eval: int = 200, seed: int = 0, *,
                     train_turns: int = 6, eval_short: int = 2, description_turn: str = "last",
                     describe_only_every: int = 3, find_turns: int = 0) -> dict:
    """Write the train split (LLaVA instruction JSON, multi-turn: `train_turns` short questions in
    random order, then the description; every `describe_only_every`-th record (0: none) is the
    description alone; description_turn="random" keeps the shuffled order with the description
    anywhere and no description-only records, the format of the first training stage of the
    bundled model; description_turn="alone" makes every `describe_only_every`-th record the
    description alone and every other record the short questions alone; `find_turns` > 0 appends
    that many training-only "describe the K ." turns (`find_questions`) to every record that holds
    short questions, right after the last of them, so that their answers never hold a short
    answer's) and the eval split
    (question file + answers apart: per image `eval_short` short questions and one description).
    Returns a summary dict."""
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train={n_train}, n_eval={n_eval} must be >= 0")
    if description_turn not in ("last", "random", "alone"):
        raise ValueError(f"description_turn={description_turn!r} must be 'last', 'random' or 'alone'")
    if describe_only_every < 0:
        raise ValueError(f"describe_only_every={describe_only_every} must be >= 0")
    if find_turns < 0:
        raise ValueError(f"find_turns={find_turns} must be >= 0")
    if description_turn == "alone" and describe_only_every == 0:
        raise ValueError("description_turn='alone' needs describe_only_every >= 1 (else no record "
                         "holds a description)")
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(out_dir, "eval"), exist_ok=True)
    # Child i of a SeedSequence depends only on i: the find turns' stream is a third child, so
    # the scenes, images and questions of a seed are the same with or without find turns.
    train_ss, eval_ss, find_ss = np.random.SeedSequence(seed).spawn(3)
    train_rng, eval_rng = np.random.default_rng(train_ss), np.random.default_rng(eval_ss)
    find_rng = np.random.default_rng(find_ss)

    records = []
    for i in range(n_train):
        name, objects, qs = make_record(i, "train", train_rng, image_dir, train_turns)
        turns = [(q, a) for _, q, a in qs] + [(DESCRIBE, describe(objects))]
        turns = [turns[j] for j in train_rng.permutation(len(turns))]
        # A description placed before a short question would hold that question's answer as text,
        # and the model would learn to copy it instead of reading the image. So the description
        # goes last, and every `describe_only_every`-th record is the description alone (eval asks
        # every question as the first turn, descriptions included). The shuffle above still runs,
        # so the images and questions drawn from the seed stay as they were.
        if description_turn == "last":
            turns = [t for t in turns if t[0] != DESCRIBE] + [t for t in turns if t[0] == DESCRIBE]
            if describe_only_every and i % describe_only_every == 0:
                turns = turns[-1:]
        elif description_turn == "alone":
            # The description is ~60 answer tokens and a short answer 1-2: in a record holding
            # both, the description gets ~90% of the loss and the short answers starve. Here a
            # record is either the description alone or the short questions alone.
            alone = i % describe_only_every == 0  # describe_only_every >= 1, checked above
            turns = [t for t in turns if (t[0] == DESCRIBE) == alone]
        if find_turns and any(q != DESCRIBE for q, _ in turns):
            # Right after the last short question (a find answer holds a short answer's words).
            k = max(j for j, (q, _) in enumerate(turns) if q != DESCRIBE) + 1
            turns = turns[:k] + find_questions(objects, find_rng, find_turns) + turns[k:]
        conv = []
        for j, (q, a) in enumerate(turns):
            conv.append({"from": "human", "value": ("<image>\n" + q) if j == 0 else q})
            conv.append({"from": "gpt", "value": a})
        records.append({"id": f"train_{i:06d}", "image": name, "conversations": conv,
                        "objects": [list(o.key()) for o in objects]})
    with open(os.path.join(out_dir, "train.json"), "w") as f:
        json.dump(records, f)

    n_q = 0
    with open(os.path.join(out_dir, "eval", "questions.jsonl"), "w") as fq, \
            open(os.path.join(out_dir, "eval", "answers.jsonl"), "w") as fa:
        for i in range(n_eval):
            name, objects, qs = make_record(i, "eval", eval_rng, image_dir, eval_short)
            items = [(kind, q, a, "short") for kind, q, a in qs[:eval_short]]
            items.append(("describe", DESCRIBE, describe(objects), "description"))
            for j, (kind, q, a, cat) in enumerate(items):
                qid = f"eval_{i:06d}_{j}"
                fq.write(json.dumps({"question_id": qid, "image": name, "text": q, "category": cat}) + "\n")
                fa.write(json.dumps({"question_id": qid, "answer": a, "category": cat, "kind": kind,
                                     "objects": [list(o.key()) for o in objects]}) + "\n")
                n_q += 1
    tok = build_tokenizer()
    tok.save_pretrained(os.path.join(out_dir, "tokenizer"))
    summary = {"train_images": n_train, "eval_images": n_eval, "eval_questions": n_q, "seed": seed,
               "image_size": IMAGE_SIZE, "vocab_size": len(tok)}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


# ----------------------------------------------------------------------------------------------
# Tokenizer

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
IMAGE_TOKEN = "<image>"


def vocabulary() -> list[str]:
    """Every word the shapes data and the vicuna_v1 prompt can contain (lower case)."""
    from twig_jax.data.preprocess import VICUNA_V1_SYSTEM

    words: set[str] = set()
    text = " ".join([
        VICUNA_V1_SYSTEM, "USER: ASSISTANT:", DESCRIBE, describe([ShapeObject("circle", "red", "small", 0)]),
        describe([ShapeObject("circle", "red", "small", 0)] * 2),
        "how many objects are there ? is there a what colour shape size is the object where left of above ?",
        " ".join(SHAPES + COLOURS + SIZES + POSITIONS + NUMBERS + tuple(PLURALS.values())), "yes no",
    ]).lower()
    for w in re.findall(r"[a-z]+|[^\sa-z]", text):
        words.add(w)
    return sorted(words)


def build_tokenizer():
    """Word-level HF tokenizer: lower-cases, splits on whitespace and punctuation; <s> is
    prepended; <image> is a special token. Decoding joins words with spaces."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(list(SPECIALS) + vocabulary() + [IMAGE_TOKEN])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>",
                                        additional_special_tokens=[IMAGE_TOKEN])
    return tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    """`twig-jax data shapes --out DIR --n N --seed S [--n-eval M]`."""
    import argparse

    p = argparse.ArgumentParser(prog="twig-jax data shapes", description="generate the shapes world")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, required=True, help="training images (one multi-turn record each)")
    p.add_argument("--n-eval", type=int, default=200, help="eval images (2 short questions + 1 description each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-turns", type=int, default=6, help="short questions per training record")
    p.add_argument("--description-turn", choices=("last", "random", "alone"), default="last",
                   help="where the description goes in a training record (random: anywhere, as the "
                        "bundled model's first training stage saw it; alone: a record is either the "
                        "description or the short questions, never both)")
    p.add_argument("--describe-only-every", type=int, default=3,
                   help="every N-th training record is the description alone (0: none; with "
                        "--description-turn last or alone)")
    p.add_argument("--find-turns", type=int, default=0,
                   help='training-only "describe the K ." turns appended to every record with short '
                        "questions (answered key first; they teach the model to look up a named object)")
    args = p.parse_args(argv)
    summary = generate_dataset(args.out, args.n, args.n_eval, args.seed, train_turns=args.train_turns,
                               description_turn=args.description_turn,
                               describe_only_every=args.describe_only_every, find_turns=args.find_turns)
    print(json.dumps(summary))
    return 0
