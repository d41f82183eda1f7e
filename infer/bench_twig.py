"""Benchmark TwigVLM decoding methods on the same weights: plain, FastV, TTP, SSD, TTP + SSD.

    python -m infer.bench_twig [--config llava-mini] [--methods none,fastv,ttp,ssd,ttp+ssd]
        [--batch-sizes 1,8] [--answer-lengths 8,128] [--K 2 --T 2 --Kf 9 --R 64]
        [--repeats 3] [--out bench_results/bench_twig.json]
    (also `twig-jax bench-twig ...` and `twig-jax bench --methods ...`)

Methods (one random base model and one random twig, built once):
    none     plain `Generator` (no pruning, no drafting): the reference
    fastv    TwigGenerator(method="fastv", ssd=False): prune with base layer K-1's attention
    ttp      TwigGenerator(method="twig",  ssd=False): prune with the twig's attention
    ssd      TwigGenerator(method="none",  ssd=True):  self-speculative decoding, no pruning
    ttp+ssd  TwigGenerator(method="twig",  ssd=True):  both (TwigVLM)
Every row generates exactly the answer length (no EOS stop). Figures, medians over --repeats
timed runs after a warm-up run (compilation):
    e2e        wall time of `generate` (input checks, padding, prefill, decode, fetch)
    prefill    the method's own prefill alone (plain prefill / ttp_prefill with its caches)
    decode     e2e - prefill; decode tok/s = batch * (length - 1) / decode
    speed      (batch * length / e2e) relative to method none at the same batch and length
    acc, tok/round  SSD acceptance rate and tokens emitted per draft/verify round
    KV/seq     KV-cache bytes per sequence at the padded shapes (all groups, K and V)
Random weights make acceptance meaningless, so two SSD calibration rows follow:
    perfect  twig = copies of base layers K..L-1 (T = L-K), method none, theta 0: every draft is
             accepted, a round emits delta + 1 tokens; round time / plain decode step shows
             what one round costs when drafting runs the whole depth.
    round    the configured twig at theta 0 (always delta drafts): the cost of a full round of
             the real twig shape as a multiple of one plain step; with i.i.d. acceptance a the
             expected tokens per round are (1 - a^(delta+1)) / (1 - a), so the attainable decode
             speed-up is that over the round multiple (reported at the paper's a = 0.574).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Sequence

import numpy as np

METHODS = {  # name -> (pruning method, ssd); None = plain Generator
    "none": None,
    "fastv": ("fastv", False),
    "ttp": ("twig", False),
    "ssd": ("none", True),
    "ttp+ssd": ("twig", True),
}
PAPER_ACCEPTANCE = 0.574


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="twig-jax bench-twig", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="llava-mini", help="preset name (configs/NAME.json)")
    p.add_argument("--methods", default="none,fastv,ttp,ssd,ttp+ssd", help=f"comma-separated of {list(METHODS)}")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--answer-lengths", default="8,128", help="generated tokens per row (short, long)")
    p.add_argument("--text-tokens", type=int, default=24, help="text tokens in the prompt besides the image")
    p.add_argument("--K", type=int, default=2)
    p.add_argument("--T", type=int, default=2)
    p.add_argument("--Kf", type=int, default=9)
    p.add_argument("--R", type=int, default=64)
    p.add_argument("--draft-len", type=int, default=5)
    p.add_argument("--theta", type=float, default=0.6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-calibration", action="store_true", help="skip the perfect-twig and round-cost rows")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_results/bench_twig.json")
    args = p.parse_args(argv)

    def ints(s, what):
        try:
            v = [int(x) for x in s.split(",") if x.strip()]
        except ValueError:
            p.error(f"{what} must be comma-separated integers, got {s!r}")
        if not v or min(v) < 1:
            p.error(f"{what} needs positive integers")
        return v

    args.batch_sizes = ints(args.batch_sizes, "--batch-sizes")
    args.answer_lengths = ints(args.answer_lengths, "--answer-lengths")
    if min(args.answer_lengths) < 2:
        p.error("--answer-lengths must be >= 2 (one prefill token plus at least one decode step)")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        p.error(f"unknown --methods {bad}; have {list(METHODS)}")
    if "none" not in args.methods:
        args.methods = ["none"] + args.methods  # the reference for relative speed
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def _log(msg: str) -> None:
    print(f"[bench-twig {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_prompts(cfg, batch: int, text_tokens: int, seed: int):
    """BOS + text + N image placeholders + text (ending in a text token); random pixels."""
    rng = np.random.default_rng(seed)
    n, v = cfg.num_image_tokens, cfg.text.vocab_size
    prompts = []
    for _ in range(batch):
        pre = max(1, text_tokens // 3)
        text = rng.integers(3, v, size=text_tokens)
        text[text == cfg.image_token_index] = 3
        p = [1] + text[:pre].tolist() + [cfg.image_token_index] * n + text[pre:].tolist()
        prompts.append(p)
    vc = cfg.vision
    pixels = rng.standard_normal((batch, vc.num_channels, vc.image_size, vc.image_size)).astype(np.float32)
    return prompts, pixels


# ----------------------------------------------------------------------------------------------
# Timed pieces


def _prefill_fn(gen):
    """(jitted fn, args builder): the method's prefill alone, with the caches its decode uses."""
    import jax
    from flax import nnx

    from twig_jax.generate import prefill
    from twig_jax.ssd import ssd_extra_slots
    from twig_jax.ttp import ttp_prefill

    if not hasattr(gen, "plan"):
        def call(prompts, pixels, new):
            tokens, lengths, _, pv, _, capacity = gen.pad_inputs(prompts, pixels, new)
            if hasattr(gen, "run_prefill"):
                return gen.run_prefill(tokens, lengths, pv, capacity)
            return gen._prefill(gen.state, tokens, lengths, pv, capacity=capacity)
        return call

    def impl(state, twig_state, tokens, lengths, pv, key, *, extra):
        model, twig = nnx.merge(gen.graphdef, state), gen._twig(twig_state)
        use = twig if (gen.ssd or gen.plan.method == "twig") else None
        pre = ttp_prefill(model, use, gen.plan, tokens, lengths, pv, extra=extra, key=key)
        return pre.caches, pre.logits

    fn = jax.jit(impl, static_argnames=("extra",))

    def call(prompts, pixels, new):
        tokens, lengths, _, pv, out_len = gen._prepare(prompts, pixels, new)
        extra = ssd_extra_slots(gen.plan, out_len) if gen.ssd else out_len + 1
        return fn(gen.state, gen.twig_state, tokens, lengths, pv, jax.random.key(0), extra=extra)
    return call


