"""`--mesh` and `--distributed` for the decoding commands (generate, eval, demo, bench): the same
("data", "fsdp", "tensor") mesh and rule table as `twig-jax train`."""

from __future__ import annotations

import argparse
import os


def add_mesh_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("devices")
    g.add_argument("--mesh", help="decode on a device mesh, e.g. data=2,tensor=4 (axes data, fsdp, tensor; their "
                                  "product is the device count); default: one device")
    g.add_argument("--distributed", choices=["auto", "on", "off"], default="auto",
                   help="jax.distributed.initialize() for multi-process runs (auto: when JAX_COORDINATOR_ADDRESS "
                        "is set or a multi-host TPU slice is detected)")


def mesh_from_args(args):
    """The mesh --mesh asks for (None without it), after joining a multi-process run if asked.
    A bad spec raises parallel.sharding.MeshError (one line, exit 2)."""
    from twig_jax.train.trainer import wants_distributed

    if wants_distributed(args.distributed, os.environ):
        import jax

        jax.distributed.initialize()  # coordinator, process count and id from the environment / TPU metadata
    if not args.mesh:
        return None
    from twig_jax.parallel.sharding import make_mesh, parse_mesh

    return make_mesh(parse_mesh(args.mesh))
