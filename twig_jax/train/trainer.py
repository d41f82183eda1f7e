"""Twig training (TwigVLM stage 1 / TwigVLM++ distillation) and full-model training.

Why the pieces look the way they do:
  * Only trainable parameters enter the optimizer: in twig mode the train state holds the twig's
    nnx.State (params + AdamW moments), and the frozen base is a separate, non-differentiated,
    non-donated argument of the jitted step. `train_all=True` instead trains the whole LLaVA with
    the plain LM loss (training a base from scratch / fine-tuning).
  * The training forward runs stacked layers with `lax.scan` over weight slices (optionally
    rematerialised) and no KV cache: the inference `run_layers` carries a cache through its loop,
    which backprop would have to keep.
  * The frozen trunk (vision, projector, base layers 0..K-1) is computed once per step and shared
    by the twig (student) and the rest of the base (PredKL teacher).
  * Gradient accumulation is a `lax.scan` over micro-batches inside the step, on masked loss
    *sums*, so accumulating A micro-batches gives the same update as one batch of A times the size.
  * Mixed precision: master weights and optimizer state stay float32; with compute_dtype=bfloat16
    the weights are cast inside the loss (so gradients come back float32), logits/loss are float32.
  * Sharding: one ("data", "fsdp", "tensor") mesh; parameter / optimizer-state / batch shardings
    all come from `twig_jax.parallel.sharding`'s single rule table; the step is `jax.jit` with explicit
    in/out shardings and a donated train state.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from twig_jax.parallel import sharding as shd
from twig_jax.progress import Progress
from twig_jax.train.losses import AttentionAuxLoss, LossConfig, LossSums, twig_loss_sums
from twig_jax.model.layers import rope_cos_sin
from twig_jax.model.llama import decoder_layer, scan_layers
from twig_jax.model.llava import Llava
from twig_jax.twig.module import Twig, init_twig_from_base
from twig_jax.twig.config import TwigConfig, default_pruning

# ----------------------------------------------------------------------------------------------
# Configs


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW + linear warmup + cosine decay + global-norm clipping (TwigVLM: lr 1e-4, warmup 3%)."""

    lr: float = 1e-4
    warmup_ratio: float = 0.03
    end_lr_ratio: float = 0.0  # final lr as a fraction of the peak
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 1.0  # <= 0 disables clipping


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100  # optimizer steps (the learning-rate schedule spans these)
    stop_at: int | None = None  # end the run after this step, schedule unchanged (staged training)
    batch_size: int = 8  # global sequences per optimizer step (all processes, all micro-batches)
    accum_steps: int = 1  # micro-batches per optimizer step (lax.scan inside the step)
    train_all: bool = False  # True: train every LLaVA parameter with the LM loss (no twig)
    # train_all only: top-level LLaVA modules ("vision", "projector", "text") that stay frozen (no
    # optimizer state), e.g. ("vision",) as LLaVA keeps its CLIP tower frozen.
    freeze: tuple[str, ...] = ()
    twig_K: int = 2
    twig_T: int = 3
    compute_dtype: str = "float32"  # "bfloat16": bf16 compute, fp32 master weights + optimizer
    remat: bool = False  # rematerialise each layer in the backward pass (saves activation memory)
    mesh: str | None = None  # "data=2,fsdp=2,tensor=2"; None: all devices on "data"
    seed: int = 0
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    # checkpoints
    ckpt_dir: str | None = None
    save_every: int = 100
    keep: int = 3
    # logging
    metrics_path: str | None = None  # JSONL, one line per step
    plot_path: str | None = None  # loss-curve PNG at the end
    progress: bool = True
    benchmark: bool = False
    # train_all only: an extra loss on the base's attention probabilities (its batch fields come
    # from the data pipeline, e.g. DataConfig.extra_fields).
    aux_loss: AttentionAuxLoss | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (checkpoint meta): the auxiliary loss by its repr."""
        d = dataclasses.asdict(dataclasses.replace(self, aux_loss=None))
        d["aux_loss"] = None if self.aux_loss is None else repr(self.aux_loss)
        return d


def compute_dtype_of(name: str):
    try:
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
    except KeyError:
        raise ValueError(f"compute_dtype {name!r} must be float32, bfloat16 or float16") from None


# ----------------------------------------------------------------------------------------------
# Training forward




def _embed(base: Llava, tokens: jax.Array, pixel_values: jax.Array | None, mesh=None) -> jax.Array:  # [B, S, D]
    feats = None if pixel_values is None else base.image_features(pixel_values)  # [B, N, D]
    x = base.embed(tokens, feats)
    return shd.activation_constraint(x, mesh, ("batch", "length", "act_embed"))


def _positions(tokens: jax.Array) -> jax.Array:  # [B, S]
    b, s = tokens.shape
    return jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (b, s))


def twig_forward(base: Llava, twig: Twig, tokens: jax.Array, pixel_values: jax.Array | None, *,
                 teacher: bool = True, remat: bool = False, mesh=None) -> tuple[jax.Array, jax.Array | None]:
    """The twig's logits [B, S, V] (float32) and, if `teacher`, the frozen base's logits.

    base embed + image merge -> base layers 0..K-1 (frozen, stop_gradient) -> twig layers -> twig
    norm + head. The teacher continues the same trunk through base layers K..L-1 and the base head,
    under stop_gradient.
    """
    tc = base.cfg.text
    k = twig.twig_cfg.K
    pos = _positions(tokens)
    x = _embed(base, tokens, pixel_values, mesh)
    base_w = base.text.layers.weights()
    h = jax.lax.stop_gradient(scan_layers(tc, base_w, x, pos, 0, k, remat=remat))  # [B, S, D] enters layer K
    y = scan_layers(tc, twig.layers.weights(), h, pos, 0, twig.layers.num_layers, remat=remat)
    twig_logits = twig.logits(y)  # [B, S, V]
    base_logits = None
    if teacher:
        z = scan_layers(tc, base_w, h, pos, k, tc.num_hidden_layers, remat=remat)
        base_logits = jax.lax.stop_gradient(base.text.logits(z))  # [B, S, V]
    return twig_logits, base_logits


def base_forward(base: Llava, tokens: jax.Array, pixel_values: jax.Array | None, *, remat: bool = False,
                 mesh=None) -> jax.Array:  # [B, S, V]
    """Full LLaVA logits (float32) through the training layer runner."""
    tc = base.cfg.text
    x = _embed(base, tokens, pixel_values, mesh)
    y = scan_layers(tc, base.text.layers.weights(), x, _positions(tokens), 0, tc.num_hidden_layers, remat=remat)
    return base.text.logits(y)


def base_forward_with_probs(base: Llava, tokens: jax.Array, pixel_values: jax.Array | None, layers: Sequence[int], *,
                            remat: bool = False, mesh=None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """base_forward's logits [B, S, V] and, for each of `layers` (in the order given), that layer's
    attention probabilities [B, H, S, S] (the same computation: those layers run on their own,
    the stretches between them scanned)."""
    tc = base.cfg.text
    bad = [l for l in layers if not 0 <= l < tc.num_hidden_layers]
    if bad or not layers:
        raise ValueError(f"attention layers {list(layers)}: each must be a layer of this "
                         f"{tc.num_hidden_layers}-layer model")
    w = base.text.layers.weights()
    pos = _positions(tokens)
    h = _embed(base, tokens, pixel_values, mesh)
    b, s, _ = h.shape
    cos, sin = rope_cos_sin(pos, tc.head_dim, tc.rope_theta, h.dtype)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((s, s), bool))[None], (b, s, s))
    probs, done = {}, 0
    for layer in sorted(set(layers)):
        h = scan_layers(tc, w, h, pos, done, layer, remat=remat)  # [B, S, D] entering `layer`
        h, probs[layer] = decoder_layer(tc, {k: v[layer] for k, v in w.items()}, h, cos, sin, lambda k, v: (k, v), mask,
                                 True)
        done = layer + 1
    y = scan_layers(tc, w, h, pos, done, tc.num_hidden_layers, remat=remat)
    return base.text.logits(y), tuple(probs[l] for l in layers)


# ----------------------------------------------------------------------------------------------
# Model split: trainable vs frozen


@dataclasses.dataclass
class TrainModel:
    """Graph definitions plus the trainable and frozen nnx.States."""

    base_def: Any
    twig_def: Any | None  # None in train_all mode
    trainable: Any  # nnx.State: the twig's (twig mode) or the base's unfrozen modules (train_all)
    frozen: Any  # nnx.State of the base (twig mode) or of its frozen modules (train_all; {} if none)
    train_all: bool

    def modules(self, trainable=None, frozen=None) -> tuple[Llava, Twig | None]:
        trainable = self.trainable if trainable is None else trainable
        frozen = self.frozen if frozen is None else frozen
        if self.train_all:
            return (nnx.merge(self.base_def, trainable, frozen) if frozen else nnx.merge(self.base_def, trainable)), None
        return nnx.merge(self.base_def, frozen), nnx.merge(self.twig_def, trainable)


FREEZABLE = ("vision", "projector", "text")  # the top-level modules of a Llava


def check_freeze(freeze: tuple[str, ...], train_all: bool) -> None:
    """ValueError naming the problem with a `freeze` setting."""
    bad = [n for n in freeze if n not in FREEZABLE]
    if bad:
        raise ValueError(f"cannot freeze {bad}: freezable LLaVA modules are {list(FREEZABLE)}")
    if freeze and not train_all:
        raise ValueError("freeze applies to train_all mode (twig training already freezes the whole base)")
    if set(freeze) == set(FREEZABLE):
        raise ValueError(f"freezing {list(freeze)} leaves nothing to train")


def split_model(base: Llava, twig: Twig | None, train_all: bool, freeze: tuple[str, ...] = ()) -> TrainModel:
    check_freeze(freeze, train_all)
    if train_all:
        if not freeze:
            base_def, base_state = nnx.split(base)
            return TrainModel(base_def, None, base_state, {}, True)
        frozen_filter = lambda path, _: bool(path) and path[0] in freeze  # noqa: E731
        base_def, frozen, trainable = nnx.split(base, frozen_filter, ...)
        return TrainModel(base_def, None, trainable, frozen, True)
    base_def, base_state = nnx.split(base)
    if twig is None:
        raise ValueError("twig training needs a twig (init_twig_from_base)")
    if getattr(twig, "p_head", None) is not None:
        raise ValueError("this twig has a P-head, which twig training does not train (it would only get optimizer "
                         "state): train the twig without one, then its P-head with python -m train.prune_rl")
    twig_def, twig_state = nnx.split(twig)
    return TrainModel(base_def, twig_def, twig_state, base_state, False)


def training_twig_config(base: Llava, K: int, T: int, *, Kf: int | None = None, R: int | None = None) -> TwigConfig:
    """The TwigConfig a twig trained on `base` carries: its shape (K, T) and the pruning budget
    inference uses unless told otherwise: Kf / R as given, else the paper's budget scaled to the
    base (twig.config.default_pruning)."""
    budget = default_pruning(base.cfg.text.num_hidden_layers, base.cfg.num_image_tokens, K)
    return TwigConfig(K=K, T=T, Kf=budget["Kf"] if Kf is None else Kf, R=budget["R"] if R is None else R)


def _cast_floats(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def make_loss_fn(model: TrainModel, cfg: TrainConfig, mesh=None) -> Callable:
    """loss_fn(trainable, frozen, batch) -> (weighted masked sum, LossSums)."""
    cdt = compute_dtype_of(cfg.compute_dtype)
    use_teacher = (not model.train_all) and cfg.loss.alpha != 0.0
    aux = cfg.aux_loss

    def loss_fn(trainable, frozen, batch):
        pix = batch.get("pixel_values")
        probs = None
        if model.train_all:
            base, _ = model.modules(_cast_floats(trainable, cdt), _cast_floats(frozen, cdt))
            if aux is None:
                logits = base_forward(base, batch["tokens"], pix, remat=cfg.remat, mesh=mesh)
            else:
                logits, probs = base_forward_with_probs(base, batch["tokens"], pix, aux.layers, remat=cfg.remat,
                                                        mesh=mesh)
            teacher = None
        else:
            base, twig = model.modules(_cast_floats(trainable, cdt), _cast_floats(frozen, cdt))
            logits, teacher = twig_forward(base, twig, batch["tokens"], pix, teacher=use_teacher,
                                           remat=cfg.remat, mesh=mesh)
        sums = twig_loss_sums(logits, batch["tokens"], batch["label_mask"], cfg.loss, teacher)
        if probs is not None:
            aux_sum, aux_count = aux.sums(probs, batch)
            sums = sums._replace(aux=aux_sum, aux_count=aux_count)
        return sums.total(cfg.loss, aux), sums

    return loss_fn


# ----------------------------------------------------------------------------------------------
# Optimizer, train state, step


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    warmup = int(round(cfg.warmup_ratio * total_steps))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.lr * cfg.end_lr_ratio)
    parts = []
    if cfg.clip_norm and cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    return optax.chain(*parts), schedule


def init_train_state(params, tx) -> dict[str, Any]:
    """{"step", "params", "opt_state"}: everything that changes during training."""
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def train_state_shardings(state_like, mesh) -> dict[str, Any]:
    """Params and optimizer moments by the rule table (moment paths end in the param's path)."""
    return {"step": shd.replicated(mesh),
            "params": shd.param_shardings(state_like["params"], mesh),
            "opt_state": shd.param_shardings(state_like["opt_state"], mesh)}


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def make_train_step(model: TrainModel, cfg: TrainConfig, tx, schedule, mesh=None) -> Callable:
    """The un-jitted step: (state, frozen, batch) -> (state, metrics)."""
    loss_fn = make_loss_fn(model, cfg, mesh)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    a = cfg.accum_steps

    def step(state, frozen, batch):
        params = state["params"]
        if a == 1:
            (_, sums), grads = grad_fn(params, frozen, batch)
        else:
            # Micro-batch j = rows j, j+A, j+2A, ...: a reshape that keeps each device's rows local.
            def split(x):
                x = x.reshape((x.shape[0] // a, a) + x.shape[1:])
                return jnp.moveaxis(x, 1, 0)  # [A, B/A, ...]
            micro = jax.tree.map(split, batch)

            def body(carry, mb):
                g_acc, s_acc = carry
                (_, sums), g = grad_fn(params, frozen, mb)
                return (_tree_add(g_acc, g), _tree_add(s_acc, sums)), None

            zero_sums = LossSums(*(jnp.zeros((), jnp.float32) for _ in LossSums._fields))
            (grads, sums), _ = jax.lax.scan(body, (jax.tree.map(jnp.zeros_like, params), zero_sums), micro)
        n = jnp.maximum(sums.count, 1.0)
        grads = jax.tree.map(lambda g: (g / n).astype(jnp.float32), grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        metrics = dict(sums.means(cfg.loss, cfg.aux_loss))
        metrics.update(grad_norm=optax.tree.norm(grads), lr=schedule(state["step"]), tokens=sums.count)
        return {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}, metrics

    return step


def jit_train_step(step_fn, state_sh, frozen_sh, batch_sh, mesh):
    """jax.jit with explicit shardings; the train state (arg 0) is donated."""
    return jax.jit(step_fn, in_shardings=(state_sh, frozen_sh, batch_sh),
                   out_shardings=(state_sh, shd.replicated(mesh)), donate_argnums=(0,))


def put_batch(batch: dict[str, np.ndarray], shardings: dict[str, Any]) -> dict[str, jax.Array]:
    """Host batch (this process's rows) -> global arrays sharded over ("data", "fsdp")."""
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in batch.items()}


def wants_distributed(mode: str, env) -> bool:
    """Whether to join a multi-process run (--distributed auto|on|off): forced on / off, or
    auto-detected from the environment (JAX_COORDINATOR_ADDRESS, a multi-host TPU slice)."""
    if mode != "auto":
        return mode == "on"
    multi_host_tpu = "," in env.get("TPU_WORKER_HOSTNAMES", "")
    return bool(env.get("JAX_COORDINATOR_ADDRESS")) or multi_host_tpu


STEP_METRICS = ("ce", "pred_kl", "attn_kl", "loss", "grad_norm", "lr", "tokens")  # an auxiliary loss adds its own


def device_batch_keys(batch: dict[str, Any], extra: Sequence[str] = ()) -> dict[str, Any]:
    """The batch fields the step consumes, plus `extra` (ids / bookkeeping stay on the host)."""
    return {k: batch[k] for k in ("tokens", "label_mask", "pixel_values", *extra) if k in batch}


class Trainer:
    """Owns mesh, shardings, optimizer, the jitted step and the train state."""

    def __init__(self, base: Llava, cfg: TrainConfig, twig: Twig | None = None, mesh=None):
        self.cfg = cfg
        if cfg.batch_size % cfg.accum_steps:
            raise ValueError(f"batch_size {cfg.batch_size} not divisible by accum_steps {cfg.accum_steps}")
        check_freeze(cfg.freeze, cfg.train_all)
        if cfg.aux_loss is not None:
            if not cfg.train_all:
                raise ValueError(f"the auxiliary loss {cfg.aux_loss.metric!r} trains the base's attention: "
                                 "it needs train_all")
            if cfg.aux_loss.metric in STEP_METRICS:
                raise ValueError(f"the auxiliary loss's metric name {cfg.aux_loss.metric!r} is taken by a step metric "
                                 f"({list(STEP_METRICS)})")
        self.mesh = mesh if mesh is not None else shd.make_mesh(cfg.mesh)
        shd.check_training_mesh(self.mesh.shape)
        if not cfg.train_all and twig is None:
            twig = init_twig_from_base(base, training_twig_config(base, cfg.twig_K, cfg.twig_T))
        self.model = split_model(base, twig, cfg.train_all, cfg.freeze)
        # Master weights are float32 whatever the checkpoint dtype (a bf16 base gives a bf16 twig).
        self.model.trainable = _cast_floats(self.model.trainable, jnp.float32)
        self.tx, self.schedule = make_optimizer(cfg.optim, cfg.steps)
        abstract = jax.eval_shape(lambda p: init_train_state(p, self.tx), self.model.trainable)
        self.state_sh = train_state_shardings(abstract, self.mesh)
        self.frozen_sh = shd.param_shardings(self.model.frozen, self.mesh)
        self.abstract_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, self.state_sh)
        params = shd.shard_to(self.model.trainable, self.state_sh["params"])
        self.frozen = shd.shard_to(self.model.frozen, self.frozen_sh)
        init = jax.jit(lambda p: init_train_state(p, self.tx), out_shardings=self.state_sh)
        self.state = init(params)
        # Keep only the sharded copies alive (the unsharded ones can be large).
        self.model.trainable = None
        self.model.frozen = self.frozen
        del params
        self._step_fn = make_train_step(self.model, cfg, self.tx, self.schedule, self.mesh)
        self._jitted = None
        self.batch_sh = None

    def compile_for(self, batch: dict[str, np.ndarray]):
        aux = self.cfg.aux_loss
        missing = [] if aux is None else [k for k in aux.batch_fields if k not in batch]
        if missing:
            raise ValueError(f"the auxiliary loss {aux.metric!r} needs its fields in the batch, missing {missing} "
                             "(a DataConfig.extra_fields that adds them)")
        per_process = self.cfg.batch_size // jax.process_count()
        for k, v in batch.items():
            if np.shape(v)[0] != per_process:
                raise ValueError(f"batch field {k!r} has {np.shape(v)[0]} rows, expected {per_process} per process")
        self.batch_sh = {k: shd.batch_sharding(self.mesh, np.ndim(v), self.cfg.batch_size) for k, v in batch.items()}
        self._jitted = jit_train_step(self._step_fn, self.state_sh, self.frozen_sh, self.batch_sh, self.mesh)

    def step(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        batch = device_batch_keys(batch, () if self.cfg.aux_loss is None else self.cfg.aux_loss.batch_fields)
        if self._jitted is None:
            self.compile_for(batch)
        self.state, metrics = self._jitted(self.state, self.frozen, put_batch(batch, self.batch_sh))
        return metrics

    def trained_modules(self) -> tuple[Llava, Twig | None]:
        """The model with the current trainable parameters (on their shardings)."""
        return self.model.modules(self.state["params"], self.frozen)


# ----------------------------------------------------------------------------------------------
# Checkpoints


class Checkpointer:
    """orbax CheckpointManager over three items saved together: the train state (trainable params +
    optimizer state + step), the data-iterator state and a small JSON `meta` (config, bad-sample
    counts). Saves are atomic (orbax writes a tmp dir and renames it on commit)."""

    def __init__(self, directory: str, save_every: int, keep: int):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(directory)
        self.save_every = max(1, int(save_every))
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=self.save_every, create=True)
        self.mngr = ocp.CheckpointManager(self.directory, options=opts, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.mngr.all_steps())

    def restore_meta(self, step: int) -> dict:
        """The `meta` item of a checkpoint alone (cheap: no arrays)."""
        ocp = self._ocp
        return self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def set_aside(self, step: int) -> str:
        """Move a damaged checkpoint out of the step sequence (DIR/corrupt-step-N), kept for a
        look; later saves may then reuse its step number. Returns where it went."""
        src = os.path.join(self.directory, str(step))
        dst, n = os.path.join(self.directory, f"corrupt-step-{step}"), 1
        while os.path.exists(dst):
            dst, n = os.path.join(self.directory, f"corrupt-step-{step}-{n}"), n + 1
        if jax.process_index() == 0:
            os.rename(src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"set_aside {step}")
        self.mngr.reload()
        return dst

    def save(self, step: int, state, data_state: dict | None, meta: dict, *, force: bool = False) -> bool:
        """Save when step is a multiple of save_every (or force); True if a save started."""
        if not force and step % self.save_every:
            return False
        ocp = self._ocp
        return self.mngr.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state if data_state is not None else {}),
            meta=ocp.args.JsonSave(meta)))

    def restore(self, step: int, abstract_state) -> tuple[Any, dict, dict]:
        ocp = self._ocp
        r = self.mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        return r.state, r.data, r.meta

    def wait(self):
        self.mngr.wait_until_finished()

    def close(self):
        self.mngr.wait_until_finished()
        self.mngr.close()


