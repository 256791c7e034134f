"""Training losses (all in float32 whatever the compute dtype) and the side channel that carries them
out of a loss-only training forward (TrainingStats)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.context import ParallelMode
from mindspore.parallel._utils import _get_parallel_mode


def causal_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100, shifted: bool = False) -> Tensor:
    """Mean next-token cross-entropy; `ignore_index` labels don't count (a batch with none to count gives 0,
    not NaN: hence the sum over max(count, 1)). Position t predicts labels[t+1] (Hugging Face), or labels[t]
    when `shifted` (MindFormers' training: labels are already the next tokens)."""
    logits = ops.cast(logits if shifted else logits[:, :-1], ms.float32)
    target = ops.cast(labels if shifted else labels[:, 1:], ms.int32).reshape(-1)
    counted = target != ignore_index
    valid = ops.cast(counted, ms.float32)
    # LogSoftmax and a gather of the target column, not ops.cross_entropy, whose composite max/exp/sum chain
    # differentiates op by op (measured in docs/performance.md).
    log_probs = ops.log_softmax(logits.reshape(-1, logits.shape[-1]), axis=-1)
    picked = ops.gather_elements(log_probs, 1, (target * ops.cast(counted, ms.int32)).reshape(-1, 1)).reshape(-1)
    return -(picked * valid).sum() / ops.maximum(valid.sum(), 1.0)


def load_balancing_loss(load: Tensor, prob_sum: Tensor, num_tokens: Tensor) -> Tensor:
    """Hugging Face's `load_balancing_loss_func`, pooled over all layers.

    load[e]: top-k assignments to expert e; prob_sum[e]: summed routing probability of e; both over
    every layer's valid tokens, `num_tokens` of them in all. Equals k under uniform routing.
    """
    num_experts = load.shape[-1]
    return num_experts * ((load / num_tokens) * (prob_sum / num_tokens)).sum()


def sequence_balancing_loss(load: Tensor, prob_sum: Tensor) -> Tensor:
    """The load-balancing loss per sequence (Megatron-Core's seq_aux_loss, normalised as Hugging Face's:
    k under uniform routing), averaged over the sequences that hold valid tokens.

    load[b, e], prob_sum[b, e]: sequence b's assignments to and summed probability of expert e, pooled over
    layers; a sequence's valid tokens times layers is its prob_sum row sum (each token's probabilities sum
    to 1)."""
    num_experts = load.shape[-1]
    tokens = prob_sum.sum(axis=-1)
    per_sequence = num_experts * (load * prob_sum).sum(axis=-1) / ops.maximum(tokens * tokens, 1.0)
    return per_sequence.sum() / ops.maximum(ops.cast(tokens > 0.5, ms.float32).sum(), 1.0)


def global_balancing_loss(step_load: Tensor, prob_sum: Tensor, num_tokens: Tensor, top_k: int) -> Tensor:
    """The load-balancing loss with the load over the global batch (Megatron-Core's global aux loss):
    the expert shares of `step_load` [E] (the step's assignments so far, every layer, constant) times k,
    against this pass's mean probabilities (prob_sum [E] over `num_tokens`, as load_balancing_loss). With
    one pass per step it equals load_balancing_loss when every token makes k assignments."""
    num_experts = step_load.shape[-1]
    share = top_k * step_load / ops.maximum(step_load.sum(), 1.0)
    return num_experts * (share * (prob_sum / num_tokens)).sum()


def router_z_loss(z_sum: Tensor, num_tokens: Tensor) -> Tensor:
    """ST-MoE z-loss: mean over tokens (and layers) of logsumexp(router logits)^2."""
    return z_sum / num_tokens


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float = 1.0,
                      ignore_index: int = -100, shifted: bool = False) -> Tensor:
    """Mean KL(teacher || student) of the next-token distributions softened by `temperature`, over the
    positions causal_lm_loss counts with the same `shifted` (position t where labels[t+1], or labels[t]
    when shifted, is not `ignore_index`)."""
    last = None if shifted else -1
    student = ops.log_softmax(ops.cast(student_logits[:, :last], ms.float32) / temperature, axis=-1)
    teacher = ops.log_softmax(ops.cast(teacher_logits[:, :last], ms.float32) / temperature, axis=-1)
    kl = (ops.exp(teacher) * (teacher - student)).sum(axis=-1)
    valid = ops.cast((labels if shifted else labels[:, 1:]) != ignore_index, ms.float32)
    return (kl * valid).sum() / ops.maximum(valid.sum(), 1.0)


def ranks_run_their_own_rows() -> bool:
    """True where every rank compiles its own step on its own rows (DATA_PARALLEL, HYBRID_PARALLEL), so its
    gradients and counts are one rank's until summed; False where one compiled step already spans the global
    batch (one process, or semi-auto parallel, whose compiler inserts the reductions)."""
    return _get_parallel_mode() in (ParallelMode.DATA_PARALLEL, ParallelMode.HYBRID_PARALLEL)


def rank_sum() -> Optional[nn.Cell]:
    """The sum over data-parallel ranks of a count each rank made on its own rows, for the counts that must
    be the global batch's: an AllReduce where ranks run their own rows, else None."""
    return ops.AllReduce() if ranks_run_their_own_rows() else None


LOSS_TERMS = ("ce_loss", "aux_loss", "z_loss")  # every training forward's terms, in the order the model passes them


