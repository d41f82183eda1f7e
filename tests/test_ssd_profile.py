"""infer/ssd_profile.py runs on the bundled model and its figures are consistent with each other
(timings themselves are benchmarks, not test assertions)."""

from __future__ import annotations

import json

from infer import ssd_profile


def test_profile_runs_and_adds_up(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert ssd_profile.main(["--batches", "1", "--repeats", "1", "--new-tokens", "12", "--out-json", str(out)]) == 0
    res = json.loads(out.read_text())
    (row,) = res["rows"]
    delta = res["draft_len"]
    assert row["batch"] == 1
    assert 1 <= row["draft_steps_per_round"] <= delta + 1
    assert 1 <= row["tokens_per_round"] <= delta + 1 and 0 <= row["acceptance"] <= 1
    for k in ("plain_step_ms", "draft_step_ms", "verify_pass_ms", "round_ms"):
        assert row[k] > 0, k
    predicted = row["draft_steps_per_round"] * row["draft_step_ms"] + row["verify_pass_ms"]
    assert abs(row["round_predicted_ms"] - predicted) < 1e-6
    assert abs(row["loop_overhead_ms"] - (row["round_ms"] - predicted)) < 1e-6
    assert abs(row["ssd_speed_cap"] - row["tokens_per_round"] * row["plain_step_ms"] / row["round_ms"]) < 1e-6
    assert "| 1 |" in capsys.readouterr().out
