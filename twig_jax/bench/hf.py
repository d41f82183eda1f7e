"""Benchmark: twig_jax jitted greedy decode vs Hugging Face PyTorch `generate`, same weights.

    python -m twig_jax.bench.hf [--config llava-mini] [--batch-sizes 1,8] [--new-tokens 128]
                          [--repeats 3] [--dtype float32] [--skip-hf] [--out bench_results/...json]

A random HF `LlavaForConditionalGeneration` is built from configs/CONFIG.json (seeded), saved with
`save_pretrained` and loaded into twig_jax with `convert.load_hf_llava`, so both sides run the same
weights. Prompts: BOS + a few text tokens + the image placeholders + text, random pixel values;
both sides generate exactly --new-tokens tokens per row (no EOS stop).

Ours: prefill = `Generator._prefill` (inputs padded to a bucket, blocked); decode = the jitted
`_decode` while_loop (new_tokens - 1 steps, output fetched to host); end to end = input checks +
padding + prefill + decode + fetch. HF: prefill = `generate(max_new_tokens=1)`; decode = full
`generate` minus that prefill. All figures are medians over --repeats runs after a warm-up
(compilation for ours). Throughputs are aggregate over the batch: decode tok/s =
(new_tokens - 1) * batch / decode time, e2e tok/s = new_tokens * batch / end-to-end time.

Floors (twig_jax/bench/floors.py): decode step >= bytes read per step / measured bandwidth;
prefill >= prefill FLOPs / measured matmul rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Sequence

import numpy as np

TARGETS = {
    "decode_step_b1_vs_floor": ("batch-1 decode step <= 1.5x floor", 1.5),
    "prefill_b1_vs_floor": ("batch-1 prefill <= 1.5x floor", 1.5),
    "decode_b8_vs_hf": ("decode tok/s >= 3x HF at batch 8", 3.0),
    "e2e_b1_vs_hf": ("e2e tok/s >= 1.2x HF at batch 1", 1.2),
    "e2e_b8_vs_hf": ("e2e tok/s >= 2x HF at batch 8", 2.0),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="twig-jax bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="llava-mini", help="preset name (configs/NAME.json)")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--text-tokens", type=int, default=24,
                   help="text tokens around the image placeholders (prompt = image tokens + this)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop repeating an (impl, batch) once its timed runs took this long (>= 1 run)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--skip-hf", action="store_true", help="time twig_jax only")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_results/bench_llava_mini.json")
    args = p.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        p.error("--batch-sizes needs at least one positive batch size")
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (one prefill token plus at least one decode step)")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


# ----------------------------------------------------------------------------------------------
# Models


def build_models(config: str, dtype: str, seed: int, want_hf: bool, log):
    """(our Llava, HF model or None, note). Both from the same saved HF checkpoint when possible."""
    import jax.numpy as jnp
    import torch
    import transformers

    from twig_jax.model.config import PRESET_DIR, load_preset

    load_preset(config)  # validates the name with a clear error
    with open(os.path.join(PRESET_DIR, f"{config}.json")) as f:
        hf_dict = json.load(f)
    hf_cfg = transformers.LlavaConfig.from_dict(hf_dict)
    torch.manual_seed(seed)
    hf = transformers.LlavaForConditionalGeneration._from_config(
        hf_cfg, attn_implementation="sdpa", dtype=torch.float32).eval()
    jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    note = "same weights: HF save_pretrained -> convert.load_hf_llava"
    try:
        from twig_jax.convert.llava import load_hf_llava
    except ImportError as e:
        load_hf_llava = None
        note = f"DIFFERENT WEIGHTS: twig_jax.convert.load_hf_llava not importable ({e}); ours random"
    if load_hf_llava is not None:
        with tempfile.TemporaryDirectory(prefix="twig_bench_") as tmp:
            t0 = time.perf_counter()
            hf.save_pretrained(tmp)
            ours = load_hf_llava(tmp, dtype=jdtype)
            log(f"weights: saved HF checkpoint and loaded it into twig_jax in {time.perf_counter() - t0:.1f}s")
    else:
        from flax import nnx

        from twig_jax.model.llava import Llava
        ours = Llava(load_preset(config), rngs=nnx.Rngs(seed), dtype=jdtype)
    if dtype == "bfloat16":
        hf = hf.to(torch.bfloat16)
    if not want_hf:
        del hf
        hf = None
    return ours, hf, note


def make_inputs(cfg, batch: int, text_tokens: int, seed: int):
    """Prompts (lists of ids, all the same length) and pixel values [B, C, H, W] float32."""
    rng = np.random.default_rng(seed)
    tc = cfg.text
    n_img = cfg.num_image_tokens
    before = max(text_tokens // 3, 1)
    after = max(text_tokens - before, 1)
    special = {cfg.image_token_index, tc.bos_token_id, tc.eos_token_id, tc.pad_token_id}
    pool = np.array([t for t in range(3, tc.vocab_size) if t not in special])
    prompts = []
    for _ in range(batch):
        ids = [tc.bos_token_id if tc.bos_token_id is not None else int(pool[0])]
        ids += rng.choice(pool, before - 1 if before > 1 else 0).tolist()
        ids += [cfg.image_token_index] * n_img
        ids += rng.choice(pool, after).tolist()
        prompts.append([int(t) for t in ids])
    v = cfg.vision
    pixels = rng.standard_normal((batch, v.num_channels, v.image_size, v.image_size)).astype(np.float32)
    return prompts, pixels


# ----------------------------------------------------------------------------------------------
# Timed runs


def time_ours(gen, prompts, pixels, new_tokens: int, repeats: int, log, budget_s=None) -> dict:
    import jax
    import jax.numpy as jnp

    from twig_jax.decode.sampling import SamplingConfig

    pad_id = gen.cfg.text.pad_token_id if gen.cfg.text.pad_token_id is not None else 0

    def once(steps=new_tokens):
        t0 = time.perf_counter()
        gen.check_inputs(prompts, pixels, new_tokens)
        tokens, lengths, active, pv, out_len, capacity = gen.pad_inputs(prompts, pixels, new_tokens)
        cache, logits = gen.run_prefill(tokens, lengths, pv, capacity)
        jax.block_until_ready((cache, logits))
        t1 = time.perf_counter()
        out, count, _ = gen.run_decode(cache, logits, active, jax.random.key(0), jnp.int32(steps),
                                       out_len=out_len, sampling=SamplingConfig(), eos_ids=(), pad_id=int(pad_id))
        out, count = np.asarray(out), np.asarray(count)
        t2 = time.perf_counter()
        n = len(prompts)
        if not np.all(count[:n] == steps):
            raise RuntimeError(f"twig_jax generated {count[:n].tolist()} tokens, expected {steps}")
        info = dict(padded_batch=int(tokens.shape[0]), padded_prompt=int(tokens.shape[1]), capacity=int(capacity))
        return t1 - t0, t2 - t1, t2 - t0, out[:n, :new_tokens], info

    # Warm-up: compile both functions and run them once with a 1-token decode (max_new_tokens is a
    # traced argument and out_len stays the bucket, so the timed runs reuse these executables).
    t0 = time.perf_counter()
    _, _, _, _, info = once(steps=2)
    compile_s = time.perf_counter() - t0
    log(f"  ours b={len(prompts)}: warm-up (compile + prefill + 1 decode step) {compile_s:.1f}s; shapes {info}")
    pre, dec, e2e = [], [], []
    for r in range(repeats):
        p, d, e, toks, _ = once()
        pre.append(p), dec.append(d), e2e.append(e)
        log(f"  ours b={len(prompts)} run {r + 1}/{repeats}: prefill {p:.3f}s decode {d:.3f}s e2e {e:.3f}s")
        if budget_s is not None and sum(e2e) > budget_s and r + 1 < repeats:
            log(f"  ours b={len(prompts)}: time budget {budget_s:.0f}s spent; stopping after {r + 1} run(s)")
            break
    return dict(prefill_s=statistics.median(pre), decode_s=statistics.median(dec), e2e_s=statistics.median(e2e),
                runs=dict(prefill_s=pre, decode_s=dec, e2e_s=e2e), n_runs=len(e2e), warmup_s=compile_s,
                best=dict(prefill_s=min(pre), decode_s=min(dec), e2e_s=min(e2e)),
                tokens=toks.tolist(), **info)


def time_hf(hf, prompts, pixels, new_tokens: int, repeats: int, pad_id: int, log, budget_s=None) -> dict:
    import torch

    ids = torch.tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)
    pv = torch.from_numpy(pixels).to(hf.dtype)
    common = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, do_sample=False, num_beams=1,
                  pad_token_id=pad_id, use_cache=True)

    def gen(n):
        t0 = time.perf_counter()
        out = hf.generate(**common, max_new_tokens=n, min_new_tokens=n)
        t = time.perf_counter() - t0
        new = out[:, ids.shape[1]:]
        if new.shape[1] != n:
            raise RuntimeError(f"HF generated {new.shape[1]} tokens, expected {n}")
        return t, new

    with torch.inference_mode():
        t0 = time.perf_counter()
        gen(2)
        log(f"  HF   b={len(prompts)}: warm-up {time.perf_counter() - t0:.1f}s")
        pre, tot = [], []
        for r in range(repeats):
            p, _ = gen(1)
            t, toks = gen(new_tokens)
            pre.append(p), tot.append(t)
            log(f"  HF   b={len(prompts)} run {r + 1}/{repeats}: prefill {p:.3f}s total {t:.3f}s")
            if budget_s is not None and sum(pre) + sum(tot) > budget_s and r + 1 < repeats:
                log(f"  HF   b={len(prompts)}: time budget {budget_s:.0f}s spent; stopping after {r + 1} run(s)")
                break
    # decode time per run = that run's total minus the prefill timed just before it
    dec = [t - p for p, t in zip(pre, tot)]
    return dict(prefill_s=statistics.median(pre), decode_s=statistics.median(dec), e2e_s=statistics.median(tot),
                runs=dict(prefill_s=pre, decode_s=dec, e2e_s=tot), n_runs=len(tot),
                best=dict(prefill_s=min(pre), decode_s=min(dec), e2e_s=min(tot)), tokens=toks.tolist())


def _rates(r: dict, batch: int, new_tokens: int) -> dict:
    r["decode_tok_s"] = (new_tokens - 1) * batch / r["decode_s"] if r["decode_s"] > 0 else float("nan")
    r["e2e_tok_s"] = new_tokens * batch / r["e2e_s"]
    r["decode_step_s"] = r["decode_s"] / (new_tokens - 1)
    return r


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ----------------------------------------------------------------------------------------------
# Report


def _dump(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=float)


def _fmt(x, spec=".3f"):
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def print_table(rows: list[dict], out=sys.stdout) -> None:
    head = f"{'impl':<9}{'batch':>6}{'runs':>5}{'prefill s':>11}{'decode tok/s':>14}{'e2e tok/s':>11}" \
           f"{'step ms':>9}{'decode x HF':>13}{'e2e x HF':>10}"
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        print(f"{r['impl']:<9}{r['batch']:>6}{r['n_runs']:>5}{_fmt(r['prefill_s']):>11}{_fmt(r['decode_tok_s'], '.2f'):>14}"
              f"{_fmt(r['e2e_tok_s'], '.2f'):>11}{_fmt(r['decode_step_s'] * 1e3, '.1f'):>9}"
              f"{_fmt(r.get('decode_ratio'), '.2f'):>13}{_fmt(r.get('e2e_ratio'), '.2f'):>10}", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    import jax
    import jax.numpy as jnp
    import torch

    from twig_jax.bench import floors as bench_floors
    from twig_jax.model.config import ConfigError
    from twig_jax.decode.generator import Generator

    from twig_jax.model.config import load_preset
    try:
        load_preset(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    torch.set_num_threads(args.threads)
    jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    itemsize = jnp.dtype(jdtype).itemsize
    host = dict(platform=platform.platform(), cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
                jax_backend=jax.default_backend(), jax=jax.__version__, torch=torch.__version__,
                loadavg_start=os.getloadavg(), xla_flags=os.environ.get("XLA_FLAGS", ""))
    log(f"host: {host}")

    log("floors: measuring memory bandwidth and matmul rate ...")
    floors = bench_floors.measure_floors(jdtype)
    bw, mm = floors["bandwidth"]["bytes_per_s"], floors["matmul"]["flops_per_s"]
    rbw = floors["read_bandwidth"]["bytes_per_s"]
    log(f"  bandwidth {bw / 1e9:.2f} GB/s (float32 copy, read+write, best), read-only {rbw / 1e9:.2f} GB/s; "
        f"matmul {mm / 1e9:.1f} GFLOP/s ({args.dtype}, best of {list(floors['matmul']['per_size'])})")

    try:
        ours_model, hf, note = build_models(args.config, args.dtype, args.seed, not args.skip_hf, log)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log(note)
    cfg = ours_model.cfg
    gen = Generator(ours_model)
    pad_id = cfg.text.pad_token_id if cfg.text.pad_token_id is not None else 0

    rows, results = [], {}
    for b in args.batch_sizes:
        prompts, pixels = make_inputs(cfg, b, args.text_tokens, args.seed + b)
        host[f"loadavg_before_batch_{b}"] = os.getloadavg()
        log(f"batch {b}: prompt {len(prompts[0])} tokens ({cfg.num_image_tokens} image), {args.new_tokens} new")
        r = _rates(time_ours(gen, prompts, pixels, args.new_tokens, args.repeats, log, args.budget_s),
                   b, args.new_tokens)
        r.update(impl="twig_jax", batch=b, prompt_len=len(prompts[0]))
        results[("twig_jax", b)] = r
        if hf is not None:
            h = _rates(time_hf(hf, prompts, pixels, args.new_tokens, args.repeats, pad_id, log, args.budget_s),
                       b, args.new_tokens)
            h.update(impl="hf_torch", batch=b, prompt_len=len(prompts[0]))
            results[("hf_torch", b)] = h
            r["decode_ratio"] = r["decode_tok_s"] / h["decode_tok_s"]
            r["e2e_ratio"] = r["e2e_tok_s"] / h["e2e_tok_s"]
            prefixes = [_common_prefix(x, y) for x, y in zip(r["tokens"], h["tokens"])]
            r["hf_token_agreement"] = dict(common_prefix_per_row=prefixes,
                                           exact_rows=sum(p == args.new_tokens for p in prefixes))
            log(f"  greedy tokens vs HF: common prefix per row {prefixes} (of {args.new_tokens})")
        if args.out:  # partial results, overwritten by the full report at the end
            _dump(args.out + ".partial", dict(config=args.config, host=host, floors_start=floors, partial=True,
                                             rows=[{k: v for k, v in x.items() if k != "tokens"}
                                                   for x in results.values()]))
    for impl in ("twig_jax", "hf_torch"):
        rows += [results[(impl, b)] for b in args.batch_sizes if (impl, b) in results]

    # Floors again: the machine is shared, so take the best of the two measurements.
    log("floors: measuring again ...")
    floors_end = bench_floors.measure_floors(jdtype)
    bw = max(bw, floors_end["bandwidth"]["bytes_per_s"])
    mm = max(mm, floors_end["matmul"]["flops_per_s"])
    rbw = max(rbw, floors_end["read_bandwidth"]["bytes_per_s"])
    floors = dict(start=floors, end=floors_end)
    log(f"  bandwidth {floors_end['bandwidth']['bytes_per_s'] / 1e9:.2f} GB/s; matmul "
        f"{floors_end['matmul']['flops_per_s'] / 1e9:.1f} GFLOP/s; using the best: {bw / 1e9:.2f} GB/s, "
        f"{mm / 1e9:.1f} GFLOP/s")

    # Floors for our batch-1 (or smallest batch) run.
    fb = 1 if ("twig_jax", 1) in results else min(args.batch_sizes)
    ref = results[("twig_jax", fb)]
    step_bytes = bench_floors.decode_step_bytes(cfg, ref["padded_batch"], ref["capacity"], itemsize)
    flops = bench_floors.prefill_flops(cfg, ref["padded_batch"], ref["padded_prompt"])
    flops_unpadded = bench_floors.prefill_flops(cfg, fb, ref["prompt_len"])["total"]
    decode_floor = step_bytes["total_bytes"] / bw
    prefill_floor = flops["total"] / mm
    floor_report = dict(
        batch=fb, bandwidth_bytes_per_s=bw, matmul_flops_per_s=mm, measurements=floors,
        decode_step_bytes=step_bytes, decode_step_floor_s=decode_floor,
        decode_step_s=ref["decode_step_s"], decode_step_x_floor=ref["decode_step_s"] / decode_floor,
        prefill_flops=flops, prefill_flops_unpadded_prompt=flops_unpadded, prefill_floor_s=prefill_floor,
        prefill_s=ref["prefill_s"], prefill_x_floor=ref["prefill_s"] / prefill_floor,
        achieved_decode_bandwidth_bytes_per_s=step_bytes["total_bytes"] / ref["decode_step_s"],
        # informational: the same floor at streaming-read bandwidth (a decode step mostly reads)
        read_bandwidth_bytes_per_s=rbw, decode_step_floor_read_bw_s=step_bytes["total_bytes"] / rbw,
        decode_step_x_floor_read_bw=ref["decode_step_s"] / (step_bytes["total_bytes"] / rbw),
        achieved_prefill_flops_per_s=flops["total"] / ref["prefill_s"],
    )

    def ratio(key, b):
        r = results.get(("twig_jax", b))
        return None if r is None else r.get(key)

    values = {
        "decode_step_b1_vs_floor": floor_report["decode_step_x_floor"] if fb == 1 else None,
        "prefill_b1_vs_floor": floor_report["prefill_x_floor"] if fb == 1 else None,
        "decode_b8_vs_hf": ratio("decode_ratio", 8),
        "e2e_b1_vs_hf": ratio("e2e_ratio", 1),
        "e2e_b8_vs_hf": ratio("e2e_ratio", 8),
    }
    targets = {}
    for key, (desc, bound) in TARGETS.items():
        v = values[key]
        if v is None:
            status = "n/a"
        elif key.endswith("vs_floor"):
            status = "PASS" if v <= bound else "FAIL"
        else:
            status = "PASS" if v >= bound else "FAIL"
        targets[key] = dict(description=desc, bound=bound, value=v, status=status)

    # ---- print
    runs = sorted({r["n_runs"] for r in rows})
    print(f"\nLLaVA bench: config {args.config}, {args.dtype}, prompt {ref['prompt_len']} tokens "
          f"(padded to {ref['padded_prompt']}, cache capacity {ref['capacity']}), {args.new_tokens} new tokens, "
          f"median of {'/'.join(map(str, runs))} run(s) (--repeats {args.repeats}); {host['cpus']} CPUs, "
          f"torch threads {host['torch_threads']}, load average at start {host['loadavg_start'][0]:.1f}")
    print(f"weights: {note}\n")
    print_table(rows)
    print(f"\nfloors (batch {fb}):")
    print(f"  memory bandwidth {bw / 1e9:.2f} GB/s; matmul {mm / 1e9:.1f} GFLOP/s (best of start/end measurements)")
    print(f"  decode step: {step_bytes['total_bytes'] / 1e6:.0f} MB/step (params {step_bytes['param_bytes'] / 1e6:.0f} MB"
          f" + KV {step_bytes['kv_bytes'] / 1e6:.0f} MB) -> floor {decode_floor * 1e3:.1f} ms; ours "
          f"{ref['decode_step_s'] * 1e3:.1f} ms = {floor_report['decode_step_x_floor']:.2f}x floor "
          f"({floor_report['achieved_decode_bandwidth_bytes_per_s'] / 1e9:.2f} GB/s effective)")
    print(f"  (info) at read-only bandwidth {rbw / 1e9:.2f} GB/s the decode floor is "
          f"{floor_report['decode_step_floor_read_bw_s'] * 1e3:.1f} ms: ours = "
          f"{floor_report['decode_step_x_floor_read_bw']:.2f}x")
    print(f"  prefill: {flops['total'] / 1e9:.0f} GFLOP (vision {flops.get('vision', 0) / 1e9:.0f}, decoder "
          f"{(flops['decoder_linears'] + flops['decoder_attention']) / 1e9:.0f}) -> floor {prefill_floor:.2f} s; ours "
          f"{ref['prefill_s']:.2f} s = {floor_report['prefill_x_floor']:.2f}x floor "
          f"({floor_report['achieved_prefill_flops_per_s'] / 1e9:.1f} GFLOP/s effective)")
    print("\ntargets:")
    for t in targets.values():
        print(f"  [{t['status']:>4}] {t['description']}: {_fmt(t['value'], '.2f')}")
    for b in args.batch_sizes:
        agree = results[("twig_jax", b)].get("hf_token_agreement")
        if agree:
            print(f"greedy tokens identical to HF at batch {b}: {agree['exact_rows']}/{b} rows "
                  f"(common prefix per row {agree['common_prefix_per_row']})")

    host["loadavg_end"] = os.getloadavg()
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        for r in rows:
            r.pop("tokens", None)
        with open(args.out, "w") as f:
            json.dump(dict(config=args.config, dtype=args.dtype, new_tokens=args.new_tokens,
                           repeats=args.repeats, batch_sizes=args.batch_sizes, weights=note, host=host,
                           rows=rows, floors=floor_report, targets=targets), f, indent=2, default=float)
        if os.path.exists(args.out + ".partial"):
            os.remove(args.out + ".partial")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
