"""The bundled shapes-world model: packing it into the repository, checking it, measuring it.

    python research/scripts/bundle_shapes.py --base /work/runs/base/final --twig /work/runs/twig \
        --out infer/assets/shapes-llava [--dtype bfloat16] [--Kf 6] [--R 16] [--measure]
    python research/scripts/bundle_shapes.py --measure                # re-measure the bundle on the mini subset
    python research/scripts/bundle_shapes.py --write-assets           # regenerate infer/assets/{demo,shapes-eval-mini}

(`python -m research.bundle` is the same command.)

A bundle directory holds
  base/  a converted model dir (orbax params/, config.json, twig_jax.json) in --dtype, with the
         tokenizer files and a preprocessor_config.json (CLIP preprocessing at the tower's image
         size, the same parameters `pipeline.image_preprocessor_for` falls back to);
  twig/  an orbax twig dir (twig_io.save_twig) whose TwigConfig is the inference one: the trained
         twig's K and T, with Kf, R, draft_len and theta given here;
  bundle.json  where it came from and what the checks measured.
Bundling refuses to leave a bundle over `MAX_BUNDLE_BYTES` (25 MB), and checks that the bundle's
greedy answers agree with the float32 source's on a few eval questions of the shapes world
(plain decoding and TTP + SSD), failing below --min-agreement.

`--measure` answers the checked-in mini eval subset (infer/assets/shapes-eval-mini: the first 16
eval images of seed 0) with the bundle, unpruned and with twig pruning, and writes the accuracy
into its expected.json; tests/test_bundled_model.py checks the bundle against that file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Sequence

from twig_jax.assets import (ASSETS, BASE_SUBDIR, BUNDLE_DIR, DEMO_DIR, MINI_DIR, REPO, RUN_DTYPE,  # noqa: F401
                             TWIG_SUBDIR)
from twig_jax.eval.evaluate import accuracy_of, read_subset, run_questions
from twig_jax.pipeline import load_bundle

MAX_BUNDLE_BYTES = 25 * 1000 * 1000  # 25 MB (decimal: the stricter reading)
BUNDLE_INFO = "bundle.json"
EXPECTED_FILE = "expected.json"
# The dtype the bundle is run in by the demo, the mini-subset measurement and its test: float32
# (the bfloat16 weights upcast exactly on load). Computing in bfloat16 makes the multi-token SSD
# verify pass round differently from one-token decoding, so near-tied greedy choices can flip
# (seen on a random bundle: 9 of 48 answers); float32 keeps greedy SSD token-identical, and
# measuring and testing in one dtype keeps expected.json exact.
# Accuracy fields per method in expected.json, and the floor the unpruned figures must reach for
# the bundle to count as measured. The shapes model's targets are >= 95% EM / 0.95 F1 on the whole
# eval split (the bundled model: 95.8% / 0.987; on the 48-question mini subset 0.938 / 1.00). The
# floors are not those targets: they sit above what a model that ignores the image reaches
# (language prior: ~40% EM, F1 ~0.05), so any bundle that reads its images can be measured.
EXPECTED_METHODS = ("none", "twig")  # + "phead" when the bundled twig has a P-head (expected_methods)
EXPECTED_FIELDS = ("short_em", "description_f1")
MEASURED_FLOOR = {"short_em": 0.45, "description_f1": 0.9}
TOLERANCE = 0.05

MB = 1e6


def expected_methods(twig) -> tuple[str, ...]:
    """The methods expected.json records for a bundle with this twig: unpruned, TTP, and the
    TwigVLM++ P-head when the twig has one."""
    return EXPECTED_METHODS + (("phead",) if twig is not None and twig.p_head is not None else ())


def main_method(twig) -> str:
    """The pruning the demo runs with SSD: the P-head when the twig has one, else the twig's attention."""
    return "phead" if twig is not None and twig.p_head is not None else "twig"


class BundleError(RuntimeError):
    """A bundle that is too large, incomplete, or disagrees with its source."""


# ----------------------------------------------------------------------------------------------
# Files