class TrainingStats(nn.Cell):
    """The side channel of the training forward: what a step measured besides the loss it returns.

    MindFormers' wrappers (PipelineCell, MicroBatchInterleaved, GradAccumulationCell and the train-one-step
    cells around them) take a network whose output is the loss alone and sum or slice it. The loss terms
    and router statistics therefore leave the forward another way: every forward pass (each micro-batch,
    interleaved copy or pipeline micro-batch) adds them, in-graph, into Parameters of this cell, which lives
    inside the model and so survives every wrapper. The model holds it as `training_stats`:

      training_stats.<term>       one scalar per loss term, summed over passes (mean = sum / passes)
      training_stats.expert_load  [L, E] routed assignments per layer and expert, summed over passes
      training_stats.dropped      [L, E] assignments dropped for lack of capacity, summed over passes
      training_stats.passes       forward passes since the last reset

    `terms` is fixed at construction (LOSS_TERMS, plus e.g. distillation's kd_loss), so the parallel plan
    shards and stages every Parameter the channel will ever have. Only these methods write the Parameters:

      calling the cell (accumulate)  MixtralForCausalLM.training_output, once per training forward pass
      reset                          MixtralTrainOneStepCell, in-graph before the step, so that what the
                                     channel holds after the step is that step's alone
      all_reduce                     MixtralTrainOneStepCell, in-graph after the step when the counts are
                                     one rank's (`rank_sum` is set: DATA_PARALLEL), so that it holds the
                                     global batch's
      read_and_reset                 the callbacks (run/callbacks.py step_stats), on the host once per step;
                                     it zeroes the channel because a foreign wrapper never calls reset

    `step_load` reads it inside the forward: the global-batch aux loss's tokens per expert so far.

    The names start with `training_stats.`: training state that checkpoint loading and the converter skip
    (mixtral_ms.checkpoint.name_map.is_training_state, which also knows the older `router_stats.`).
    """

    def __init__(self, num_layers: int, num_experts: int, terms: Sequence[str] = LOSS_TERMS) -> None:
        super().__init__()
        self.terms = tuple(terms)
        zeros = lambda *shape: Tensor(np.zeros(shape, np.float32))  # noqa: E731
        self.term_sums = ms.ParameterTuple(
            Parameter(zeros(), name=t, requires_grad=False) for t in self.terms)
        self.expert_load = Parameter(zeros(num_layers, num_experts), name="expert_load", requires_grad=False)
        self.dropped = Parameter(zeros(num_layers, num_experts), name="dropped", requires_grad=False)
        self.passes = Parameter(zeros(), name="passes", requires_grad=False)
        # Primitives the parallel plan shards replicated: without a strategy the compiler would split the
        # [L, E] tables over devices like a batch (mixtral_ms/parallel/plan.py).
        self.add_scalar, self.add_table = ops.AssignAdd(), ops.AssignAdd()
        self.zero_scalar, self.zero_table = ops.Assign(), ops.Assign()
        self.step_load_add, self.step_load_sum = ops.Add(), ops.ReduceSum()
        self.rank_sum = rank_sum()

    def _parameters(self) -> tuple:
        """Every Parameter of the channel, in a fixed order (terms, expert_load, dropped, passes)."""
        return tuple(self.term_sums) + (self.expert_load, self.dropped, self.passes)

    def construct(self, terms: tuple, load: Tensor, dropped: Tensor) -> Tensor:
        """Accumulate one forward pass (`terms` in the order of `self.terms`); returns a token to
        `ops.depend` the loss on, so the writes are kept."""
        token = self.add_scalar(self.passes, ops.ones((), ms.float32))
        for param, value in zip(self.term_sums, terms):
            token = ops.depend(token, self.add_scalar(param, ops.stop_gradient(ops.cast(value, ms.float32))))
        token = ops.depend(token, self.add_table(self.expert_load, ops.stop_gradient(ops.cast(load, ms.float32))))
        return ops.depend(token, self.add_table(self.dropped, ops.stop_gradient(ops.cast(dropped, ms.float32))))

    def reset(self) -> Tensor:
        """Zero everything in-graph; returns a token."""
        token = self.zero_table(self.expert_load, ops.zeros_like(self.expert_load))
        token = ops.depend(token, self.zero_table(self.dropped, ops.zeros_like(self.dropped)))
        for param in tuple(self.term_sums) + (self.passes,):
            token = ops.depend(token, self.zero_scalar(param, ops.zeros_like(param)))
        return token

    def step_load(self, load: Tensor) -> Tensor:
        """The step's tokens per expert so far, pooled over layers [E]: the earlier passes' plus this pass's
        `load` [L, E], over every data-parallel rank (each rank runs the same passes in step); a constant."""
        total = self.step_load_add(self.expert_load, ops.stop_gradient(load))
        if self.rank_sum is not None:
            total = self.rank_sum(total)
        return self.step_load_sum(total, 0)

    def all_reduce(self) -> Tensor:
        """Replace every Parameter by its sum over data-parallel ranks in-graph (only when `rank_sum` is
        set); returns a token."""
        params = self._parameters()
        token = ops.assign(params[0], self.rank_sum(params[0]))
        for param in params[1:]:
            token = ops.depend(token, ops.assign(param, self.rank_sum(param)))
        return token

    def read_and_reset(self) -> dict:
        """Host-side read (between steps): {"terms": {term: mean over passes}, "expert_load": [L, E] sum,
        "dropped": [L, E] sum, "passes": n}, then zero everything for the next step."""
        passes = float(self.passes.asnumpy())
        out = {"terms": {t: float(p.asnumpy()) / max(passes, 1.0) for t, p in zip(self.terms, self.term_sums)},
               "expert_load": self.expert_load.asnumpy().copy(), "dropped": self.dropped.asnumpy().copy(),
               "passes": passes}
        for param in self._parameters():
            param.set_data(Tensor(np.zeros(param.shape, np.float32)))
        return out
