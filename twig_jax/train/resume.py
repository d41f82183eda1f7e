"""Resuming a run: the newest intact checkpoint, the settings it was made with, the metrics log.

A checkpoint's `meta` item records the run's TrainConfig ("config") and what it trained on
("identity": the base model's config and a fingerprint of its weights, and whatever the caller
adds, e.g. the data file's hash). A resume compares both with the run at hand: a difference in a
training setting or in the model is refused unless the caller allows it, and then it is recorded
("config_changes"). Settings of the run itself (RUN_SETTINGS: where it writes, how often, the
mesh, when it stops) may change freely.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Callable, Mapping

import numpy as np

# TrainConfig fields that do not change what is trained: a resume may change them.
RUN_SETTINGS = frozenset({"stop_at", "mesh", "remat", "accum_steps", "ckpt_dir", "save_every", "keep",
                          "metrics_path", "plot_path", "progress", "benchmark"})


class CheckpointError(ValueError):
    """A run's checkpoints cannot be resumed (none intact, or made with other settings); one line."""


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def setting_changes(saved_meta: Mapping[str, Any], config: Mapping[str, Any],
                    identity: Mapping[str, Any]) -> dict[str, list]:
    """{key: [checkpoint's, this run's]} for every training setting (config minus RUN_SETTINGS) and
    identity entry both sides record that differs."""
    before = {**{k: v for k, v in flatten(saved_meta.get("config") or {}).items() if k.split(".")[0] not in RUN_SETTINGS},
              **flatten(saved_meta.get("identity") or {})}
    now = {**{k: v for k, v in flatten(config).items() if k.split(".")[0] not in RUN_SETTINGS},
           **flatten(identity)}
    return {k: [before[k], now[k]] for k in sorted(before.keys() & now.keys()) if before[k] != now[k]}


def describe_changes(changes: Mapping[str, list]) -> str:
    """'optim.lr 0.001 -> 0.002, twig_T 1 -> 2'."""
    return ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items())


def model_identity(model) -> dict[str, Any]:
    """The base model's config, dtype and a fingerprint of its weights: the first and last 64 values
    of every parameter, hashed (cheap for a 7B model, and any other checkpoint differs in them)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    digest = hashlib.sha256()
    dtype = None
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(nnx.state(model))[0], key=lambda kv: str(kv[0])):
        flat = jnp.ravel(leaf)
        if dtype is None and jnp.issubdtype(leaf.dtype, jnp.floating):
            dtype = jnp.dtype(leaf.dtype).name
        ends = np.concatenate([np.asarray(flat[:64], np.float32), np.asarray(flat[-64:], np.float32)])
        digest.update(f"{jax.tree_util.keystr(path)}{tuple(leaf.shape)}".encode())
        digest.update(ends.tobytes())
    return {"config": json.loads(json.dumps(dataclasses.asdict(model.cfg), default=str)), "dtype": dtype,
            "weights": digest.hexdigest()[:16]}


def short_reason(e: BaseException) -> str:
    """The exception in a few words: the type and first line of the error that started it (orbax
    wraps TensorStore's, which says what is wrong with which file), without TensorStore's spec."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.split(" See full TensorStore details")[0].split(" [tensorstore_spec")[0]
    text = re.sub(r' in OCDBT database at local file "[^"]*"', "", text)
    return f"{type(e).__name__}: {text[:240]}" if text else type(e).__name__


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    state: Any
    data_state: dict
    meta: dict
    changes: dict  # {key: [checkpoint's, this run's]} accepted with allow_changes


def restore_newest_intact(ckpt, abstract_state, config: Mapping[str, Any], identity: Mapping[str, Any], *,
                          allow_changes: bool, log: Callable[[str], None]) -> Restored | None:
    """The newest checkpoint in `ckpt` (a trainer.Checkpointer) that restores, or None if there is
    none at all. A damaged newer one is moved aside (ckpt.set_aside) with one line saying which
    and why; when none restores, CheckpointError lists them all and moves nothing. A checkpoint
    made with other settings (setting_changes) raises CheckpointError naming them unless
    allow_changes."""
    skipped = []
    for step in sorted(ckpt.all_steps(), reverse=True):
        try:
            meta = ckpt.restore_meta(step)
        except Exception as e:  # noqa: BLE001 - orbax / tensorstore / json raise many types on damaged files
            skipped.append((step, short_reason(e)))
            continue
        changes = setting_changes(meta, config, identity)
        if changes and not allow_changes:
            raise CheckpointError(f"{ckpt.directory}: checkpoint step {step} was made with other settings: "
                                  f"{describe_changes(changes)} (resume with --allow-config-change, or use another "
                                  "--ckpt-dir)")
        try:
            state, data_state, meta = ckpt.restore(step, abstract_state)
        except Exception as e:  # noqa: BLE001
            if changes:
                raise CheckpointError(f"{ckpt.directory}: checkpoint step {step} does not fit the changed settings "
                                      f"({describe_changes(changes)}): {short_reason(e)}") from None
            skipped.append((step, short_reason(e)))
            continue
        for bad, reason in skipped:
            moved = ckpt.set_aside(bad)
            log(f"skipped checkpoint step {bad}: corrupt ({reason}); moved to {moved}")
        return Restored(step, state, data_state or {}, dict(meta or {}), changes)
    if skipped:
        listed = "; ".join(f"step {s}: {r}" for s, r in skipped)
        raise CheckpointError(f"{ckpt.directory}: no intact checkpoint ({listed}); move them away or use another "
                              "--ckpt-dir")
    return None


def continue_metrics(path: str, step: int) -> list[dict]:
    """Keep the metrics log's records of steps 1..step (the last record of each, in step order) and
    drop the rest (steps a killed run logged past its checkpoint) and unreadable lines; the file is
    rewritten in one rename. Returns the kept records."""
    if not os.path.isfile(path):
        return []
    by_step: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
                s = int(rec["step"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill
            if 1 <= s <= step:
                by_step[s] = rec
    kept = [by_step[s] for s in sorted(by_step)]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)
    return kept


__all__ = ["RUN_SETTINGS", "CheckpointError", "flatten", "setting_changes", "describe_changes", "model_identity",
           "short_reason", "Restored", "restore_newest_intact", "continue_metrics"]
