"""Decoding on a device mesh equals decoding on one device.

One subprocess with 8 simulated CPU devices runs every case (`mesh_cases`) and reports tokens,
prefill logits and per-device bytes as JSON; the tests compare each mesh run with the single-device
run of the same generator (the oracle), for plain, TTP, P-head, FastV, chain and tree SSD, greedy,
on meshes (8,1,1), (2,1,4), (1,2,4), (2,2,2), with prompts of different lengths.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from tests.conftest import json_from_8_devices

MESHES = ("data=8", "data=2,tensor=4", "fsdp=2,tensor=4", "data=2,fsdp=2,tensor=2")
# (name, method, ssd, spec): each TwigGenerator case runs its pruned prefill and its decoding; the
# first two on every mesh, the others (one-token pruned decoding, FastV) on the last mesh only.
TWIG_CASES = (("ttp+ssd", "twig", True, "chain"), ("phead+tree", "phead", True, "tree"),
              ("ttp", "twig", False, "chain"), ("fastv", "fastv", False, "chain"))
EVERY_MESH = ("plain", "ttp+ssd", "phead+tree")
BUNDLE_MESHES = ("data=2,fsdp=2,tensor=2",)


def _tiny_world():
    from flax import nnx

    from twig_jax.model.config import load_preset
    from twig_jax.model.llava import Llava
    from twig_jax.twig.config import TwigConfig
    from twig_jax.twig.module import init_twig_from_base
    from twig_jax.twig.phead import with_p_head

    cfg = load_preset("tiny")  # 4 kv heads: they split over tensor=4
    model = Llava(cfg, rngs=nnx.Rngs(0))
    n = cfg.num_image_tokens
    rng = np.random.default_rng(0)
    prompts = [[1] + rng.integers(3, 150, 3).tolist() + [cfg.image_token_index] * n + rng.integers(3, 150, k).tolist()
               for k in (2, 9, 5)]
    v = cfg.vision
    pixels = rng.normal(size=(3, v.num_channels, v.image_size, v.image_size)).astype(np.float32)
    twig = with_p_head(init_twig_from_base(model, TwigConfig(K=1, T=1, Kf=cfg.text.num_hidden_layers, R=n // 4)),
                       seed=1)
    return model, twig, prompts, pixels


def _run(gen, prompts, pixels, new_tokens, prefill: bool):
    """tokens, prefill logits [n, V] and per-device bytes of params and caches of one generator
    (prefill: also run the prefill alone, for its logits and caches)."""
    from twig_jax.decode.placement import per_device_bytes

    out = gen.generate(prompts, pixels, max_new_tokens=new_tokens)
    n = len(prompts)
    stats = {k: v for k, v in getattr(out, "stats", {}).items() if k != "per_row"}
    if not prefill:
        return {"tokens": out.tokens, "stats": stats}
    caches, logits = gen.prefill_only(prompts, pixels, new_tokens)
    twig_bytes = per_device_bytes(gen.twig_state)
    return {"tokens": out.tokens, "logits": np.asarray(logits)[:n].tolist(),
            "layer_bytes": per_device_bytes(gen.state["text"]["layers"]),
            "param_bytes": per_device_bytes(gen.state), "twig_bytes": twig_bytes,
            "cache_bytes": per_device_bytes(caches), "copies": gen.layer_weights is not None, "stats": stats}


def mesh_cases(path: str) -> None:
    """Every case on one device and on each mesh; JSON to `path` (run with 8 devices)."""
    import jax

    from twig_jax.decode.generator import Generator, TwigGenerator
    from twig_jax.decode.sampling import SamplingConfig
    from twig_jax.decode.stream import stream_generate
    from twig_jax.parallel.sharding import make_mesh

    assert jax.device_count() == 8, jax.devices()
    model, twig, prompts, pixels = _tiny_world()

    def twig_gen(method, ssd, spec, mesh):
        import dataclasses
        cfg = dataclasses.replace(twig.twig_cfg, spec=spec, tree_width=2, tree_depth=3, tree_nodes=6)
        return TwigGenerator(model, twig, cfg, method, ssd, mesh=mesh)

    results = {}
    for mesh_spec in (None,) + MESHES:
        mesh = None if mesh_spec is None else make_mesh(mesh_spec)
        key = mesh_spec or "one"
        results[key] = {"plain": _run(Generator(model, mesh=mesh), prompts, pixels, 12, True)}
        for name, method, ssd, spec in TWIG_CASES:
            if name in EVERY_MESH or mesh_spec in (None, MESHES[-1]):
                results[key][name] = _run(twig_gen(method, ssd, spec, mesh), prompts, pixels, 12,
                                          prefill=name == "ttp+ssd")
    # sampling on a mesh: each row's draws come from its own key, so a padded batch of another
    # size on the mesh samples what one device samples
    sampled = SamplingConfig(temperature=1.0, top_p=0.9)
    results["sampled"] = {
        key: {"plain": Generator(model, mesh=mesh).generate(prompts, pixels, max_new_tokens=12, sampling=sampled,
                                                           seed=5).tokens,
              "ttp+ssd": twig_gen("twig", True, "chain", mesh).generate(prompts, pixels, max_new_tokens=12,
                                                                       sampling=sampled, seed=5).tokens}
        for key, mesh in (("one", None), ("mesh", make_mesh("data=8")))}
    # streaming on a mesh: the same loop with an ordered host callback per round
    chunks = []
    gen = twig_gen("twig", True, "chain", make_mesh("data=2,fsdp=2,tensor=2"))
    out = stream_generate(gen, prompts[1], pixels[1:2], lambda toks, _: chunks.append(list(toks)), max_new_tokens=12)
    results["stream"] = {"tokens": out.tokens[0], "chunks": sum(chunks, [])}
    results["bundle"] = bundle_cases()
    with open(path, "w") as f:
        json.dump(results, f)


def bundle_cases() -> dict:
    """The bundled shapes model with its trained twig: P-head pruning + chain SSD and plain decoding,
    on one device and on two meshes, loaded straight into its shards."""
    from twig_jax.assets import BUNDLE_DIR
    from twig_jax.decode.generator import make_generator
    from twig_jax.parallel.sharding import make_mesh
    from twig_jax.pipeline import Pipeline, load_bundle
    from twig_jax.data.shapes import render_scene, sample_scene, short_questions

    if not os.path.isdir(BUNDLE_DIR):
        return {}
    rng = np.random.default_rng(3)
    images, questions = [], []
    for i in range(6):
        objects = sample_scene(rng)
        images.append(render_scene(objects, rng))
        questions.append(short_questions(objects, rng)[i % 3][1])
    out = {}
    for mesh_spec in (None,) + BUNDLE_MESHES:
        mesh = None if mesh_spec is None else make_mesh(mesh_spec)
        b = load_bundle(mesh=mesh)
        rows = {}
        for name, ssd in (("phead+ssd", True), ("plain", False)):
            gen = make_generator(b.model, b.twig if ssd else None, ssd=ssd, mesh=mesh)
            answers, _ = Pipeline(b.model, b.tokenizer, b.image_processor, gen).answer(images, questions,
                                                                                      max_new_tokens=24)
            rows[name] = [a.tokens for a in answers]
        out[mesh_spec or "one"] = rows
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mesh") / "results.json")
    return json_from_8_devices("tests.decode.test_mesh:mesh_cases", path)


CASES = [(mesh, case) for mesh in MESHES for case in EVERY_MESH] + \
    [(MESHES[-1], case) for case, *_ in TWIG_CASES if case not in EVERY_MESH]


@pytest.mark.parametrize("mesh,case", CASES)
def test_mesh_equals_one_device(results, mesh, case):
    one, sharded = results["one"][case], results[mesh][case]
    assert sharded["tokens"] == one["tokens"]
    assert all(len(t) == 12 or t[-1] == 2 for t in one["tokens"])  # ran to the budget or EOS
    if "logits" in one:
        np.testing.assert_allclose(np.array(sharded["logits"]), np.array(one["logits"]), atol=1e-5, rtol=0)
    if "ssd" in case or "tree" in case:
        assert sharded["stats"] == one["stats"]  # same rounds, drafts, acceptances


def _axis(mesh: str, name: str) -> int:
    sizes = dict(part.split("=") for part in mesh.split(","))
    return int(sizes.get(name, 1))


@pytest.mark.parametrize("mesh", MESHES)
def test_weights_and_caches_are_sharded(results, mesh):
    one, sharded = results["one"]["ttp+ssd"], results[mesh]["ttp+ssd"]
    assert sharded["twig_bytes"] <= one["twig_bytes"]
    tensor, fsdp = _axis(mesh, "tensor"), _axis(mesh, "fsdp")
    rows = _axis(mesh, "data") * fsdp
    # Decoder weights: every matrix splits over tensor (and its model width over fsdp); only the
    # two norm vectors per layer stay whole.
    from twig_jax.model.config import load_preset

    tc = load_preset("tiny").text
    norms = tc.num_hidden_layers * 2 * tc.hidden_size * 4  # two float32 norm vectors per layer
    assert sharded["layer_bytes"] <= (one["layer_bytes"] - norms) / (tensor * fsdp) + norms
    if tensor * fsdp > 1:
        assert sharded["param_bytes"] < one["param_bytes"] / 2
    else:  # batch-only mesh: every device holds the whole model
        assert sharded["param_bytes"] == one["param_bytes"]
    # Caches: batch over data x fsdp, kv heads over tensor. Three prompts fill a batch bucket of 4 on
    # one device; on a mesh the bucket rounds up to a multiple of data x fsdp.
    batch_one = 4
    batch_mesh = -(-batch_one // rows) * rows
    expected = one["cache_bytes"] * batch_mesh // batch_one // (rows * tensor)
    lengths = 4 * 4 * batch_mesh  # the four groups' int32 [B] lengths, replicated over tensor
    assert expected <= sharded["cache_bytes"] <= expected + lengths
    assert one["copies"] and not sharded["copies"]  # no per-layer duplicate on a mesh
    assert not results[mesh]["plain"]["copies"]


def test_sampling_on_a_mesh(results):
    """Sampled plain decoding and sampled SSD (rejection sampling) with the same seed: the mesh
    (data=8, a batch bucket of 8 rows instead of 4) draws the single-device tokens."""
    one, mesh = results["sampled"]["one"], results["sampled"]["mesh"]
    assert mesh == one
    assert one["plain"] != results["one"]["plain"]["tokens"]  # sampled, not greedy


def test_streaming_on_a_mesh(results):
    assert results["stream"]["chunks"] == results["stream"]["tokens"] == results["one"]["ttp+ssd"]["tokens"][1]


@pytest.mark.parametrize("mesh", BUNDLE_MESHES)
def test_bundled_model_on_a_mesh(results, mesh):
    if not results["bundle"]:
        pytest.skip("no bundled model")
    one = results["bundle"]["one"]
    assert results["bundle"][mesh] == one
