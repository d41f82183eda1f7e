"""`twig-jax train`: train a twig on a frozen LLaVA-1.5 (or, with --train-all, the whole model).

Example:
  twig-jax train --data llava_v1_5_mix665k.json --images data/ --base converted/llava-1.5-7b \\
      --twig-k 2 --twig-t 3 --steps 5200 --batch 128 --accum 8 --lr 1e-4 --dtype bfloat16 \\
      --mesh data=1,fsdp=8,tensor=1 --ckpt-dir runs/twig --every 500 --keep 3 --out runs/twig/final

Bad input is one `twig-jax train: error: ...` line and status 2; SIGINT / SIGTERM save a
checkpoint of the current step and exit with 128 + the signal's number (130, 143).

`main` also takes a data extension (`DataConfig.extra_fields`) and an auxiliary attention loss
(`TrainConfig.aux_loss`) as keyword arguments, for entry points that build them from their own
flags (research/train_attention.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from typing import TYPE_CHECKING, Sequence

from twig_jax.train.outputs import OneLineArgumentParser, UsageError, report
from twig_jax.train.trainer import wants_distributed

if TYPE_CHECKING:
    from twig_jax.data import SampleExtension
    from twig_jax.train.losses import AttentionAuxLoss

PROG = "twig-jax train"
DEFAULT_K, DEFAULT_T = 2, 3


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, help="LLaVA instruction JSON (list of {id, image, conversations})")
    d.add_argument("--images", default=None, help="image folder the JSON's 'image' paths are relative to")
    d.add_argument("--max-len", type=int, default=2048, help="fixed sequence length (pad / skip / truncate)")
    d.add_argument("--on-too-long", choices=["skip", "truncate"], default="skip")
    d.add_argument("--tokenizer", default=None, help="tokenizer.json or HF tokenizer dir (default: --base)")
    d.add_argument("--data-threads", type=int, default=2)
    d.add_argument("--data-workers", type=int, default=0, help="grain multiprocessing workers (0: off)")
    m = p.add_argument_group("model")
    g = m.add_mutually_exclusive_group(required=True)
    g.add_argument("--base", help="base model dir (converted twig_jax or Hugging Face)")
    g.add_argument("--base-preset", help="random-init base from configs/NAME.json (train from scratch)")
    m.add_argument("--vision-dir", default=None, help="CLIP dir for liuhaotian-layout HF checkpoints")
    m.add_argument("--base-dtype", choices=["float32", "bfloat16"], default=None,
                   help="dtype the base is held in (default: as stored; bfloat16 halves a frozen base's memory; "
                        "trained weights are always float32 masters)")
    m.add_argument("--twig-k", type=int, default=None,
                   help=f"the twig reads the hidden state entering base layer K (default {DEFAULT_K}, or --init-twig's)")
    m.add_argument("--twig-t", type=int, default=None,
                   help=f"twig decoder layers (default {DEFAULT_T}, or --init-twig's)")
    m.add_argument("--R", type=int, default=None,
                   help="pruning budget saved with the twig: visual tokens kept in layers K..Kf-1 (default: the "
                        "paper's 41 of 576, scaled to the base's visual tokens)")
    m.add_argument("--Kf", type=int, default=None,
                   help="pruning budget saved with the twig: FinalWipe layer (default: the paper's 24 of 32, scaled "
                        "to the base's depth)")
    m.add_argument("--init-twig", default=None, help="start from this twig (orbax dir or MILVLG safetensors)")
    m.add_argument("--train-all", action="store_true", help="train every LLaVA parameter with the LM loss")
    m.add_argument("--freeze", default="", help="with --train-all: comma-separated LLaVA modules kept frozen "
                   "(vision, projector, text), e.g. vision as LLaVA keeps its CLIP tower frozen")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, required=True)
    o.add_argument("--stop-at", type=int, default=None,
                   help="end the run after this step (checkpoint and --out as at the end); the learning-rate "
                        "schedule still spans --steps")
    o.add_argument("--batch", type=int, default=8, help="global batch (sequences per optimizer step)")
    o.add_argument("--accum", type=int, default=1, help="gradient-accumulation micro-batches per step")
    o.add_argument("--lr", type=float, default=1e-4)
    o.add_argument("--warmup-ratio", type=float, default=0.03)
    o.add_argument("--clip", type=float, default=1.0, help="global-norm gradient clipping (<= 0: off)")
    o.add_argument("--alpha", type=float, default=0.1, help="PredKL weight (0: plain next-token CE)")
    o.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    o.add_argument("--remat", action="store_true")
    o.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("run")
    r.add_argument("--mesh", default=None, help="e.g. data=2,fsdp=2,tensor=2 (default: all devices on data)")
    r.add_argument("--ckpt-dir", default=None, help="checkpoints, metrics and the loss plot; the same command "
                   "resumes from the newest intact checkpoint here")
    r.add_argument("--every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    r.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    r.add_argument("--allow-config-change", action="store_true",
                   help="resume from a checkpoint made with other settings (recorded in the checkpoints' meta)")
    r.add_argument("--metrics", default=None, help="JSONL metrics (default: CKPT_DIR/metrics.jsonl)")
    r.add_argument("--plot", default=None, help="loss-curve PNG (default: CKPT_DIR/loss.png)")
    r.add_argument("--out", default=None, help="export the trained twig here (orbax + MILVLG safetensors); with "
                   "--train-all, the trained model as a converted model dir (+ tokenizer, image preprocessing)")
    r.add_argument("--force", action="store_true",
                   help="let --out replace a directory that holds something other than our own export (never an "
                        "input of the run)")
    r.add_argument("--benchmark", action="store_true", help="report tokens/s, step time and MFU")
    r.add_argument("--distributed", choices=["auto", "on", "off"], default="auto",
                   help="jax.distributed.initialize() for multi-process runs (auto: when JAX_COORDINATOR_ADDRESS "
                        "is set or a multi-host TPU slice is detected)")
    r.add_argument("--no-progress", action="store_true")
    return p


def load_tokenizer_from(path: str, flag: str):
    """A tokenizer from a tokenizer.json file or a Hugging Face tokenizer directory."""
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path}: no such file or directory")
    try:
        if path.endswith(".json"):
            from tokenizers import Tokenizer

            from twig_jax.data import CallableTokenizer

            return CallableTokenizer(Tokenizer.from_file(path))
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - tokenizers / transformers raise many types
        from twig_jax.train.resume import short_reason

        hint = " (give --tokenizer)" if flag == "--base" else ""
        raise UsageError(f"{flag} {path}: no usable tokenizer{hint} ({short_reason(e)})") from None


def read_records(path: str) -> tuple[list, str]:
    """The data file's records and the sha256 of its bytes; UsageError naming the file when it is
    missing, not JSON, not a list or empty."""
    if not os.path.isfile(path):
        raise UsageError(f"--data {path}: no such file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        records = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"--data {path}: not valid JSON ({e})") from None
    if not isinstance(records, list):
        raise UsageError(f"--data {path}: expected a JSON list of samples, got a {type(records).__name__}")
    if not records:
        raise UsageError(f"--data {path}: no samples (an empty list): nothing to train on")
    return records, hashlib.sha256(raw).hexdigest()


def check_arguments(args, aux_loss) -> None:
    """UsageError for a setting that is wrong whatever the files say (checked before loading anything)."""
    from twig_jax.train.trainer import check_freeze

    if args.stop_at is not None and not 1 <= args.stop_at <= args.steps:
        raise UsageError(f"--stop-at {args.stop_at} must be in 1..--steps ({args.steps})")
    if aux_loss is not None and not args.train_all:
        raise UsageError(f"the auxiliary loss {aux_loss.metric!r} trains the base's attention: it needs --train-all")
    if args.freeze and not args.train_all:
        raise UsageError("--freeze needs --train-all (twig training already freezes the whole base)")
    for flag, value, least in (("--steps", args.steps, 1), ("--batch", args.batch, 1), ("--accum", args.accum, 1),
                               ("--every", args.every, 1), ("--keep", args.keep, 1), ("--max-len", args.max_len, 2),
                               ("--data-threads", args.data_threads, 1), ("--data-workers", args.data_workers, 0)):
        if value < least:
            raise UsageError(f"{flag} {value} must be >= {least}")
    if args.batch % args.accum:
        raise UsageError(f"--batch {args.batch} is not divisible by --accum {args.accum}")
    if args.train_all:
        given = [f for f, v in (("--R", args.R), ("--Kf", args.Kf), ("--twig-k", args.twig_k),
                                ("--twig-t", args.twig_t), ("--init-twig", args.init_twig)) if v is not None]
        if given:
            raise UsageError(f"{', '.join(given)} apply to twig training, not --train-all")
    try:
        check_freeze(tuple(n for n in args.freeze.split(",") if n), args.train_all)
    except ValueError as e:
        raise UsageError(f"--freeze {args.freeze}: {e}") from None
    if args.base_preset and not args.tokenizer:
        raise UsageError("--tokenizer is required with --base-preset")
    if not (args.ckpt_dir or args.out or args.benchmark):
        raise UsageError("neither --ckpt-dir nor --out is given: the run would save nothing (add one; --benchmark "
                         "runs only measure)")
    if args.mesh:
        from twig_jax.parallel.sharding import check_training_mesh, parse_mesh

        try:
            check_training_mesh(parse_mesh(args.mesh))
        except ValueError as e:
            raise UsageError(f"--mesh {args.mesh}: {e}") from None
    for flag, path, kind in (("--images", args.images, "dir"), ("--base", args.base, "dir"),
                             ("--vision-dir", args.vision_dir, "dir"), ("--init-twig", args.init_twig, "any")):
        if path is not None and not (os.path.isdir(path) if kind == "dir" else os.path.exists(path)):
            raise UsageError(f"{flag} {path}: no such {'directory' if kind == 'dir' else 'file or directory'}")


def run_inputs(args) -> dict[str, str | None]:
    """{flag: path} of everything the run reads: outputs never replace these."""
    return {"--base": args.base, "--vision-dir": args.vision_dir, "--init-twig": args.init_twig,
            "--ckpt-dir": args.ckpt_dir, "--data": args.data, "--images": args.images, "--tokenizer": args.tokenizer}


def check_outputs(args) -> None:
    """UsageError when --out or --ckpt-dir would write over something the run must not touch."""
    from twig_jax.train.outputs import check_output, holds_trained_model

    inputs = run_inputs(args)
    if args.out:
        if args.train_all:
            check_output(args.out, inputs, force=args.force, holds_ours=holds_trained_model,
                         what="a model trained by twig-jax train")
        else:
            check_output(args.out, inputs, force=args.force)
    if args.ckpt_dir:
        real = os.path.realpath(args.ckpt_dir)
        for flag, path in inputs.items():
            if flag != "--ckpt-dir" and path and os.path.realpath(path) == real:
                raise UsageError(f"--ckpt-dir {args.ckpt_dir} is the {flag} path: checkpoints go elsewhere")
        if os.path.isfile(os.path.join(real, "config.json")) or os.path.isfile(os.path.join(real, "twig_config.json")):
            raise UsageError(f"--ckpt-dir {args.ckpt_dir} holds a model or a twig: checkpoints go elsewhere")


def load_base(args):
    """(base, model_dir): the base model, and its directory (None for a preset)."""
    if args.base_preset:
        import jax.numpy as jnp
        from flax import nnx

        from twig_jax.model.config import load_preset
        from twig_jax.model.llava import Llava

        return Llava(load_preset(args.base_preset), rngs=nnx.Rngs(args.seed),
                     dtype=jnp.dtype(args.base_dtype or "float32")), None
    from twig_jax.convert.llava import load_model

    return load_model(args.base, dtype=args.base_dtype, vision_dir=args.vision_dir), args.base


def build_twig(args, base):
    """The twig to train: from --init-twig or grown from the base, with its inference budget (--R,
    --Kf, else the init twig's own or twig.config.default_pruning)."""
    import dataclasses

    from twig_jax.twig import io as twig_io
    from twig_jax.twig.config import TwigConfigError
    from twig_jax.train.trainer import training_twig_config

    L, N = base.cfg.text.num_hidden_layers, base.cfg.num_image_tokens
    if args.R is not None and not 1 <= args.R <= N:
        raise UsageError(f"--R {args.R} must be in 1..{N} (the base's visual tokens per image)")
    orbax = bool(args.init_twig) and os.path.isfile(os.path.join(args.init_twig, twig_io.TWIG_CONFIG_FILE))
    if orbax:
        twig = twig_io.load_twig(args.init_twig, base.cfg.text)
        own = twig.twig_cfg
        for flag, given, has in (("--twig-k", args.twig_k, own.K), ("--twig-t", args.twig_t, own.T)):
            if given is not None and given != has:
                raise UsageError(f"{flag} {given} differs from --init-twig {args.init_twig}'s {has}")
        K, T = own.K, own.T
    else:
        K = DEFAULT_K if args.twig_k is None else args.twig_k
        T = DEFAULT_T if args.twig_t is None else args.twig_t
    if not (K >= 1 and T >= 1 and K + T <= L):
        raise UsageError(f"--twig-k {K} --twig-t {T}: a twig needs K >= 1, T >= 1 and K + T <= {L} (the base's layers)")
    if args.Kf is not None and not K < args.Kf <= L:
        raise UsageError(f"--Kf {args.Kf} must be in {K + 1}..{L} (past the twig's K = {K}, within the base's layers)")
    if orbax:
        tc = dataclasses.replace(own, **{k: v for k, v in (("Kf", args.Kf), ("R", args.R)) if v is not None})
        if args.R is not None:
            tc = dataclasses.replace(tc, R_bar=None)
    else:
        tc = training_twig_config(base, K, T, Kf=args.Kf, R=args.R)
    try:
        tc.validate(L, N)
    except TwigConfigError as e:
        raise UsageError(f"the twig's settings (K={tc.K}, T={tc.T}, Kf={tc.Kf}, R={tc.R}): {e}") from None
    if orbax:
        twig.twig_cfg = tc
    elif args.init_twig:
        twig = twig_io.import_milvlg(args.init_twig, base.cfg.text, tc)
    else:
        from twig_jax.twig.module import init_twig_from_base

        twig = init_twig_from_base(base, tc)
    return twig


def main(argv: Sequence[str] | None = None, *, extra_fields: SampleExtension | None = None,
         aux_loss: AttentionAuxLoss | None = None) -> int:
    """The training command; extra_fields / aux_loss go to DataConfig / TrainConfig unchanged."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad command line already reported in one line
        return int(e.code or 0)
    from twig_jax.data import NoUsableSamples
    from twig_jax.train.resume import CheckpointError
    from twig_jax.train.trainer import NoTrainingData

    try:
        return run(args, argv, extra_fields, aux_loss)
    except (NoUsableSamples, NoTrainingData) as e:
        return report(PROG, f"--data {args.data}: {e}")
    except (UsageError, CheckpointError) as e:
        return report(PROG, e)
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C during it
        print(f"{PROG}: interrupted by SIGINT: stopped at once (checkpoints saved before are kept)", file=sys.stderr)
        return 128 + signal.SIGINT


def run(args, argv: list[str], extra_fields, aux_loss) -> int:
    check_arguments(args, aux_loss)
    check_outputs(args)
    records, data_sha = read_records(args.data)
    import jax

    if wants_distributed(args.distributed, os.environ):
        jax.distributed.initialize()  # coordinator, process count and id from the environment / TPU metadata

    from twig_jax.data import DataConfig, build_dataset, default_image_preprocessor
    from twig_jax.train.losses import LossConfig
    from twig_jax.train.trainer import OptimConfig, TrainConfig, TrainingInterrupted, train

    try:
        base, model_dir = load_base(args)
        tokenizer = load_tokenizer_from(args.tokenizer or model_dir, "--tokenizer" if args.tokenizer else "--base")
        twig = None if args.train_all else build_twig(args, base)
    except UsageError:
        raise
    except (ValueError, OSError) as e:  # ConversionError, ConfigError, TwigFormatError, a missing file
        raise UsageError(str(e)) from None
    if args.batch % jax.process_count():
        raise UsageError(f"--batch {args.batch} is not divisible by the {jax.process_count()} processes")

    ckpt = args.ckpt_dir
    if ckpt:
        os.makedirs(ckpt, exist_ok=True)
    tc = None if twig is None else twig.twig_cfg
    cfg = TrainConfig(
        steps=args.steps, stop_at=args.stop_at, batch_size=args.batch, accum_steps=args.accum, train_all=args.train_all,
        freeze=tuple(n for n in args.freeze.split(",") if n),
        twig_K=tc.K if tc else DEFAULT_K, twig_T=tc.T if tc else DEFAULT_T, compute_dtype=args.dtype,
        remat=args.remat, mesh=args.mesh,
        seed=args.seed, optim=OptimConfig(lr=args.lr, warmup_ratio=args.warmup_ratio, clip_norm=args.clip),
        loss=LossConfig(alpha=args.alpha), aux_loss=aux_loss, ckpt_dir=ckpt, save_every=args.every, keep=args.keep,
        metrics_path=args.metrics or (os.path.join(ckpt, "metrics.jsonl") if ckpt else None),
        plot_path=args.plot or (os.path.join(ckpt, "loss.png") if ckpt else None),
        progress=not args.no_progress, benchmark=args.benchmark)
    data_cfg = DataConfig(json_path=args.data, image_dir=args.images, max_len=args.max_len, batch_size=args.batch,
                          seed=args.seed, on_too_long=args.on_too_long, num_threads=args.data_threads,
                          worker_count=args.data_workers, extra_fields=extra_fields)
    size = base.cfg.vision.image_size
    ds, bad_samples = build_dataset(data_cfg, tokenizer, image_token_index=base.cfg.image_token_index,
                                num_image_tokens=base.cfg.num_image_tokens,
                                image_preprocessor=default_image_preprocessor(base.cfg, model_dir),
                                pixel_shape=(base.cfg.vision.num_channels, size, size), records=records)
    identity = {"data": {"sha256": data_sha[:16], "records": len(records), "max_len": args.max_len,
                         "on_too_long": args.on_too_long}}
    try:
        out = train(base, cfg, iter(ds), twig=twig, bad_report=bad_samples, identity=identity,
                    allow_config_change=args.allow_config_change)
    except TrainingInterrupted as e:
        stopped = e

        def save(name):
            if jax.process_index() == 0:
                export(args, argv, stopped.result, base, model_dir, tokenizer, interrupted_by=name)

        return interrupted(args, stopped, save)
    if args.out and jax.process_index() == 0:
        export(args, argv, out, base, model_dir, tokenizer, interrupted_by=None)
    if out["benchmark"]:
        print(json.dumps(out["benchmark"]))
    return 0


def export(args, argv: list[str], result: dict, base, model_dir: str | None, tokenizer, *,
           interrupted_by: str | None) -> str:
    """Write the trained twig (or, with --train-all, model) to --out, replacing it in one rename,
    with a training record (TRAINING_RECORD_FILE)."""
    import jax
    from flax import nnx

    from twig_jax.train.outputs import training_record
    from twig_jax.twig import io as twig_io

    check_outputs(args)  # again: the folder may have changed while training
    trainer = result["trainer"]
    record = {twig_io.TRAINING_RECORD_FILE: training_record(
        command=PROG, argv=argv, step=result["end_step"], steps=args.steps, interrupted_by=interrupted_by,
        base=args.base or f"preset {args.base_preset}", data=args.data, ckpt_dir=args.ckpt_dir,
        config_changes=result["config_changes"])}
    if not args.train_all:
        twig_mod = nnx.merge(trainer.model.twig_def, jax.device_get(trainer.state["params"]))
        twig_io.save_twig(twig_mod, args.out, overwrite=True, force=args.force, milvlg=True, extra_files=record)
        print(f"twig saved to {args.out}", file=sys.stderr)
        return args.out
    from twig_jax.convert.llava import save_converted_model
    from twig_jax.train.outputs import holds_trained_model

    trained, _ = trainer.model.modules(jax.device_get(trainer.state["params"]), jax.device_get(trainer.frozen))

    def write(stage):
        save_converted_model(trained, stage, tokenizer if hasattr(tokenizer, "save_pretrained") else None,
                             preprocessor_from=model_dir)
        if not hasattr(tokenizer, "save_pretrained"):  # a bare tokenizer.json
            import shutil

            shutil.copy(args.tokenizer, os.path.join(stage, "tokenizer.json"))
        pre = os.path.join(stage, "preprocessor_config.json")
        if not os.path.exists(pre):  # training used CLIP's settings at the tower's size: say so
            from twig_jax.data.preprocess import LLAVA15_CLIP_PARAMS

            size = base.cfg.vision.image_size
            with open(pre, "w") as f:
                json.dump(dict(LLAVA15_CLIP_PARAMS, crop_size={"height": size, "width": size},
                               size={"shortest_edge": size}), f, indent=2)
        for name, text in record.items():
            with open(os.path.join(stage, name), "w") as f:
                f.write(text)

    twig_io.check_replaceable(os.path.realpath(args.out), overwrite=True, force=args.force,
                              holds_ours=holds_trained_model, what="a model trained by twig-jax train")
    twig_io.replace_with_staged(args.out, write)
    print(f"model saved to {args.out}", file=sys.stderr)
    return args.out


def interrupted(args, e, save) -> int:
    """One line for a run stopped by SIGINT / SIGTERM (e: TrainingInterrupted); without a checkpoint
    directory, save(signal_name) exports what was trained to --out. Status 128 + the signal's number."""
    name = signal.Signals(e.signum).name
    if e.checkpointed:
        what = f"checkpoint of step {e.step} saved in {args.ckpt_dir}: run the same command to resume"
    elif e.step > 0 and args.out:
        save(name)
        what = f"no --ckpt-dir, so the {'model' if args.train_all else 'twig'} of step {e.step} was written to " \
               f"{args.out} (its training.json records the interruption)"
    else:
        what = "nothing trained, nothing saved"
    print(f"{PROG}: interrupted by {name} at step {e.step} of {args.steps}; {what}", file=sys.stderr, flush=True)
    return 128 + e.signum


if __name__ == "__main__":
    sys.exit(main())
