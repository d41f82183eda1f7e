"""research/shard_cost.py: bytes communicated and held per device, against hand-worked numbers.

`hlo_comm_bytes` reads a hand-written HLO module (async pairs, tuple results, the three
replica-group forms, nested while loops) in this process, and jitted shard_map programs of known
collectives on 8 simulated CPU devices; `prefill_cost` compiles the tiny-gqa TTP prefill (K = 1,
T = 1) unsharded ("data=8") and split over two "sequence" shards ("data=4,sequence=2"), whose
KV-cache bytes, K/V all-gathers and keep-rule share follow from the shapes. One subprocess runs
every 8-device case (`device_cases`) and reports JSON.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from research.shard_cost import hlo_collectives, hlo_comm_bytes
from tests.conftest import json_from_8_devices

BATCH, PROMPT, NEW = 8, 24, 128  # tiny-gqa: 16 visual tokens, 8 text tokens
K, T, KF, R = 1, 1, 3, 4

HLO = """HloModule handwritten

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%inner_body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %ar = f32[4,8]{1,0} all-reduce(%x), channel_id=1, replica_groups=[2,4]<=[8], use_global_device_ids=true, to_apply=%add
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %ar)
}

%inner_cond (p: (s32[], f32[4,8])) -> pred[] {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

%outer_body (q: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %q = (s32[], f32[4,8]{1,0}) parameter(0)
  %w = (s32[], f32[4,8]{1,0}) while(%q), condition=%inner_cond, body=%inner_body, backend_config={"known_trip_count":{"n":"3"}}
  %y = f32[2,8]{1,0} constant({...})
  %ags = (f32[2,8]{1,0}, f32[8,8]{1,0}) all-gather-start(%y), channel_id=2, replica_groups=mesh['x'=2,'y'=4] {'y'}, dimensions={0}, use_global_device_ids=true
  %agd = f32[8,8]{1,0} all-gather-done(%ags)
  ROOT %r = (s32[], f32[4,8]{1,0}) tuple(%w)
}

ENTRY %main (z: f32[4,8]) -> f32[4,8] {
  %z = f32[4,8]{1,0} parameter(0)
  %o = (s32[], f32[4,8]{1,0}) while(%z), condition=%inner_cond, body=%outer_body, backend_config={"known_induction_variable":{"tuple_index":"0"},"known_trip_count":{"n":"2"}}
  %u = f32[16]{0} constant({...})
  %cps = (f32[16]{0}, f32[16]{0}, u32[], u32[]) collective-permute-start(%u), channel_id=3, source_target_pairs={{0,1},{1,0}}
  %cpd = f32[16]{0} collective-permute-done(%cps)
  %ag = (f32[8]{0}, bf16[16]{0}) all-gather(%u, %u), channel_id=4, replica_groups={{0,1},{2,3},{4,5},{6,7}}, dimensions={0}
  %rs = f32[4]{0} reduce-scatter(%u), channel_id=5, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, to_apply=%add
  %a2a = (f32[2]{0}, f32[2]{0}) all-to-all(%u, %u), channel_id=6, replica_groups={{0,1},{2,3},{4,5},{6,7}}
  %ars = f32[10]{0} all-reduce-start(%u), channel_id=7, replica_groups={}, to_apply=%add
  %ard = f32[10]{0} all-reduce-done(%ars)
  ROOT %g = f32[4,8]{1,0} get-tuple-element(%o), index=1
}
"""


def test_handwritten_hlo():
    # by hand, per device (ring): all-gather (G-1)/G M, all-reduce 2 (G-1)/G M, reduce-scatter (G-1) M,
    # all-to-all (G-1)/G M, collective-permute M; M the result's bytes, G the group size
    inner_all_reduce = 2 * 3 / 4 * (4 * 8 * 4) * 3 * 2  # f32[4,8], groups of 4; 3 inner x 2 outer trips
    start_all_gather = 3 / 4 * (8 * 8 * 4) * 2  # the -start's result part f32[8,8], mesh axis 'y' = 4; 2 trips
    combined_all_gather = 1 / 2 * (8 * 4 + 16 * 2)  # a tuple of f32[8] and bf16[16], pairs
    reduce_scatter = 7 * (4 * 4)  # f32[4], all 8 devices
    all_to_all = 1 / 2 * (2 * 2 * 4)  # two f32[2], pairs
    permute = 16 * 4  # the -start's result part f32[16]
    empty_groups_all_reduce = 2 * 7 / 8 * (10 * 4)  # replica_groups={}: all num_devices = 8
    want = {"all-gather": start_all_gather + combined_all_gather, "all-reduce": inner_all_reduce + empty_groups_all_reduce,
            "reduce-scatter": reduce_scatter, "all-to-all": all_to_all, "collective-permute": permute}
    want = {k: round(v) for k, v in want.items()}
    want["total"] = sum(want.values())
    assert hlo_comm_bytes(HLO, 8) == want
    executions = {c.name: c.executions for c in hlo_collectives(HLO, 8)}
    assert executions == {"ar": 6, "ags": 2, "cps": 1, "ag": 1, "rs": 1, "a2a": 1, "ars": 1}  # -done ops not counted


def known_programs() -> dict:
    """shard_map collectives of known sizes on a (2, 4) mesh ("a", "b"); each device holds [8, 8] f32."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

    def body(x):  # [8, 8]
        gathered = jax.lax.all_gather(x, "b", tiled=True)  # [32, 8]
        summed = jax.lax.psum(x, "a")
        looped = jax.lax.fori_loop(0, 5, lambda i, c: c + jax.lax.psum(c, "b"), x)
        scattered = jax.lax.psum_scatter(x, "b", tiled=True)  # [2, 8]
        swapped = jax.lax.all_to_all(x, "b", 0, 0, tiled=True)
        shifted = jax.lax.ppermute(x, "b", [(i, (i + 1) % 4) for i in range(4)])
        parts = (gathered, summed, looped, scattered, swapped, shifted)
        return jax.lax.psum(sum(p.sum() for p in parts), ("a", "b"))

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("a", "b"), out_specs=P()))
    return hlo_comm_bytes(f.lower(jnp.ones((16, 32), jnp.float32)).compile().as_text(), 8)


