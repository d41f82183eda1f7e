"""Where self-speculative decoding's time goes: the cost of a plain decode step, a draft step, the
verification pass and a whole draft/verify round, side by side in one run.

    python -m research.ssd_profile [--model DIR] [--twig DIR] [--batches 1,8] [--repeats 5] [--out-json F]

Every figure is a median over `--repeats` timed calls after a warm-up (compiled) call.
  plain step   (generate 65 new tokens - generate 1) / 64, plain `Generator`: one token, L layers;
  ssd round    (generate 65 - generate 1) / loop rounds, SSD without pruning (method none); the
               batch's loop runs until its slowest row is done, so loop rounds = the most any row took;
  draft step   trunk (base layers 0..K-1) + twig layers + twig head, one token, in a fori_loop;
  verify pass  base layers K..L-1 on draft_len + 1 tokens, in a fori_loop; "verify pass / one-token
               pass" divides it by the same pass on one token (about 1 where matmuls are memory-bound,
               as on a GPU at small batch; speculation's premise).
EOS is switched off, so every call generates exactly its budget. "round, predicted" is
(draft steps per round) x draft step + verify pass; the rest of a measured round is the loop's
own cost (acceptance, rollback, bookkeeping). The speed cap of SSD at this acceptance is
tokens per round x plain step / round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def _median_time(fn, repeats: int) -> float:
    fn()  # compile / warm
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def component_costs(gen, prompts, pixels, repeats: int, max_new_tokens: int, n_iter: int = 30) -> dict:
    """Seconds per draft step and per verification pass, on the caches of a real prefill with the
    capacity a `max_new_tokens` generate call gets (attention reads the whole static cache)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from twig_jax.decode.prune import target_step, trunk_step, twig_step

    tokens, lengths, _, pv, out_len = gen.prepare(prompts, pixels, max_new_tokens)
    caches, _ = gen._prefill_only(gen.state, gen.twig_state, gen.weights, tokens, lengths, pv, jax.random.key(0),
                                  extra=out_len + gen.plan.draft_len + 1)
    plan = gen.plan

    def loop(kind, n_tok: int = plan.draft_len + 1):
        @jax.jit
        def f(state, twig_state, w, caches):
            model, twig = nnx.merge(gen.graphdef, state), nnx.merge(gen.twig_graphdef, twig_state)
            b = caches.trunk.lengths.shape[0]

            def body(i, c):  # lengths are put back each time: every call writes the same slots
                trunk, tw, mid, tail, acc = c
                if kind == "draft":
                    t2, h = trunk_step(model, plan, trunk, jnp.full((b, 1), i % 7, jnp.int32), w)
                    tw2, lq = twig_step(twig, tw, h, trunk.lengths[:, None], w)
                    return (t2.replace(lengths=trunk.lengths), tw2.replace(lengths=tw.lengths), mid, tail,
                            acc + jnp.max(jax.nn.softmax(lq)))
                h = jnp.full((b, n_tok, model.cfg.text.hidden_size), 1e-3 * i, jnp.float32)
                pos = trunk.lengths[:, None] + jnp.arange(n_tok)[None]
                m2, t2, lp = target_step(model, plan, mid, tail, h.astype(model.text.embed[...].dtype), pos, w)
                return trunk, tw, m2.replace(lengths=mid.lengths), t2.replace(lengths=tail.lengths), acc + lp.max()

            return jax.lax.fori_loop(0, n_iter, body, (caches.trunk, caches.twig, caches.mid, caches.tail,
                                                       jnp.float32(0)))[-1]

        return _median_time(lambda: jax.block_until_ready(f(gen.state, gen.twig_state, gen.weights, caches)),
                            repeats) / n_iter

    # verify_one: the same pass on one token. Speculation pays when checking draft_len + 1 tokens
    # costs about what one token costs (a GPU's matmuls are memory-bound there); the ratio says how
    # far this machine is from that.
    return dict(draft_step=loop("draft"), verify_pass=loop("verify"), verify_one=loop("verify", 1))


