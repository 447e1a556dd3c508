"""The training loss: label-smoothed cross-entropy per target token (Section 5.4), and an update's average.

Shape legend: n target positions (b * t, PAD included), d d_model, V vocabulary, c positions in one chunk.

Two computations of the same loss:

- :func:`label_smoothed_nll` over given logits (b, t, V): the plain form, the reference of the tests.
- :func:`chunked_label_smoothed_nll` from the decoder's hidden states and the output projection: the logits
  exist ``chunk_tokens`` positions at a time, so neither the full fp32 logits (n, V) nor their gradient is
  ever materialised. At 4096 tokens and a 37k vocabulary each of them is ~0.6 GB (1.2 GB together); at the
  16k tokens an H200 holds, ~5 GB. It computes the gradient during the forward pass, chunk by chunk (the
  loss is a sum, so its gradient only needs scaling by the incoming one later), as Liger-Kernel's fused
  linear cross-entropy does; the backward pass is then one multiplication per input.

Neither indexes with a boolean mask or reads a value back to the host: PAD positions are zeroed with
``torch.where``, and the token count stays a device tensor, so a training step never waits for the GPU.

Normalisation (tensor2tensor, fairseq): the loss of one optimizer update is the sum of the token losses of
all its micro-batches on all ranks divided by the update's number of target tokens. Averaging the
micro-batches' means instead would weigh a token of a sparse micro-batch more than one of a full
micro-batch. :class:`UpdateLoss` sums the micro-batches' losses and tokens on the device and rescales the
summed gradients once, just before the optimizer step, as fairseq's ``multiply_grads(world / tokens)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from transformer_lit.errors import NonFiniteLossError


def label_smoothed_nll(
    logits: Tensor, target: Tensor, *, epsilon: float, pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Label-smoothed cross-entropy (the training loss) and the plain NLL (for perplexity).

    The smoothed target puts 1 - epsilon on the gold token and spreads epsilon uniformly over the whole
    vocabulary (Szegedy et al. 2016, as cited in Section 5.4). PAD positions of ``target`` are ignored.

    Args:
        logits: (b, t, V) decoder outputs.
        target: (b, t) gold ids, PAD where there is no token.
    Returns:
        (smoothed loss summed over tokens, NLL summed over tokens, number of non-PAD tokens), 0-d tensors
        on the logits' device.
    """
    lprobs = F.log_softmax(logits.float(), dim=-1).flatten(0, 1)  # (n, V)
    target = target.flatten()  # (n,)
    keep = target.ne(pad_id)  # (n,)
    nll = -lprobs.gather(1, target.unsqueeze(1)).squeeze(1)  # (n,)
    smooth = -lprobs.mean(dim=-1)  # (n,): cross-entropy against the uniform distribution
    loss = (1.0 - epsilon) * nll + epsilon * smooth  # (n,)
    return torch.where(keep, loss, 0.0).sum(), torch.where(keep, nll, 0.0).sum(), keep.sum()


def chunked_label_smoothed_nll(
    hidden: Tensor, weight: Tensor, target: Tensor, *, epsilon: float, pad_id: int, chunk_tokens: int
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`label_smoothed_nll` of ``hidden @ weight.T``, computed ``chunk_tokens`` positions at a time.

    Equal to the plain loss on the full logits up to float rounding, in value and in the gradients of
    ``hidden`` and ``weight``. Under ``torch.autocast`` the projections run in the autocast dtype and the
    softmax in float32, as the plain form's ``output_proj`` + ``log_softmax(logits.float())`` do.

    Args:
        hidden: (..., d) decoder outputs before the output projection.
        weight: (V, d) the output projection (shared with the embeddings, Section 3.4).
        target: (...) gold ids, PAD where there is no token.
        chunk_tokens: positions whose logits exist at once.
    Returns:
        (smoothed loss summed over tokens, NLL summed over tokens, number of non-PAD tokens); only the
        first carries a gradient.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    hidden = hidden.reshape(-1, hidden.size(-1))  # (n, d)
    target = target.reshape(-1)  # (n,)
    keep = target.ne(pad_id)  # (n,)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if not grad:
        loss_sum, nll_sum, _, _ = _chunked_forward(hidden, weight, target, keep, epsilon, chunk_tokens, False)
        return loss_sum, nll_sum, keep.sum()
    loss_sum, nll_sum = _LinearLabelSmoothedCE.apply(hidden, weight, target, keep, epsilon, chunk_tokens)
    return loss_sum, nll_sum, keep.sum()


def _chunked_forward(
    hidden: Tensor, weight: Tensor, target: Tensor, keep: Tensor, epsilon: float, chunk: int, grad: bool
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Loss sums and, if ``grad``, d(smoothed loss sum) / d(hidden, weight), one chunk of positions at a time.

    For logits z of one position, lse = logsumexp(z), gold y and PAD weight w in {0, 1}:
    loss = w * (lse - (1 - eps) z_y - eps mean(z)),
    d loss / d z = w * (softmax(z) - (1 - eps) e_y - eps / V).
    """
    n, vocab = hidden.size(0), weight.size(0)
    loss_sum = hidden.new_zeros((), dtype=torch.float32)
    nll_sum = hidden.new_zeros((), dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if grad else None  # (n, d)
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if grad else None  # (V, d)
    for start in range(0, n, chunk):
        h, y, w = hidden[start : start + chunk], target[start : start + chunk], keep[start : start + chunk]
        logits = F.linear(h, weight).float()  # (c, V)
        lse = logits.logsumexp(dim=-1)  # (c,)
        nll = lse - logits.gather(1, y[:, None]).squeeze(1)  # (c,)
        loss = (1.0 - epsilon) * nll + epsilon * (lse - logits.mean(dim=-1))  # (c,)
        loss_sum += torch.where(w, loss, 0.0).sum()
        nll_sum += torch.where(w, nll, 0.0).sum()
        if grad_hidden is None or grad_weight is None:
            continue
        d_logits = logits.sub_(lse[:, None]).exp_().sub_(epsilon / vocab)  # (c, V), in place of the logits
        d_logits.scatter_add_(1, y[:, None], d_logits.new_full((y.size(0), 1), epsilon - 1.0))
        d_logits.mul_(w[:, None])  # PAD positions contribute nothing
        grad_hidden[start : start + chunk] = d_logits.to(h.dtype) @ weight.to(h.dtype)  # (c, d)
        grad_weight += (d_logits.t() @ h.float()).float()  # (V, d)
    return loss_sum, nll_sum, grad_hidden, grad_weight


class _LinearLabelSmoothedCE(torch.autograd.Function):
    """Autograd wrapper of :func:`_chunked_forward`: gradients are made in forward, scaled in backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        target: Tensor,
        keep: Tensor,
        epsilon: float,
        chunk: int,
    ) -> tuple[Tensor, Tensor]:
        loss_sum, nll_sum, grad_hidden, grad_weight = _chunked_forward(
            hidden, weight, target, keep, epsilon, chunk, True
        )
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(nll_sum)
        return loss_sum, nll_sum

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor, _grad_nll: Tensor):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors  # (n, d), (V, d)
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        d_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype) if need_hidden else None  # (n, d)
        d_weight = (grad_weight * grad_loss).to(ctx.weight_dtype) if need_weight else None  # (V, d)
        return d_hidden, d_weight, None, None, None, None


