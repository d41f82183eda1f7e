"""One vocabulary for what a benchmark or table row runs: a pruning method, its keep-set rule, and
whether the twig drafts (SSD).

A variant's name is built by one rule and parsed back by it: `METHOD[-RULE][+ssd|+tree]`, where
METHOD is a pruning method (twig.config.METHODS; "twig" is TTP), RULE a keep-set rule other than
top R ("cover", "sample"), "+ssd" chain drafting and "+tree" tree drafting; "plain" is no pruning and
no drafting, "ssd" / "tree" drafting alone. Examples: "twig", "twig+ssd", "phead-cover+tree",
"fastv-cover".
"""

from __future__ import annotations

import dataclasses

from twig_jax.twig.config import METHODS, SELECT_RULES, SPECS, TwigConfigError

METHOD_LABELS = {"none": "plain", "twig": "TTP", "phead": "P-head", "fastv": "FastV", "random": "random"}
RULE_LABELS = {"cover": "coverage keep-set", "sample": "sampled keep-set"}


@dataclasses.dataclass(frozen=True)
class Variant:
    method: str  # pruning method (twig.config.METHODS)
    ssd: bool = False  # the twig drafts, the pruned model verifies
    select: str = "top"  # keep-set rule over the method's scores
    spec: str = "chain"  # the drafts' shape when ssd: "chain" or "tree"

    def __post_init__(self):
        if self.method not in METHODS:
            raise TwigConfigError(f"unknown pruning method {self.method!r}; have {', '.join(METHODS)}")
        if self.select not in SELECT_RULES or (self.method == "none" and self.select != "top"):
            raise TwigConfigError(f"keep-set rule {self.select!r} does not go with method {self.method!r}")
        if self.spec not in SPECS or (self.spec != "chain" and not self.ssd):
            raise TwigConfigError(f"draft shape {self.spec!r} needs drafting (ssd)")

    @property
    def draft_suffix(self) -> str:
        return ("+tree" if self.spec == "tree" else "+ssd") if self.ssd else ""

    @property
    def name(self) -> str:
        if self.method == "none":
            return self.draft_suffix[1:] if self.ssd else "plain"
        rule = "" if self.select == "top" else f"-{self.select}"
        return f"{self.method}{rule}{self.draft_suffix}"

    @property
    def label(self) -> str:
        drafting = {"": "", "+ssd": "SSD", "+tree": "tree SSD"}[self.draft_suffix]
        if self.method == "none":
            return drafting or "plain"
        rule = f", {RULE_LABELS[self.select]}" if self.select != "top" else ""
        return f"{METHOD_LABELS[self.method]}{rule}{' + ' + drafting if drafting else ''}"


def parse_variant(name: str) -> Variant:
    """The Variant a name stands for (the inverse of Variant.name); TwigConfigError names a bad one."""
    if name in ("plain", "ssd", "tree"):
        return Variant("none", ssd=name != "plain", spec="tree" if name == "tree" else "chain")
    head, ssd, spec = name, False, "chain"
    for suffix, shape in (("+ssd", "chain"), ("+tree", "tree")):
        if name.endswith(suffix):
            head, ssd, spec = name[:-len(suffix)], True, shape
    method, _, rule = head.partition("-")
    try:
        v = Variant(method, ssd, rule or "top", spec)
    except TwigConfigError as e:
        raise TwigConfigError(f"variant {name!r}: {e}; a variant is METHOD[-RULE][+ssd|+tree], 'plain', 'ssd' or 'tree'") from None
    if v.name != name:  # e.g. "twig-top": top R is the unmarked rule
        raise TwigConfigError(f"variant {name!r} is spelled {v.name!r}")
    return v
