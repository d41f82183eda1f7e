"""TwigVLM++ P-head training: stage 2, reinforcement learning (default), or stage 1, AttnKL (docs/design.md, "The P-head").

Only the P-head learns; the base and the twig stay frozen. For each single-turn example (image,
question, reference answer) the P-head scores the visual tokens, G keep-sets of R tokens are drawn
from its scores without replacement (Gumbel-top-k), and each is rewarded with the mean
log-probability of the reference answer under the frozen base given that pruned input (teacher
forced, FinalWipe at Kf; no rollouts). The loss is REINFORCE with group-normalised advantages.
R follows the paper's curriculum over budgets, P(i) ~ exp(-beta(t) i), beta(t) = 8 (t/T)^2, with
the budgets ordered from the most aggressive (smallest R) up, so the run ends on the smallest R.

  python -m train.prune_rl --base W/base --twig W/twig --data W/data/train.json \\
      --images W/data/images --out W/twig-phead --steps 300 --batch 8 --group 8 --R 16,32,48

On several devices, --mesh data=2,fsdp=2,tensor=2 lays them out as twig-jax train does (OnMesh).

The result is the twig with its P-head (TwigConfig p_head=True) in --out; prune with it through
`--method phead` (twig-jax eval / generate, research.accuracy_table).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Any, NamedTuple, Sequence

import numpy as np


def single_turn_records(records: Sequence[dict], image_placeholder: str = "<image>") -> list[dict]:
    """Every (question, answer) turn of every record as its own one-turn record with the image.

    The P-head scores from the last prompt token of one question, as at inference, so each turn
    becomes a sequence of its own (later turns get the image placeholder the first turn had).
    """
    out = []
    for rec in records:
        conv = rec.get("conversations") or []
        for j in range(0, len(conv) - 1, 2):
            q, a = conv[j], conv[j + 1]
            if q.get("from") != "human" or a.get("from") != "gpt":
                continue
            text = str(q["value"]).replace(image_placeholder, "").strip()
            value = f"{image_placeholder}\n{text}" if rec.get("image") else text
            out.append({"id": f"{rec.get('id', len(out))}_t{j // 2}", "image": rec.get("image"),
                        "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": a["value"]}]})
    return out


def curriculum_probs(step: int, total: int, count: int) -> np.ndarray:  # [count]
    """P(i) ~ exp(-beta i), beta = 8 (step/total)^2: uniform at the start, the first budget at the end."""
    beta = 8.0 * (step / max(total, 1)) ** 2
    w = np.exp(-beta * np.arange(count))
    return w / w.sum()


class _Prelude(NamedTuple):
    x: Any
    h_k: Any
    h_t: Any
    pos: Any
    query: Any
    img_pos: Any
    is_image: Any


class FrozenModels:
    """The frozen pieces every objective reads, and the shared forward prelude."""

    def __init__(self, base, twig, kf: int):
        self.base, self.tc, self.kf = base, base.cfg.text, kf
        self.K, self.T, self.N = twig.twig_cfg.K, twig.twig_cfg.T, base.cfg.num_image_tokens
        self.base_w = base.text.layers.weights()
        self.twig_w = twig.layers.weights()
        self.last_w = {k: v[self.T - 1] for k, v in self.twig_w.items()}

    def prelude(self, batch):
        """The embedded sequence x, h_k (enters base layer K), h_t (enters the last twig layer), all
        [B, S, D]; positions, the last prompt token [B], visual positions [B, N], is_image [B, S]."""
        import jax.numpy as jnp

        from twig_jax.model.llama import scan_layers
        from twig_jax.twig.keep import visual_positions

        tokens = batch["tokens"]
        b, s = tokens.shape
        is_image = tokens == self.base.cfg.image_token_index
        pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (b, s))
        x = self.base.embed(tokens, self.base.image_features(batch["pixel_values"]))
        h_k = scan_layers(self.tc, self.base_w, x, pos, 0, self.K)
        h_t = scan_layers(self.tc, self.twig_w, h_k, pos, 0, self.T - 1)
        query = (jnp.argmax(batch["label_mask"], axis=1) - 1).astype(jnp.int32)  # answer starts after it
        return _Prelude(x, h_k, h_t, pos, query, visual_positions(is_image, self.N), is_image)

    def reward(self, h_k, batch, is_image, keep, kf=None):  # [B]
        from twig_jax.train.phead_objectives import pruned_answer_logprob

        return pruned_answer_logprob(self.tc, self.base_w, self.base.text.logits, h_k, batch["tokens"],
                                     batch["label_mask"], is_image, keep, K=self.K,
                                     Kf=self.kf if kf is None else kf, N=self.N)

    def rule_rewards(self, params, pre, batch, key, R: int) -> dict:  # {rule: [B]}
        """Rewards of the keep rules every probe compares: the P-head's top R, its coverage keep-set
        and the mean of 4 keep-sets drawn from it (when params is not None), the twig's own attention
        (TTP) top R and coverage keep-set (ttp.cover_visual on the layer-K hidden states), the mean
        of 4 random keep-sets (one draw is too noisy a baseline), and unpruned (all N, no FinalWipe)."""
        import jax
        import jax.numpy as jnp

        from twig_jax.train.phead_objectives import attention_over_visual, attention_rows
        from twig_jax.twig.keep import gumbel_top_k
        from twig_jax.model.layers import gather_rows
        from twig_jax.twig.keep import cover_visual

        _, h_k, h_t, pos, query, img_pos, is_image = pre
        b = h_k.shape[0]
        rw = lambda keep: self.reward(h_k, batch, is_image, keep)
        top = lambda sc: jax.lax.top_k(sc, R)[1]
        twig_s = attention_over_visual(self.tc, self.twig_w, h_t, pos, self.T - 1,
                                       attention_rows(batch["label_mask"], "last"), img_pos)
        cover = lambda sc: cover_visual(sc, gather_rows(h_k, img_pos), R)
        out = {"twig": rw(top(twig_s)), "twig-cover": rw(cover(twig_s)),
               "random": sum(rw(top(jax.random.uniform(k, (b, self.N)))) for k in jax.random.split(key, 4)) / 4,
               "unpruned": self.reward(h_k, batch, is_image, jnp.broadcast_to(jnp.arange(self.N)[None], (b, self.N)),
                                       kf=self.base.cfg.text.num_hidden_layers)}
        if params is not None:
            ls = self.log_scores(params, h_t, pos, query, img_pos)
            out["phead"] = rw(top(ls))
            out["phead-cover"] = rw(cover(jnp.exp(ls)))
            # the policy RL trains: Gumbel-top-R draws from s (select="sample")
            out["phead-sample"] = sum(rw(gumbel_top_k(k, ls, R, 1)[:, 0])
                                       for k in jax.random.split(jax.random.fold_in(key, 1), 4)) / 4
        return out

    def log_scores(self, params, h_t, pos, query, img_pos):  # [B, N]
        import jax.numpy as jnp

        from twig_jax.twig.phead import phead_scores

        return jnp.log(jnp.maximum(phead_scores(self.tc, self.last_w, params, h_t, pos, query, img_pos), 1e-30))


BATCH_FIELDS = {"tokens": 2, "label_mask": 2, "pixel_values": 4}  # what a step reads: field -> ndim


@dataclasses.dataclass(frozen=True)
class OnMesh:
    """The frozen base and twig placed on a ("data", "fsdp", "tensor") mesh by the rule table (as
    Trainer.frozen), and the shardings of the P-head's train state (init_train_state's tree: its
    gates and Adam moments, replicated where no rule matches) and of a batch of global examples."""

    mesh: Any
    graphdefs: tuple  # (base, twig): the modules are rebuilt from them inside each jitted function
    p_head_shapes: Any  # the rebuilt twig's P-head is only shapes: its gates are the train state's
    frozen: Any  # {"base": nnx.State, "twig": nnx.State without the P-head}
    frozen_sh: Any
    state_sh: Any
    batch_sh: dict

    def models(self, frozen, kf: int) -> FrozenModels:
        from flax import nnx

        base_def, twig_def = self.graphdefs
        return FrozenModels(nnx.merge(base_def, frozen["base"]),
                            nnx.merge(twig_def, self.p_head_shapes, frozen["twig"]), kf)

    def rows(self, x):
        """x with its leading axis (examples, or examples x keep-sets) split like the batch."""
        from twig_jax.parallel.sharding import activation_constraint

        return activation_constraint(x, self.mesh, ("batch",) + (None,) * (x.ndim - 1))

    def put(self, batch: dict) -> dict:
        """This process's rows of a host batch -> global arrays with batch on ("data", "fsdp")."""
        from twig_jax.train.trainer import device_batch_keys, put_batch

        return put_batch(device_batch_keys(batch), self.batch_sh)

    def jit(self, step):
        """step(state, frozen, batch) -> (state, metrics), jitted on the mesh, the state donated."""
        from twig_jax.train.trainer import jit_train_step

        return jit_train_step(step, self.state_sh, self.frozen_sh, self.batch_sh, self.mesh)