def checkpoint_models(base: Llava, ckpt_dir: str, steps: Sequence[int] | None = None,
                      freeze: tuple[str, ...] = ("vision",)) -> Iterator[tuple[int, Llava]]:
    """(step, model) for checkpoints of a --train-all run that started from `base` with `freeze`
    (the frozen modules come from base, the rest from the checkpoint); steps None: the latest.
    Raises FileNotFoundError at the call, before any restore, when a step was never saved, and
    resume.CheckpointError (one line) for a checkpoint that does not restore."""
    ck = Checkpointer(ckpt_dir, 1, 100)
    have = sorted(ck.mngr.all_steps())
    if not have:
        raise FileNotFoundError(f"no checkpoints in {ckpt_dir}")
    steps = list(steps) if steps is not None else [have[-1]]
    missing = [s for s in steps if s not in have]
    if missing:
        raise FileNotFoundError(f"{ckpt_dir} has no checkpoint for step(s) {missing}; it has {have}")
    trainer = Trainer(base, TrainConfig(steps=1, batch_size=1, train_all=True, freeze=freeze))

    def restore_each():
        from twig_jax.train.resume import CheckpointError, short_reason

        for step in steps:
            try:
                state, _, _ = ck.restore(step, trainer.abstract_state)
            except Exception as e:  # noqa: BLE001 - orbax / tensorstore raise many types on damaged files
                raise CheckpointError(f"{ckpt_dir}: checkpoint step {step} does not restore: {short_reason(e)}") from None
            model, _ = trainer.model.modules(jax.tree.map(jnp.asarray, state["params"]),
                                             jax.tree.map(jnp.asarray, trainer.frozen))
            yield step, model

    return restore_each()