def profile(model, twig, twig_cfg, prompts, pixels, *, repeats: int = 5, n_new: int = 64) -> dict:
    from twig_jax.decode.generator import make_generator

    plain = make_generator(model, None, None, method="none", ssd=False)
    ssd = make_generator(model, twig, twig_cfg, method="none", ssd=True)
    gen = lambda g, n: g.generate(prompts, pixels, max_new_tokens=n, eos_ids=())  # noqa: E731
    t1 = _median_time(lambda: gen(plain, 1), repeats)
    tn = _median_time(lambda: gen(plain, n_new + 1), repeats)
    plain_step = (tn - t1) / n_new
    out = gen(ssd, n_new + 1)
    # The batch's loop runs until its slowest row is done: time is per loop round, not per row-round.
    rounds = max(int(r) for r in out.stats["per_row"]["rounds"])
    row_rounds = int(out.stats["rounds"])
    drafted = int(out.stats["drafted"]) / row_rounds  # per row-round
    accepted = int(out.stats["accepted"]) / row_rounds
    s1 = _median_time(lambda: gen(ssd, 1), repeats)
    sn = _median_time(lambda: gen(ssd, n_new + 1), repeats)
    round_s = (sn - s1) / rounds
    comp = component_costs(ssd, prompts, pixels, repeats, n_new + 1)
    # a row runs one draft step per proposed draft, plus step m for h_m (the last proposed token's KV)
    steps_per_round = drafted + 1  # (the loop runs as many steps as its longest-drafting row; a lower bound)
    predicted = steps_per_round * comp["draft_step"] + comp["verify_pass"]
    tokens_per_round = n_new / rounds  # per row, per loop round
    return dict(batch=len(prompts), plain_step_ms=1e3 * plain_step, draft_step_ms=1e3 * comp["draft_step"],
                verify_pass_ms=1e3 * comp["verify_pass"], verify_one_ms=1e3 * comp["verify_one"],
                verify_over_one=comp["verify_pass"] / comp["verify_one"], round_ms=1e3 * round_s, round_predicted_ms=1e3 * predicted,
                loop_overhead_ms=1e3 * (round_s - predicted), draft_steps_per_round=steps_per_round,
                tokens_per_round=tokens_per_round, acceptance=accepted / max(drafted, 1),
                draft_over_plain=comp["draft_step"] / plain_step,
                ssd_speed_cap=tokens_per_round * plain_step / round_s,
                prefill_ms=dict(plain=1e3 * t1, ssd=1e3 * s1))


def markdown(rows) -> str:
    lines = ["| batch | plain step | draft step | draft / plain | verify pass | verify pass / one-token pass "
             "| round (measured) | round (predicted) | loop overhead | tokens / round | SSD decode speed vs plain |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['plain_step_ms']:.2f} ms | {r['draft_step_ms']:.2f} ms | "
                     f"{r['draft_over_plain']:.2f} | {r['verify_pass_ms']:.2f} ms | {r['verify_over_one']:.2f} | "
                     f"{r['round_ms']:.2f} ms | "
                     f"{r['round_predicted_ms']:.2f} ms | {r['loop_overhead_ms']:.2f} ms | "
                     f"{r['tokens_per_round']:.2f} | {r['ssd_speed_cap']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from twig_jax.eval.evaluate import DEFAULT_MODEL, DEFAULT_TWIG

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--twig", default=DEFAULT_TWIG)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out-json", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights are cast to this on load (default %(default)s, as the demo and the eval run the bundle)")
    args = p.parse_args(argv)

    from research.speed_table import description_batch, load_model_and_twig

    model, _, twig, twig_cfg, pipe = load_model_and_twig(args.model, args.twig, args.dtype)
    batches = [int(b) for b in args.batches.split(",")]
    prompts, pixels = description_batch(pipe, None, max(batches))
    rows = []
    for b in batches:
        r = profile(model, twig, twig_cfg, prompts[:b], pixels[:b], repeats=args.repeats,
                    n_new=args.new_tokens)
        rows.append(r)
        print(f"batch {b}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items() if isinstance(v, float)),
              file=sys.stderr)
    print(markdown(rows))
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump({"model": args.model, "twig": args.twig, "dtype": args.dtype, "K": twig_cfg.K, "T": twig_cfg.T,
                       "draft_len": twig_cfg.draft_len, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