def bundle_files(path: str) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file under path; BundleError on symlinks or special files
    (the bundle is committed to git as plain files)."""
    out = []
    for root, dirs, files in os.walk(path):
        for name in sorted(dirs) + sorted(files):
            p = os.path.join(root, name)
            if os.path.islink(p):
                raise BundleError(f"{p} is a symlink; a bundle must hold plain files only")
        for name in sorted(files):
            p = os.path.join(root, name)
            if not os.path.isfile(p):
                raise BundleError(f"{p} is not a plain file")
            out.append((os.path.relpath(p, path), os.path.getsize(p)))
    return out


def bundle_size(path: str) -> int:
    return sum(n for _, n in bundle_files(path))


def check_size(path: str, limit: int = MAX_BUNDLE_BYTES, out=sys.stdout) -> int:
    """Print the bundle's size (total and per part); BundleError above limit."""
    files = bundle_files(path)
    total = sum(n for _, n in files)
    parts: dict[str, int] = {}
    for rel, n in files:
        parts[rel.split(os.sep)[0]] = parts.get(rel.split(os.sep)[0], 0) + n
    detail = ", ".join(f"{k} {v / MB:.2f} MB" for k, v in sorted(parts.items()))
    print(f"bundle size: {total / MB:.2f} MB ({total} bytes; {detail}; limit {limit / MB:.0f} MB)", file=out)
    if total > limit:
        raise BundleError(f"bundle {path} is {total / MB:.2f} MB, over the {limit / MB:.0f} MB limit "
                          f"({detail}); store it in a smaller dtype or shrink the model")
    return total


def preprocessor_params(model) -> dict:
    """preprocessor_config.json fields: CLIP preprocessing at the tower's image size, exactly what
    `pipeline.image_preprocessor_for(model, None)` uses."""
    from twig_jax.data.preprocess import LLAVA15_CLIP_PARAMS

    size = model.cfg.vision.image_size
    return dict(LLAVA15_CLIP_PARAMS, crop_size={"height": size, "width": size}, size={"shortest_edge": size})


# ----------------------------------------------------------------------------------------------
# Loading






# ----------------------------------------------------------------------------------------------
# Answering a question set (shared by the bundling check, the measurement and the test)








# ----------------------------------------------------------------------------------------------
# Bundling


def inference_twig_config(trained_cfg, *, Kf: int, R: int, draft_len: int = 5, theta: float = 0.6,
                          select: str = "top"):
    """The trained twig's K and T (and P-head) with the inference-time pruning / drafting settings."""
    return dataclasses.replace(trained_cfg, Kf=Kf, R=R, R_bar=None, draft_len=draft_len, theta=theta, select=select)


