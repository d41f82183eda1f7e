"""twig-jax train never loses a user's work and never silently does the wrong thing: it refuses to
write over models and inputs, saves and exits cleanly on SIGINT / SIGTERM, falls back past a
corrupt checkpoint, refuses a resume with other settings, keeps metrics once per step, refuses
empty data, gives a trained twig a pruning budget, exports a whole model with its image
preprocessing and tokenizer, and answers bad input with one line and status 2.

The oracle for every resumed run is one uninterrupted run of the same command (`full_run`)."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from test_train import _flat, _write_dataset
from twig_jax.model.config import load_preset
from twig_jax.model.llava import Llava

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _args(d, ckpt, steps=6, *extra, out: str | None = "default"):
    """The resume test's training command (tiny preset, K=2, T=1, batch 2, every 3, keep 2)."""
    args = ["--data", os.path.join(d, "data.json"), "--images", d, "--base-preset", "tiny", "--tokenizer",
            os.path.join(d, "tokenizer.json"), "--max-len", "64", "--steps", str(steps), "--batch", "2",
            "--twig-k", "2", "--twig-t", "1", "--lr", "1e-3", "--every", "3", "--keep", "2", "--no-progress"]
    if ckpt is not None:
        args += ["--ckpt-dir", ckpt]
    if out == "default":
        out = os.path.join(ckpt, "twig")
    if out is not None:
        args += ["--out", out]
    return args + list(extra)


def _main(argv):
    from twig_jax.cli.train import main

    return main(argv)


def _train_all(argv):
    """argv as a --train-all run (no twig flags)."""
    out = []
    for a, b in zip(argv, argv[1:] + [""]):
        if out and out[-1] in ("--twig-k", "--twig-t"):
            out.pop()
            continue
        out.append(a)
    return out + ["--train-all"]


def _with_base(argv, base_dir):
    """argv with --base-preset tiny replaced by --base base_dir (the tokenizer stays --tokenizer's)."""
    i = argv.index("--base-preset")
    return argv[:i] + ["--base", base_dir] + argv[i + 2:]


