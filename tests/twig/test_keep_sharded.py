"""Keep rules across sequence shards (twig_jax/twig/keep_sharded.py) on 8 simulated CPU devices.

One subprocess runs every case at S = 2, 4, 8 over a 1-D ("sequence",) mesh and returns JSON. The
main process (one device) holds the oracles: the unsharded KEEP_RULES and softmax on the same
inputs, numpy top R / greedy coverage / softmax / per-block top, and the collectives read from
the compiled HLO for the bytes communicated.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twig_jax.twig.keep import KEEP_RULES
from twig_jax.twig.keep_sharded import comm_bytes
from tests.conftest import finish, start_on_8_devices

SHARDS = (2, 4, 8)
KEYS = (7, 8)
R = {32: {"top": 12, "sample": 12, "cover": 5}, 18: {"top": 5, "sample": 5, "cover": 5}}
LOCAL_R = 8  # per block: 4 / 2 / 1 at S = 2 / 4 / 8
HEADS = 4
PADDED = (4, 8)  # the shard counts that do not divide N = 18: the "uneven" case runs at these


def cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (scores [3, N], features [3, N, 8]): three rows with different scores each."""
    rng = np.random.default_rng(0)
    protos = rng.normal(size=(3, 8))
    ties = rng.integers(0, 3, (3, 32)) / 2.0  # a few values, each in every block
    ties[2] = 1.0  # a row of one value: the lowest R indices
    # Three distinct features, each token a copy of one: equal coverage gains within a group, and
    # zero gains once every group has a kept copy. Groups start at 0, 7, 16 (row 0, across block
    # edges), at random (row 1), and rolled by 13 (row 2).
    groups = np.repeat([0, 1, 2], [7, 9, 16])
    groups = np.stack([groups, rng.integers(0, 3, 32), np.roll(groups, 13)])
    return {
        "random": (rng.random((3, 32)), rng.normal(size=(3, 32, 8))),
        "ties": (ties, protos[groups]),
        "uneven": (rng.random((3, 18)), rng.normal(size=(3, 18, 8))),  # N = 18: padded at S = 4, 8
    }


def phead_logits() -> np.ndarray:  # [3, H, 18]
    return (3.0 * np.random.default_rng(1).normal(size=(3, HEADS, 18))).astype(np.float32)


def hlo_comm_bytes(hlo: str, s: int, trips: int) -> float:
    """Bytes each device receives by the collectives of compiled HLO with ring algorithms (an
    all-gather result of M bytes: (S - 1) / S M; an all-reduce of M: 2 (S - 1) / S M); the ones
    in a while body count `trips` times."""
    bodies = set(re.findall(r"body=%([\w.\-]+)", hlo))
    sizes = {"f32": 4, "s32": 4, "bf16": 2, "u32": 4, "pred": 1}
    total, comp = 0.0, ""
    for line in hlo.splitlines():
        if line and not line.startswith((" ", "}")):
            comp = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
        m = re.search(r"= (\w+)\[([\d,]*)\]\S* (all-gather|all-reduce)\(", line)
        if m:
            nbytes = sizes[m[1]] * int(np.prod([int(d) for d in m[2].split(",") if d]))
            total += (s - 1) / s * nbytes * (2 if m[3] == "all-reduce" else 1) * (trips if comp in bodies else 1)
    return total