def make_bundle(base_dir: str, twig_dir: str, out: str, *, dtype: str = "bfloat16", Kf: int = 6, R: int = 16,
                draft_len: int = 5, theta: float = 0.6, select: str = "top", force: bool = False,
                log=sys.stdout) -> dict:
    """Write OUT/base, OUT/twig and OUT/bundle.json from a trained base model dir and twig dir.

    The new bundle is built beside OUT and moved into place only when complete (a failed run
    leaves an existing bundle as it was). Returns the bundle.json dict."""
    import jax.numpy as jnp

    from twig_jax.convert.llava import MARKER_FILE, load_model
    from twig_jax.pipeline import load_tokenizer
    from twig_jax.twig.io import load_twig_any
    from twig_jax.convert.llava import save_converted_model
    from twig_jax.twig.io import save_twig

    out = os.path.abspath(out)
    if os.path.exists(out) and not force:
        raise BundleError(f"{out} exists; pass --force to replace it")
    dt = getattr(jnp, dtype)
    model = load_model(base_dir, dtype=dt)
    tokenizer = load_tokenizer(base_dir)
    twig, trained = load_twig_any(twig_dir, model.cfg.text, dtype=dt)
    L, N = model.cfg.text.num_hidden_layers, model.cfg.num_image_tokens
    tc = inference_twig_config(trained, Kf=Kf, R=R, draft_len=draft_len, theta=theta, select=select).validate(L, N)
    twig.twig_cfg = tc

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".bundle-", dir=parent)
    try:
        base_out = os.path.join(tmp, BASE_SUBDIR)
        save_converted_model(model, base_out, tokenizer)
        with open(os.path.join(base_out, "preprocessor_config.json"), "w") as f:
            json.dump(preprocessor_params(model), f, indent=2)
        marker_path = os.path.join(base_out, MARKER_FILE)
        with open(marker_path) as f:
            marker = json.load(f)
        marker["source"] = f"research.bundle: {os.path.abspath(base_dir)} cast to {dtype}"
        with open(marker_path, "w") as f:
            json.dump(marker, f, indent=2)
        save_twig(twig, os.path.join(tmp, TWIG_SUBDIR))
        info = {
            "source_base": os.path.abspath(base_dir), "source_twig": os.path.abspath(twig_dir), "dtype": dtype,
            "trained_twig_config": dataclasses.asdict(trained), "twig_config": dataclasses.asdict(tc),
            "num_visual_tokens": N, "num_layers": L,
            "command": "python research/scripts/bundle_shapes.py " + " ".join(
                [f"--base {base_dir}", f"--twig {twig_dir}", f"--out {_repo_rel(out)}",
                 f"--dtype {dtype}", f"--Kf {Kf}", f"--R {R}", f"--draft-len {draft_len}", f"--theta {theta}",
                 f"--select {select}"]),
            "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        }
        with open(os.path.join(tmp, BUNDLE_INFO), "w") as f:
            json.dump(info, f, indent=2)
        info["bytes"] = check_size(tmp, out=log)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _update_info(out, bytes=info["bytes"])
    print(f"wrote {out}: base ({dtype}, {L} layers, N={N}) + twig (K={tc.K}, T={tc.T}, Kf={tc.Kf}, R={tc.R}, "
          f"draft_len={tc.draft_len}, theta={tc.theta}, P-head {'yes, select=' + tc.select if tc.p_head else 'no'})",
          file=log)
    return info


def _repo_rel(path: str) -> str:
    rel = os.path.relpath(os.path.abspath(path), REPO)
    return os.path.abspath(path) if rel.startswith("..") else rel


def _update_info(out: str, **fields) -> None:
    p = os.path.join(out, BUNDLE_INFO)
    with open(p) as f:
        info = json.load(f)
    info.update(fields)
    with open(p, "w") as f:
        json.dump(info, f, indent=2)


def check_preprocessor(out: str, log=sys.stdout) -> None:
    """The bundle's preprocessor_config.json preprocesses exactly as image_preprocessor_for's
    fallback for the model (checked on a shapes image)."""
    import numpy as np

    from twig_jax.model.config import load_config
    from twig_jax.data.shapes import render_scene, sample_scene
    from twig_jax.pipeline import image_preprocessor_for
    from twig_jax.data.preprocess import ImagePreprocessor

    base = os.path.join(out, BASE_SUBDIR)
    rng = np.random.default_rng(0)
    img = render_scene(sample_scene(rng), rng)

    class _M:  # image_preprocessor_for only reads cfg.vision.image_size
        cfg = load_config(os.path.join(base, "config.json"))

    a = ImagePreprocessor.from_pretrained(base)(img)
    b = image_preprocessor_for(_M, None)(img)
    if a.shape != b.shape or not np.array_equal(a, b):
        raise BundleError(f"{base}/preprocessor_config.json does not reproduce image_preprocessor_for's "
                          f"preprocessing ({a.shape} vs {b.shape})")
    print(f"preprocessor_config.json: {a.shape[2]}x{a.shape[3]} CLIP preprocessing, identical to the fallback",
          file=log)


def check_agreement(base_dir: str, twig_dir: str, out: str, *, n_images: int = 8, seed: int = 0,
                    min_agreement: float = 0.9, log=sys.stdout) -> dict:
    """Greedy answers of the bundle vs the float32 source on the first n_images eval images of
    the shapes world (seed): plain decoding and TTP + SSD (the source twig run with the bundle's
    inference TwigConfig). Prints the agreement and both accuracies; BundleError below
    min_agreement (fraction of identical answers) for either."""
    import jax.numpy as jnp

    from twig_jax.data.shapes import generate_dataset

    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(tmp, 0, n_images, seed)
        sub = os.path.join(tmp, "subset")
        os.makedirs(sub)
        for name in ("questions.jsonl", "answers.jsonl"):
            shutil.copy(os.path.join(tmp, "eval", name), os.path.join(sub, name))
        os.rename(os.path.join(tmp, "images"), os.path.join(sub, "images"))
        questions, refs, images = read_subset(sub)
        bundled = load_bundle(out)
        source = load_bundle(base_dir, dtype=jnp.float32, twig_path=twig_dir)
        source.twig.twig_cfg = bundled.twig_cfg
        cache: dict = {}
        result = {"questions": len(questions), "images": n_images, "seed": seed}
        failures = []
        mm = main_method(bundled.twig)
        for label, method, ssd in (("plain", "none", False), (f"{'phead' if mm == 'phead' else 'ttp'}+ssd", mm, True)):
            got = {}
            for name, b in (("source", source), ("bundle", bundled)):
                got[name], _ = run_questions(b.model, b.tokenizer, b.image_processor, questions, images,
                                             twig=b.twig, twig_cfg=b.twig_cfg, method=method, ssd=ssd,
                                             image_cache=cache)
            same = sum(got["source"][k].tokens == got["bundle"][k].tokens for k in got["source"])
            frac = same / len(questions)
            acc = {n: accuracy_of(a, refs) for n, a in got.items()}
            result[label] = {"identical": same, "agreement": frac, "accuracy": acc}
            print(f"agreement {label}: {same}/{len(questions)} identical greedy answers ({100 * frac:.1f}%); "
                  f"accuracy fp32 source {_acc_str(acc['source'])}, bundle {_acc_str(acc['bundle'])}", file=log)
            for k in got["source"]:
                if got["source"][k].tokens != got["bundle"][k].tokens:
                    print(f"    differs [{k}]: source {_clip(got['source'][k].text)}\n"
                          f"               bundle {_clip(got['bundle'][k].text)}", file=log)
            if frac < min_agreement:
                failures.append(f"{label}: {100 * frac:.1f}% < {100 * min_agreement:.0f}%")
        _update_info(out, agreement=result)
        if failures:
            raise BundleError(f"the bundle's greedy answers disagree with the float32 source's: {'; '.join(failures)} "
                              f"(the bundle is left in {out} for inspection: do not commit it as is)")
        return result


def _clip(text: str, n: int = 150) -> str:
    return repr(text if len(text) <= n else text[:n] + " ...")


def _acc_str(a: dict) -> str:
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    return f"short EM {f(a['short_em'])} / description F1 {f(a['description_f1'])}"


# ----------------------------------------------------------------------------------------------
# The checked-in eval subsets and the measurement


def write_subset(out: str, n_images: int, seed: int = 0, *, demo: bool = False) -> int:
    """The first n_images eval images of the shapes world (seed) with their questions and
    reference answers: out/questions.jsonl, out/answers.jsonl, out/images/. All questions, or
    with demo=True each image's first short question and its description. Returns the number
    of questions written."""
    from twig_jax.data.shapes import generate_dataset

    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(tmp, 0, n_images, seed)
        img_out = os.path.join(out, "images")
        if os.path.isdir(img_out):
            shutil.rmtree(img_out)
        os.makedirs(img_out)
        for name in sorted(os.listdir(os.path.join(tmp, "images"))):
            shutil.copy(os.path.join(tmp, "images", name), os.path.join(img_out, name))
        with open(os.path.join(tmp, "eval", "questions.jsonl")) as f:
            keep, seen = set(), set()
            for r in (json.loads(line) for line in f if line.strip()):
                if not demo or (r["image"], r["category"]) not in seen:
                    keep.add(r["question_id"])
                    seen.add((r["image"], r["category"]))
        n = 0
        for name in ("questions.jsonl", "answers.jsonl"):
            with open(os.path.join(tmp, "eval", name)) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            rows = [r for r in rows if r["question_id"] in keep]
            with open(os.path.join(out, name), "w") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
            n = len(rows)
    return n


def write_assets(log=sys.stdout) -> None:
    """Regenerate infer/assets/demo (8 images: a short question and the description each) and
    infer/assets/shapes-eval-mini (16 images, all 48 questions); expected.json is left alone
    (a null one is written if absent)."""
    n = write_subset(DEMO_DIR, 8, 0, demo=True)
    print(f"{DEMO_DIR}: 8 images, {n} questions", file=log)
    n = write_subset(MINI_DIR, 16, 0)
    print(f"{MINI_DIR}: 16 images, {n} questions", file=log)
    if not os.path.exists(os.path.join(MINI_DIR, EXPECTED_FILE)):
        write_expected(os.path.join(MINI_DIR, EXPECTED_FILE), None)


def write_expected(path: str, measured: dict | None, **meta) -> dict:
    """expected.json: {method: {short_em, description_f1}} (null = never measured) + how."""
    methods = EXPECTED_METHODS if measured is None else tuple(measured)
    d = {m: {f: (None if measured is None else measured[m][f]) for f in EXPECTED_FIELDS} for m in methods}
    d["_about"] = ("Accuracy of the bundled model (infer/assets/shapes-llava) on this subset, greedy, "
                   "max_new_tokens 16 (short) / 128 (descriptions): 'none' unpruned, 'twig' TTP at the "
                   "twig's R and Kf, 'phead' (when the twig has a P-head) TwigVLM++ P-head pruning at the same R "
                   "and Kf, both with the twig config's keep-set rule (select; 'sample' applies to the P-head "
                   "only) (SSD off; greedy SSD gives the same answers). Written by "
                   "`python research/scripts/bundle_shapes.py --measure`; null = never measured. "
                   "tests/test_bundled_model.py requires the bundle to reach these within "
                   f"{TOLERANCE} and the unpruned ones to be >= {MEASURED_FLOOR}.")
    d.update(meta)
    with open(path, "w") as f:
        json.dump(d, f, indent=2)
        f.write("\n")
    return d


def measure(bundle_dir: str = BUNDLE_DIR, subset: str = MINI_DIR, log=sys.stdout) -> dict:
    """Accuracy of the bundle on the subset, unpruned and with twig pruning (SSD off)."""
    b = load_bundle(bundle_dir)
    questions, refs, images = read_subset(subset)
    cache: dict = {}
    res = {}
    for method in expected_methods(b.twig):
        t0 = time.perf_counter()
        ans, _ = run_questions(b.model, b.tokenizer, b.image_processor, questions, images, twig=b.twig,
                               twig_cfg=b.twig_cfg, method=method, ssd=False, image_cache=cache)
        res[method] = accuracy_of(ans, refs)
        print(f"{method}: {_acc_str(res[method])} ({len(questions)} questions, "
              f"{time.perf_counter() - t0:.1f} s)", file=log)
    return res


# ----------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from twig_jax.twig.config import SELECT_RULES

    p = argparse.ArgumentParser(prog="research/scripts/bundle_shapes.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", help="trained base model dir (converted, fp32; tokenizer inside)")
    p.add_argument("--twig", help="trained twig dir (orbax, twig_io.save_twig) or MILVLG safetensors")
    p.add_argument("--out", default=os.path.relpath(BUNDLE_DIR), help="bundle dir (default %(default)s)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--Kf", type=int, default=6, help="FinalWipe layer of the inference TwigConfig")
    p.add_argument("--R", type=int, default=16, help="kept visual tokens (16 = N/9: 88.9%% pruned)")
    p.add_argument("--draft-len", type=int, default=5)
    p.add_argument("--theta", type=float, default=0.6)
    p.add_argument("--select", choices=list(SELECT_RULES), default="top",
                   help="keep-set rule of the inference TwigConfig: top R of the scores, score-weighted "
                        "coverage, or a draw from the P-head's scores (the policy its RL trains)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.add_argument("--check-images", type=int, default=8, help="eval images (seed 0) for the agreement check")
    p.add_argument("--min-agreement", type=float, default=0.9,
                   help="fail when fewer greedy answers than this fraction match the fp32 source's")
    p.add_argument("--measure", action="store_true",
                   help="measure the bundle on the mini subset and write its expected.json")
    p.add_argument("--subset", default=os.path.relpath(MINI_DIR), help="subset dir for --measure")
    p.add_argument("--write-assets", action="store_true",
                   help="regenerate infer/assets/demo and infer/assets/shapes-eval-mini from the generator")
    args = p.parse_args(argv)
    if bool(args.base) != bool(args.twig):
        p.error("give --base and --twig together")
    if not (args.base or args.measure or args.write_assets):
        p.error("nothing to do: give --base/--twig (bundle), --measure or --write-assets")
    try:
        if args.write_assets:
            write_assets()
        if args.base:
            t0 = time.perf_counter()
            make_bundle(args.base, args.twig, args.out, dtype=args.dtype, Kf=args.Kf, R=args.R,
                        draft_len=args.draft_len, theta=args.theta, select=args.select, force=args.force)
            check_preprocessor(args.out)
            if args.check_images > 0:
                check_agreement(args.base, args.twig, args.out, n_images=args.check_images,
                                min_agreement=args.min_agreement)
            print(f"bundled in {time.perf_counter() - t0:.0f} s", file=sys.stdout)
        if args.measure:
            check_size(args.out)
            res = measure(args.out, args.subset)
            exp = os.path.join(args.subset, EXPECTED_FILE)
            with open(os.path.join(args.out, BUNDLE_INFO)) as f:
                info = json.load(f)
            write_expected(exp, res, bundle=_repo_rel(args.out),
                           bundle_created=info.get("created"), twig_config=info.get("twig_config"),
                           dtype=info.get("dtype"), run_dtype=RUN_DTYPE)
            _update_info(args.out, mini_subset=res)
            print(f"wrote {exp}")
    except BundleError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
