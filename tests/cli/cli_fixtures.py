"""Fixtures shared by the CLI tests (import them into a test module to use them): a random demo
LLaVA saved as a converted dir, a random twig (orbax and bare MILVLG safetensors), two images, a
question file, and TwigGenerator's reference answers; plus `run_cli`, which runs `twig-jax ...`
in-process and returns its exit status and stderr."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

MAX_NEW = 8
QUESTIONS = ["what colour is the circle ?", "describe the image ."]


def run_cli(argv, capsys) -> tuple[int, str]:
    """(exit status, stderr) of `twig-jax *argv`; argparse's SystemExit counts as an exit status."""
    from twig_jax.cli.main import main

    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def saved(tmp_path_factory):
    """A random demo LLaVA + tokenizer saved as a converted dir, a random twig saved with
    save_twig, two images and a question file (both JSONL layouts)."""
    from PIL import Image

    from twig_jax.cli.demo import random_demo_model
    from twig_jax.convert.llava import save_converted_model
    from twig_jax.twig.module import Twig
    from twig_jax.twig.config import TwigConfig
    from twig_jax.twig.io import save_twig

    root = tmp_path_factory.mktemp("cli_twig")
    model, tok = random_demo_model()
    model_dir = save_converted_model(model, str(root / "model"), tok)
    tc = TwigConfig(K=1, T=2, Kf=3, R=16, draft_len=4, theta=0.05)
    twig = Twig(model.cfg.text, tc, rngs=nnx.Rngs(3))
    # A copy of the base head makes the drafts agree with the target now and then.
    twig.head.set_value(model.text.head_weight())
    twig_dir = save_twig(twig, str(root / "twig"))
    rng = np.random.default_rng(0)
    names = []
    for i, shape in enumerate([(60, 90, 3), (80, 50, 3)]):
        name = f"img{i}.png"
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8)).save(root / name)
        names.append(name)
    qfile = root / "questions.jsonl"
    with open(qfile, "w") as f:
        f.write(json.dumps({"question_id": 7, "image": names[0], "text": QUESTIONS[0]}) + "\n")
        f.write(json.dumps({"image": names[1], "question": QUESTIONS[1]}) + "\n")
    return dict(root=root, model=model, tok=tok, twig=twig, tc=tc, model_dir=model_dir, twig_dir=twig_dir,
                images=[str(root / n) for n in names], qfile=str(qfile))


@pytest.fixture(scope="session")
def reference(saved):
    """TwigGenerator greedy answers (method twig, SSD), one question per call like --batch-size 1."""
    from twig_jax.pipeline import Pipeline, image_preprocessor_for
    from twig_jax.decode.generator import TwigGenerator

    gen = TwigGenerator(saved["model"], saved["twig"], saved["tc"], method="twig", ssd=True)
    pipe = Pipeline(saved["model"], saved["tok"], image_preprocessor_for(saved["model"], saved["model_dir"]),
                    generator=gen)
    out = []
    for img, q in zip(saved["images"], QUESTIONS):
        (a,), stats = pipe.answer([img], [q], max_new_tokens=MAX_NEW)
        out.append((a, stats))
    return out


