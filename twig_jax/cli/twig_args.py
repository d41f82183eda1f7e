"""The twig, pruning and drafting flags every decoding command shares, and which of them a run
would ignore (refused, so nothing a user sets is silently dropped)."""

from __future__ import annotations

import argparse

from twig_jax.twig.config import METHODS, SELECT_RULES, SPECS

TWIG_FIELDS = ("K", "T", "Kf", "R", "R_bar", "draft_len", "theta", "score_rows", "select", "spec", "tree_width",
               "tree_depth", "tree_nodes")
FLAGS = {"K": "--K", "T": "--T", "Kf": "--Kf", "R": "--R", "R_bar": "--R-bar", "draft_len": "--draft-len",
         "theta": "--theta", "score_rows": "--score-rows", "select": "--select", "spec": "--spec",
         "tree_width": "--tree-width", "tree_depth": "--tree-depth", "tree_nodes": "--tree-nodes"}


def add_twig_args(p: argparse.ArgumentParser, decoding: bool = True) -> None:
    """The twig and pruning flags; `decoding` adds the method, SSD and drafting flags (prune-viz
    draws every method at one R and decodes nothing, so it has none of them)."""
    g = p.add_argument_group("TwigVLM (hyper-parameters default to the twig checkpoint's TwigConfig)")
    g.add_argument("--twig", help="twig checkpoint: orbax dir (twig_io.save_twig) or MILVLG safetensors (an "
                                  "official one, without a TwigConfig, needs --K and --R or --R-bar)")
    if decoding:
        g.add_argument("--method", choices=list(METHODS),
                       help="visual token pruning (default: twig with --twig, else none)")
        g.add_argument("--ssd", action=argparse.BooleanOptionalAction, default=None,
                       help="self-speculative decoding (default: on with --twig; needs a twig)")
    b = g.add_mutually_exclusive_group()
    b.add_argument("--R", type=int, help="kept visual tokens")
    b.add_argument("--R-bar", dest="R_bar", type=float, help="average visual tokens per layer (paper's budget)")
    g.add_argument("--K", type=int, help="trunk depth: the twig grows on base layer K (FastV scores layer K-1)")
    g.add_argument("--T", type=int, help="twig layers (must match the twig checkpoint)")
    g.add_argument("--Kf", type=int, help="FinalWipe: base layers Kf..L-1 see text only")
    if decoding:
        g.add_argument("--draft-len", type=int, help="most tokens drafted per SSD round (delta)")
        g.add_argument("--theta", type=float, help="stop drafting when the draft's top probability is below this")
        g.add_argument("--spec", choices=list(SPECS), help="draft shape: a chain (draft_len, theta) or a tree "
                                                            "(TwigVLM++ / EAGLE-2; default: the twig's)")
        g.add_argument("--tree-width", type=int, help="tree drafting: children per expanded node (E)")
        g.add_argument("--tree-depth", type=int, help="tree drafting: levels below the root (D)")
        g.add_argument("--tree-nodes", type=int, help="tree drafting: nodes verified per round (N)")
    g.add_argument("--score-rows", choices=["last", "text"], help="attention rows that score visual tokens")
    g.add_argument("--select", choices=list(SELECT_RULES),
                   help="keep-set from the scores: top R (the paper), score-weighted coverage of the visual "
                        "tokens, or a Gumbel-top-R draw (the P-head only: its RL's policy); default: the "
                        "twig's for twig / phead, top for fastv / random")


def unused_settings(given: dict, *, method: str, ssd: bool, twig_given: bool) -> str | None:
    """Why a setting the user gave would not change this run, or None. `given`: TwigConfig fields
    given (see TWIG_FIELDS). twig.config.resolve_twig_config refuses the rest: pruning settings with
    method none, select=sample without the P-head, a K or T the twig does not have."""
    plain = method == "none" and not ssd
    if "T" in given and not twig_given:
        return "--T is the twig checkpoint's depth, and no --twig is given"
    if plain and twig_given:
        return ("--twig is given, but method none without SSD decodes without it: choose a pruning --method, "
                "or SSD")
    if plain and "K" in given:
        return "--K is given, but this run neither prunes nor drafts (method none without SSD)"
    drafting = [FLAGS[k] for k in ("draft_len", "theta", "spec", "tree_width", "tree_depth", "tree_nodes")
                if k in given]
    if drafting and not ssd:
        return f"{'/'.join(drafting)} set SSD drafting, and this run has no SSD"
    if "score_rows" in given and method in ("random", "phead"):
        return (f"--score-rows picks the attention rows that score the visual tokens; method {method} scores "
                "without attention")
    return None