def place_on_mesh(base, twig, tx, mesh, batch_size: int) -> tuple[OnMesh, dict]:
    """(OnMesh, the P-head's train state on it) for a twig with a P-head; batch_size: global
    examples per batch."""
    import jax
    from flax import nnx

    from twig_jax.parallel import sharding as shd
    from twig_jax.train.trainer import init_train_state, train_state_shardings
    from twig_jax.twig.phead import p_head_weights

    base_def, base_state = nnx.split(base)
    twig_def, p_head_state, twig_state = nnx.split(twig, nnx.PathContains("p_head"), ...)
    frozen = {"base": base_state, "twig": twig_state}
    frozen_sh = shd.param_shardings(frozen, mesh)
    params = jax.device_get(p_head_weights(twig.p_head))  # host copies: the donated state owns its buffers
    state_sh = train_state_shardings(jax.eval_shape(lambda p: init_train_state(p, tx), params), mesh)
    batch_sh = {k: shd.batch_sharding(mesh, n, batch_size) for k, n in BATCH_FIELDS.items()}
    on = OnMesh(mesh, (base_def, twig_def), jax.eval_shape(lambda: p_head_state), shd.shard_to(frozen, frozen_sh),
                frozen_sh, state_sh, batch_sh)
    init = jax.jit(lambda p: init_train_state(p, tx), out_shardings=state_sh)
    return on, init(shd.shard_to(params, state_sh["params"]))


