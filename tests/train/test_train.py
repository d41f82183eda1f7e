"""Twig training: frozen base, optimizer over twig params only, accumulation, sharded == single
device (8 simulated CPU devices in a subprocess), SIGKILL + resume == uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from twig_jax.parallel import sharding as shd
from twig_jax.model.config import load_preset
from twig_jax.model.llava import Llava
from twig_jax.train.trainer import OptimConfig, TrainConfig, Trainer
from tests.conftest import finish, start_on_8_devices

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS = os.path.join(ROOT, "tests", "train")


def _flat(tree) -> dict[str, np.ndarray]:
    return {shd.path_str(kp): np.asarray(jax.device_get(v)) for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _batches(cfg, n, b, s=24, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = rng.integers(3, 200, (b, s)).astype(np.int32)
        tokens[:, 2:2 + cfg.num_image_tokens] = cfg.image_token_index
        mask = np.zeros((b, s), np.int32)
        mask[:, 19:] = 1
        pix = rng.standard_normal((b, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
        out.append({"tokens": tokens, "label_mask": mask, "pixel_values": pix})
    return out


def run_three_steps(mesh: str, out: str | None = None) -> dict[str, np.ndarray]:
    """3 optimizer steps (batch 8, 2 micro-batches) of a K=2, T=1 twig on the tiny preset."""
    cfg = load_preset("tiny")
    base = Llava(cfg, rngs=nnx.Rngs(0))
    tcfg = TrainConfig(steps=3, batch_size=8, accum_steps=2, twig_K=2, twig_T=1, mesh=mesh,
                       optim=OptimConfig(lr=1e-3, warmup_ratio=0.0))
    tr = Trainer(base, tcfg)
    for batch in _batches(cfg, 3, 8):
        tr.step(batch)
    params = _flat(tr.state["params"])
    if out:
        specs = {shd.path_str(kp): str(v.sharding.spec)
                 for kp, v in jax.tree_util.tree_flatten_with_path(tr.state["params"])[0]}
        np.savez(out, **params)
        with open(out + ".specs.json", "w") as f:
            json.dump(specs, f)
    return params


@pytest.fixture(scope="module")
def base():
    return Llava(load_preset("tiny"), rngs=nnx.Rngs(0))


def test_frozen_base_bit_identical_and_optimizer_holds_only_twig(base):
    before = _flat(nnx.state(base))
    tr = Trainer(base, TrainConfig(steps=2, batch_size=2, twig_K=2, twig_T=1, compute_dtype="bfloat16",
                                   optim=OptimConfig(lr=1e-2)))
    twig0 = _flat(tr.state["params"])
    for batch in _batches(base.cfg, 2, 2):
        m = tr.step(batch)
    assert np.isfinite(float(m["loss"]))
    frozen = _flat(tr.frozen)
    assert frozen.keys() == before.keys()
    for k in before:
        assert np.array_equal(frozen[k], before[k]), k  # bit-identical frozen base
    twig1 = _flat(tr.state["params"])
    assert any(not np.array_equal(twig0[k], twig1[k]) for k in twig0)  # the twig learned
    # optimizer state: AdamW moments for exactly the twig's parameters, nothing of the base
    opt = _flat(tr.state["opt_state"])
    big = {k: v for k, v in opt.items() if v.ndim > 0}
    assert sum(v.size for v in big.values()) == 2 * sum(v.size for v in twig0.values())
    for k, v in big.items():
        matches = [p for p in twig0 if k.endswith("/" + p)]
        assert matches and twig0[matches[0]].shape == v.shape, k
    assert not any(k.startswith(("vision", "text", "projector")) for k in twig0)
    assert all(v.dtype == np.float32 for v in twig1.values())  # bf16 compute, fp32 master weights


def test_grad_accumulation_equals_big_batch(base):
    batch = _batches(base.cfg, 1, 4, seed=1)[0]
    got = []
    for a in (1, 2):
        tr = Trainer(base, TrainConfig(steps=1, batch_size=4, accum_steps=a, twig_K=2, twig_T=1))
        got.append(jax.device_get(tr.step(batch)))
    for key in ("loss", "ce", "pred_kl", "grad_norm", "tokens"):
        np.testing.assert_allclose(got[0][key], got[1][key], rtol=2e-5, atol=1e-6, err_msg=key)


def test_train_all(base):
    tr = Trainer(base, TrainConfig(steps=1, batch_size=2, train_all=True, optim=OptimConfig(lr=1e-2)))
    before = _flat(tr.state["params"])
    assert "text/layers/wq" in before and "vision/blocks/wq" in before  # everything trains
    m = tr.step(_batches(base.cfg, 1, 2)[0])
    assert np.isfinite(float(m["loss"])) and float(m["pred_kl"]) == 0.0  # plain LM loss
    after = _flat(tr.state["params"])
    assert not np.array_equal(before["text/layers/wq"], after["text/layers/wq"])


def test_train_all_with_frozen_vision(base):
    """--freeze vision: the tower stays bit-identical and has no optimizer state; the rest trains."""
    before = _flat(nnx.state(base))
    tr = Trainer(base, TrainConfig(steps=2, batch_size=2, train_all=True, freeze=("vision",),
                                   optim=OptimConfig(lr=1e-2)))
    params0 = _flat(tr.state["params"])
    assert params0 and not any(k.startswith("vision") for k in params0)
    assert {k for k in before if not k.startswith("vision")} == params0.keys()
    for batch in _batches(base.cfg, 2, 2):
        m = tr.step(batch)
    assert np.isfinite(float(m["loss"]))
    frozen = _flat(tr.frozen)
    assert frozen.keys() == {k for k in before if k.startswith("vision")}
    for k in frozen:
        assert np.array_equal(frozen[k], before[k]), k
    params1 = _flat(tr.state["params"])
    for k in ("projector/w1", "text/layers/wq", "text/lm_head"):
        assert not np.array_equal(params0[k], params1[k]), k  # projector and language model learned
    opt = {k: v for k, v in _flat(tr.state["opt_state"]).items() if v.ndim > 0}
    assert sum(v.size for v in opt.values()) == 2 * sum(v.size for v in params0.values())  # AdamW mu + nu
    assert not any("vision" in k for k in opt)
    model, _ = tr.trained_modules()  # the merged model has the frozen tower and the trained rest
    merged = _flat(nnx.state(model))
    assert np.array_equal(merged["vision/blocks/wq"], before["vision/blocks/wq"])
    assert np.array_equal(merged["text/layers/wq"], params1["text/layers/wq"])


def test_stop_at_keeps_the_schedule(base):
    """stop_at=2 of a 4-step schedule equals the first 2 steps of the 4-step run (not a 2-step run)."""
    from twig_jax.train.trainer import train

    batches = _batches(base.cfg, 2, 2)
    cfg = TrainConfig(steps=4, batch_size=2, train_all=True, optim=OptimConfig(lr=1e-2, warmup_ratio=0.5))
    full = Trainer(base, cfg)
    lrs = [float(full.step(b)["lr"]) for b in batches]
    out = train(base, dataclasses.replace(cfg, stop_at=2, progress=False), iter(batches + batches))
    assert [m["lr"] for m in out["metrics"]] == pytest.approx(lrs) and len(out["metrics"]) == 2
    assert lrs[1] < 1e-2  # still warming up: a 2-step schedule would be at its peak or decaying
    a, b = _flat(full.state["params"]), _flat(out["trainer"].state["params"])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("freeze, train_all, match", [
    (("tower",), True, "cannot freeze"), (("vision",), False, "train_all"),
    (("vision", "projector", "text"), True, "nothing to train")])
def test_freeze_errors(base, freeze, train_all, match):
    with pytest.raises(ValueError, match=match):
        Trainer(base, TrainConfig(steps=1, batch_size=2, train_all=train_all, freeze=freeze))


def test_sharding_rules():
    mesh = shd.make_mesh("data=1,fsdp=1,tensor=1")
    assert shd.parse_mesh("data=2,fsdp=2,tensor=2") == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError):
        shd.parse_mesh("model=2")
    assert shd.param_logical_axes("text/layers/wq", 3) == ("layers", "embed", "heads")
    assert shd.param_logical_axes("head", 2) == ("embed", "vocab")
    assert shd.logical_to_spec(("batch", None), (4, 3), mesh) == jax.sharding.PartitionSpec(None, None)


def test_sharded_training_equals_single_device(tmp_path):
    out8 = str(tmp_path / "p8.npz")
    code = (f"import sys; sys.path.insert(0, {TESTS!r}); "
            f"from test_train import run_three_steps; run_three_steps('data=2,fsdp=2,tensor=2', {out8!r})")
    proc = start_on_8_devices(code)
    assert jax.device_count() == 1  # the main pytest process keeps one device
    single = run_three_steps("data=1,fsdp=1,tensor=1")
    finish(proc, timeout=600)
    sharded = dict(np.load(out8))
    with open(out8 + ".specs.json") as f:
        specs = json.load(f)
    assert specs["layers/wq"] == "P(None, 'fsdp', 'tensor')"  # really sharded
    assert specs["head"] == "P('fsdp', 'tensor')"
    assert sharded.keys() == single.keys()
    for k in single:
        np.testing.assert_allclose(sharded[k], single[k], atol=1e-5, rtol=0, err_msg=k)


# ---------------------------------------------------------------------------- kill + resume


def _write_dataset(d):
    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from twig_jax.data.preprocess import VICUNA_V1_SYSTEM

    rng = np.random.default_rng(0)
    words = "what is in the image a cat dog red blue big yes no".split()
    recs = []
    for i in range(10):
        q, a = " ".join(rng.choice(words, 3)), " ".join(rng.choice(words, 4))
        r = {"id": f"s{i}", "conversations": [{"from": "human", "value": "<image>\n" + q},
                                               {"from": "gpt", "value": a}]}
        if i % 5 == 4:
            r["conversations"][0]["value"] = q
        else:
            r["image"] = f"{i}.png"
            Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(os.path.join(d, f"{i}.png"))
        recs.append(r)
    recs[6]["image"] = "missing.png"
    with open(os.path.join(d, "data.json"), "w") as f:
        json.dump(recs, f)
    pt = pre_tokenizers.Whitespace()
    ws = {w for w, _ in pt.pre_tokenize_str(VICUNA_V1_SYSTEM + " USER: ASSISTANT: " + " ".join(words))}
    vocab = {s: i for i, s in enumerate(["<pad>", "<s>", "</s>", "<unk>"])}
    for w in sorted(ws):
        vocab[w] = len(vocab)
    vocab["<image>"] = 255  # the tiny preset's image_token_index
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pt
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>", "<image>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(os.path.join(d, "tokenizer.json"))


# The training command in a fresh process; with kill_after=N the process SIGKILLs itself right after
# the checkpoint of step N is committed (fault injection lives here, not in the library).
_TRAIN_IN_SUBPROCESS = """
import os, signal, sys
sys.path.insert(0, {root!r})
from twig_jax.train import trainer
kill_after = {kill_after!r}
if kill_after is not None:
    save = trainer.Checkpointer.save
    def save_then_die(self, step, *args, **kwargs):
        saved = save(self, step, *args, **kwargs)
        if saved and step == kill_after:
            self.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return saved
    trainer.Checkpointer.save = save_then_die
