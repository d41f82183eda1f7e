"""A sequence-sharded pruned prefill equals the unsharded one.

One subprocess with 8 simulated CPU devices runs every case (`sequence_cases`) and reports JSON;
each test compares a run on a mesh with a "sequence" axis of 2, 4 or 8 against the same function
with no mesh (the oracle): `ttp_prefill`'s logits, twig logits, scores and every cache group to
1e-5, the kept indices and the greedy first token exactly, and `TwigGenerator`'s greedy tokens and
SSD statistics exactly. Prompts are 23 tokens (no shard count divides them), a batch holds
prompts of different lengths, and a second model has 17 visual tokens (CLS kept), which no shard
count divides either.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from tests.conftest import json_from_8_devices

MESHES = ("data=2,sequence=2,tensor=2", "data=2,sequence=4", "sequence=8")
# prefill case -> (world, method, score_rows, select); world "n16": 16 visual tokens, "n17": 17
PREFILL_CASES = {"twig": ("n16", "twig", "last", "top"), "twig-n17": ("n17", "twig", "last", "top"),
                 "phead-sample": ("n16", "phead", "last", "sample"), "fastv-text-cover": ("n17", "fastv", "text", "cover")}
# the local keep rule (each of S shards keeps R / S of its block): TTP at R = 4 on sequence=4
LOCAL_CASE, LOCAL_MESH, LOCAL_R = "twig-local", "data=2,sequence=4", 4
# generator case -> (world, method, ssd, spec)
GENERATOR_CASES = {"ttp+chain": ("n17", "twig", True, "chain")}
# Which cases run on which mesh (each is a compile, so TTP runs on every mesh and the rest are
# spread over them): every mesh sees 16 and 17 visual tokens.
ON_MESH = {"data=2,sequence=2,tensor=2": ("twig", "fastv-text-cover"),
           "data=2,sequence=4": ("twig", "ttp+chain"),
           "sequence=8": ("twig", "twig-n17", "phead-sample")}
NEW_TOKENS = 10
PROMPT_LEN = 23  # no shard count divides it


def _world(strategy: str):
    """tiny-gqa (2 kv heads) with 16 visual tokens ("default") or 17 ("full": CLS kept), its twig
    (copies of base layers 1..2) with a P-head, and a batch of three prompts of different lengths."""
    import dataclasses

    from flax import nnx

    from twig_jax.model.config import load_preset
    from twig_jax.model.llava import Llava
    from twig_jax.twig.config import TwigConfig
    from twig_jax.twig.module import init_twig_from_base
    from twig_jax.twig.phead import with_p_head

    cfg = dataclasses.replace(load_preset("tiny-gqa"), vision_feature_select_strategy=strategy)
    model = Llava(cfg, rngs=nnx.Rngs(0))
    n = cfg.num_image_tokens
    twig = with_p_head(init_twig_from_base(model, TwigConfig(K=1, T=2, Kf=3, R=5)), seed=1)
    rng = np.random.default_rng(0)
    prompts = [[1] + rng.integers(3, 250, 2).tolist() + [cfg.image_token_index] * n + rng.integers(3, 250, k).tolist()
               for k in (PROMPT_LEN - n - 3, 1, 2)]  # the longest fills PROMPT_LEN
    v = cfg.vision
    pixels = rng.normal(size=(len(prompts), v.num_channels, v.image_size, v.image_size)).astype(np.float32)
    return model, twig, prompts, pixels


def _prefill_case(model, twig, prompts, pixels, method, score_rows, select, mesh, **settings):
    """ttp_prefill on the padded batch (PROMPT_LEN tokens), jitted, under `mesh` (None: no mesh);
    settings: other TwigConfig fields (R, shard_keep)."""
    import contextlib
    import dataclasses

    import jax
    from flax import nnx

    from twig_jax.decode.prune import make_plan, ttp_prefill

    plan = make_plan(model.cfg, dataclasses.replace(twig.twig_cfg, score_rows=score_rows, select=select, **settings),
                     method)
    s = max(len(p) for p in prompts)
    tokens = np.zeros((len(prompts), s), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    graph, state = nnx.split(model)
    twig_graph, twig_state = nnx.split(twig)

    @jax.jit
    def run(state, twig_state, tokens, lengths, pixels, key):
        pre = ttp_prefill(nnx.merge(graph, state), nnx.merge(twig_graph, twig_state), plan, tokens, lengths,
                          pixels, extra=4, key=key)
        return pre._replace(caches=pre.caches.groups())

    args = (state, twig_state, tokens, lengths, pixels, jax.random.key(3))
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        compiled = run.lower(*args).compile()
        pre = compiled(*args)
    hlo = compiled.as_text()
    caches = {g: {"k": np.asarray(c.k).tolist(), "v": np.asarray(c.v).tolist(), "lengths": np.asarray(c.lengths).tolist()}
              for g, c in pre.caches.items()}
    return {"logits": np.asarray(pre.logits).tolist(), "draft_logits": np.asarray(pre.draft_logits).tolist(),
            "scores": np.asarray(pre.scores).tolist(), "keep": np.asarray(pre.keep).tolist(), "caches": caches,
            "seq_len": s, "all_gathers": hlo.count(" all-gather(") + hlo.count(" all-gather-start(")}


def _generator_case(model, twig, prompts, pixels, method, ssd, spec, mesh):
    import dataclasses

    from twig_jax.decode.generator import TwigGenerator

    cfg = dataclasses.replace(twig.twig_cfg, spec=spec, tree_width=2, tree_depth=3, tree_nodes=5)
    text = PROMPT_LEN - model.cfg.num_image_tokens  # every prompt pads to PROMPT_LEN tokens
    gen = TwigGenerator(model, twig, cfg, method, ssd, mesh=mesh, text_buckets=(text,), prompt_buckets=(64,),
                        new_token_buckets=(NEW_TOKENS,))
    out = gen.generate(prompts, pixels, max_new_tokens=NEW_TOKENS)
    stats = {k: v for k, v in out.stats.items() if k != "per_row"}
    return {"tokens": out.tokens, "keep": out.keep.tolist(), "stats": stats}


def sequence_cases(path: str) -> None:
    """Every case with no mesh and on the meshes of ON_MESH; JSON to `path` (run with 8 devices)."""
    import jax

    from twig_jax.parallel.sharding import make_mesh

    assert jax.device_count() == 8, jax.devices()
    worlds = {"n16": _world("default"), "n17": _world("full")}

    def run(name, mesh):
        if name in PREFILL_CASES:
            world, method, rows, select = PREFILL_CASES[name]
            return _prefill_case(*worlds[world], method, rows, select, mesh)
        world, method, ssd, spec = GENERATOR_CASES[name]
        return _generator_case(*worlds[world], method, ssd, spec, mesh)

    results = {"one": {name: run(name, None) for name in {**PREFILL_CASES, **GENERATOR_CASES}}}
    for mesh_spec, names in ON_MESH.items():
        mesh = make_mesh(mesh_spec)
        results[mesh_spec] = {name: run(name, mesh) for name in names}
    results[LOCAL_MESH][LOCAL_CASE] = _prefill_case(*worlds["n16"], "twig", "last", "top", make_mesh(LOCAL_MESH),
                                                    R=LOCAL_R, shard_keep="local")
    with open(path, "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sequence") / "results.json")
    # LLVM at -O0 halves the compile time of the ~20 executables; oracle and meshes share the flags.
    return json_from_8_devices("tests.decode.test_sequence_prefill:sequence_cases", path, fast_compile=True)


def _pairs(cases):
    return [(mesh, name) for mesh, names in ON_MESH.items() for name in names if name in cases]


@pytest.mark.parametrize("mesh, case", _pairs(PREFILL_CASES))
def test_sharded_prefill_equals_unsharded(results, mesh, case):
    one, sharded = results["one"][case], results[mesh][case]
    shards = int(dict(p.split("=") for p in mesh.split(","))["sequence"])
    assert one["seq_len"] % shards  # the prompt does not split evenly
    if mesh == "sequence=8":  # nothing else to split: a gather means the prompt was split
        assert sharded["all_gathers"] > 0 and one["all_gathers"] == 0
    assert sharded["keep"] == one["keep"]
    for name in ("logits", "draft_logits", "scores"):
        np.testing.assert_allclose(np.array(sharded[name]), np.array(one[name]), atol=1e-5, rtol=0, err_msg=name)
    assert np.argmax(sharded["logits"], -1).tolist() == np.argmax(one["logits"], -1).tolist()  # greedy token
    assert sharded["caches"].keys() == one["caches"].keys() == {"trunk", "twig", "mid", "tail"}
    for group, want in one["caches"].items():
        got = sharded["caches"][group]
        assert got["lengths"] == want["lengths"], group
        for kv, slot_axis in (("k", -1), ("v", -2)):
            a, b = np.array(got[kv]), np.array(want[kv])
            assert a.shape == b.shape, (group, kv)
            # every slot the prompt fills (the sharded run may leave its padding past them: never read)
            filled = np.arange(a.shape[slot_axis]) < one["seq_len"]
            np.testing.assert_allclose(np.compress(filled, a, slot_axis), np.compress(filled, b, slot_axis),
                                       atol=1e-5, rtol=0, err_msg=f"{group}.{kv}")


def test_prefill_cases_are_not_trivial(results):
    """The oracle's keep sets differ across rows and from the first R tokens, so a wrong gather
    or a shard-local top R would show; its rows have different lengths."""
    for case in PREFILL_CASES:
        keep = np.array(results["one"][case]["keep"])
        assert (keep != np.arange(keep.shape[1])).any(), case
        assert len({tuple(k) for k in keep}) > 1, case
        assert len(set(results["one"][case]["caches"]["trunk"]["lengths"])) == 3, case


@pytest.mark.parametrize("mesh, case", _pairs(GENERATOR_CASES))
def test_sharded_generator_equals_unsharded(results, mesh, case):
    one, sharded = results["one"][case], results[mesh][case]
    assert all(len(t) == NEW_TOKENS or t[-1] == 2 for t in one["tokens"])  # ran to the budget or EOS
    assert sharded["tokens"] == one["tokens"]
    assert sharded["keep"] == one["keep"]
    assert sharded["stats"] == one["stats"]  # same rounds, drafts, acceptances


def test_local_keep_takes_r_over_s_from_each_shard(results):
    """shard_keep="local": each of the S shards keeps the top R / S of its own block of visual tokens
    (lower index first), read against numpy on the unsharded run's scores (the scores do not
    depend on R)."""
    scores = np.array(results["one"]["twig"]["scores"])  # [B, N]
    shards = 4
    blocks = scores.reshape(scores.shape[0], shards, -1)  # N = 16: four blocks of 4
    per = LOCAL_R // shards
    top = np.argsort(-blocks, axis=-1, kind="stable")[..., :per]  # [B, S, R / S]
    want = np.sort((top + np.arange(shards)[None, :, None] * blocks.shape[-1]).reshape(scores.shape[0], -1), axis=1)
    got = np.array(results[LOCAL_MESH][LOCAL_CASE]["keep"])
    assert got.tolist() == want.tolist()
    global_top = np.sort(np.argsort(-scores, axis=1, kind="stable")[:, :LOCAL_R], axis=1)
    assert (global_top != want).any()  # the local set is not the global one here: the rule is seen
