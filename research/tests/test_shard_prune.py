"""research/shard_prune.py on the bundled model and the first image of the checked-in mini subset, on
8 simulated devices: the exact keep rule on a sequence-split prompt answers exactly as the
unsharded run (S = 1), the local rule's row is there with its margin, each row's accuracy kept is
its accuracy over the unpruned one, and the keep rule's bytes are keep_sharded.comm_bytes'."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from research.bundle import BUNDLE_DIR, MINI_DIR

pytestmark = pytest.mark.skipif(not os.path.isdir(BUNDLE_DIR), reason=f"no bundled model at {BUNDLE_DIR}")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_shard_prune_table(tmp_path):
    out = tmp_path / "shard_prune.json"
    argv = ["--questions", os.path.join(MINI_DIR, "questions.jsonl"), "--images", os.path.join(MINI_DIR, "images"),
            "--answers", os.path.join(MINI_DIR, "answers.jsonl"), "--limit", "3", "--methods", "twig",
            "--shards", "1,2", "--batch", "8", "--bootstrap", "50", "--max-new-description", "24",
            "--out-json", str(out)]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "research.shard_prune", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = {(r["rule"], r["shards"]): r for r in res["runs"]}
    assert set(rows) == {("exact", 1), ("exact", 2), ("local", 2)}
    assert rows["exact", 2]["same_answers_as_s1"]  # the exact rule keeps the unsharded set: same answers
    for r in rows.values():
        for c, acc in r["accuracy"].items():
            assert r["kept"][c] == pytest.approx(acc / res["unpruned"][c])
    from twig_jax.twig.keep_sharded import comm_bytes
    import jax.numpy as jnp

    want = comm_bytes(1, res["N"], res["R"], 2, jnp.float32, feature_dim=256, heads=8)
    assert rows["exact", 2]["keep_comm_bytes"] == want["top"] > 0
    assert rows["local", 2]["keep_comm_bytes"] == 0
    assert "margin_vs_exact" in rows["local", 2] and "margin_vs_exact" not in rows["exact", 2]
