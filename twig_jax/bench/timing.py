"""Timing passes for side-by-side speed tables: warm up, then round-robin, report the median."""

from __future__ import annotations

import time


def run_pass(gen, prompts, pixels, batch: int, max_new_tokens: int, eos_ids, sampling=None) -> dict:
    """All inputs in batches of `batch`; seconds, tokens and SSD counters summed."""
    import numpy as np

    secs, toks, rounds, drafted, accepted, emitted = 0.0, 0, 0, 0, 0, 0
    outs = []
    for i in range(0, len(prompts), batch):
        t0 = time.perf_counter()
        kw = {} if sampling is None else dict(sampling=sampling, seed=i)
        out = gen.generate(prompts[i:i + batch], pixels[i:i + batch], max_new_tokens=max_new_tokens,
                           eos_ids=eos_ids, **kw)
        secs += time.perf_counter() - t0
        toks += int(np.sum(out.num_generated))
        outs.extend(out.tokens)
        st = getattr(out, "stats", None) or {}
        if st:
            rounds += st["rounds"]
            drafted += st["drafted"]
            accepted += st["accepted"]
            emitted += int(np.maximum(np.asarray(out.num_generated) - 1, 0).sum())
    return dict(seconds=secs, tokens=toks, rounds=rounds, drafted=drafted, accepted=accepted, emitted=emitted,
                outputs=outs)



def timed_passes(gens: dict, prompts, pixels, batch: int, repeats: int, max_new_tokens: int, eos_ids,
                 sampling=None) -> dict:
    """{name: [pass, ...]}: a warm-up pass per generator (compiles every shape this batch size uses),
    then `repeats` passes round-robin over the generators, so a noisy machine slows each alike."""
    for g in gens.values():
        run_pass(g, prompts, pixels, batch, max_new_tokens, eos_ids, sampling)
    passes = {name: [] for name in gens}
    for _ in range(repeats):
        for name, g in gens.items():
            passes[name].append(run_pass(g, prompts, pixels, batch, max_new_tokens, eos_ids, sampling))
    return passes


def median_pass(passes: list[dict]) -> dict:
    """The pass of median time."""
    return sorted(passes, key=lambda p: p["seconds"])[len(passes) // 2]
