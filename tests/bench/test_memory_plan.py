"""The memory plan (twig_jax/bench/memory_plan.py) against the bytes the generators really hold.

The plan is made here, in the one-device pytest process, for meshes of 8 devices that do not
exist here; one subprocess with 8 simulated CPU devices builds `Generator` / `TwigGenerator` on
those meshes, runs their prefill at the same padded shapes and reports `per_device_bytes` of the
parameters and of every KV-cache group (the oracle). The single-device case runs in-process.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
import pytest

from twig_jax.bench.memory_plan import GIB, plan_memory
from twig_jax.cli.main import main as cli_main
from twig_jax.decode.variants import parse_variant
from twig_jax.model.config import load_preset
from tests.conftest import finish, start_on_8_devices

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PRESET = "tiny-gqa"  # 2 kv heads: kept on tensor=2, dropped (replicated) on tensor=4
BATCH, NEW_TOKENS, TEXT = 8, 5, (4, 8, 6, 5, 7, 4, 3, 8)  # text tokens per prompt besides the image
# mesh -> variants run on it: plain (Generator) and TwigGenerator with each kind of headroom / group set
CASES = {"data=8": ("plain", "twig+ssd"), "data=2,tensor=4": ("plain", "twig+tree"),
         "data=2,fsdp=2,tensor=2": ("plain", "ssd")}
ONE_DEVICE = ("plain", "fastv")  # bfloat16, in-process


def prompt_len() -> int:
    return load_preset(PRESET).num_image_tokens + max(TEXT)


def random_init(make, seed: int):
    """The module `make()` builds, its parameters drawn with numpy (eager jax.random over 8 devices
    is slow; the values do not matter here)."""
    from flax import nnx

    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)
    return nnx.merge(graphdef, jax.tree.map(
        lambda x: jax.numpy.asarray(0.02 * rng.standard_normal(x.shape), x.dtype), state))


def measure(cases: dict, dtype: str = "float32") -> dict:
    """{mesh: {variant: {"params", "twig_params", "kv": {group: bytes}}}} of generators really built
    and run, for cases {mesh spec (None: one device): variants}."""
    import jax.numpy as jnp
    from flax import nnx

    from twig_jax.bench.memory_plan import default_twig_config
    from twig_jax.decode.generator import Generator, TwigGenerator
    from twig_jax.decode.placement import per_device_bytes
    from twig_jax.model.llava import Llava
    from twig_jax.parallel.sharding import make_mesh
    from twig_jax.twig.config import needs_twig
    from twig_jax.twig.module import Twig

    cfg = load_preset(PRESET)
    dt = getattr(jnp, dtype)
    model = random_init(lambda: Llava(cfg, rngs=nnx.Rngs(0), dtype=dt), 0)
    n = cfg.num_image_tokens
    prompts = [[1] + [cfg.image_token_index] * n + list(range(3, 3 + k)) for k in TEXT]
    v = cfg.vision
    pixels = np.random.default_rng(0).normal(size=(BATCH, v.num_channels, v.image_size, v.image_size))
    out = {}
    for mesh_spec, variants in cases.items():
        mesh = None if mesh_spec is None else make_mesh(mesh_spec)
        for name in variants:
            var = parse_variant(name)
            if name == "plain":
                gen = Generator(model, mesh=mesh)
                groups = {"cache": gen.prefill_only(prompts, pixels, NEW_TOKENS)[0]}
            else:
                tcfg = default_twig_config(cfg, var)
                twig = (random_init(lambda: Twig(cfg.text, tcfg, rngs=nnx.Rngs(1), dtype=dt), 1)
                        if var.ssd or needs_twig(var.method) else None)
                gen = TwigGenerator(model, twig, tcfg, var.method, var.ssd, mesh=mesh)
                groups = gen.prefill_only(prompts, pixels, NEW_TOKENS)[0].groups()
            out.setdefault(mesh_spec, {})[name] = {
                "params": per_device_bytes(gen.state),
                "twig_params": per_device_bytes(gen.twig_state),
                "kv": {g: per_device_bytes(c) for g, c in groups.items()}}
    return out


def planned(mesh_spec: str, variant: str, dtype: str = "float32") -> dict:
    p = plan_memory(load_preset(PRESET), mesh_spec, BATCH, prompt_len(), NEW_TOKENS, parse_variant(variant), dtype)
    return {"params": p.params, "twig_params": p.twig_params, "kv": p.kv}


@pytest.fixture(scope="module")
def measured():
    """{mesh: {variant: bytes}}: one subprocess with 8 CPU devices measures every case in CASES while
    this process measures the one-device cases (key "one device")."""
    code = (f"import sys, json; sys.path[:0] = [{HERE!r}, {ROOT!r}]; from test_memory_plan import measure, CASES; "
            "print('RESULT ' + json.dumps(measure(CASES)))")
    proc = start_on_8_devices(code)
    assert jax.device_count() == 1  # the main pytest process keeps one device
    one = measure({None: ONE_DEVICE}, dtype="bfloat16")[None]
    log = finish(proc)
    line = [x for x in log.splitlines() if x.startswith("RESULT ")][-1]
    return dict(json.loads(line[len("RESULT "):]), **{"one device": one})


@pytest.mark.parametrize("mesh", list(CASES))
def test_plan_equals_generator_bytes_on_8_devices(measured, mesh):
    for variant in CASES[mesh]:
        assert planned(mesh, variant) == measured[mesh][variant], (mesh, variant)
    # the cases really shard: parameters split over tensor (and fsdp), the caches' batch over data
    one = planned("data=1", "plain")
    got = measured[mesh]["plain"]
    assert got["kv"]["cache"] <= one["kv"]["cache"] // 2
    assert (got["params"] < one["params"] / 2) == (mesh != "data=8")
    twig_variant = measured[mesh][CASES[mesh][1]]
    assert set(twig_variant["kv"]) == {"trunk", "twig", "mid", "tail"} and twig_variant["twig_params"] > 0


def test_plan_equals_generator_bytes_on_one_device(measured):
    got = measured["one device"]
    for variant in ONE_DEVICE:
        assert planned("data=1", variant, "bfloat16") == got[variant], variant
    assert set(got["fastv"]["kv"]) == {"trunk", "mid", "tail"} and got["fastv"]["twig_params"] == 0


def test_7b_figures():
    cfg = load_preset("llava-1.5-7b")
    p = plan_memory(cfg, "data=1", 8, 640, 128, parse_variant("plain"))
    # Hugging Face's llava-1.5-7b-hf has 7,063,427,072 parameters; the last CLIP layer and CLIP's
    # post-layernorm (12,598,272) are never run (features come from layer -2) and are not stored.
    assert p.params == 2 * (7_063_427_072 - 12_598_272)
    q = plan_memory(cfg, "data=2,tensor=4", 8, 640, 128, parse_variant("plain"))
    # K and V of 32 layers, 4 of 8 rows, 8 of 32 kv heads, 640 + 128 slots, 128 dims, 2 bytes; lengths
    assert q.kv == {"cache": 2 * 32 * 4 * 8 * 768 * 128 * 2 + 4 * 4}
    # TTP: the decode keeps trunk, mid and tail: a third of plain's KV at the default budget
    t = plan_memory(cfg, "data=2,tensor=4", 8, 640, 128, parse_variant("twig"))
    assert t.prefill_only == ("twig",)
    kept = sum(b for g, b in t.kv.items() if g not in t.prefill_only)
    assert 0.25 < kept / q.kv["cache"] < 0.4


def run_cli(argv, capsys) -> tuple[int, str, str]:
    try:
        code = cli_main(["plan"] + argv)
    except SystemExit as e:  # argparse's usage errors (one line, status 2)
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_plans_7b_without_allocating(tmp_path, capsys):
    live = sum(x.nbytes for x in jax.live_arrays())
    start = time.perf_counter()
    path = str(tmp_path / "plan.json")
    code, out, err = run_cli(["--config", "llava-1.5-7b", "--mesh", "data=1", "data=2,tensor=4", "tensor=8",
                              "--batch", "8", "--prompt-len", "640", "--variant", "plain", "twig",
                              "--json", path], capsys)
    assert code == 0, err
    assert time.perf_counter() - start < 30
    assert sum(x.nbytes for x in jax.live_arrays()) - live < 1 << 20  # nothing of 13 GiB was allocated
    rows = [line.split() for line in out.splitlines() if line.startswith("llava-1.5-7b")]
    assert len(rows) == 6
    # one device: 13.1 GiB of bf16 weights + KV do not fit a 16 GiB v5e; 8 devices with tensor=4 do
    assert rows[0][:2] == ["llava-1.5-7b", "plain"] and rows[0][-2:] == ["no", "fits"]
    assert rows[1][-2:] == ["fits", "fits"]
    with open(path) as f:
        data = json.load(f)
    assert [r["mesh"]["tensor"] for r in data["plans"]] == [1, 4, 8] * 2
    assert data["plans"][0]["fits"] == {"tpu-v5e": False, "h100": True}
    assert 13 < data["plans"][0]["params"] / GIB < 13.2
    code, _, err = run_cli(["--config", "llava-1.5-7b", "--mesh", "data=8", "--json", path], capsys)
    assert code == 2 and "exists" in err  # an existing file needs --force
    assert run_cli(["--config", "llava-1.5-7b", "--mesh", "data=8", "--json", path, "--force"], capsys)[0] == 0


@pytest.mark.parametrize("argv, says", [
    (["--mesh", "data=2,model=4"], "bad mesh entry"),
    (["--mesh", "data=two"], "bad mesh entry"),
    (["--mesh", "data=16"], "does not split"),  # batch 8 over 16 rows
    (["--mesh", "data=2", "--config", "llava-9b"], "no preset"),
    (["--mesh", "data=2", "--variant", "twig+fast"], "variant"),
    (["--mesh", "data=2", "--prompt-len", "100"], "image tokens"),
    (["--mesh", "data=2", "--device", "tpu-v9"], "unknown"),
])
def test_cli_bad_input_is_one_line_exit_2(argv, says, capsys):
    if "--config" not in argv:
        argv = ["--config", "llava-1.5-7b"] + argv
    code, out, err = run_cli(argv, capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and says in err, err