from twig_jax.cli.train import main
sys.exit(main(sys.argv[1:]))
"""


def _train_cmd(d, ckpt, steps, *extra, kill_after=None):
    args = ["--data", os.path.join(d, "data.json"), "--images", d, "--base-preset", "tiny", "--tokenizer",
            os.path.join(d, "tokenizer.json"), "--max-len", "64", "--steps", str(steps), "--batch", "2",
            "--twig-k", "2", "--twig-t", "1", "--lr", "1e-3", "--ckpt-dir", ckpt, "--every", "3", "--keep", "2",
            "--out", os.path.join(ckpt, "twig"), "--no-progress", *extra]
    code = _TRAIN_IN_SUBPROCESS.format(root=ROOT, kill_after=kill_after)
    return [sys.executable, "-c", code, *args]


def _indices(ckpt):
    with open(os.path.join(ckpt, "metrics.jsonl")) as f:
        return [(r["step"], r["indices"]) for r in map(json.loads, f)]


def test_sigkill_resume_equals_uninterrupted(tmp_path):
    from twig_jax.twig.io import load_twig

    d = str(tmp_path)
    _write_dataset(d)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    # The killed and the resumed process share a persistent compilation cache (the resume reuses
    # the killed run's executables).
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    run = lambda cmd: subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True)
    p_kill = run(_train_cmd(d, part, 6, kill_after=3))
    # The uninterrupted run goes in-process (1 device), overlapping the subprocess.
    from twig_jax.cli.train import main

    assert main(_train_cmd(d, full, 6)[3:]) == 0
    log_kill, _ = p_kill.communicate(timeout=600)
    assert p_kill.returncode == -signal.SIGKILL, log_kill
    assert sorted(os.listdir(part)) == ["3", "metrics.jsonl"]  # committed step-3 checkpoint, nothing after
    assert [s for s, _ in _indices(part)] == [1, 2, 3]
    p_resume = run(_train_cmd(d, part, 6))
    log_resume, _ = p_resume.communicate(timeout=600)
    assert p_resume.returncode == 0, log_resume
    assert "resumed from" in log_resume and "at step 3" in log_resume
    assert "missing_image" in log_resume or "missing_image" in log_kill  # the bad sample was reported
    assert os.path.isfile(os.path.join(full, "loss.png"))
    assert _indices(part) == _indices(full)  # identical data order across the kill
    a, b = load_twig(os.path.join(full, "twig")), load_twig(os.path.join(part, "twig"))
    fa, fb = _flat(nnx.state(a)), _flat(nnx.state(b))
    assert fa.keys() == fb.keys()
    for k in fa:
        assert np.array_equal(fa[k], fb[k]), k  # bit-identical parameters
    assert sorted(x for x in os.listdir(part) if x.isdigit()) == ["3", "6"]


# ---------------------------------------------------------------------------- extension point


@dataclasses.dataclass(frozen=True)
class AnswerRow:
    """A DataConfig.extra_fields: the row that predicts the first answer token."""

    field_names: tuple[str, ...] = ("answer_row",)

    def sample_fields(self, record, tokens, label_mask, encoder):
        return {"answer_row": np.int32(np.flatnonzero(label_mask)[0] - 1)}


@dataclasses.dataclass(frozen=True)
class ImageMassAtAnswerRow:
    """A TrainConfig.aux_loss: -log of the head-averaged attention mass that `layer` puts on the
    image from each sample's answer row (samples without an image are left out)."""

    layer: int = 1
    image_token_index: int = 255
    weight: float = 0.5
    metric: str = "image_mass_nll"
    batch_fields: tuple[str, ...] = ("answer_row",)

    @property
    def layers(self):
        return (self.layer,)

    def sums(self, probs, batch):
        import jax.numpy as jnp

        p = probs[0].mean(axis=1)  # [B, S, S]
        row = jnp.take_along_axis(p, batch["answer_row"][:, None, None], axis=1)[:, 0]  # [B, S]
        is_image = (batch["tokens"] == self.image_token_index).astype(jnp.float32)  # [B, S]
        valid = (is_image.sum(-1) > 0).astype(jnp.float32)  # [B]
        nll = -jnp.log(jnp.sum(row * is_image, axis=-1) + 1e-6)  # [B]
        return jnp.sum(nll * valid), jnp.sum(valid)