def _block(x):
    import jax

    jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)
    return x


def time_method(gen, prompts, pixels, new: int, repeats: int) -> dict:
    """Warm up, then median e2e / prefill times and the last run's statistics."""
    prefill_call = _prefill_fn(gen)
    kw = dict(max_new_tokens=new, eos_ids=())
    t0 = time.perf_counter()
    out = gen.generate(prompts, pixels, **kw)
    _block(prefill_call(prompts, pixels, new))
    compile_s = time.perf_counter() - t0
    e2e, pre = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = gen.generate(prompts, pixels, **kw)
        e2e.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _block(prefill_call(prompts, pixels, new))
        pre.append(time.perf_counter() - t0)
    b = len(prompts)
    got = [len(t) for t in out.tokens]
    if got != [new] * b:
        raise RuntimeError(f"expected {new} tokens per row (no EOS), got {got}")
    e2e_s, pre_s = statistics.median(e2e), statistics.median(pre)
    dec_s = max(e2e_s - pre_s, 1e-9)
    res = {
        "e2e_s": e2e_s, "prefill_s": pre_s, "decode_s": dec_s, "warmup_s": compile_s,
        "e2e_tok_s": b * new / e2e_s, "decode_tok_s": b * (new - 1) / dec_s,
        "e2e_runs_s": e2e, "prefill_runs_s": pre,
    }
    st = getattr(out, "stats", None) or {}
    if st:
        rounds = np.asarray(st["per_row"]["rounds"])
        res.update(acceptance_rate=st["acceptance_rate"], tokens_per_round=st["mean_tokens_per_round"],
                   rounds_per_row_max=int(rounds.max()), round_s=dec_s / max(int(rounds.max()), 1))
    if hasattr(gen, "plan"):
        res["kv_bytes_per_seq"] = gen.kv_bytes_per_sequence()["total"]
        res["kept_visual_tokens"] = gen.plan.R
    else:
        tc = gen.cfg.text
        *_, capacity = gen.pad_inputs(prompts, pixels, new)
        res["kv_bytes_per_seq"] = 2 * tc.num_hidden_layers * tc.num_key_value_heads * tc.head_dim * capacity * \
            gen._bench_itemsize
        res["kept_visual_tokens"] = gen.cfg.num_image_tokens
    res["step_s"] = dec_s / (new - 1)
    return res


# ----------------------------------------------------------------------------------------------


def expected_tokens_per_round(a: float, delta: int) -> float:
    return float(delta + 1) if a >= 1 else (1 - a ** (delta + 1)) / (1 - a)


def _write(res: dict, path: str | None) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(res, f, indent=2)