def apply_gradients(tx, state: dict, grads) -> dict:
    import optax

    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}


POLICIES = ("plackett-luce", "cover")
ADVANTAGES = ("std", "mean")  # phead.group_advantage with scale=True / scale=False


def make_rl_step(on: OnMesh, kf: int, tx, group: int, policy: str = "plackett-luce", cover_sharpness: float = 1.0,
                 advantage: str = "std", seed: int = 0):
    """rl_step(state, batch, R) -> (state, metrics): one REINFORCE step on on.mesh (state: the
    P-head's train state, donated; batch: this process's rows of host arrays; one compiled step per
    budget R). The keep-sets of step t are drawn with fold_in(key(seed), t).

    policy: how keep-sets are drawn from the scores s: "plackett-luce" (Gumbel-top-R: the paper;
    its mode is top R) or "cover" (phead.sample_cover: its mode is the coverage keep-set,
    select="cover"; cover_sharpness > 1 draws closer to that mode). advantage: "std" (r - mean) /
    std over each example's group, or "mean" (r - mean).
    """
    import functools

    import jax
    import jax.numpy as jnp
    import optax

    from twig_jax.model.layers import gather_rows
    from twig_jax.twig.keep import (
        coverage_similarity, cover_logprob, gumbel_top_k, plackett_luce_logprob, sample_cover,
    )
    from twig_jax.train.phead_objectives import group_advantage

    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r} must be one of {POLICIES}")
    if advantage not in ADVANTAGES:
        raise ValueError(f"advantage={advantage!r} must be one of {ADVANTAGES}")

    def step(state, frozen, batch, R):
        fz, params = on.models(frozen, kf), state["params"]
        key = jax.random.fold_in(jax.random.key(seed), state["step"])
        b = batch["tokens"].shape[0]
        _, h_k, h_t, pos, query, img_pos, is_image = fz.prelude(batch)
        ls = fz.log_scores(params, h_t, pos, query, img_pos)
        if policy == "cover":
            sim = coverage_similarity(gather_rows(h_k, img_pos))  # [B, N, N]
            order = sample_cover(key, jax.lax.stop_gradient(ls), sim, R, group, cover_sharpness)  # [B, G, R]
            logprob = lambda log_s: cover_logprob(log_s, sim, order, cover_sharpness)
        else:
            order = gumbel_top_k(key, jax.lax.stop_gradient(ls), R, group)  # [B, G, R]
            logprob = lambda log_s: plackett_luce_logprob(log_s, order)
        # [B*G, ...]: an example's G copies sit next to it, on its device
        rep = lambda a: on.rows(jnp.repeat(a, group, axis=0))
        reward = fz.reward(rep(h_k), {k: rep(v) for k, v in batch.items()}, rep(is_image),
                           on.rows(order.reshape(b * group, R)))
        reward = jax.lax.stop_gradient(reward.reshape(b, group))
        adv = group_advantage(reward, scale=advantage == "std")

        def loss_fn(p):
            return -jnp.mean(adv * logprob(fz.log_scores(p, h_t, pos, query, img_pos)))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        entropy = -jnp.mean(jnp.sum(jnp.exp(ls) * ls, axis=1))
        return apply_gradients(tx, state, grads), {"loss": loss, "reward": jnp.mean(reward), "entropy": entropy,
                                                   "grad_norm": optax.tree.norm(grads)}

    compiled = functools.cache(lambda R: on.jit(functools.partial(step, R=R)))  # one per budget
    return lambda state, batch, R: compiled(R)(state, on.frozen, on.put(batch))