def prefill_cases() -> dict:
    from research.shard_cost import prefill_cost
    from twig_jax.model.config import load_preset
    from twig_jax.twig.config import TwigConfig

    cfg = load_preset("tiny-gqa")
    out = {}
    for name, spec, rule in (("s1", "data=8", "exact"), ("s2-exact", "data=4,sequence=2", "exact"),
                             ("s2-local", "data=4,sequence=2", "local")):
        tc = TwigConfig(K=K, T=T, Kf=KF, R=R, shard_keep=rule)
        out[name] = prefill_cost(cfg, tc, "twig", mesh_spec=spec, batch=BATCH, prompt_len=PROMPT, new_tokens=NEW)
    return out


def cli_cases(tmp: str) -> dict:
    from research.shard_cost import main

    paths = [os.path.join(tmp, "cost.json"), os.path.join(tmp, "cost.md")]
    argv = ["--preset", "tiny-gqa", "--image-size", "28", "--shards", "2", "--rules", "local", "--methods", "twig",
            "--out-json", paths[0], "--out-md", paths[1]]
    rc = main(argv)
    try:
        main(argv)  # the files exist now
        again = 0
    except SystemExit as e:
        again = e.code
    with open(paths[0]) as f, open(paths[1]) as g:
        return {"rc": rc, "again": again, "json": json.load(f), "md": g.read()}


def device_cases(path: str) -> None:
    import jax

    out = {"devices": jax.device_count(), "programs": known_programs(), "prefill": prefill_cases(),
           "cli": cli_cases(os.path.dirname(path))}
    with open(path, "w") as f:
        json.dump(out, f)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("shard_cost") / "results.json")
    # LLVM at -O0 shortens the compiles; the HLO passes, and so the collectives, are the same.
    res = json_from_8_devices("research.tests.test_shard_cost:device_cases", path, fast_compile=True)
    assert res["devices"] == 8
    return res


def test_known_programs(results):
    local = np.zeros((8, 8), np.float32).nbytes  # one device's block
    want = {
        "all-gather": 3 / 4 * np.zeros((32, 8), np.float32).nbytes,  # tiled over "b" (4)
        "all-reduce": 2 * 1 / 2 * local  # psum over "a" (2)
        + 5 * 2 * 3 / 4 * local  # psum over "b" in a 5-trip loop
        + 2 * 7 / 8 * np.zeros((), np.float32).nbytes,  # the final scalar over all 8
        "reduce-scatter": 3 * np.zeros((2, 8), np.float32).nbytes,
        "all-to-all": 3 / 4 * local,
        "collective-permute": local,
    }
    want = {k: round(v) for k, v in want.items()}
    want["total"] = sum(want.values())
    assert results["programs"] == want


