"""Training losses. All in float32 whatever the compute dtype."""
from __future__ import annotations

import mindspore as ms
from mindspore import Tensor, ops


def causal_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy: position t predicts labels[t+1]; `ignore_index` labels don't count
    (a batch with none to count gives 0, not NaN: hence the sum over max(count, 1))."""
    logits = ops.cast(logits[:, :-1], ms.float32)
    target = ops.cast(labels[:, 1:], ms.int32)
    valid = ops.cast(target != ignore_index, ms.float32)
    nll = ops.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=ignore_index,
                            reduction="sum")
    return nll / ops.maximum(valid.sum(), 1.0)


def load_balancing_loss(load: Tensor, prob_sum: Tensor, num_tokens: Tensor) -> Tensor:
    """Hugging Face's `load_balancing_loss_func`, pooled over all layers.

    load[e]: top-k assignments to expert e; prob_sum[e]: summed routing probability of e; both over
    every layer's valid tokens, `num_tokens` of them in all. Equals k under uniform routing.
    """
    num_experts = load.shape[-1]
    return num_experts * ((load / num_tokens) * (prob_sum / num_tokens)).sum()


def router_z_loss(z_sum: Tensor, num_tokens: Tensor) -> Tensor:
    """ST-MoE z-loss: mean over tokens (and layers) of logsumexp(router logits)^2."""
    return z_sum / num_tokens


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float = 1.0,
                      ignore_index: int = -100) -> Tensor:
    """Mean KL(teacher || student) of the next-token distributions softened by `temperature`, over the
    positions causal_lm_loss counts (position t, where labels[t+1] is not `ignore_index`)."""
    student = ops.log_softmax(ops.cast(student_logits[:, :-1], ms.float32) / temperature, axis=-1)
    teacher = ops.log_softmax(ops.cast(teacher_logits[:, :-1], ms.float32) / temperature, axis=-1)
    kl = (ops.exp(teacher) * (teacher - student)).sum(axis=-1)
    valid = ops.cast(labels[:, 1:] != ignore_index, ms.float32)
    return (kl * valid).sum() / ops.maximum(valid.sum(), 1.0)