def run_sharded() -> dict:
    """Every sharded case; runs in the 8-device subprocess."""
    from twig_jax.twig.config import TwigConfigError
    from twig_jax.twig.keep_sharded import exact_keep, local_keep, phead_softmax_scores

    exact = jax.jit(exact_keep, static_argnums=(0, 3), static_argnames=("mesh", "axis"))
    local = jax.jit(local_keep, static_argnums=(1,), static_argnames=("mesh", "axis"))
    softmax = jax.jit(phead_softmax_scores, static_argnames=("mesh", "axis"))
    out: dict = {"devices": jax.device_count()}
    for s in SHARDS:
        mesh = jax.make_mesh((s,), ("sequence",), devices=jax.devices()[:s])
        on = dict(mesh=mesh, axis="sequence")
        for name, (scores, feats) in cases().items():
            args = (jnp.asarray(scores, jnp.float32), jnp.asarray(feats, jnp.float32))
            rules = R[scores.shape[1]].items() if name != "uneven" or s in PADDED else ()
            for rule, r in rules:
                for k in KEYS:
                    out[f"{rule}/{name}/{s}/{k}"] = exact(rule, *args, r, jax.random.key(k), **on).tolist()
            try:
                out[f"local/{name}/{s}"] = local(args[0], LOCAL_R, **on).tolist()
            except TwigConfigError as e:
                out[f"local/{name}/{s}"] = str(e)
        out[f"phead/{s}"] = softmax(phead_logits(), **on).tolist()
        if s == 4:  # the same on a mesh of Auto axes (twig_jax.parallel.sharding's kind)
            auto = dict(mesh=jax.make_mesh((s,), ("sequence",), devices=jax.devices()[:s],
                                           axis_types=(jax.sharding.AxisType.Auto,)), axis="sequence")
            scores, feats = (jnp.asarray(x, jnp.float32) for x in cases()["uneven"])
            out[f"cover/uneven/auto/{KEYS[0]}"] = exact("cover", scores, feats, R[18]["cover"], jax.random.key(KEYS[0]),
                                                        **auto).tolist()
            out["phead/auto"] = softmax(phead_logits(), **auto).tolist()
        scores, feats = (jnp.asarray(x, jnp.float32) for x in cases()["random"])
        key = jax.random.key(0)
        hlo = {rule: exact.lower(rule, scores, feats, r, key, **on).compile().as_text() for rule, r in R[32].items()}
        hlo["local"] = local.lower(scores, LOCAL_R, **on).compile().as_text()
        hlo["phead_softmax"] = softmax.lower(jnp.zeros((3, HEADS, 32)), **on).compile().as_text()
        out[f"hlo_bytes/{s}"] = {rule: hlo_comm_bytes(text, s, R[32]["cover"]) for rule, text in hlo.items()}
        try:
            local(scores, 6, **on)
        except TwigConfigError as e:
            out[f"local_error/{s}"] = str(e)
    return out


def np_top(scores: np.ndarray, r: int) -> np.ndarray:  # [B, R] ascending; lower index first among equals
    return np.sort(np.argsort(-scores, axis=1, kind="stable")[:, :r], axis=1)


def np_cover(scores: np.ndarray, feats: np.ndarray, r: int) -> np.ndarray:  # [B, R], float64 greedy
    f = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
    out = []
    for w, sim in zip(scores / scores.sum(1, keepdims=True), np.maximum(np.einsum("bid,bjd->bij", f, f), 0)):
        covered, keep = np.zeros(len(w)), []
        for _ in range(r):
            gain = np.maximum(sim - covered[None], 0) @ w
            gain[keep] = -1
            keep.append(int(np.argmax(gain)))  # first maximum: the lowest index
            covered = np.maximum(covered, sim[keep[-1]])
        out.append(sorted(keep))
    return np.array(out)


