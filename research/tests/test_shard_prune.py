"""research/shard_prune.py on the bundled model and the first image of the checked-in mini subset, on
8 simulated devices: the exact keep rule on a sequence-split prompt answers exactly as the
unsharded run (S = 1), the local rule's row is there with its margin, each row's accuracy kept is
its accuracy over the unpruned one, and the keep rule's bytes are keep_sharded.comm_bytes'."""

from __future__ import annotations

import json
import os

import pytest

from research.bundle import BUNDLE_DIR, MINI_DIR
from tests.conftest import finish, start_on_8_devices

pytestmark = pytest.mark.skipif(not os.path.isdir(BUNDLE_DIR), reason=f"no bundled model at {BUNDLE_DIR}")


def test_shard_prune_table(tmp_path):
    out = tmp_path / "shard_prune.json"
    argv = ["--questions", os.path.join(MINI_DIR, "questions.jsonl"), "--images", os.path.join(MINI_DIR, "images"),
            "--answers", os.path.join(MINI_DIR, "answers.jsonl"), "--limit", "3", "--methods", "twig",
            "--shards", "1,2", "--batch", "8", "--bootstrap", "50", "--max-new-description", "24",
            "--out-json", str(out)]
    finish(start_on_8_devices(f"import sys; from research.shard_prune import main; sys.exit(main({argv!r}))"))
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
