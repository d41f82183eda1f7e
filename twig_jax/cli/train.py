"""`twig-jax train`: train a twig on a frozen LLaVA-1.5 (or, with --train-all, the whole model).

Example:
  twig-jax train --data llava_v1_5_mix665k.json --images data/ --base converted/llava-1.5-7b \\
      --twig-k 2 --twig-t 3 --steps 5200 --batch 128 --accum 8 --lr 1e-4 --dtype bfloat16 \\
      --mesh data=1,fsdp=8,tensor=1 --ckpt-dir runs/twig --every 500 --keep 3 --out runs/twig/final

`main` also takes a data extension (`DataConfig.extra_fields`) and an auxiliary attention loss
(`TrainConfig.aux_loss`) as keyword arguments, for entry points that build them from their own
flags (research/train_attention.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from twig_jax.data import SampleExtension
    from twig_jax.train.losses import AttentionAuxLoss


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="twig-jax train", description=__doc__.split("\n\n")[0])
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
    m.add_argument("--twig-k", type=int, default=2)
    m.add_argument("--twig-t", type=int, default=3)
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
    r.add_argument("--ckpt-dir", default=None)
    r.add_argument("--every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    r.add_argument("--keep", type=int, default=3, help="checkpoints to keep")
    r.add_argument("--metrics", default=None, help="JSONL metrics (default: CKPT_DIR/metrics.jsonl)")
    r.add_argument("--plot", default=None, help="loss-curve PNG (default: CKPT_DIR/loss.png)")
    r.add_argument("--out", default=None, help="export the trained twig here (orbax + MILVLG safetensors); with "
                   "--train-all, the trained model as a converted model dir (+ tokenizer)")
    r.add_argument("--benchmark", action="store_true", help="report tokens/s, step time and MFU")
    r.add_argument("--distributed", choices=["auto", "on", "off"], default="auto",
                   help="jax.distributed.initialize() for multi-process runs (auto: when JAX_COORDINATOR_ADDRESS "
                        "is set or a multi-host TPU slice is detected)")
    r.add_argument("--no-progress", action="store_true")
    return p


def _load_tokenizer(path: str):
    if path.endswith(".json"):
        from tokenizers import Tokenizer

        from twig_jax.data import CallableTokenizer

        return CallableTokenizer(Tokenizer.from_file(path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def wants_distributed(mode: str, env) -> bool:
    """Whether to join a multi-process run: forced on/off, or auto-detected from the environment."""
    if mode != "auto":
        return mode == "on"
    multi_host_tpu = "," in env.get("TPU_WORKER_HOSTNAMES", "")
    return bool(env.get("JAX_COORDINATOR_ADDRESS")) or multi_host_tpu


def main(argv: Sequence[str] | None = None, *, extra_fields: SampleExtension | None = None,
         aux_loss: AttentionAuxLoss | None = None) -> int:
    """The training command; extra_fields / aux_loss go to DataConfig / TrainConfig unchanged."""
    args = build_parser().parse_args(argv)
    if args.stop_at is not None and not 1 <= args.stop_at <= args.steps:
        print(f"twig-jax train: error: --stop-at {args.stop_at} must be in 1..--steps ({args.steps})", file=sys.stderr)
        return 2
    if aux_loss is not None and not args.train_all:
        print(f"twig-jax train: error: the auxiliary loss {aux_loss.metric!r} trains the base's attention: it needs "
              "--train-all", file=sys.stderr)
        return 2
    if args.freeze and not args.train_all:
        print("twig-jax train: error: --freeze needs --train-all (twig training already freezes the whole base)",
              file=sys.stderr)
        return 2
    import jax
    from flax import nnx

    if wants_distributed(args.distributed, os.environ):
        jax.distributed.initialize()  # coordinator, process count and id from the environment / TPU metadata

    from twig_jax.data import DataConfig, make_train_iterator
    from twig_jax.train.losses import LossConfig
    from twig_jax.train.trainer import OptimConfig, TrainConfig, train, training_twig_config

    if args.base_preset:
        from twig_jax.model.config import load_preset
        from twig_jax.model.llava import Llava

        import jax.numpy as jnp

        base = Llava(load_preset(args.base_preset), rngs=nnx.Rngs(args.seed),
                     dtype=jnp.dtype(args.base_dtype or "float32"))
        model_dir = None
    else:
        from twig_jax.convert.llava import load_model

        base = load_model(args.base, dtype=args.base_dtype, vision_dir=args.vision_dir)
        model_dir = args.base
    tok_path = args.tokenizer or model_dir
    if tok_path is None:
        print("twig-jax train: error: --tokenizer is required with --base-preset", file=sys.stderr)
        return 2
    tokenizer = _load_tokenizer(tok_path)

    twig = None
    if not args.train_all:
        if args.init_twig:
            from twig_jax.twig import io as twig_io

            if os.path.isdir(args.init_twig) and os.path.isfile(os.path.join(args.init_twig, twig_io.TWIG_CONFIG_FILE)):
                twig = twig_io.load_twig(args.init_twig, base.cfg.text)
            else:
                twig = twig_io.import_milvlg(args.init_twig, base.cfg.text,
                                             training_twig_config(base, args.twig_k, args.twig_t))
        else:
            from twig_jax.twig.module import init_twig_from_base

            twig = init_twig_from_base(base, training_twig_config(base, args.twig_k, args.twig_t))

    ckpt = args.ckpt_dir
    if ckpt:
        os.makedirs(ckpt, exist_ok=True)
    cfg = TrainConfig(
        steps=args.steps, stop_at=args.stop_at, batch_size=args.batch, accum_steps=args.accum, train_all=args.train_all,
        freeze=tuple(n for n in args.freeze.split(",") if n),
        twig_K=args.twig_k, twig_T=args.twig_t, compute_dtype=args.dtype, remat=args.remat, mesh=args.mesh,
        seed=args.seed, optim=OptimConfig(lr=args.lr, warmup_ratio=args.warmup_ratio, clip_norm=args.clip),
        loss=LossConfig(alpha=args.alpha), aux_loss=aux_loss, ckpt_dir=ckpt, save_every=args.every, keep=args.keep,
        metrics_path=args.metrics or (os.path.join(ckpt, "metrics.jsonl") if ckpt else None),
        plot_path=args.plot or (os.path.join(ckpt, "loss.png") if ckpt else None),
        progress=not args.no_progress, benchmark=args.benchmark)
    data_cfg = DataConfig(json_path=args.data, image_dir=args.images, max_len=args.max_len, batch_size=args.batch,
                          seed=args.seed, on_too_long=args.on_too_long, num_threads=args.data_threads,
                          worker_count=args.data_workers, extra_fields=extra_fields)
    it, report = make_train_iterator(data_cfg, tokenizer, base.cfg, model_dir=model_dir)
    out = train(base, cfg, it, twig=twig, bad_report=report)
    if args.out and jax.process_index() == 0 and not args.train_all:
        from twig_jax.twig import io as twig_io

        trainer = out["trainer"]
        twig_mod = nnx.merge(trainer.model.twig_def, jax.device_get(trainer.state["params"]))
        twig_io.save_twig(twig_mod, args.out, overwrite=True)
        twig_io.export_milvlg(twig_mod, os.path.join(args.out, "model.safetensors"))
        print(f"twig saved to {args.out}", file=sys.stderr)
    if args.out and jax.process_index() == 0 and args.train_all:
        from twig_jax.convert.llava import save_converted_model

        trainer = out["trainer"]
        trained, _ = trainer.model.modules(jax.device_get(trainer.state["params"]), jax.device_get(trainer.frozen))
        save_converted_model(trained, args.out, tokenizer if hasattr(tokenizer, "save_pretrained") else None)
        print(f"model saved to {args.out}", file=sys.stderr)
    if out["benchmark"]:
        print(json.dumps(out["benchmark"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