def run(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from twig_jax.config import load_preset
    from twig_jax.generate import Generator
    from twig_jax.model.llava import Llava
    from twig_jax.twig import Twig, TwigConfig, init_twig_from_base
    from twig_jax.twig_generate import TwigGenerator

    cfg = load_preset(args.config)
    L, N = cfg.text.num_hidden_layers, cfg.num_image_tokens
    dtype = getattr(jnp, args.dtype)
    _log(f"config {args.config}: L={L}, N={N}, hidden={cfg.text.hidden_size}; building random weights")
    model = Llava(cfg, rngs=nnx.Rngs(args.seed), dtype=dtype)
    tc = TwigConfig(K=args.K, T=args.T, Kf=args.Kf, R=args.R, draft_len=args.draft_len, theta=args.theta)
    tc.validate(L, N)
    twig = Twig(cfg.text, tc, rngs=nnx.Rngs(args.seed + 1), dtype=dtype)
    itemsize = jnp.dtype(dtype).itemsize

    gens = {}
    for m in args.methods:
        spec = METHODS[m]
        if spec is None:
            g = Generator(model)
            g._bench_itemsize = itemsize
        else:
            g = TwigGenerator(model, twig, tc, method=spec[0], ssd=spec[1])
        gens[m] = g
    calib = {}
    if not args.no_calibration:
        k = args.K
        ptc = TwigConfig(K=k, T=L - k, Kf=L, R=N, draft_len=args.draft_len, theta=0.0)
        calib["perfect"] = TwigGenerator(model, init_twig_from_base(model, ptc), ptc, method="none", ssd=True)
        rtc = TwigConfig(K=k, T=args.T, Kf=L, R=N, draft_len=args.draft_len, theta=0.0)
        calib["round"] = TwigGenerator(model, twig, rtc, method="none", ssd=True)

    rows = []
    res = {
        "config": args.config, "methods": args.methods, "twig": dict(K=args.K, T=args.T, Kf=args.Kf, R=args.R,
                                                                     draft_len=args.draft_len, theta=args.theta),
        "dtype": args.dtype, "repeats": args.repeats, "batch_sizes": args.batch_sizes,
        "answer_lengths": args.answer_lengths, "text_tokens": args.text_tokens,
        "device": str(jax.devices()[0]), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "note": "random weights: acceptance of the random twig is meaningless; see the cal:* rows",
        "complete": False, "rows": rows,
    }
    for b in args.batch_sizes:
        prompts, pixels = make_prompts(cfg, b, args.text_tokens, args.seed)
        for new in args.answer_lengths:
            base = None
            for name, g in list(gens.items()) + [(f"cal:{k}", g) for k, g in calib.items()]:
                _log(f"batch {b}, length {new}: {name} ...")
                r = time_method(g, prompts, pixels, new, args.repeats)
                r.update(method=name, batch=b, answer_len=new, prompt_len=len(prompts[0]))
                if name == "none":
                    base = r
                if base is not None:
                    r["speed_vs_plain"] = r["e2e_tok_s"] / base["e2e_tok_s"]
                    r["decode_speed_vs_plain"] = r["decode_tok_s"] / base["decode_tok_s"]
                    if "round_s" in r:
                        r["round_vs_plain_step"] = r["round_s"] / base["step_s"]
                if name == "cal:round" and "round_vs_plain_step" in r:
                    e = expected_tokens_per_round(PAPER_ACCEPTANCE, args.draft_len)
                    r["paper_acceptance"] = PAPER_ACCEPTANCE
                    r["expected_tokens_per_round_at_paper_acceptance"] = e
                    r["decode_speedup_at_paper_acceptance"] = e / r["round_vs_plain_step"]
                rows.append(r)
                _write(res, args.out)  # partial results survive an interrupted run ("complete": false)
                _log(f"  e2e {r['e2e_s']:.3f}s prefill {r['prefill_s']:.3f}s decode {r['decode_tok_s']:.1f} tok/s "
                     f"speed x{r.get('speed_vs_plain', float('nan')):.2f}")
    res["complete"] = True
    return res


def _fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def table(res: dict) -> str:
    hdr = (f"{'batch':>5} {'len':>4} {'method':<12} {'speed':>6} {'e2e s':>8} {'prefill s':>9} {'dec tok/s':>9} "
           f"{'acc':>5} {'tok/rnd':>7} {'rnd/step':>8} {'kept':>5} {'KV/seq MiB':>10}")
    lines = [hdr, "-" * len(hdr)]
    for r in res["rows"]:
        lines.append(
            f"{r['batch']:>5} {r['answer_len']:>4} {r['method']:<12} {_fmt(r.get('speed_vs_plain'), '6.2f')} "
            f"{r['e2e_s']:>8.3f} {r['prefill_s']:>9.3f} {r['decode_tok_s']:>9.1f} "
            f"{_fmt(r.get('acceptance_rate'), '5.2f')} {_fmt(r.get('tokens_per_round'), '7.2f')} "
            f"{_fmt(r.get('round_vs_plain_step'), '8.2f')} {r['kept_visual_tokens']:>5} "
            f"{r['kv_bytes_per_seq'] / 2**20:>10.2f}")
    for r in res["rows"]:
        if "decode_speedup_at_paper_acceptance" in r:
            lines.append(
                f"batch {r['batch']} len {r['answer_len']}: one full round of the K={res['twig']['K']}, "
                f"T={res['twig']['T']} twig costs {r['round_vs_plain_step']:.2f} plain steps; at the paper's "
                f"acceptance {PAPER_ACCEPTANCE} (~{r['expected_tokens_per_round_at_paper_acceptance']:.2f} "
                f"tokens/round) decode would run x{r['decode_speedup_at_paper_acceptance']:.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    res = run(args)
    print(table(res))
    if args.out:
        _write(res, args.out)
        _log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