def make_attn_step(on: OnMesh, kf: int, tx, layer: int, rows: str):
    """TwigVLM++ stage 1 for the P-head alone: attn_step(state, batch) -> (state, metrics) on
    on.mesh (as make_rl_step's) minimising KL(a_base || s), a_base = base layer `layer`'s
    head-averaged attention over the visual tokens from the query rows `rows` (phead.attention_rows)."""
    import jax
    import jax.numpy as jnp
    import optax

    from twig_jax.train.losses import attn_kl
    from twig_jax.train.phead_objectives import attention_rows, attention_over_visual
    from twig_jax.model.llama import scan_layers

    def step(state, frozen, batch):
        fz = on.models(frozen, kf)
        x, h_k, h_t, pos, query, img_pos, is_image = fz.prelude(batch)
        h_l = (scan_layers(fz.tc, fz.base_w, h_k, pos, fz.K, layer) if layer >= fz.K
               else scan_layers(fz.tc, fz.base_w, x, pos, 0, layer))
        target = attention_over_visual(fz.tc, fz.base_w, h_l, pos, layer,
                                       attention_rows(batch["label_mask"], rows), img_pos)

        def loss_fn(p):
            return jnp.mean(attn_kl(target, jnp.exp(fz.log_scores(p, h_t, pos, query, img_pos))))

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        return apply_gradients(tx, state, grads), {"attn_kl": loss, "grad_norm": optax.tree.norm(grads)}

    jitted = on.jit(step)
    return lambda state, batch: jitted(state, on.frozen, on.put(batch))


def make_rl_eval(on: OnMesh, kf: int):
    """rl_eval(params, batch, key, R) -> per-example rewards [B] of each keep rule
    (FrozenModels.rule_rewards), replicated; params: the train state's, batch as make_rl_step's."""
    import functools

    import jax

    from twig_jax.parallel.sharding import replicated

    def rewards(params, frozen, batch, key, R):
        fz = on.models(frozen, kf)
        return fz.rule_rewards(params, fz.prelude(batch), batch, key, R)

    compiled = functools.cache(lambda R: jax.jit(
        functools.partial(rewards, R=R), out_shardings=replicated(on.mesh),
        in_shardings=(on.state_sh["params"], on.frozen_sh, on.batch_sh, replicated(on.mesh))))
    return lambda params, batch, key, R: compiled(R)(params, on.frozen, on.put(batch), key)


LONG_ANSWER_TOKENS = 8  # an answer this long or longer counts as long (descriptions)


def accumulate(acc: dict, rewards: dict, batch: dict) -> dict:
    """Add one batch's per-example rewards {rule: [B]} to acc {rule: {"long": [...], "short": [...]}},
    skipping the padding rows of a last, filled-up batch (batch["valid"])."""
    long_ = np.asarray(batch["label_mask"]).sum(1) >= LONG_ANSWER_TOKENS
    for name, v in rewards.items():
        v = np.asarray(v)
        d = acc.setdefault(name, {"long": [], "short": []})
        d["long"].extend(v[long_ & batch["valid"]].tolist())
        d["short"].extend(v[~long_ & batch["valid"]].tolist())
    return acc


