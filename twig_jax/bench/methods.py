"""Benchmark TwigVLM decoding methods on the same weights: plain, FastV, TTP, SSD, TTP + SSD.

    python -m twig_jax.bench.methods [--config llava-mini] [--methods plain,fastv,twig,ssd,twig+ssd]
        [--batch-sizes 1,8] [--answer-lengths 8,128] [--K 2 --T 2 --Kf 9 --R 64]
        [--repeats 3] [--calibration-batch-sizes 1] [--clock wall|cpu] [--out bench_results/bench_twig.json]
    (also `twig-jax bench-twig ...` and `twig-jax bench --methods ...`)

The command line builds one random base model and one random twig; `bench_methods` is the library
entry for real weights (a trained model and twig, real prompts and images):

    from twig_jax.bench.methods import bench_methods, table
    rows = bench_methods(model, twig, twig_cfg, prompts, pixels, batch_sizes=(1, 8),
                         answer_lengths=(8, 128), eos_ids=())
    print(table({"rows": rows, "twig": {"K": twig_cfg.K, "T": twig_cfg.T}}))

Variants (decode/variants.py names; all generators share one per-layer copy of the decoder weights):
    plain     plain `Generator` (no pruning, no drafting, per-layer decode): the reference
    fastv     TwigGenerator(method="fastv", ssd=False): prune with base layer K-1's attention
    twig      TwigGenerator(method="twig",  ssd=False): TTP, prune with the twig's attention
    ssd       TwigGenerator(method="none",  ssd=True):  self-speculative decoding, no pruning
    twig+ssd  TwigGenerator(method="twig",  ssd=True):  both (TwigVLM)
    any other METHOD[-RULE][+ssd], e.g. fastv-cover, phead+ssd
With eos_ids=() (the default, and the command line) every row generates exactly the answer length;
with real EOS ids rows stop early and the figures count the tokens actually generated. Figures,
medians over `repeats` timed runs after a warm-up run (compilation):
    e2e        wall time of `generate` (input checks, padding, prefill, decode, fetch)
    prefill    the method's own prefill alone (plain prefill / ttp_prefill with its caches)
    decode     e2e - prefill; decode tok/s = (generated - batch) / decode (the prefill emits one per row)
    speed      generated / e2e, relative to plain at the same batch and length (docs/design.md, "Self-speculative decoding")
    acc, tok/round  SSD acceptance rate (accepted / drafted) and tokens emitted per draft/verify round
    round/step one draft+verify round (decode / rounds of the longest row) over one plain decode step
    KV/seq     KV-cache bytes per sequence at the padded shapes (all groups, K and V)
Calibration rows (calibration=True; with random weights the twig's acceptance means nothing):
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
import os
import platform
import statistics
import sys
import dataclasses
import time
from typing import Callable, Sequence

import numpy as np

from twig_jax.files import write_json_atomic

DEFAULT_VARIANTS = ("plain", "fastv", "twig", "ssd", "twig+ssd")  # decode/variants.py names
PAPER_ACCEPTANCE = 0.574


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="twig-jax bench-twig", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="llava-mini", help="preset name (configs/NAME.json)")
    p.add_argument("--methods", default=",".join(DEFAULT_VARIANTS),
                   help="comma-separated variants, METHOD[-RULE][+ssd] (decode/variants.py), e.g. plain,twig+ssd")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--answer-lengths", default="8,128", help="generated tokens per row (short, long)")
    p.add_argument("--text-tokens", type=int, default=24, help="text tokens in the prompt besides the image")
    p.add_argument("--K", type=int, default=2)
    p.add_argument("--T", type=int, default=2)
    p.add_argument("--Kf", type=int, default=9)
    p.add_argument("--R", type=int, default=64)
    p.add_argument("--draft-len", type=int, default=5)
    p.add_argument("--theta", type=float, default=0.6)
    p.add_argument("--tree-width", type=int, default=10, help="E of the +tree variants (the TwigVLM++ setting)")
    p.add_argument("--tree-depth", type=int, default=4, help="D of the +tree variants")
    p.add_argument("--tree-nodes", type=int, default=60, help="N of the +tree variants")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-calibration", action="store_true", help="skip the perfect-twig and round-cost rows")
    p.add_argument("--calibration-batch-sizes", default=None,
                   help="batch sizes that get the calibration rows (default: all of --batch-sizes)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="time with elapsed (wall) or process CPU time; cpu is steadier on a shared machine "
                        "(with XLA_FLAGS=--xla_cpu_multi_thread_eigen=false)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mesh", help="run every variant on a device mesh, e.g. data=2,tensor=4 (default: one device)")
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
    args.calibration_batch_sizes = (None if args.calibration_batch_sizes is None
                                    else ints(args.calibration_batch_sizes, "--calibration-batch-sizes"))
    if min(args.answer_lengths) < 2:
        p.error("--answer-lengths must be >= 2 (one prefill token plus at least one decode step)")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from twig_jax.decode.variants import parse_variant
    from twig_jax.twig.config import TwigConfigError

    if not args.methods:
        p.error("--methods is empty")
    for m in args.methods:
        try:
            parse_variant(m)
        except TwigConfigError as e:
            p.error(f"--methods: {e}")
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


def _block(x):
    import jax

    jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)
    return x


def _plain_kv_bytes(gen, prompts, pixels, new: int) -> int:
    tc = gen.cfg.text
    *_, capacity = gen.pad_inputs(prompts, pixels, new)
    itemsize = np.dtype(gen.layer_weights.layer(0)["wq"].dtype if gen.layer_weights is not None else np.float32).itemsize
    return 2 * tc.num_hidden_layers * tc.num_key_value_heads * tc.head_dim * capacity * itemsize


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_method(gen, prompts, pixels, new: int, repeats: int, eos_ids: Sequence[int] = (),
                sampling=None, clock: str = "wall") -> dict:
    """Warm up, then median e2e / prefill times over `repeats` runs, and the last run's statistics.

    clock "wall": elapsed time; "cpu": this process's CPU time (all threads), steadier than wall
    time on a machine shared with other jobs (run XLA single-threaded to keep it comparable).
    """
    from twig_jax.decode.sampling import SamplingConfig

    now = CLOCKS[clock]
    prefill_call = gen.prefill_only  # the prefill alone, with the caches its decode uses
    kw = dict(max_new_tokens=new, eos_ids=tuple(eos_ids), sampling=sampling or SamplingConfig())
    t0 = now()
    out = gen.generate(prompts, pixels, **kw)
    _block(prefill_call(prompts, pixels, new))
    compile_s = now() - t0
    e2e, pre = [], []
    for _ in range(repeats):
        t0 = now()
        out = gen.generate(prompts, pixels, **kw)
        e2e.append(now() - t0)
        t0 = now()
        _block(prefill_call(prompts, pixels, new))
        pre.append(now() - t0)
    b = len(prompts)
    got = [len(t) for t in out.tokens]
    if not eos_ids and got != [new] * b:
        raise RuntimeError(f"expected {new} tokens per row (no EOS), got {got}")
    generated = int(sum(got))
    e2e_s, pre_s = statistics.median(e2e), statistics.median(pre)
    dec_s = max(e2e_s - pre_s, 1e-9)
    decoded = generated - b  # the prefill's logits give each row its first token
    res = {
        "e2e_s": e2e_s, "prefill_s": pre_s, "decode_s": dec_s, "warmup_s": compile_s,
        "generated_tokens": generated, "mean_answer_len": generated / b,
        "e2e_tok_s": generated / e2e_s, "decode_tok_s": decoded / dec_s,
        "step_s": dec_s / max(max(got) - 1, 1),  # one pass of the loop (the longest row sets the count)
        "e2e_runs_s": e2e, "prefill_runs_s": pre, "clock": clock,
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
        res["kv_bytes_per_seq"] = _plain_kv_bytes(gen, prompts, pixels, new)
        res["kept_visual_tokens"] = gen.cfg.num_image_tokens
    return res


# ----------------------------------------------------------------------------------------------


def expected_tokens_per_round(a: float, delta: int) -> float:
    return float(delta + 1) if a >= 1 else (1 - a ** (delta + 1)) / (1 - a)


def make_generators(model, twig, twig_cfg, methods: Sequence[str], calibration: bool = True, mesh=None) -> dict:
    """{name: generator} for `methods` (+ "cal:perfect", "cal:round" with calibration), sharing one
    per-layer copy of the base decoder weights (on one device) or all on `mesh`. Variant "plain" is
    always built (the reference)."""
    from twig_jax.decode.generator import Generator
    from twig_jax.twig.config import TwigConfigError
    from twig_jax.twig.module import init_twig_from_base
    from twig_jax.decode.generator import TwigGenerator

    from twig_jax.decode.variants import parse_variant
    from twig_jax.twig.config import needs_twig

    variants = {m: parse_variant(m) for m in methods}  # TwigConfigError names a bad one
    plain = Generator(model, mesh=mesh)
    shared = dict(mesh=mesh) if mesh is not None else dict(layer_weights=plain.layer_weights)
    gens = {"plain": plain}
    for m, v in variants.items():
        if m == "plain":
            continue
        if twig is None and (v.ssd or needs_twig(v.method)):
            raise TwigConfigError(f"variant {m!r} needs a twig")
        tc = dataclasses.replace(twig_cfg, spec=v.spec, **({} if v.method == "none" else {"select": v.select}))
        gens[m] = TwigGenerator(model, twig if (v.ssd or needs_twig(v.method)) else None, tc, method=v.method,
                                ssd=v.ssd, **shared)
    if calibration:
        L, N, k = model.cfg.text.num_hidden_layers, model.cfg.num_image_tokens, twig_cfg.K
        ptc = dataclasses.replace(twig_cfg, T=L - k, Kf=L, R=N, R_bar=None, theta=0.0)
        gens["cal:perfect"] = TwigGenerator(model, init_twig_from_base(model, ptc), ptc, method="none", ssd=True,
                                            **shared)
        if twig is not None:
            rtc = dataclasses.replace(twig_cfg, Kf=L, R=N, R_bar=None, theta=0.0)
            gens["cal:round"] = TwigGenerator(model, twig, rtc, method="none", ssd=True, **shared)
    return gens


def bench_methods(model, twig, twig_cfg, prompts: Sequence[Sequence[int]], pixels, *,
                  methods: Sequence[str] = DEFAULT_VARIANTS,
                  batch_sizes: Sequence[int] = (1, 8), answer_lengths: Sequence[int] = (8, 128),
                  repeats: int = 3, calibration: bool = True, calibration_batch_sizes: Sequence[int] | None = None,
                  eos_ids: Sequence[int] = (), sampling=None, clock: str = "wall",
                  log: Callable[[str], None] | None = _log, on_row: Callable[[dict], None] | None = None,
                  mesh=None) -> list[dict]:
    """Time every method on the same weights and return one dict per (batch, length, method).

    model: a twig_jax Llava; twig: a Twig (None is fine for methods none / fastv); twig_cfg: its
    TwigConfig (K, T, Kf, R or R_bar, draft_len, theta); prompts: token-id lists with the N image
    placeholders expanded; pixels: [n, C, H, W] preprocessed images, one per prompt. A batch of b
    takes prompts 0..b-1 (cycling when there are fewer). answer_lengths are max_new_tokens;
    eos_ids=() makes every row generate exactly that many (comparable timings), real EOS ids let
    rows stop (then speed counts generated tokens). Each row holds the figures of time_method plus
    method, batch, answer_len, prompt_len, speed_vs_plain (end-to-end generated tokens/s over
    plain's), decode_speed_vs_plain, round_vs_plain_step (SSD methods). calibration adds
    "cal:perfect" (and "cal:round" when a twig is given) rows; calibration_batch_sizes limits them
    to those batch sizes (default: all). clock: "wall" or "cpu" (see time_method). on_row(row) is
    called as each row completes. mesh: every generator runs on it (decode/placement.py).
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock {clock!r}: have {list(CLOCKS)}")
    log = log or (lambda msg: None)
    methods = list(methods)
    if "plain" not in methods:
        methods = ["plain"] + methods  # the reference for relative speed
    gens = make_generators(model, twig, twig_cfg, methods, calibration, mesh)
    n_have = len(prompts)
    if n_have == 0 or np.asarray(pixels).shape[0] != n_have:
        raise ValueError(f"need one image per prompt: {n_have} prompts, {np.asarray(pixels).shape[0]} images")
    pixels = np.asarray(pixels, np.float32)
    delta = twig_cfg.draft_len
    rows = []
    for b in batch_sizes:
        idx = [i % n_have for i in range(b)]
        bp, bx = [list(prompts[i]) for i in idx], pixels[idx]
        for new in answer_lengths:
            base = None
            for name, g in gens.items():
                if name.startswith("cal:") and calibration_batch_sizes is not None and b not in calibration_batch_sizes:
                    continue
                if name not in methods and not name.startswith("cal:"):
                    continue
                log(f"batch {b}, length {new}: {name} ...")
                r = time_method(g, bp, bx, new, repeats, eos_ids=eos_ids, sampling=sampling, clock=clock)
                r.update(method=name, batch=b, answer_len=new, prompt_len=max(len(p) for p in bp))
                if name == "plain":
                    base = r
                r["speed_vs_plain"] = r["e2e_tok_s"] / base["e2e_tok_s"]
                r["decode_speed_vs_plain"] = r["decode_tok_s"] / base["decode_tok_s"]
                if "round_s" in r:
                    r["round_vs_plain_step"] = r["round_s"] / base["step_s"]
                if name == "cal:round":
                    e = expected_tokens_per_round(PAPER_ACCEPTANCE, delta)
                    r["paper_acceptance"] = PAPER_ACCEPTANCE
                    r["expected_tokens_per_round_at_paper_acceptance"] = e
                    r["decode_speedup_at_paper_acceptance"] = e / r["round_vs_plain_step"]
                rows.append(r)
                if on_row is not None:
                    on_row(r)
                log(f"  e2e {r['e2e_s']:.3f}s prefill {r['prefill_s']:.3f}s decode {r['decode_tok_s']:.1f} tok/s "
                    f"speed x{r['speed_vs_plain']:.2f}")
    return rows


def _write(res: dict, path: str | None) -> None:
    if path:
        write_json_atomic(path, res)


def run(args) -> dict:
    """The command line: a random base model and twig of preset args.config, then bench_methods."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from twig_jax.model.config import load_preset
    from twig_jax.model.llava import Llava
    from twig_jax.twig.module import Twig
    from twig_jax.twig.config import TwigConfig

    cfg = load_preset(args.config)
    L, N = cfg.text.num_hidden_layers, cfg.num_image_tokens
    dtype = getattr(jnp, args.dtype)
    from twig_jax.parallel.sharding import make_mesh, parse_mesh

    mesh = make_mesh(parse_mesh(args.mesh)) if args.mesh else None
    _log(f"config {args.config}: L={L}, N={N}, hidden={cfg.text.hidden_size}; building random weights")
    model = random_model(lambda: Llava(cfg, rngs=nnx.Rngs(args.seed), dtype=dtype), mesh)
    tc = TwigConfig(K=args.K, T=args.T, Kf=args.Kf, R=args.R, draft_len=args.draft_len, theta=args.theta,
                    tree_width=args.tree_width, tree_depth=args.tree_depth, tree_nodes=args.tree_nodes)
    tc.validate(L, N)
    twig = random_model(lambda: Twig(cfg.text, tc, rngs=nnx.Rngs(args.seed + 1), dtype=dtype), mesh)
    prompts, pixels = make_prompts(cfg, max(args.batch_sizes), args.text_tokens, args.seed)

    rows = []
    res = {
        "config": args.config, "methods": args.methods, "twig": dict(K=args.K, T=args.T, Kf=args.Kf, R=args.R,
                                                                     draft_len=args.draft_len, theta=args.theta),
        "dtype": args.dtype, "repeats": args.repeats, "clock": args.clock, "mesh": args.mesh,
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "batch_sizes": args.batch_sizes,
        "answer_lengths": args.answer_lengths, "text_tokens": args.text_tokens,
        "device": str(jax.devices()[0]), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "load_avg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "note": "random weights: acceptance of the random twig is meaningless; see the cal:* rows",
        "complete": False, "rows": rows,
    }

    def on_row(r):
        rows.append(r)
        _write(res, args.out)  # partial results survive an interrupted run ("complete": false)

    bench_methods(model, twig, tc, prompts, pixels, methods=args.methods, batch_sizes=args.batch_sizes,
                  answer_lengths=args.answer_lengths, repeats=args.repeats, calibration=not args.no_calibration,
                  calibration_batch_sizes=args.calibration_batch_sizes, clock=args.clock, on_row=on_row, mesh=mesh)
    res["load_avg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    res["complete"] = True
    return res


def random_model(build, mesh=None):
    """The module `build()` makes, its random weights made straight into their shards on `mesh`
    (a 7B model never sits whole on one device)."""
    import jax
    from flax import nnx

    from twig_jax.parallel.sharding import param_shardings

    if mesh is None:
        return build()
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    state = jax.jit(lambda: nnx.state(build()), out_shardings=param_shardings(abstract, mesh))()
    return nnx.merge(graphdef, state)


def _fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def table(res: dict) -> str:
    """A text table of res["rows"] (res["twig"] = {"K", "T"} names the twig in the footnotes)."""
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
    tw = res.get("twig", {})
    for r in res["rows"]:
        if "decode_speedup_at_paper_acceptance" in r:
            lines.append(
                f"batch {r['batch']} len {r['answer_len']}: one full round of the K={tw.get('K')}, "
                f"T={tw.get('T')} twig costs {r['round_vs_plain_step']:.2f} plain steps; at the paper's "
                f"acceptance {PAPER_ACCEPTANCE} (~{r['expected_tokens_per_round_at_paper_acceptance']:.2f} "
                f"tokens/round) decode would run x{r['decode_speedup_at_paper_acceptance']:.2f}")
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict]) -> str:
    """The rows as a Markdown table (README)."""
    out = ["| batch | len | method | speed | prefill s | dec tok/s | acceptance | tokens/round | round / plain step "
           "| kept | KV/seq MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {r['batch']} | {r['answer_len']} | {r['method']} | {_fmt(r.get('speed_vs_plain'), '.2f')} | "
            f"{r['prefill_s']:.2f} | {r['decode_tok_s']:.1f} | {_fmt(r.get('acceptance_rate'), '.2f')} | "
            f"{_fmt(r.get('tokens_per_round'), '.2f')} | {_fmt(r.get('round_vs_plain_step'), '.2f')} | "
            f"{r['kept_visual_tokens']} | {r['kv_bytes_per_seq'] / 2**20:.1f} |")
    return "\n".join(out)


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