def test_loader_and_trainer_take_a_custom_extension(tmp_path, base):
    """DataConfig.extra_fields adds its field to every batch; TrainConfig.aux_loss reads it with its
    layer's attention, is logged under its own metric and weighted into the loss, as a numpy
    reference on the same probabilities says; the checks on both sides are generic."""
    from tokenizers import Tokenizer

    from twig_jax.data import CallableTokenizer, DataConfig, make_train_iterator
    from twig_jax.train.trainer import base_forward_with_probs

    d = str(tmp_path)
    _write_dataset(d)
    tok = CallableTokenizer(Tokenizer.from_file(os.path.join(d, "tokenizer.json")))
    cfg = DataConfig(json_path=os.path.join(d, "data.json"), image_dir=d, max_len=64, batch_size=4, seed=0,
                     extra_fields=AnswerRow())
    it, _ = make_train_iterator(cfg, tok, base.cfg)
    batch = next(it)
    assert batch["answer_row"].shape == (4,)
    for i in range(4):
        first = np.flatnonzero(batch["label_mask"][i])[0]
        assert batch["answer_row"][i] == first - 1 and batch["label_mask"][i, first - 1] == 0
    assert batch["has_image"].any() and not batch["has_image"].all()  # both kinds of sample

    aux = ImageMassAtAnswerRow()
    _, (probs,) = base_forward_with_probs(base, batch["tokens"], batch["pixel_values"], (1,))
    probs = np.asarray(probs, np.float64)  # [B, H, S, S]
    want = []
    for i in range(4):
        image = batch["tokens"][i] == 255
        if image.any():
            want.append(-np.log(probs[i].mean(0)[batch["answer_row"][i], image].sum() + 1e-6))
    tr = Trainer(base, TrainConfig(steps=1, batch_size=4, train_all=True, aux_loss=aux, optim=OptimConfig(lr=1e-2)))
    with pytest.raises(ValueError, match=r"needs its fields in the batch, missing \['answer_row'\]"):
        tr.step({k: v for k, v in batch.items() if k != "answer_row"})
    m = jax.device_get(tr.step(batch))
    np.testing.assert_allclose(m["image_mass_nll"], np.mean(want), rtol=1e-5)
    np.testing.assert_allclose(m["loss"], m["ce"] + 0.5 * m["image_mass_nll"], rtol=1e-6)
    assert m["attn_kl"] == 0.0 and len(want) == int(batch["has_image"].sum())

    with pytest.raises(ValueError, match="needs train_all"):
        Trainer(base, TrainConfig(steps=1, batch_size=4, aux_loss=aux))
    with pytest.raises(ValueError, match="taken by a step metric"):
        Trainer(base, TrainConfig(steps=1, batch_size=4, train_all=True,
                                  aux_loss=dataclasses.replace(aux, metric="ce")))
    with pytest.raises(ValueError, match="would replace the sample's"):
        dataclasses.replace(cfg, extra_fields=AnswerRow(field_names=("tokens",))).validate()
    it, _ = make_train_iterator(dataclasses.replace(cfg, extra_fields=AnswerRow(field_names=("row",))), tok, base.cfg)
    with pytest.raises(ValueError, match="declared"):  # a wrong extension stops the run, not skipped samples
        next(it)