def _metrics(ckpt):
    with open(os.path.join(ckpt, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _same_metrics(a, b):
    """Same steps, data and losses (timings differ)."""
    keys = ("step", "indices", "loss", "ce", "pred_kl", "grad_norm", "lr", "tokens")
    return [{k: r.get(k) for k in keys} for r in a] == [{k: r.get(k) for k in keys} for r in b]


def _assert_same_twig(dir_a, dir_b):
    from twig_jax.twig.io import load_twig

    fa, fb = _flat(nnx.state(load_twig(dir_a))), _flat(nnx.state(load_twig(dir_b)))
    assert fa.keys() == fb.keys()
    for k in fa:
        assert np.array_equal(fa[k], fb[k]), k


def _one_error_line(err: str, prog: str = "twig-jax train") -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _tree_bytes(path) -> dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("data"))
    _write_dataset(d)
    return d


@pytest.fixture(scope="module")
def full_run(world, tmp_path_factory):
    """6 uninterrupted steps: checkpoints 3 and 6, metrics, the exported twig."""
    full = str(tmp_path_factory.mktemp("full") / "run")
    assert _main(_args(world, full)) == 0
    return full


@pytest.fixture(scope="module")
def converted_base(tmp_path_factory, world):
    """A converted tiny base (weights of seed 5) with a tokenizer and a non-default image preprocessing."""
    from transformers import PreTrainedTokenizerFast

    from twig_jax.convert.llava import save_converted_model

    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(world, "tokenizer.json"), bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    d = save_converted_model(Llava(load_preset("tiny"), rngs=nnx.Rngs(5)),
                             str(tmp_path_factory.mktemp("base") / "model"), tok)
    pre = {"crop_size": {"height": 28, "width": 28}, "size": {"shortest_edge": 28}, "do_center_crop": True,
           "do_normalize": True, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
           "do_convert_rgb": True, "resample": 3, "image_mean": [0.2, 0.3, 0.4], "image_std": [0.5, 0.25, 0.125],
           "image_processor_type": "CLIPImageProcessor"}
    with open(os.path.join(d, "preprocessor_config.json"), "w") as f:
        json.dump(pre, f)
    return d


# ---------------------------------------------------------------------------- 1: where --out may write


def test_train_out_never_writes_over_a_model_or_an_input(world, converted_base, tmp_path, capsys):
    """--out onto the base dir (even with --force), a folder holding it, a Hugging Face model dir,
    the checkpoint dir or the data folder (even with --force): exit 2 with one line naming why,
    before anything is trained, and every byte of them is still there."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "llava"}')
    (hf / "model.safetensors").write_bytes(b"weights of someone else's model")
    before = {p: _tree_bytes(p) for p in (converted_base, str(hf), world)}
    ckpt = str(tmp_path / "ck")
    cases = [
        (_with_base(_args(world, ckpt, 2, "--force", out=converted_base), converted_base), ("--base",)),
        (_with_base(_args(world, ckpt, 2, out=converted_base), converted_base), ("--base",)),
        (_with_base(_args(world, ckpt, 2, out=os.path.dirname(converted_base)), converted_base), ("--base",)),
        (_args(world, ckpt, 2, out=str(hf)), ("config.json",)),
        (_train_all(_args(world, ckpt, 2, out=str(hf))), ("config.json",)),
        (_args(world, ckpt, 2, out=ckpt), ("--ckpt-dir",)),
        (_args(world, ckpt, 2, "--force", out=world), ("--data", "--images", "--tokenizer")),
    ]
    for argv, named in cases:
        assert _main(argv) == 2, argv
        line = _one_error_line(capsys.readouterr().err)
        assert any(n in line for n in named), line
    for p, files in before.items():
        assert _tree_bytes(p) == files, p
    assert not os.path.exists(ckpt)


# ---------------------------------------------------------------------------- 4 + 6: signals, resume, metrics

# The training command in a fresh process that sends itself `sig` right after optimizer step `at`.
_SIGNAL_AFTER_STEP = """
import os, signal, sys
sys.path.insert(0, {root!r})
from twig_jax.train import trainer
step, calls = trainer.Trainer.step, []
def step_then_signal(self, batch):
    m = step(self, batch)
    calls.append(1)
    if len(calls) == {at}:
        os.kill(os.getpid(), {sig})
    return m
trainer.Trainer.step = step_then_signal
from twig_jax.cli.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_and_sigint_save_and_resume_exactly(world, full_run, tmp_path, monkeypatch, capsys):
    """SIGTERM after step 2 (a preempted VM): a checkpoint at step 2 (not a multiple of --every),
    status 143 and one line. The same command resumes; SIGINT after its step 4 (Ctrl-C): status
    130, checkpoint 4. A simulated kill logged steps 5 and 6 past that checkpoint; the last run
    drops them, logs each step once, plots steps 1..6, and ends bit-identical to the uninterrupted
    run."""
    from twig_jax.train import trainer

    part = str(tmp_path / "part")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    code = _SIGNAL_AFTER_STEP.format(root=ROOT, at=2, sig=int(signal.SIGTERM))
    proc = subprocess.run([sys.executable, "-c", code, *_args(world, part)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "interrupted" in last and "SIGTERM" in last and "step 2" in last and "Traceback" not in proc.stderr
    assert sorted(s for s in os.listdir(part) if s.isdigit()) == ["2"]
    assert not os.path.exists(os.path.join(part, "twig"))  # the run is not finished: nothing exported

    step, calls = trainer.Trainer.step, []

    def step_then_sigint(self, batch):
        m = step(self, batch)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return m

    monkeypatch.setattr(trainer.Trainer, "step", step_then_sigint)
    assert _main(_args(world, part)) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert "resumed" in err and "at step 2" in err
    assert "interrupted" in err.strip().splitlines()[-1] and "SIGINT" in err and "step 4" in err
    assert sorted(s for s in os.listdir(part) if s.isdigit()) == ["3", "4"]  # the regular 3, the interrupted 4 (--keep 2)
    monkeypatch.setattr(trainer.Trainer, "step", step)

    full = _metrics(full_run)
    with open(os.path.join(part, "metrics.jsonl"), "a") as f:  # what a run killed after step 6 left
        for r in full[4:]:
            f.write(json.dumps(dict(r, loss=999.0)) + "\n")
    plotted = []
    monkeypatch.setattr(trainer, "plot_loss", lambda metrics, path: plotted.append([m["step"] for m in metrics]))
    assert _main(_args(world, part)) == 0
    got = _metrics(part)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    assert _same_metrics(got, full)
    assert plotted == [[1, 2, 3, 4, 5, 6]]
    _assert_same_twig(os.path.join(full_run, "twig"), os.path.join(part, "twig"))


def test_a_run_that_would_save_nothing_is_refused(world, capsys):
    assert _main(_args(world, None, 2, out=None)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--ckpt-dir" in line and "--out" in line


# ---------------------------------------------------------------------------- 5: corrupt / foreign checkpoints


def _corrupt(step_dir, how):
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
    biggest = max(files, key=os.path.getsize)
    if how == "truncated":
        with open(biggest, "r+b") as f:
            f.truncate(os.path.getsize(biggest) // 2)
    elif how == "random":
        size = os.path.getsize(biggest)
        with open(biggest, "wb") as f:
            f.write(np.random.default_rng(0).bytes(size))
    else:  # broken metadata
        with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
            f.write('{"tree_metadata": ')


@pytest.mark.parametrize("how", ["truncated", "random", "metadata"])
def test_corrupt_latest_checkpoint_falls_back_to_the_newest_intact_one(world, full_run, tmp_path, capsys, how):
    """Step 6 damaged: one line names it and why, the run resumes from step 3 and its step 4 is
    the uninterrupted run's step 4."""
    part = str(tmp_path / "run")
    shutil.copytree(full_run, part, ignore=shutil.ignore_patterns("twig"))
    _corrupt(os.path.join(part, "6"), how)
    assert _main(_args(world, part, 6, "--stop-at", "4")) == 0
    err = capsys.readouterr().err
    skipped = [line for line in err.splitlines() if "skipped checkpoint step 6" in line]
    assert len(skipped) == 1 and "corrupt" in skipped[0], err
    assert "Traceback" not in err and "TensorStore" not in err.replace(skipped[0], "")
    assert "at step 3" in err
    got = _metrics(part)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert _same_metrics(got, _metrics(full_run)[:4])


def test_no_intact_checkpoint_is_one_line(world, full_run, tmp_path, capsys):
    part = str(tmp_path / "run")
    shutil.copytree(full_run, part, ignore=shutil.ignore_patterns("twig"))
    for s in ("3", "6"):
        _corrupt(os.path.join(part, s), "truncated")
    assert _main(_args(world, part)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "no intact checkpoint" in line and "step 6" in line and "step 3" in line
    assert sorted(s for s in os.listdir(part) if s.isdigit()) == ["3", "6"]  # left for the user to look at


def test_changed_settings_are_refused_or_recorded(world, full_run, converted_base, tmp_path, capsys):
    """A resume with another --lr is refused naming it; --allow-config-change resumes and records
    the change in the checkpoint's and the export's metadata. A checkpoint of another model (other
    base weights) or another twig depth is refused naming that."""
    part = str(tmp_path / "run")
    shutil.copytree(full_run, part, ignore=shutil.ignore_patterns("twig", "6"))
    assert _main(_args(world, part, 6, "--lr", "2e-3")) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "optim.lr 0.001 -> 0.002" in line and "--allow-config-change" in line
    assert _main(_args(world, part, 6, "--twig-t", "2")) == 2
    assert "twig_T 1 -> 2" in _one_error_line(capsys.readouterr().err)
    assert _main(_with_base(_args(world, part), converted_base)) == 2
    assert "model.weights" in _one_error_line(capsys.readouterr().err)

    assert _main(_args(world, part, 6, "--lr", "2e-3", "--allow-config-change", "--stop-at", "4")) == 0
    err = capsys.readouterr().err
    assert "optim.lr 0.001 -> 0.002" in err
    from twig_jax.train.trainer import Checkpointer

    ck = Checkpointer(part, 1, 3)
    meta = ck.restore_meta(4)
    ck.close()
    assert meta["config_changes"] == [{"step": 3, "changes": {"optim.lr": [0.001, 0.002]}}]
    with open(os.path.join(part, "twig", "training.json")) as f:
        assert json.load(f)["config_changes"] == meta["config_changes"]


# ---------------------------------------------------------------------------- 7: empty data


def test_empty_data_is_an_error_naming_the_file(world, tmp_path, capsys):
    data = tmp_path / "empty.json"
    data.write_text("[]")
    argv = _args(world, str(tmp_path / "ck"))
    argv[argv.index("--data") + 1] = str(data)
    assert _main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(data) in line and "no samples" in line
    assert not os.path.exists(tmp_path / "ck" / "twig")


# ---------------------------------------------------------------------------- 8: the pruning budget


def test_default_pruning_scales_the_papers_budget():
    from twig_jax.twig.config import default_pruning

    assert default_pruning(32, 576, 2) == {"Kf": 24, "R": 41}  # the paper's LLaVA-1.5-7B setting
    assert default_pruning(8, 144, 2) == {"Kf": 6, "R": 10}
    assert default_pruning(4, 16, 2) == {"Kf": 3, "R": 1}
    assert default_pruning(3, 16, 2) == {"Kf": 3, "R": 1}  # Kf clamped into (K, L]
    assert default_pruning(4, 2000, 3) == {"Kf": 4, "R": 142}


def test_trained_twig_prunes_by_default_and_takes_R_and_Kf(world, full_run, tmp_path, capsys):
    from twig_jax.twig.config import default_pruning, resolve_twig_config
    from twig_jax.twig.io import load_twig

    cfg = load_preset("tiny")
    L, N = cfg.text.num_hidden_layers, cfg.num_image_tokens
    tc = load_twig(os.path.join(full_run, "twig")).twig_cfg
    assert (tc.Kf, tc.R) == (default_pruning(L, N, 2)["Kf"], default_pruning(L, N, 2)["R"])
    run = resolve_twig_config(L, N, method="twig", ssd=False, twig_cfg=tc)
    assert run.kept_count(L, N) < N and run.Kf < L  # twig-jax generate --twig DIR prunes

    ck = str(tmp_path / "ck")
    assert _main(_args(world, ck, 1, "--R", "5", "--Kf", "4")) == 0
    tc = load_twig(os.path.join(ck, "twig")).twig_cfg
    assert (tc.R, tc.Kf, tc.K, tc.T) == (5, 4, 2, 1)
    capsys.readouterr()
    for bad, named in ((["--R", "0"], "--R"), (["--R", "17"], "--R"), (["--Kf", "2"], "--Kf"),
                       (["--Kf", "5"], "--Kf"), (["--R", "4", "--train-all"], "--train-all")):
        assert _main(_args(world, str(tmp_path / "ck2"), 1, *bad)) == 2, bad
        assert named in _one_error_line(capsys.readouterr().err), bad


# ---------------------------------------------------------------------------- 11a: --train-all export


def test_train_all_export_keeps_image_preprocessing_and_tokenizer(world, converted_base, tmp_path):
    """The exported model normalises images as training did and carries the base's tokenizer."""
    from PIL import Image

    from twig_jax.convert.llava import load_model
    from twig_jax.data.llava_data import default_image_preprocessor
    from twig_jax.pipeline import image_preprocessor_for, load_tokenizer

    out = str(tmp_path / "trained")
    argv = _train_all(_args(world, str(tmp_path / "ck"), 1, out=out))
    i = argv.index("--base-preset")
    argv[i:i + 4] = ["--base", converted_base]  # and the tokenizer from the base
    assert _main(argv) == 0
    img = str(tmp_path / "x.png")
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(img)
    trained = load_model(out)
    want = default_image_preprocessor(trained.cfg, converted_base)(img)  # what training fed the model
    np.testing.assert_array_equal(image_preprocessor_for(trained, out)(img), want)
    text = "USER: what is in the image ASSISTANT: a red cat"
    assert load_tokenizer(out)(text)["input_ids"] == load_tokenizer(converted_base)(text)["input_ids"]


# ---------------------------------------------------------------------------- 18b: the progress line


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_line_ends_before_warnings_and_counts_real_tokens(monkeypatch):
    """On a terminal, a warning written mid-run starts on a line of its own (the redrawn progress
    line is ended first), and tokens/s counts the batch's real tokens, not its padding."""
    from twig_jax.train.trainer import OptimConfig, TrainConfig, train
    from test_train import _batches

    cfg = load_preset("tiny")
    base = Llava(cfg, rngs=nnx.Rngs(0))
    batches = _batches(cfg, 3, 2)
    for b, lengths in zip(batches, ([20, 24], [22, 21], [24, 19])):
        b["length"] = np.array(lengths, np.int32)

    logger = logging.getLogger("twig_jax.test_progress")

    def data():
        for i, b in enumerate(batches):
            if i == 1:
                logger.warning("a logged warning")
            if i == 2:
                print("WARNING: a bad sample", file=sys.stderr)
            yield b

    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    handler = logging.StreamHandler(term)  # a handler given stderr before training started
    logger.addHandler(handler)
    logger.propagate = False
    try:
        out = train(base, TrainConfig(steps=3, batch_size=2, twig_K=2, twig_T=1, optim=OptimConfig(lr=1e-3)), data(),
                    log=lambda s: print(s, file=sys.stderr))
    finally:
        logger.removeHandler(handler)
    text = term.getvalue()
    assert sys.stderr is term and handler.stream is term
    lines = text.replace("\r", "\n").split("\n")
    assert "WARNING: a bad sample" in lines and "a logged warning" in lines, text  # lines of their own
    assert any("3/3" in line and "loss" in line for line in lines), text  # the progress line ran
    for rec, lengths in zip(out["metrics"], ([20, 24], [22, 21], [24, 19])):
        assert rec["tokens_per_s"] == pytest.approx(sum(lengths) / rec["step_time"])


# ---------------------------------------------------------------------------- bad input: one line, status 2


@pytest.mark.parametrize("change, named", [
    ({"--data": "missing.json"}, "missing.json"),
    ({"--data": "not_json.json"}, "not_json.json"),
    ({"--data": "a_dict.json"}, "a_dict.json"),
    ({"--tokenizer": "missing_tokenizer.json"}, "missing_tokenizer.json"),
    ({"--base-preset": "no-such-preset"}, "no-such-preset"),
    ({"--mesh": "model=2"}, "model"),
    ({"--mesh": "data=1,sequence=2"}, "sequence=2"),
    ({"--accum": "3"}, "3"),
    ({"--steps": "0"}, "--steps"),
    ({"--batch": "0"}, "--batch"),
    ({"--every": "0"}, "--every"),
    ({"--twig-k": "9"}, "9"),
    ({"--init-twig": "missing_twig"}, "missing_twig"),
    ({"--no-such-flag": None}, "--no-such-flag"),
    ({"--steps": "many"}, "many"),
])
def test_bad_input_is_one_line_and_status_2(world, tmp_path, monkeypatch, capsys, change, named):
    (tmp_path / "not_json.json").write_text("[{")
    (tmp_path / "a_dict.json").write_text('{"id": 1}')
    monkeypatch.chdir(tmp_path)
    argv = _args(world, str(tmp_path / "ck"), 2)
    for flag, value in change.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag] + ([value] if value is not None else [])
    assert _main(argv) == 2
    assert named in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("argv, named", [
    (["--base", "no_base", "--twig", "t", "--data", "d.json", "--out", "o"], "no_base"),
    (["--base", "b", "--twig", "t", "--data", "d.json", "--out", "o", "--steps", "x"], "x"),
    (["--base", "b", "--twig", "t", "--data", "d.json"], "--out"),
    (["--base", "b", "--twig", "t", "--data", "d.json", "--out", "t"], "--twig"),
])
def test_train_phead_bad_input_is_one_line_and_status_2(tmp_path, monkeypatch, capsys, argv, named):
    from twig_jax.train.prune_rl import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "t").mkdir()
    assert main(argv) == 2
    assert named in _one_error_line(capsys.readouterr().err, "twig-jax train-phead")


# ---------------------------------------------------------------------------- the P-head command


@pytest.fixture(scope="module")
def phead_world(tmp_path_factory):
    """A tiny random shapes LLaVA (converted dir), a twig (K=1, T=2) and a 4-image training split."""
    from tests.eval.test_eval import _numpy_init, _tiny_model
    from twig_jax.convert.llava import save_converted_model
    from twig_jax.data.shapes import build_tokenizer, generate_dataset
    from twig_jax.twig.config import TwigConfig
    from twig_jax.twig.io import save_twig
    from twig_jax.twig.module import Twig

    root = tmp_path_factory.mktemp("phead")
    generate_dataset(str(root / "data"), 4, 0, seed=3)
    tok = build_tokenizer()
    model = _tiny_model(tok)
    base_dir = save_converted_model(model, str(root / "model"), tok)
    twig = _numpy_init(lambda: Twig(model.cfg.text, TwigConfig(K=1, T=2, Kf=3, R=4), rngs=nnx.Rngs(1)), 1)
    return base_dir, save_twig(twig, str(root / "twig")), str(root / "data")


def test_train_phead_saves_on_sigint(phead_world, tmp_path, monkeypatch, capsys):
    """Ctrl-C during step 2 of 4 (saves every 50): the twig with its P-head of step 2 and its logs
    are saved, one line says so, status 130."""
    from twig_jax.train import prune_rl
    from twig_jax.twig.io import load_twig

    base_dir, twig_dir, data = phead_world
    probs = prune_rl.curriculum_probs

    def probs_then_sigint(step, total, count):
        if step == 1:  # drawn at the start of step 2
            os.kill(os.getpid(), signal.SIGINT)
        return probs(step, total, count)

    monkeypatch.setattr(prune_rl, "curriculum_probs", probs_then_sigint)
    out = str(tmp_path / "rl")
    rc = prune_rl.main(["--base", base_dir, "--twig", twig_dir, "--data", os.path.join(data, "train.json"),
                        "--images", os.path.join(data, "images"), "--out", out, "--steps", "4", "--batch", "2",
                        "--group", "2", "--R", "8", "--eval-records", "0"])
    assert rc == 128 + signal.SIGINT
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "interrupted by SIGINT at step 2 of 4" in last and out in last
    assert load_twig(out).twig_cfg.p_head
    with open(os.path.join(out, "rl_log.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
    with open(os.path.join(out, "rl_config.json")) as f:
        assert json.load(f)["step"] == 2
