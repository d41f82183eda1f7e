"""TwigVLM++ stage 2: train the P-head by reinforcement learning (DESIGN.md s.5).

Only the P-head learns; the base and the twig stay frozen. For each single-turn example (image,
question, reference answer) the P-head scores the visual tokens, G keep-sets of R tokens are drawn
from its scores without replacement (Gumbel-top-k), and each is rewarded with the mean
log-probability of the reference answer under the frozen base given that pruned input (teacher
forced, FinalWipe at Kf; no rollouts). The loss is REINFORCE with group-normalised advantages.
R follows the paper's curriculum over budgets, P(i) ~ exp(-beta(t) i), beta(t) = 8 (t/T)^2, with
the budgets ordered from the most aggressive (smallest R) up, so the run ends on the smallest R.

  python -m train.prune_rl --base W/base --twig W/twig --data W/data/train.json \\
      --images W/data/images --out W/twig-phead --steps 300 --batch 8 --group 8 --R 16,32,48

The result is the twig with its P-head (TwigConfig p_head=True) in --out; prune with it through
`--method phead` (twig-jax eval / generate, infer.accuracy_table).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Sequence

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


@dataclasses.dataclass(frozen=True)
class RLConfig:
    R_values: tuple[int, ...] = (16, 32, 48)  # budgets, most aggressive first
    group: int = 8  # G: keep-sets sampled per example
    lr: float = 1e-3
    steps: int = 300
    seed: int = 0


def make_rl_step(base, twig, plan_kf: int, tx, group: int):
    """rl_step(p_head_params, opt_state, batch, key, R) -> (params, opt_state, metrics), jitted; R static.

    Everything frozen (base, twig layers) is closed over as constants of the jitted function.
    """
    import jax
    import jax.numpy as jnp
    import optax

    from twig_jax.phead import (gumbel_top_k, group_advantage, phead_scores, plackett_luce_logprob,
                                pruned_answer_logprob)
    from twig_jax.train_lib import scan_layers
    from twig_jax.ttp import visual_positions

    tc = base.cfg.text
    K, T, N = twig.twig_cfg.K, twig.twig_cfg.T, base.cfg.num_image_tokens
    base_w = base.text.layers.weights()
    twig_w = twig.layers.weights()
    last_w = {k: v[T - 1] for k, v in twig_w.items()}

    def step(params, opt_state, batch, key, R):
        tokens, label_mask = batch["tokens"], batch["label_mask"]
        b, s = tokens.shape
        g = group
        is_image = tokens == base.cfg.image_token_index  # [B, S]
        pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None], (b, s))
        x = base.embed(tokens, base.image_features(batch["pixel_values"]))  # [B, S, D]
        h_k = scan_layers(tc, base_w, x, pos, 0, K)  # [B, S, D] enters base layer K
        h_t = scan_layers(tc, twig_w, h_k, pos, 0, T - 1)  # [B, S, D] enters the last twig layer
        query = (jnp.argmax(label_mask, axis=1) - 1).astype(jnp.int32)  # [B] last prompt token
        img_pos = visual_positions(is_image, N)

        def log_scores(p):  # [B, N]
            return jnp.log(jnp.maximum(phead_scores(tc, last_w, p, h_t, pos, query, img_pos), 1e-30))

        ls = log_scores(params)
        order = gumbel_top_k(key, jax.lax.stop_gradient(ls), R, g)  # [B, G, R]
        rep = lambda a: jnp.repeat(a, g, axis=0)  # [B*G, ...]
        reward = pruned_answer_logprob(tc, base_w, base.text.logits, rep(h_k), rep(tokens), rep(label_mask),
                                       rep(is_image), order.reshape(b * g, R), K=K, Kf=plan_kf, N=N)
        reward = jax.lax.stop_gradient(reward.reshape(b, g))
        adv = group_advantage(reward)
        greedy = jax.lax.top_k(ls, R)[1]  # the keep-set inference would use
        greedy_reward = pruned_answer_logprob(tc, base_w, base.text.logits, h_k, tokens, label_mask, is_image,
                                              greedy, K=K, Kf=plan_kf, N=N)

        def loss_fn(p):
            return -jnp.mean(adv * plackett_luce_logprob(log_scores(p), order))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        s_ = jnp.exp(ls)
        entropy = -jnp.mean(jnp.sum(s_ * ls, axis=1))
        return params, opt_state, {"loss": loss, "reward": jnp.mean(reward), "greedy_reward": jnp.mean(greedy_reward),
                                   "entropy": entropy, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, static_argnames=("R",), donate_argnums=(0, 1))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.prune_rl", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="base model dir (converted twig_jax or Hugging Face)")
    p.add_argument("--twig", required=True, help="the trained twig (orbax dir); a P-head it has is continued")
    p.add_argument("--data", required=True, help="LLaVA instruction JSON")
    p.add_argument("--images", default=None, help="image folder")
    p.add_argument("--out", required=True, help="where the twig with its P-head is written")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8, help="examples per step")
    p.add_argument("--group", type=int, default=8, help="G: keep-sets sampled per example")
    p.add_argument("--R", default=None, help="budgets, comma-separated (default: N/9, 2N/9, 3N/9)")
    p.add_argument("--Kf", type=int, default=None, help="FinalWipe layer of the reward model (default: the twig's)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-len", type=int, default=352)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=50, help="save the twig every N steps (and at the end)")
    p.add_argument("--log-every", type=int, default=10)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from twig_jax.convert import load_model
    from twig_jax.data.llava_data import DataConfig, build_dataset, load_records
    from twig_jax.phead import p_head_weights, with_p_head
    from twig_jax.pipeline import image_preprocessor_for, load_tokenizer
    from twig_jax.twig_io import load_twig, save_twig

    base = load_model(args.base, dtype=jnp.float32)
    twig = load_twig(args.twig, base.cfg.text, dtype=jnp.float32)
    had = twig.p_head is not None
    twig = with_p_head(twig, seed=args.seed)
    tc, N = twig.twig_cfg, base.cfg.num_image_tokens
    R_values = tuple(int(r) for r in args.R.split(",")) if args.R else (N // 9, 2 * N // 9, 3 * N // 9)
    R_values = tuple(sorted(R_values))
    bad = [r for r in R_values if not 1 <= r <= N]
    if bad:
        print(f"error: --R {bad} outside [1, {N}] (the visual token count)", file=sys.stderr)
        return 2
    kf = args.Kf if args.Kf is not None else tc.Kf
    L = base.cfg.text.num_hidden_layers
    if not tc.K < kf <= L:
        print(f"error: Kf={kf} must satisfy K={tc.K} < Kf <= L={L}", file=sys.stderr)
        return 2
    if args.group < 2:
        print("error: --group must be >= 2 (the advantage is normalised within each group)", file=sys.stderr)
        return 2

    records = single_turn_records(load_records(args.data))
    cfg = DataConfig(json_path=args.data, image_dir=args.images, max_len=args.max_len, batch_size=args.batch,
                     seed=args.seed, on_too_long="skip")
    size = base.cfg.vision.image_size
    ds, report = build_dataset(cfg, load_tokenizer(args.base), image_token_index=base.cfg.image_token_index,
                               num_image_tokens=N, image_preprocessor=image_preprocessor_for(base, args.base),
                               pixel_shape=(base.cfg.vision.num_channels, size, size), records=records,
                               shard=_single_shard())
    data = iter(ds)

    tx = optax.adam(optax.cosine_decay_schedule(args.lr, args.steps, alpha=0.1))
    params = p_head_weights(twig.p_head)
    opt_state = tx.init(params)
    step_fn = make_rl_step(base, twig, kf, tx, args.group)
    rng = np.random.default_rng(args.seed)
    key = jax.random.key(args.seed)
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "rl_log.jsonl")
    print(f"P-head RL: {len(records)} single-turn examples, budgets R={R_values}, G={args.group}, "
          f"batch {args.batch}, Kf={kf}, {'continuing its P-head' if had else 'new P-head'}", flush=True)

    def save(step):
        twig.p_head.gate_q.set_value(params["gate_q"])
        twig.p_head.gate_k.set_value(params["gate_k"])
        save_twig(twig, args.out, overwrite=True)
        with open(os.path.join(args.out, "rl_config.json"), "w") as f:
            json.dump({"step": step, "R_values": R_values, "group": args.group, "batch": args.batch, "lr": args.lr,
                       "Kf": kf, "seed": args.seed, "data": args.data, "base": args.base, "twig": args.twig}, f,
                      indent=2)

    t0 = time.time()
    window: dict[int, list] = {}
    with open(log_path, "a") as log:
        for step in range(1, args.steps + 1):
            batch = next(data)
            r = int(R_values[rng.choice(len(R_values), p=curriculum_probs(step - 1, args.steps, len(R_values)))])
            key, sub = jax.random.split(key)
            feed = {k: jnp.asarray(batch[k]) for k in ("tokens", "label_mask", "pixel_values")}
            params, opt_state, m = step_fn(params, opt_state, feed, sub, R=r)
            m = {k: float(v) for k, v in m.items()}
            if not all(math.isfinite(v) for v in m.values()):
                print(f"error: non-finite metrics at step {step}: {m}", file=sys.stderr)
                return 1
            window.setdefault(r, []).append(m)
            log.write(json.dumps({"step": step, "R": r, **m}) + "\n")
            if step % args.log_every == 0 or step == args.steps:
                parts = [f"R={rr}: reward {np.mean([x['reward'] for x in ms]):.3f} greedy "
                         f"{np.mean([x['greedy_reward'] for x in ms]):.3f} (n={len(ms)})" for rr, ms in sorted(window.items())]
                ent = np.mean([x["entropy"] for ms in window.values() for x in ms])
                print(f"step {step}/{args.steps} {time.time() - t0:.0f}s  " + "; ".join(parts) +
                      f"; entropy {ent:.2f} (uniform {math.log(N):.2f})", flush=True)
                log.flush()
                window = {}
            if step % args.every == 0 or step == args.steps:
                save(step)
    print(f"saved the twig with its P-head to {args.out} ({time.time() - t0:.0f}s)"
          f"{'; bad samples: ' + json.dumps(report.to_dict()['counts']) if report.to_dict()['counts'] else ''}")
    return 0


def _single_shard():
    import grain

    return grain.sharding.NoSharding()


if __name__ == "__main__":
    sys.exit(main())