# ----------------------------------------------------------------------------------------------
# FLOPs / benchmark


def measure_matmul_flops(dtype=jnp.float32) -> float:
    """Measured matmul rate (FLOP/s) of one device; the same measurement as the inference
    benchmark's prefill floor (best of jitted 2048^3 and 4096^3 products), so MFU figures compare."""
    from twig_jax.bench.floors import measure_matmul

    return float(measure_matmul(dtype=dtype)["flops_per_s"])


def _layer_flops_per_token(tc, seq: int) -> float:
    """Forward FLOPs of one decoder layer per token: matmuls + attention scores/values."""
    d, i = tc.hidden_size, tc.intermediate_size
    hq, hkv = tc.num_attention_heads * tc.head_dim, tc.num_key_value_heads * tc.head_dim
    matmul = 2 * (d * hq + 2 * d * hkv + hq * d + 3 * d * i)
    attn = 2 * 2 * seq * hq  # QK^T and PV over the full (masked) sequence
    return float(matmul + attn)


def model_flops_per_step(base_cfg, cfg: TrainConfig, seq: int) -> float:
    """Model FLOPs of one optimizer step (forward = 1x, backward = 2x of trained parts).

    Twig mode: the frozen trunk (vision, projector, layers 0..K-1) and the teacher (layers K..L-1 +
    head) run forward only; the twig's T layers + head run forward and backward.
    """
    tc, vc = base_cfg.text, base_cfg.vision
    L = tc.num_hidden_layers
    tokens = cfg.batch_size * seq
    layer = _layer_flops_per_token(tc, seq)
    head = 2.0 * tc.hidden_size * tc.vocab_size
    npatch = vc.num_patches + 1
    vis_layer = 2.0 * (4 * vc.hidden_size ** 2 + 2 * vc.hidden_size * vc.intermediate_size) + 4.0 * npatch * vc.hidden_size
    vision = cfg.batch_size * npatch * (max(base_cfg.feature_layers) * vis_layer)
    proj = cfg.batch_size * base_cfg.num_image_tokens * 2.0 * (base_cfg.projector_in_dim * tc.hidden_size + tc.hidden_size ** 2)
    if cfg.train_all:
        # Trained: forward + activation and weight gradients (3x). Frozen: forward, plus the
        # activation gradient (2x) only where a module before it (vision -> projector -> text) trains.
        order = ("vision", "projector", "text")

        def mult(name):
            if name not in cfg.freeze:
                return 3.0
            return 2.0 if any(m not in cfg.freeze for m in order[:order.index(name)]) else 1.0

        return mult("vision") * vision + mult("projector") * proj + mult("text") * tokens * (L * layer + head)
    trunk = vision + proj + tokens * cfg.twig_K * layer
    teacher = tokens * ((L - cfg.twig_K) * layer + head) if cfg.loss.alpha else 0.0
    twig = 3.0 * tokens * (cfg.twig_T * layer + head)
    return trunk + teacher + twig


