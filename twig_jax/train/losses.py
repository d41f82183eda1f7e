"""Training losses for the twig (TwigVLM / TwigVLM++, docs/design.md, "The twig" and "The P-head").

Everything is computed in float32 and reduced as masked *sums* plus a token count, so that
gradient accumulation over micro-batches gives exactly the full-batch masked mean (the mean of
per-micro-batch means would weight short micro-batches more).

Position convention: `logits[:, t]` predicts `tokens[:, t + 1]`; `label_mask[:, t]` says whether
token t is a training target (an assistant answer token or its closing "</s>"). `shift_targets`
turns (tokens, label_mask) into per-position targets and weights.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights of the TwigVLM++ stage-1 objective L = NTP + alpha PredKL + gamma AttnKL."""

    alpha: float = 0.1  # PredKL weight (0 disables the base teacher forward entirely)
    gamma: float = 1.0  # AttnKL weight (only used when attention distributions are given)
    temperature: float = 5.0  # PredKL softmax temperature tau; the KL is scaled by tau^2
    kl_clip: float = 4.0  # each token's scaled KL is clipped at this value and divided by it


class AttentionAuxLoss(Protocol):
    """An auxiliary training loss on the base's attention (train_all only), next to the LM loss.

    The trainer runs `layers` on their own to get their attention probabilities, sends
    `batch_fields` (added by the data pipeline, e.g. a `DataConfig.extra_fields`) to the device,
    and adds `weight` times the mean sum / count to the loss; the mean is logged as `metric`."""

    @property
    def layers(self) -> tuple[int, ...]: ...  # base layers whose attention probabilities `sums` reads

    @property
    def batch_fields(self) -> tuple[str, ...]: ...  # batch fields `sums` reads

    @property
    def metric(self) -> str: ...  # name of the mean in the step metrics

    @property
    def weight(self) -> float: ...  # weight of the mean in the loss

    def sums(self, probs: Sequence[jax.Array], batch: dict) -> tuple[jax.Array, jax.Array]:
        """(sum, count) float32 scalars; probs: per entry of `layers`, [B, H, S, S]."""
        ...


class LossSums(NamedTuple):
    """Masked sums (float32 scalars); divide by `count` for means."""

    ce: jax.Array
    pred_kl: jax.Array
    attn_kl: jax.Array
    count: jax.Array  # number of target tokens
    attn_count: jax.Array  # number of attention distributions in attn_kl
    aux: jax.Array  # sum of an AttentionAuxLoss (0 without one)
    aux_count: jax.Array  # its count

    def total(self, cfg: LossConfig, aux: AttentionAuxLoss | None = None) -> jax.Array:
        """Weighted sum whose gradient divided by `count` is the gradient of the mean loss."""
        attn = self.attn_kl * (self.count / jnp.maximum(self.attn_count, 1.0))
        out = self.ce + cfg.alpha * self.pred_kl + cfg.gamma * attn
        if aux is not None:
            out = out + aux.weight * (self.aux * (self.count / jnp.maximum(self.aux_count, 1.0)))
        return out

    def means(self, cfg: LossConfig, aux: AttentionAuxLoss | None = None) -> dict[str, jax.Array]:
        n = jnp.maximum(self.count, 1.0)
        out = {"ce": self.ce / n, "pred_kl": self.pred_kl / n,
               "attn_kl": self.attn_kl / jnp.maximum(self.attn_count, 1.0)}
        out["loss"] = out["ce"] + cfg.alpha * out["pred_kl"] + cfg.gamma * out["attn_kl"]
        if aux is not None:
            out[aux.metric] = self.aux / jnp.maximum(self.aux_count, 1.0)
            out["loss"] = out["loss"] + aux.weight * out[aux.metric]
        return out


