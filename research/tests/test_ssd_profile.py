"""research/ssd_profile.py runs on the bundled model and its figures are consistent with each other
(timings themselves are benchmarks, not test assertions)."""

from __future__ import annotations

import json
import os

import pytest

from research import ssd_profile
from research.bundle import BUNDLE_DIR


def test_profile_runs_and_adds_up(tmp_path, capsys):
    out = tmp_path / "p.json"
    # Plain step = (time of n+1 tokens - time of 1 token) / n: with float32 weights a step is well under a
    # millisecond here, so n must be large enough for that difference to stand above timing noise.
    assert ssd_profile.main(["--batches", "1", "--repeats", "3", "--new-tokens", "48", "--out-json", str(out)]) == 0
    res = json.loads(out.read_text())
    (row,) = res["rows"]
    delta = res["draft_len"]
    assert row["batch"] == 1
    assert res["dtype"] == "float32"  # the bundle is stored in bfloat16 but run (and timed) in float32
    assert 1 <= row["draft_steps_per_round"] <= delta + 1
    assert 1 <= row["tokens_per_round"] <= delta + 1 and 0 <= row["acceptance"] <= 1
    for k in ("plain_step_ms", "draft_step_ms", "verify_pass_ms", "verify_one_ms", "round_ms"):
        assert row[k] > 0, k
    assert abs(row["verify_over_one"] - row["verify_pass_ms"] / row["verify_one_ms"]) < 1e-9
    predicted = row["draft_steps_per_round"] * row["draft_step_ms"] + row["verify_pass_ms"]
    assert abs(row["round_predicted_ms"] - predicted) < 1e-6
    assert abs(row["loop_overhead_ms"] - (row["round_ms"] - predicted)) < 1e-6
    assert abs(row["ssd_speed_cap"] - row["tokens_per_round"] * row["plain_step_ms"] / row["round_ms"]) < 1e-6
    assert "| 1 |" in capsys.readouterr().out


def test_loader_casts_the_bundle_to_the_run_dtype():
    import jax.numpy as jnp

    from research.speed_table import load_model_and_twig
    from twig_jax.eval.evaluate import DEFAULT_MODEL, DEFAULT_TWIG

    for name in ("float32", "bfloat16"):
        model, _, twig, _, _ = load_model_and_twig(DEFAULT_MODEL, DEFAULT_TWIG, name)
        assert model.text.embed[...].dtype == jnp.dtype(name)
        assert model.text.layers.wq[...].dtype == jnp.dtype(name)
        assert twig.layers.wq[...].dtype == jnp.dtype(name)


def test_speed_table_variants_and_draft_settings(tmp_path, capsys):
    """--variants runs plain plus the asked ones; --draft-len / --theta reach the generators (the
    table's meta and at most draft_len + 1 tokens per round); greedy SSD stays lossless."""
    import json

    import pytest

    from research.speed_table import main

    out = str(tmp_path / "speed.json")
    assert main(["--images", "8", "--batches", "8", "--repeats", "1", "--max-new-tokens", "12",
                 "--variants", "phead+ssd,phead", "--draft-len", "2", "--theta", "0.1", "--out-json", out]) == 0
    with open(out) as f:
        res = json.load(f)
    assert res["meta"]["draft_len"] == 2 and res["meta"]["theta"] == 0.1
    with open(os.path.join(BUNDLE_DIR, "twig", "twig_config.json")) as f:  # the P-head rows' keep-set rule
        assert res["meta"]["phead_select"] == json.load(f)["twig"]["select"]
    assert [r["variant"] for r in res["rows"]] == ["plain", "phead", "phead+ssd"]
    spec = res["rows"][2]
    assert 1 <= spec["mean_tokens_per_round"] <= 3 and spec["same_tokens_as_phead"]
    with pytest.raises(SystemExit):
        main(["--variants", "ssd,bogus"])
    assert "bogus" in capsys.readouterr().err


@pytest.mark.slow  # a benchmark script's smoke test (4 compiles); the padding itself is tested in test_generate
def test_padding_ab_runs_and_adds_up(tmp_path, capsys):
    from research import padding_ab

    out = tmp_path / "pad.json"
    assert padding_ab.main(["--images", "8", "--batches", "8", "--repeats", "1", "--out-json", str(out)]) == 0
    rows = {r["padding"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"text", "whole"}
    assert rows["text"]["prompt_len"] < rows["whole"]["prompt_len"]  # the two paddings really differ
    for r in rows.values():
        assert abs(r["ratio"] - r["spec_tokens_per_s"] / r["plain_tokens_per_s"]) < 1e-9
    assert "| 8 | text |" in capsys.readouterr().out