class UpdateLoss:
    """Token sums of one optimizer update, kept on the device, and the gradient scale they imply.

    Each micro-batch's ``training_step`` returns its *summed* smoothed loss and calls :meth:`add`. Autograd
    then holds ``sum over micro-batches of grad(loss sum) / divisor``, where ``divisor`` is what the training
    loop divided by: Lightning divides every micro-batch's loss by ``accumulate_grad_batches`` and DDP
    averages over ranks, so ``divisor = accumulate * world_size``. :meth:`finish` all-reduces the sums and
    multiplies the gradients by ``divisor / tokens of the whole update``: the gradient of
    (sum of token losses of the update) / (its target tokens), whatever the micro-batches' sizes.
    """

    def __init__(self) -> None:
        self.sums: Tensor | None = None  # (3,) float64: smoothed loss, NLL, target tokens (this rank)

    def add(self, loss_sum: Tensor, nll_sum: Tensor, num_tokens: Tensor) -> None:
        sums = torch.stack([loss_sum.detach().double(), nll_sum.detach().double(), num_tokens.double()])
        self.sums = sums if self.sums is None else self.sums + sums

    def finish(self, params: list[Tensor], *, divisor: int, distributed: bool) -> Tensor:
        """Scale ``params``' gradients as above; return the update's sums over all ranks (3,), and reset.

        ``distributed``: all-reduce over the default process group (a plain ``all_reduce``, which, unlike
        Lightning's ``strategy.reduce``, adds no barrier and so no host synchronisation).
        """
        if self.sums is None:
            raise RuntimeError("UpdateLoss.finish before any add: an optimizer step without a training step")
        sums, self.sums = self.sums, None
        if distributed:
            torch.distributed.all_reduce(sums)
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            scale = divisor / sums[2].clamp(min=1.0)  # 0-d, on the device: no host read
            torch._foreach_mul_(grads, scale.to(grads[0].dtype))
        return sums


class NonFiniteGuard:
    """Notices a NaN or infinite update loss without a host read per step, and raises when asked.

    ``torch.isfinite(loss)`` in Python makes the host wait for the GPU at every step. Here the first
    non-finite loss and its step are recorded on the device; :meth:`check` reads them, and the module calls
    it only where the host waits anyway (before a checkpoint is written, at logging steps, before
    validation, at the end). A run therefore stops at most that many steps after the loss went bad, and no
    checkpoint is ever written after it: the last good checkpoint is kept.
    """

    def __init__(self) -> None:
        self.step: Tensor | None = None  # 0-d int64: step of the first non-finite loss, -1 while all finite
        self.loss: Tensor | None = None  # 0-d float64: that loss

    def observe(self, loss: Tensor, step: int) -> None:
        """Record ``loss`` (0-d, on the device) of optimizer step ``step`` if it is the first bad one."""
        if self.step is None or self.loss is None:
            self.step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self.loss = torch.zeros((), dtype=torch.float64, device=loss.device)
        first = loss.isfinite().logical_not_() & self.step.lt(0)
        self.step = torch.where(first, step, self.step)
        self.loss = torch.where(first, loss.double(), self.loss)

    def check(self) -> None:
        """Raise NonFiniteLossError if a non-finite loss was seen (one host read)."""
        if self.step is None or self.loss is None:
            return
        step = int(self.step)
        if step >= 0:
            raise NonFiniteLossError(
                f"non-finite training loss ({float(self.loss)}) at step {step}; the run stops here and its "
                "last good checkpoint is kept (lower optim.lr_factor or raise optim.warmup_steps)"
            )