# ----------------------------------------------------------------------------------------------
# Logging


class LineGuard:
    """stderr shared by a redrawn progress line and everything else: a write from anywhere else
    (a log line, a warning, a data-pipeline report) first ends an unfinished progress line, so
    it starts on a line of its own. `progress` is the stream the progress line writes to."""

    def __init__(self, stream):
        self.stream = stream
        self.line_open = False
        self.progress = _ProgressStream(self)

    def write(self, text: str) -> int:
        if text and self.line_open:
            self.stream.write("\n")
            self.line_open = False
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def __getattr__(self, name):
        return getattr(self.stream, name)


class _ProgressStream:
    def __init__(self, guard: LineGuard):
        self.guard = guard

    def write(self, text: str) -> int:
        n = self.guard.stream.write(text)
        if text:
            self.guard.line_open = not text.endswith("\n")
        return n

    def flush(self) -> None:
        self.guard.stream.flush()

    def isatty(self) -> bool:
        return self.guard.isatty()


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (a preempted VM) while training: the first asks the loop to stop
    after the current step (it saves and raises TrainingInterrupted); a second one restores the
    previous handlers and interrupts at once. Handlers are only installed from the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            return
        self.restore()
        if signum == signal.SIGINT:
            signal.default_int_handler(signum, frame)
        os.kill(os.getpid(), signum)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self.restore()