def np_local(scores: np.ndarray, r: int, s: int) -> np.ndarray:  # [B, R]: top r / s of each block
    n_loc = -(-scores.shape[1] // s)
    padded = np.pad(scores, ((0, 0), (0, s * n_loc - scores.shape[1])), constant_values=-np.inf)
    return np.concatenate([np_top(padded[:, i * n_loc:(i + 1) * n_loc], r // s) + i * n_loc for i in range(s)], 1)


def unsharded_keeps() -> dict:
    """KEEP_RULES on one device, every case and key."""
    keep = jax.jit(lambda rule, s, f, r, k: KEEP_RULES[rule].keep(s, f, r, k), static_argnums=(0, 3))
    return {f"{rule}/{name}/{k}": np.asarray(keep(rule, jnp.asarray(s, jnp.float32), jnp.asarray(f, jnp.float32), r,
                                                   jax.random.key(k)))
            for name, (s, f) in cases().items() for rule, r in R[s.shape[1]].items() for k in KEYS}


@pytest.fixture(scope="module")
def runs() -> dict:
    """{"sharded": run_sharded() from the 8-device subprocess, "unsharded": unsharded_keeps() here,
    computed while the subprocess runs}."""
    code = "import json; from tests.twig.test_keep_sharded import run_sharded; print('RESULT', json.dumps(run_sharded()))"
    proc = start_on_8_devices(code)
    unsharded = unsharded_keeps()
    log = finish(proc)
    out = json.loads(log.split("RESULT ", 1)[1])
    assert out["devices"] == 8 and jax.device_count() == 1
    return {"sharded": out, "unsharded": unsharded}


@pytest.fixture(scope="module")
def sharded(runs) -> dict:
    return runs["sharded"]


@pytest.fixture(scope="module")
def unsharded(runs) -> dict:
    return runs["unsharded"]


def test_ties_straddle_the_cut():
    """The tie case makes the R-th and (R+1)-th scores equal in every row (the tie rule decides)."""
    scores, _ = cases()["ties"]
    ordered = -np.sort(-scores, axis=1)
    assert np.all(ordered[:, R[32]["top"] - 1] == ordered[:, R[32]["top"]])


@pytest.mark.parametrize("name", ["random", "ties", "uneven"])
@pytest.mark.parametrize("rule", ["top", "cover", "sample"])
def test_exact_rules_equal_unsharded(sharded, unsharded, rule, name):
    scores, feats = cases()[name]
    r = R[scores.shape[1]][rule]
    oracle = {"top": lambda: np_top(scores, r), "cover": lambda: np_cover(scores, feats, r), "sample": None}[rule]
    for k in KEYS:
        expected = unsharded[f"{rule}/{name}/{k}"]
        if oracle is not None:
            np.testing.assert_array_equal(expected, oracle(), err_msg="unsharded rule against numpy")
        for s in PADDED if name == "uneven" else SHARDS:
            np.testing.assert_array_equal(np.array(sharded[f"{rule}/{name}/{s}/{k}"]), expected, err_msg=f"S={s} key={k}")
    if name == "uneven" and rule == "cover":
        np.testing.assert_array_equal(np.array(sharded[f"{rule}/uneven/auto/{KEYS[0]}"]), unsharded[f"{rule}/uneven/{KEYS[0]}"])
    if rule == "sample":  # the key matters: another key, another set
        assert not np.array_equal(unsharded[f"sample/{name}/{KEYS[0]}"], unsharded[f"sample/{name}/{KEYS[1]}"])


def test_phead_softmax_equals_unsharded(sharded):
    logits = phead_logits()
    expected = np.asarray(jnp.mean(jax.nn.softmax(jnp.asarray(logits), axis=-1), axis=1))
    e = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(expected, (e / e.sum(-1, keepdims=True)).mean(1), atol=1e-6, rtol=0)
    for s in (*SHARDS, "auto"):
        np.testing.assert_allclose(np.array(sharded[f"phead/{s}"]), expected, atol=1e-6, rtol=0, err_msg=f"S={s}")


@pytest.mark.parametrize("name", ["random", "ties", "uneven"])
def test_local_rule_is_per_block_top(sharded, name):
    scores, _ = cases()[name]
    for s in SHARDS:
        got = sharded[f"local/{name}/{s}"]
        n_loc = -(-scores.shape[1] // s)
        if scores.shape[1] - (s - 1) * n_loc < LOCAL_R // s:  # N = 18, S = 8: the last blocks are all padding
            assert "R=8" in got and "S=8" in got and "N=18" in got, got
            continue
        got = np.array(got)
        assert got.shape == (3, LOCAL_R)
        assert np.all(np.diff(got, axis=1) > 0)  # ascending, distinct
        assert np.all(np.bincount(got.ravel() // n_loc, minlength=s) == 3 * LOCAL_R // s)  # R / S per block
        np.testing.assert_array_equal(got, np_local(scores, LOCAL_R, s), err_msg=f"S={s}")


def test_local_rule_needs_r_divisible_by_s(sharded):
    for s in (4, 8):  # R = 6 divides over S = 2, not over 4 or 8
        msg = sharded[f"local_error/{s}"]
        assert "R=6" in msg and f"S={s}" in msg, msg
    assert "local_error/2" not in sharded


def test_comm_bytes_match_the_compiled_collectives(sharded):
    b, n = cases()["random"][0].shape
    for s in SHARDS:
        model = comm_bytes(b, n, R[32]["top"], s, np.float32, feature_dim=8, heads=HEADS)
        cover = comm_bytes(b, n, R[32]["cover"], s, np.float32, feature_dim=8, heads=HEADS)["cover"]
        hlo = sharded[f"hlo_bytes/{s}"]
        assert hlo["local"] == model["local"] == 0
        for rule, expected in {**model, "cover": cover}.items():
            assert hlo[rule] == pytest.approx(expected, abs=1), (s, rule)
    assert comm_bytes(3, 32, 32, 4, np.float32, feature_dim=8, heads=HEADS)["top"] == 0  # R = N: nothing to choose