def kv_gathers(row: dict) -> list[dict]:
    """The all-gathers over the two "sequence" shards whose result is one layer's keys or values
    of the whole prompt for this device's rows: [B / data, Hkv, S, Dh] f32 (tiny-gqa: Hkv 2, Dh 16)."""
    one = (BATCH // 4) * 2 * PROMPT * 16 * 4
    return [c for c in row["collectives"] if c["kind"] == "all-gather" and c["group"] == 2 and c["result_bytes"] == one]


def test_prefill_kv_and_weights(results):
    from twig_jax.decode.prune import make_plan
    from twig_jax.decode.speculative import ssd_extra_slots
    from twig_jax.model.config import load_preset
    from twig_jax.twig.config import TwigConfig

    cfg = load_preset("tiny-gqa")
    plan = make_plan(cfg, TwigConfig(K=K, T=T, Kf=KF, R=R), "twig")
    extra = ssd_extra_slots(plan, NEW)
    slots = {"trunk": PROMPT + extra, "twig": PROMPT + extra, "mid": plan.mid_len(PROMPT) + extra,
             "tail": plan.tail_len(PROMPT) + extra}
    layers = {"trunk": K, "twig": T, "mid": KF - K, "tail": cfg.text.num_hidden_layers - KF}
    for name, rows in (("s1", BATCH // 8), ("s2-exact", BATCH // 4)):  # batch on "data"; whole along length
        kv = {g: 2 * layers[g] * rows * 2 * slots[g] * 16 * 4 + rows * 4 for g in slots}  # K and V, + lengths int32
        assert results["prefill"][name]["kv"] == kv, name
    # fsdp = tensor = 1: every device holds every weight
    s1, s2 = results["prefill"]["s1"], results["prefill"]["s2-exact"]
    assert s1["weights"] == s2["weights"]
    assert s1["weights"]["model"] == 4 * sum(int(np.prod(shape)) for shape in model_shapes(cfg))


def model_shapes(cfg):
    import jax
    from flax import nnx

    from twig_jax.model.llava import Llava

    return [x.shape for x in jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: Llava(cfg, rngs=nnx.Rngs(0)))))]


def test_prefill_communication(results):
    s1, exact, local = (results["prefill"][k] for k in ("s1", "s2-exact", "s2-local"))
    scores = BATCH * 16 * 4  # the whole batch's [B, N] f32 scores
    # unsharded: only small collectives over "data" (all 8 devices), no K/V
    assert all(c["group"] == 8 and c["result_bytes"] <= scores for c in s1["collectives"])
    assert s1["keep_comm"] == 0 and not kv_gathers(s1)
    one = (BATCH // 4) * 2 * PROMPT * 16 * 4
    for row in (exact, local):
        gathers = kv_gathers(row)
        n = sum(c["executions"] for c in gathers)
        # K and V of every trunk and twig layer at least once, at most twice (attention and cache write)
        assert 2 * (K + T) <= n <= 4 * (K + T), n
        kv_received = n * one / 2
        # hlo_comm_bytes adds the collectives up; the K/V gathers are the bulk of the all-gathers
        got = sum(c["executions"] * c["result_bytes"] * (c["group"] - 1) / c["group"]
                  for c in row["collectives"] if c["kind"] == "all-gather")
        assert row["comm"]["all-gather"] == round(got)
        assert kv_received <= got < kv_received + one
    # the keep rule's share: top-R gathers each shard's top min(R, N / S) values (f32) and indices (s32)
    assert exact["keep_comm"] == (2 - 1) * BATCH * min(R, 16 // 2) * (4 + 4)
    in_shard_map = [c for c in exact["collectives"] if "shard_map" in c["op"]]
    assert sum(c["result_bytes"] * (c["group"] - 1) / c["group"] for c in in_shard_map) == exact["keep_comm"]
    assert local["keep_comm"] == 0 and not [c for c in local["collectives"] if "shard_map" in c["op"]]


def test_cli(results):
    cli = results["cli"]
    assert cli["rc"] == 0 and cli["again"] == 2  # an existing output is not replaced without --force
    (row,) = cli["json"]["rows"]
    assert (row["method"], row["rule"], row["shards"], row["mesh"], row["batch"]) == ("twig", "local", 2,
                                                                                      "data=4,sequence=2", 8)
    assert row["visual"] == 16 and row["prompt"] == 1 + 16 + 40 and row["keep_comm"] == 0
    assert cli["md"].startswith("| method | rule | S |") and "| twig | local | 2 | data=4,sequence=2 |" in cli["md"]