class TrainingInterrupted(Exception):
    """Training stopped on a signal. `step`: the last completed step; `checkpointed`: whether a
    checkpoint holds it; `result`: what train() would have returned (its trainer included)."""

    def __init__(self, signum: int, step: int, checkpointed: bool, result: dict):
        self.signum, self.step, self.checkpointed, self.result = signum, step, checkpointed, result
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}")


class NoTrainingData(ValueError):
    """The data iterator ended before the first step."""


def tensorboard_writer(log_dir: str | None, purge_step: int | None = None):
    """A TensorBoard SummaryWriter on process 0 when a TensorBoard writer package is installed
    (tensorboardX, or torch's with the tensorboard package), else None: metrics always go to JSONL.
    purge_step: a resumed run's first step (TensorBoard hides what an earlier run logged from it on)."""
    if log_dir is None or jax.process_index() != 0:
        return None
    for mod in ("tensorboardX", "torch.utils.tensorboard"):
        try:
            writer_cls = __import__(mod, fromlist=["SummaryWriter"]).SummaryWriter
        except Exception:  # not installed (or torch without tensorboard)
            continue
        return writer_cls(log_dir) if purge_step is None else writer_cls(log_dir, purge_step=purge_step)
    return None


def plot_loss(metrics: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [m["loss"] for m in metrics], label="loss")
    if any(m.get("pred_kl") for m in metrics):
        ax.plot(steps, [m["ce"] for m in metrics], label="ce", alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp"  # written beside, then renamed: a kill never leaves half a picture
    fig.savefig(tmp, dpi=100, format=os.path.splitext(path)[1][1:] or "png")
    os.replace(tmp, path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The loop


def _to_float(x) -> float:
    return float(np.asarray(x))


def train(base: Llava, cfg: TrainConfig, data_iter: Iterator[dict[str, np.ndarray]], *, twig: Twig | None = None,
          bad_report: Any = None, log=None, identity: dict | None = None,
          allow_config_change: bool = False) -> dict[str, Any]:
    """Run `cfg.steps` optimizer steps; resume from the newest intact checkpoint in cfg.ckpt_dir.

    data_iter: a grain DatasetIterator (get_state/set_state make the data order resumable) or any
    iterator of host batches (a "length" field [B] gives each row's real tokens for tokens/s).
    identity: JSON-able facts a resume must match besides the config and the base model (e.g. the
    data file's hash); a checkpoint made with other settings raises resume.CheckpointError unless
    allow_config_change, which records the change in the checkpoints' meta ("config_changes").
    SIGINT / SIGTERM stop the run after the current step with a checkpoint of it (when there is a
    checkpoint directory) and raise TrainingInterrupted. Data that ends before the first step
    raises NoTrainingData. Returns {"trainer", "metrics" (this run's steps), "benchmark",
    "start_step", "end_step", "config_changes"}.
    """
    guard = LineGuard(sys.stderr)
    previous_stderr, sys.stderr = sys.stderr, guard
    # Logging handlers that were given stderr itself write through the guard too.
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    handlers = [h for lg in loggers for h in lg.handlers
                if isinstance(h, logging.StreamHandler) and h.stream is previous_stderr]
    for h in handlers:
        h.setStream(guard)
    try:
        with StopRequest() as stop:
            return _train(base, cfg, data_iter, twig=twig, bad_report=bad_report,
                          log=log or (lambda s: print(s, file=sys.stderr, flush=True)), identity=identity or {},
                          allow_config_change=allow_config_change, stop=stop, progress_stream=guard.progress)
    finally:
        for h in handlers:
            h.setStream(previous_stderr)
        sys.stderr = previous_stderr


def _train(base, cfg, data_iter, *, twig, bad_report, log, identity, allow_config_change, stop, progress_stream):
    from twig_jax.train.resume import continue_metrics, describe_changes, model_identity, restore_newest_intact

    identity = {"model": model_identity(base), **identity}
    trainer = Trainer(base, cfg, twig=twig)
    ckpt = Checkpointer(cfg.ckpt_dir, cfg.save_every, cfg.keep) if cfg.ckpt_dir else None
    start, config_changes = 0, []
    if ckpt is not None:
        try:
            restored = restore_newest_intact(ckpt, trainer.abstract_state, cfg.to_dict(), identity,
                                             allow_changes=allow_config_change, log=log)
        except BaseException:
            ckpt.close()
            raise
        if restored is not None:
            start = restored.step
            trainer.state = restored.state
            if restored.data_state and hasattr(data_iter, "set_state"):
                data_iter.set_state(restored.data_state)
            if bad_report is not None and restored.meta.get("bad_samples"):
                bad_report.load(restored.meta["bad_samples"])
            config_changes = list(restored.meta.get("config_changes") or [])
            if restored.changes:
                config_changes.append({"step": start, "changes": restored.changes})
                log(f"resuming with changed settings: {describe_changes(restored.changes)} (recorded in the "
                    "checkpoints' meta)")
            log(f"resumed from {cfg.ckpt_dir} at step {start}")
    main_process = jax.process_index() == 0
    # Steps past the restored checkpoint that a killed run logged are dropped: one record per step.
    earlier = continue_metrics(cfg.metrics_path, start) if cfg.metrics_path and main_process else []
    metrics_f = open(cfg.metrics_path, "a") if cfg.metrics_path and main_process else None
    tb = tensorboard_writer(os.path.join(os.path.dirname(cfg.metrics_path) or ".", "tensorboard")
                            if cfg.metrics_path else None, purge_step=start + 1 if start else None)
    seq = None
    step_flops = None
    peak = None
    if cfg.benchmark:
        peak = measure_matmul_flops(jnp.float32)
        log(f"measured float32 matmul rate: {peak / 1e9:.1f} GFLOP/s per device ({jax.device_count()} devices)")
    history: list[dict] = []
    times: list[float] = []
    real_tokens: list[int] = []
    last = cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at)
    prog = Progress(last - start, "steps", label="train", stream=progress_stream, enabled=cfg.progress)
    meta_base = {"config": cfg.to_dict(), "identity": identity, "config_changes": config_changes}

    def meta():
        m = dict(meta_base)
        if bad_report is not None:
            m["bad_samples"] = bad_report.to_dict()
        return m

    last_saved = done = start
    try:
        for step in range(start, last):
            if stop.signum is not None:
                break
            try:
                batch = next(data_iter)
            except StopIteration:
                if step == 0:
                    raise NoTrainingData("the data gave no batch: nothing to train on") from None
                log(f"data exhausted after {step} steps")
                break
            if seq is None:
                seq = int(np.shape(batch["tokens"])[1])
                step_flops = model_flops_per_step(base.cfg, cfg, seq)
            # Real tokens: each row's length (its padding excluded), over every process's rows.
            real = (int(np.sum(batch["length"])) * jax.process_count() if "length" in batch
                    else cfg.batch_size * seq)
            t0 = time.perf_counter()
            m = trainer.step(batch)
            m = jax.device_get(m)  # waits for the step
            dt = time.perf_counter() - t0
            times.append(dt)
            real_tokens.append(real)
            rec = {"step": step + 1, **{k: _to_float(v) for k, v in m.items()}, "step_time": dt,
                   "tokens_per_s": real / dt}
            if "index" in batch:
                rec["indices"] = [int(i) for i in np.asarray(batch["index"]).reshape(-1)]
            history.append(rec)
            done = step + 1
            if metrics_f is not None:
                metrics_f.write(json.dumps(rec) + "\n")
                metrics_f.flush()
            if tb is not None:
                for k, v in rec.items():
                    if isinstance(v, float):
                        tb.add_scalar(f"train/{k}", v, step + 1)
            prog.advance(1, extra=f"step {done}/{last} loss {rec['loss']:.4f} tok/s {rec['tokens_per_s']:,.0f}")
            if ckpt is not None:
                data_state = data_iter.get_state() if hasattr(data_iter, "get_state") else None
                if ckpt.save(done, trainer.state, data_state, meta()):
                    last_saved = done
    except BaseException:
        if ckpt is not None:
            ckpt.close()
        raise
    finally:
        prog.close()
        if metrics_f is not None:
            metrics_f.close()
        if tb is not None:
            tb.close()
    checkpointed = ckpt is not None and done > 0
    if ckpt is not None:
        if done != last_saved:  # always checkpoint the end, and the step a signal stopped at
            ckpt.save(done, trainer.state, data_iter.get_state() if hasattr(data_iter, "get_state") else None,
                      meta(), force=True)
        ckpt.close()
    bench = None
    if cfg.benchmark and len(times) > 1:
        st = float(np.median(times[1:]))  # first step includes compilation
        tok_s = float(np.mean(real_tokens[1:])) / st
        mfu = step_flops / st / (peak * jax.device_count())
        bench = {"step_time_s": st, "tokens_per_s": tok_s, "padded_tokens_per_s": cfg.batch_size * seq / st,
                 "model_flops_per_step": step_flops, "matmul_flops_per_s_per_device": peak, "mfu": mfu}
        log(f"benchmark: step {st * 1e3:.1f} ms, {tok_s:,.0f} training tokens/s (padding excluded), "
            f"{step_flops / st / 1e9:.2f} model GFLOP/s, MFU {100 * mfu:.1f}% of measured fp32 matmul rate")
    if cfg.plot_path and (earlier or history) and main_process:
        plot_loss(earlier + history, cfg.plot_path)
    if bad_report is not None:
        log(bad_report.summary())
    result = {"trainer": trainer, "metrics": history, "benchmark": bench, "start_step": start, "end_step": done,
              "config_changes": config_changes}
    if stop.signum is not None:
        raise TrainingInterrupted(stop.signum, done, checkpointed, result)
    return result


__all__ = ["OptimConfig", "TrainConfig", "scan_layers", "twig_forward", "base_forward", "base_forward_with_probs",
           "TrainModel", "split_model", "training_twig_config", "make_loss_fn", "make_optimizer", "init_train_state",
           "train_state_shardings", "make_train_step", "jit_train_step", "wants_distributed", "STEP_METRICS",
           "device_batch_keys", "Trainer",
           "Checkpointer", "measure_matmul_flops", "model_flops_per_step", "plot_loss", "LineGuard", "StopRequest",
           "TrainingInterrupted", "NoTrainingData", "train"]