PROG = "twig-jax train-phead"


def build_parser() -> argparse.ArgumentParser:
    from twig_jax.train.outputs import OneLineArgumentParser

    p = OneLineArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="base model dir (converted twig_jax or Hugging Face)")
    p.add_argument("--twig", required=True, help="the trained twig (orbax dir); a P-head it has is continued")
    p.add_argument("--data", required=True, help="LLaVA instruction JSON")
    p.add_argument("--images", default=None, help="image folder")
    p.add_argument("--out", required=True, help="where the twig with its P-head is written (a new directory, or "
                   "one holding a twig of ours)")
    p.add_argument("--force", action="store_true",
                   help="let --out replace a directory that holds something else (never --base, --twig or the data)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8, help="examples per step")
    p.add_argument("--group", type=int, default=8, help="G: keep-sets sampled per example")
    p.add_argument("--R", default=None, help="budgets, comma-separated (default: N/9, 2N/9, 3N/9)")
    p.add_argument("--Kf", type=int, default=None, help="FinalWipe layer of the reward model (default: the twig's)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--policy", choices=list(POLICIES), default="plackett-luce",
                   help="RL keep-set policy: Gumbel-top-R draws from the scores (the paper; used with "
                        "select top / sample) or the coverage policy (used with select cover)")
    p.add_argument("--advantage", choices=list(ADVANTAGES), default="std",
                   help="std: group-normalised (r - mean) / std (default); mean: r - mean, so groups whose "
                        "samples score alike add little")
    p.add_argument("--cover-sharpness", type=float, default=1.0,
                   help="coverage policy: each pick's probability is gain^a / sum of gains^a (a > 1 draws "
                        "closer to the greedy coverage set)")
    p.add_argument("--objective", choices=["rl", "attn"], default="rl",
                   help="rl: stage 2, REINFORCE on the answer's log-prob (default); attn: stage 1, AttnKL to the "
                        "base's attention (the P-head alone; run rl on its output after)")
    p.add_argument("--attn-layer", type=int, default=None,
                   help="attn: the base layer whose attention is the target (default round(19/32 L), the paper's 19 of 32)")
    p.add_argument("--attn-rows", choices=["last", "answer"], default="last",
                   help="attn: the target's query rows: the last prompt token (paper) or every row that predicts "
                        "an answer token")
    p.add_argument("--init-scale", type=float, default=1.0,
                   help="a new P-head's gate init scale (1: near the layer's own attention; small: near uniform, "
                        "i.e. random pruning)")
    p.add_argument("--max-len", type=int, default=352)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=50, help="save the twig every N steps (and at the end)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-records", type=int, default=24, help="records held out for the reward eval (0: none)")
    p.add_argument("--eval-every", type=int, default=100, help="held-out eval at the smallest R every N steps")
    p.add_argument("--mesh", default=None, help="e.g. data=2,fsdp=2,tensor=2, as twig-jax train (default: all "
                   "devices on data); --batch must divide over data x fsdp")
    p.add_argument("--distributed", choices=["auto", "on", "off"], default="auto",
                   help="jax.distributed.initialize() for multi-process runs, as twig-jax train")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The P-head training command: 0, or 2 with one `twig-jax train-phead: error: ...` line for bad input."""
    from twig_jax.train.outputs import UsageError, report

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad command line already reported in one line
        return int(e.code or 0)
    try:
        return run(args, argv)
    except UsageError as e:
        return report(PROG, e)


def load_inputs(args):
    """(base, twig, tokenizer, records) or UsageError naming the input that is wrong."""
    import jax.numpy as jnp

    from twig_jax.convert.llava import load_model
    from twig_jax.pipeline import load_tokenizer
    from twig_jax.train.outputs import UsageError
    from twig_jax.twig.io import load_twig

    try:
        base = load_model(args.base, dtype=jnp.float32)
        twig = load_twig(args.twig, base.cfg.text, dtype=jnp.float32)
        tokenizer = load_tokenizer(args.base)
    except (ValueError, OSError) as e:  # ConversionError, TwigFormatError, InputError, a missing file
        raise UsageError(str(e)) from None
    if not os.path.isfile(args.data):
        raise UsageError(f"--data {args.data}: no such file")
    try:
        with open(args.data, encoding="utf-8") as f:
            records = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"--data {args.data}: not valid JSON ({e})") from None
    if not isinstance(records, list) or not records:
        raise UsageError(f"--data {args.data}: expected a non-empty JSON list of samples")
    return base, twig, tokenizer, records


def run(args, argv: list[str]) -> int:
    import jax
    import jax.numpy as jnp
    import optax

    from twig_jax.data.llava_data import DataConfig, build_dataset
    from twig_jax.twig.phead import with_p_head
    from twig_jax.pipeline import image_preprocessor_for
    from twig_jax.train.outputs import check_output, report, training_record
    from twig_jax.train.trainer import StopRequest, wants_distributed
    from twig_jax.twig.io import TRAINING_RECORD_FILE, save_twig

    if wants_distributed(args.distributed, os.environ):
        jax.distributed.initialize()  # coordinator, process count and id from the environment
    mesh = mesh_for(args.mesh, args.batch)
    # The output replaces a directory as a whole: never an input, never something else without --force.
    check_output(args.out, {"--base": args.base, "--twig": args.twig, "--data": args.data, "--images": args.images},
                 force=args.force)
    base, twig, tokenizer, all_records = load_inputs(args)
    had = twig.p_head is not None
    twig = with_p_head(twig, seed=args.seed, init_scale=args.init_scale)
    tc, N = twig.twig_cfg, base.cfg.num_image_tokens
    R_values = tuple(int(r) for r in args.R.split(",")) if args.R else (N // 9, 2 * N // 9, 3 * N // 9)
    R_values = tuple(sorted(R_values))
    bad = [r for r in R_values if not 1 <= r <= N]
    if bad:
        return report(PROG, f"--R {bad} outside [1, {N}] (the visual token count)")
    kf = args.Kf if args.Kf is not None else tc.Kf
    L = base.cfg.text.num_hidden_layers
    if not tc.K < kf <= L:
        return report(PROG, f"--Kf {kf} must satisfy K={tc.K} < Kf <= L={L}")
    if args.group < 2:
        return report(PROG, "--group must be >= 2 (the advantage is normalised within each group)")
    if not args.cover_sharpness > 0:
        return report(PROG, f"--cover-sharpness must be > 0 (got {args.cover_sharpness})")
    if args.cover_sharpness != 1.0 and args.policy != "cover":
        return report(PROG, "--cover-sharpness applies to --policy cover only")
    for flag, value, least in (("--steps", args.steps, 1), ("--batch", args.batch, 1), ("--every", args.every, 1),
                               ("--log-every", args.log_every, 1), ("--eval-every", args.eval_every, 1),
                               ("--eval-records", args.eval_records, 0), ("--max-len", args.max_len, 2)):
        if value < least:
            return report(PROG, f"{flag} {value} must be >= {least}")
    if args.eval_records >= len(all_records):
        return report(PROG, f"--eval-records {args.eval_records} leaves no training records (the data has "
                      f"{len(all_records)})")
    # The last --eval-records records are held out: every turn of them is an eval example.
    cut = len(all_records) - args.eval_records
    records = single_turn_records(all_records[:cut])
    eval_recs = single_turn_records(all_records[cut:])
    size = base.cfg.vision.image_size

    def dataset(recs, batch, shuffle, epochs, shard):
        cfg = DataConfig(json_path=args.data, image_dir=args.images, max_len=args.max_len, batch_size=batch,
                         seed=args.seed, on_too_long="skip", shuffle=shuffle, num_epochs=epochs)
        return build_dataset(cfg, tokenizer, image_token_index=base.cfg.image_token_index,
                             num_image_tokens=N, image_preprocessor=image_preprocessor_for(base, args.base),
                             pixel_shape=(base.cfg.vision.num_channels, size, size), records=recs,
                             shard=shard)

    ds, bad_report = dataset(records, args.batch, True, None, None)  # None: this process's rows
    data = iter(ds)
    # every process holds every held-out example and feeds its own rows of each batch
    held_out = eval_batches(list(dataset(eval_recs, 1, False, 1, single_shard())[0]) if eval_recs else [],
                            args.batch)
    tx = optax.adam(optax.cosine_decay_schedule(args.lr, args.steps, alpha=0.1))
    on, state = place_on_mesh(base, twig, tx, mesh, args.batch)
    eval_fn = make_rl_eval(on, kf)
    attn_layer = args.attn_layer if args.attn_layer is not None else round(19 / 32 * L)
    if not 0 <= attn_layer < L:
        return report(PROG, f"--attn-layer {attn_layer} must be in [0, {L})")
    if args.objective == "rl":
        step_fn = make_rl_step(on, kf, tx, args.group, args.policy, args.cover_sharpness, args.advantage, args.seed)
    else:
        step_fn = make_attn_step(on, kf, tx, attn_layer, args.attn_rows)
    rng = np.random.default_rng(args.seed)
    # The logs live in memory and are written with each save: the output directory is replaced as a
    # whole, so what it holds always belongs together.
    log_lines: list[str] = []
    eval_lines: list[str] = []
    what = (f"RL ({args.policy} keep-sets): budgets R={R_values}, G={args.group}" if args.objective == "rl" else
            f"AttnKL to base layer {attn_layer}'s attention from the {args.attn_rows} rows")
    print(f"P-head {what}; {len(records)} single-turn examples, batch {args.batch}, Kf={kf}, "
          f"{'continuing its P-head' if had else 'new P-head'}", flush=True)

    def evaluate(step, Rs):
        """Mean held-out reward of each keep rule, by answer length (LONG_ANSWER_TOKENS)."""
        out = {}
        for r in Rs:
            acc: dict = {}
            for i, b in enumerate(held_out):
                rewards = eval_fn(state["params"], process_rows(b, args.batch), jax.random.key(1000 + i), R=r)
                accumulate(acc, rewards, b)
            out[r] = {f"{k}/{c}": float(np.mean(v[c])) if v[c] else float("nan") for k, v in acc.items() for c in v}
            line = "  ".join(f"{cat}: " + " ".join(f"{m} {out[r][f'{m}/{cat}']:.3f}"
                                                   for m in ("unpruned", "phead", "phead-sample", "phead-cover", "twig",
                                                             "twig-cover", "random") if f"{m}/{cat}" in out[r])
                             for cat in ("long", "short"))
            print(f"  eval step {step} R={r} (mean answer log-prob)  {line}", flush=True)
        eval_lines.append(json.dumps({"step": step, **{f"R{r}": v for r, v in out.items()}}) + "\n")
        return out

    def save(step):
        if jax.process_index():
            return  # one writer
        params = jax.device_get(state["params"])
        twig.p_head.gate_q.set_value(jnp.asarray(params["gate_q"]))
        twig.p_head.gate_k.set_value(jnp.asarray(params["gate_k"]))
        rl_config = json.dumps({"step": step, "objective": args.objective, "policy": args.policy,
                                "cover_sharpness": args.cover_sharpness, "advantage": args.advantage,
                                "attn_layer": attn_layer, "attn_rows": args.attn_rows,
                                "R_values": R_values, "group": args.group, "batch": args.batch, "lr": args.lr,
                                "init_scale": args.init_scale,
                                "Kf": kf, "seed": args.seed, "data": args.data, "base": args.base, "twig": args.twig},
                               indent=2)
        record = training_record(command=PROG, argv=argv, step=step, steps=args.steps, base=args.base,
                                 twig=args.twig, data=args.data)
        save_twig(twig, args.out, overwrite=True, force=args.force,
                  extra_files={"rl_log.jsonl": "".join(log_lines), "rl_eval.jsonl": "".join(eval_lines),
                               "rl_config.json": rl_config, TRAINING_RECORD_FILE: record})

    t0 = time.time()
    if held_out:
        print(f"held out: {len(held_out) * args.batch} examples (the last {args.eval_records} records)", flush=True)
        evaluate(0, R_values[:1])
    window: dict[int, list] = {}
    with StopRequest() as stop:
        for step in range(1, args.steps + 1):
            batch = next(data)
            r = int(R_values[rng.choice(len(R_values), p=curriculum_probs(step - 1, args.steps, len(R_values)))])
            if args.objective == "rl":
                state, m = step_fn(state, batch, R=r)
            else:
                state, m = step_fn(state, batch)
                r = 0  # no budget: the target is a distribution over every visual token
            m = {k: float(v) for k, v in m.items()}
            if not all(math.isfinite(v) for v in m.values()):
                print(f"{PROG}: error: non-finite metrics at step {step}: {m}", file=sys.stderr)
                return 1
            window.setdefault(r, []).append(m)
            log_lines.append(json.dumps({"step": step, "R": r, **m}) + "\n")
            if step % args.log_every == 0 or step == args.steps:
                parts = [f"R={rr}: reward {np.mean([x['reward'] for x in ms]):.3f} (n={len(ms)})" if rr else
                         f"attn KL {np.mean([x['attn_kl'] for x in ms]):.4f}" for rr, ms in sorted(window.items())]
                ent = [x["entropy"] for ms in window.values() for x in ms if "entropy" in x]
                print(f"step {step}/{args.steps} {time.time() - t0:.0f}s  " + "; ".join(parts) +
                      (f"; entropy {np.mean(ent):.2f} (uniform {math.log(N):.2f})" if ent else ""), flush=True)
                window = {}
            if step % args.every == 0 or step == args.steps:
                save(step)
            if stop.signum is not None:  # Ctrl-C or preemption: keep what was trained
                save(step)
                print(f"{PROG}: interrupted by {signal.Signals(stop.signum).name} at step {step} of {args.steps}; "
                      f"the twig with its P-head of step {step} saved to {args.out} (continue from it with --twig "
                      f"{args.out} and a new --out)", file=sys.stderr, flush=True)
                return 128 + stop.signum
            if held_out and step % args.eval_every == 0 and step != args.steps:
                evaluate(step, R_values[:1])
    if held_out:
        evaluate(args.steps, R_values)
        save(args.steps)  # again, with the final eval in rl_eval.jsonl
    print(f"saved the twig with its P-head to {args.out} ({time.time() - t0:.0f}s)"
          f"{'; bad samples: ' + json.dumps(bad_report.to_dict()['counts']) if bad_report.to_dict()['counts'] else ''}")
    return 0


def eval_batches(examples: list[dict], batch: int) -> list[dict]:
    """Single examples (batches of 1) regrouped into batches of `batch`; the last one is filled up
    with copies of the first example, marked invalid (one compiled shape, every example counted once)."""
    out = []
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        valid = np.array([True] * len(chunk) + [False] * (batch - len(chunk)))
        chunk = chunk + [examples[0]] * (batch - len(chunk))
        b = {k: np.concatenate([c[k] for c in chunk]) for k in ("tokens", "label_mask", "pixel_values")}
        out.append(dict(b, valid=valid))
    return out


def mesh_for(spec: str | None, batch: int):
    """The mesh of --mesh (None: every device on "data", as twig-jax train); UsageError for a bad
    one, or a --batch that the processes or the batch's mesh axes do not divide."""
    import jax

    from twig_jax.parallel.sharding import LOGICAL_AXIS_RULES, check_training_mesh, make_mesh
    from twig_jax.train.outputs import UsageError

    try:
        mesh = make_mesh(spec)
        check_training_mesh(mesh.shape)
    except ValueError as e:
        raise UsageError(f"--mesh {spec}: {e}") from None
    axes = LOGICAL_AXIS_RULES["batch"]  # each device on these takes whole examples
    for ways, what in ((jax.process_count(), "processes"),
                       (math.prod(mesh.shape.get(a, 1) for a in axes), f"devices on the mesh's {' x '.join(axes)} axes")):
        if batch % ways:
            raise UsageError(f"--batch {batch} is not divisible by the {ways} {what}")
    return mesh


def process_rows(batch: dict, global_batch: int) -> dict:
    """This process's rows of a batch every process holds whole."""
    import jax

    n = global_batch // jax.process_count()
    return {k: v[jax.process_index() * n:(jax.process_index() + 1) * n] for k, v in batch.items()}


def single_shard():
    import grain

    return grain.sharding.NoSharding()


if __name__ == "__main__":
    sys.exit(main())
