"""The P-head's RL and AttnKL stages (twig_jax/train/prune_rl.py) on a ("data", "fsdp", "tensor")
mesh: 3 steps on data=2,fsdp=2,tensor=2 (8 simulated CPU devices, one subprocess) equal 3 steps
on a one-device mesh, gates and losses; the frozen base and the batch are really split; a --batch
or --mesh the devices cannot take is one error line.

RL uses the default policy with advantage "mean": the default "std" divides each group's rewards
by their spread (about 0.1 on this random tiny model), so float32 noise that differs between the
layouts (5e-6 in a reward) reaches the loss at 1e-5; the layout code is the same for both."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from tests.conftest import json_from_8_devices

STEPS, BATCH, GROUP, R, KF, LR = 3, 8, 3, 4, 3, 1e-3


def tiny_world():
    """The tiny random shapes LLaVA and twig (K=1, T=2) of tests/twig/test_phead.py's
    tiny_shapes_dirs, with a P-head, and STEPS random batches of BATCH examples."""
    from flax import nnx

    from tests.eval.test_eval import _numpy_init, _tiny_model
    from twig_jax.data.shapes import build_tokenizer
    from twig_jax.twig.config import TwigConfig
    from twig_jax.twig.module import Twig
    from twig_jax.twig.phead import with_p_head

    base = _tiny_model(build_tokenizer())
    twig = _numpy_init(lambda: Twig(base.cfg.text, TwigConfig(K=1, T=2, Kf=KF, R=R), rngs=nnx.Rngs(1)), 1)
    twig = with_p_head(twig, seed=0)
    cfg, rng = base.cfg, np.random.default_rng(0)
    s, n = 32, cfg.num_image_tokens
    batches = []
    for _ in range(STEPS):
        tokens = rng.integers(3, cfg.text.vocab_size, (BATCH, s)).astype(np.int32)
        tokens[tokens == cfg.image_token_index] = 3
        tokens[:, 1:1 + n] = cfg.image_token_index
        mask = np.zeros((BATCH, s), np.int32)
        for i in range(BATCH):  # answers of different lengths
            mask[i, 22 + i % 4:] = 1
        pix = rng.standard_normal((BATCH, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
        batches.append({"tokens": tokens, "label_mask": mask, "pixel_values": pix})
    return base, twig, batches


def run_stages(mesh, base, twig, batches) -> dict:
    """Losses and final gates of STEPS steps of each objective on `mesh`."""
    import jax
    import optax

    from twig_jax.train.prune_rl import make_attn_step, make_rl_step, place_on_mesh

    tx = optax.adam(LR)
    out = {}
    for objective in ("rl", "attn"):
        on, state = place_on_mesh(base, twig, tx, mesh, BATCH)
        if objective == "rl":
            step = make_rl_step(on, KF, tx, GROUP, advantage="mean")
            run = lambda st, b: step(st, b, R=R)  # noqa: E731
        else:
            run = make_attn_step(on, KF, tx, layer=2, rows="last")
        losses = []
        for b in batches:
            state, m = run(state, b)
            losses.append(float(m["loss" if objective == "rl" else "attn_kl"]))
        out[objective] = {"losses": losses,
                          "params": {k: np.asarray(v).tolist() for k, v in jax.device_get(state["params"]).items()}}
        if objective == "rl":
            out["specs"] = {"base wq": str(on.frozen["base"]["text"]["layers"]["wq"].sharding.spec),
                            "gate_q": str(state["params"]["gate_q"].sharding.spec),
                            "tokens": str(on.put(batches[0])["tokens"].sharding.spec)}
    return out


def cli_errors() -> dict:
    """The command's stderr and status for a --batch or --mesh the 8 devices cannot take."""
    from twig_jax.train.prune_rl import main

    args = ["--base", "no-base", "--twig", "no-twig", "--data", "no.json", "--out", "no-out"]
    out = {}
    for name, extra in (("batch6 on 2x2x2", ["--batch", "6", "--mesh", "data=2,fsdp=2,tensor=2"]),
                        ("batch4 on data=8", ["--batch", "4"]), ("mesh of 3", ["--mesh", "data=3"])):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(args + extra)
        out[name] = {"rc": rc, "err": err.getvalue()}
    return out


def main_in_subprocess(path: str) -> None:
    import jax

    from twig_jax.parallel.sharding import make_mesh

    assert jax.device_count() == 8
    world = tiny_world()
    result = {"mesh": run_stages(make_mesh("data=2,fsdp=2,tensor=2"), *world),
              "one": run_stages(make_mesh("data=1", devices=jax.devices()[:1]), *world), "cli": cli_errors()}
    with open(path, "w") as f:
        json.dump(result, f)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("phead_mesh") / "result.json")
    return json_from_8_devices("tests.train.test_prune_rl_mesh:main_in_subprocess", path)


@pytest.mark.parametrize("objective", ["rl", "attn"])
def test_three_steps_on_the_mesh_equal_one_device(result, objective):
    mesh, one = result["mesh"][objective], result["one"][objective]
    np.testing.assert_allclose(mesh["losses"], one["losses"], atol=1e-5, rtol=0)
    assert len(set(np.round(one["losses"], 6))) == STEPS  # the gates moved: each step saw new ones
    for k in one["params"]:
        np.testing.assert_allclose(mesh["params"][k], one["params"][k], atol=1e-5, rtol=0, err_msg=k)


def test_the_base_and_the_batch_are_split(result):
    specs = result["mesh"]["specs"]
    assert specs["base wq"] == "P(None, 'fsdp', 'tensor')"
    assert specs["tokens"] == "P(('data', 'fsdp'), None)"
    assert specs["gate_q"] == "P(None, None)"  # no rule matches the P-head's gates: replicated


def test_a_batch_or_mesh_the_devices_cannot_take_is_one_line(result):
    for name, r in result["cli"].items():
        lines = r["err"].strip().splitlines()
        assert r["rc"] == 2 and len(lines) == 1 and lines[0].startswith("twig-jax train-phead: error:"), (name, r)
    assert "--batch 6 is not divisible by the 4 devices" in result["cli"]["batch6 on 2x2x2"]["err"]
    assert "--batch 4 is not divisible by the 8 devices" in result["cli"]["batch4 on data=8"]["err"]
    assert "--mesh data=3" in result["cli"]["mesh of 3"]["err"]