def shift_targets(tokens: jax.Array, label_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """targets [B, S] (tokens[:, t+1]) and weights [B, S] float32 (label_mask[:, t+1]); the last
    position has no next token and weight 0."""
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)  # [B, S]
    weights = jnp.concatenate([label_mask[:, 1:], jnp.zeros_like(label_mask[:, :1])], axis=1)
    return targets, weights.astype(jnp.float32)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of x over mask (float32); 0 when the mask is empty."""
    m = mask.astype(jnp.float32)
    return jnp.sum(x.astype(jnp.float32) * m) / jnp.maximum(jnp.sum(m), 1.0)


def token_ce(logits: jax.Array, targets: jax.Array) -> jax.Array:  # [B, S]
    """Per-position next-token cross-entropy in float32; logits [B, S, V], targets [B, S]."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, S]
    # An unlabelled target may be an id outside the vocabulary (liuhaotian's image placeholder, -200):
    # an out-of-range gather gives NaN, which a zero weight does not remove, so clip the index.
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1, mode="clip")[..., 0]
    return lse - picked


def token_pred_kl(teacher_logits: jax.Array, student_logits: jax.Array, *, temperature: float = 5.0,
                  clip: float = 4.0) -> jax.Array:  # [B, S]
    """TwigVLM++ PredKL per token: tau^2 KL(softmax(teacher/tau) || softmax(student/tau)),
    clipped at `clip` and divided by `clip` (so each token contributes at most 1).

    The teacher (frozen base) is wrapped in stop_gradient here as well, so a caller can never
    leak gradient into the base through this term.
    """
    t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
    s = student_logits.astype(jnp.float32) / temperature
    logp_t = jax.nn.log_softmax(t, axis=-1)  # [B, S, V]
    logp_s = jax.nn.log_softmax(s, axis=-1)
    kl = jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1) * (temperature ** 2)  # [B, S]
    kl = jnp.maximum(kl, 0.0)  # exact KL is >= 0; remove float noise below 0
    return jnp.minimum(kl, clip) / clip


def attn_kl(p: jax.Array, q: jax.Array, eps: float = 1e-9) -> jax.Array:  # [...]
    """KL(p || q) over the last axis for two probability distributions (e.g. the base's
    head-averaged attention over visual tokens and the P-head's score s). The hook for
    TwigVLM++'s AttnKL; unused until the P-head exists."""
    p = p.astype(jnp.float32)
    q = q.astype(jnp.float32)
    return jnp.sum(p * (jnp.log(p + eps) - jnp.log(q + eps)), axis=-1)


AttnKLFn = Callable[[jax.Array, jax.Array], jax.Array]


def twig_loss_sums(
    student_logits: jax.Array,  # [B, S, V] twig (or trained base) logits
    tokens: jax.Array,  # [B, S]
    label_mask: jax.Array,  # [B, S]
    cfg: LossConfig,
    teacher_logits: jax.Array | None = None,  # [B, S, V] frozen base logits (PredKL)
    attn_pair: tuple[jax.Array, jax.Array] | None = None,  # ([B, M], [B, M]) base attn, P-head score
    attn_kl_fn: AttnKLFn = attn_kl,
) -> LossSums:
    """NTP cross-entropy on answer tokens (+ PredKL when teacher logits are given, + AttnKL when
    an attention pair is given), as masked sums."""
    targets, w = shift_targets(tokens, label_mask)
    count = jnp.sum(w)
    ce = jnp.sum(token_ce(student_logits, targets) * w)
    zero = jnp.zeros((), jnp.float32)
    kl = zero
    if teacher_logits is not None and cfg.alpha:
        kl = jnp.sum(token_pred_kl(teacher_logits, student_logits, temperature=cfg.temperature,
                                   clip=cfg.kl_clip) * w)
    akl, acount = zero, zero
    if attn_pair is not None and cfg.gamma:
        a_base, score = attn_pair
        akl = jnp.sum(attn_kl_fn(jax.lax.stop_gradient(a_base), score))
        acount = jnp.asarray(a_base.shape[0], jnp.float32)
    return LossSums(ce, kl, akl, count, acount, zero, zero)


__all__ = ["LossConfig", "AttentionAuxLoss", "LossSums", "shift_targets", "masked_mean", "token_ce", "token_pred_kl",
           "attn_kl", "twig_loss_sums"]
