"""twig_jax.bench.methods as a library: bench_methods on a tiny random model returns one row per
(batch, length, method) with the figures the README table reports; the perfect twig accepts
every draft and emits delta + 1 tokens per full round."""

from __future__ import annotations

import json

import numpy as np
from flax import nnx

from twig_jax.bench.methods import bench_methods, main, make_prompts, markdown_table, table
from twig_jax.model.config import load_preset
from twig_jax.model.llava import Llava
from twig_jax.twig.module import Twig
from twig_jax.twig.config import TwigConfig


def test_bench_methods_rows():
    cfg = load_preset("tiny")
    model = Llava(cfg, rngs=nnx.Rngs(0))
    tc = TwigConfig(K=1, T=1, Kf=3, R=4, draft_len=3)
    twig = Twig(cfg.text, tc, rngs=nnx.Rngs(1))
    prompts, pixels = make_prompts(cfg, 2, 6, 0)  # two prompts: batch 3 cycles them
    rows = bench_methods(model, twig, tc, prompts, pixels, methods=("twig+ssd",), batch_sizes=(1, 3),
                         answer_lengths=(9,), repeats=1, calibration_batch_sizes=(1,), log=None)
    names = [(r["batch"], r["method"]) for r in rows]
    assert names == [(1, "plain"), (1, "twig+ssd"), (1, "cal:perfect"), (1, "cal:round"), (3, "plain"), (3, "twig+ssd")]
    for r in rows:
        assert r["generated_tokens"] == 9 * r["batch"] and r["answer_len"] == 9
        assert r["e2e_s"] > 0 and r["prefill_s"] > 0 and r["speed_vs_plain"] > 0 and r["kv_bytes_per_seq"] > 0
    by = {(r["batch"], r["method"]): r for r in rows}
    assert by[(1, "plain")]["speed_vs_plain"] == 1.0 and "acceptance_rate" not in by[(1, "plain")]
    assert by[(1, "twig+ssd")]["kept_visual_tokens"] == 4 and by[(1, "plain")]["kept_visual_tokens"] == 16
    assert 0 <= by[(3, "twig+ssd")]["acceptance_rate"] <= 1 and by[(3, "twig+ssd")]["tokens_per_round"] >= 1
    perfect = by[(1, "cal:perfect")]
    assert perfect["acceptance_rate"] == 1.0
    assert perfect["tokens_per_round"] == 4.0  # 8 decoded tokens in 2 full rounds of delta + 1
    assert "round_vs_plain_step" in perfect and "decode_speedup_at_paper_acceptance" in by[(1, "cal:round")]
    res = {"rows": rows, "twig": {"K": 1, "T": 1}}
    assert "cal:perfect" in table(res) and markdown_table(rows).count("\n") == len(rows) + 1


def test_bench_command_writes_json(tmp_path):
    out = tmp_path / "b.json"
    assert main(["--config", "tiny", "--methods", "fastv", "--batch-sizes", "1", "--answer-lengths", "3",
                 "--K", "1", "--T", "1", "--Kf", "3", "--R", "4", "--repeats", "1", "--no-calibration",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["complete"] and [r["method"] for r in res["rows"]] == ["plain", "fastv"]
    assert np.isclose(res["rows"][0]["speed_vs_plain"], 1.0)
