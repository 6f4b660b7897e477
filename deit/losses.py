"""MaxSup and label smoothing (with its Table-1 parts), one small ``nn.Module`` each, and the input checks
every loss shares. The other baselines are in :mod:`deit.baselines`; building a loss by name: :mod:`deit.criterion`.

Notation: logits ``z`` of shape (B, K); targets either class indices (B,) or soft targets (B, K) such as
timm's Mixup/CutMix output. Every loss returns the batch mean and computes in float32 whatever the autocast
dtype, because the max/mean/log-sum-exp differences lose all precision in fp16/bf16.

Paper: Zhou et al., "MaxSup: Overcoming Representation Collapse in Label Smoothing" (2025).
  Eq. (LS, logit form)  L_LS     = CE(z, y) + alpha * (z_gt  - mean_k z_k)
  Eq. (MaxSup)          L_MaxSup = CE(z, y) + alpha * (z_max - mean_k z_k)
  Corollary 3.4         z_gt - mean_k z_k = 1/K sum_{z_k < z_gt} (z_gt - z_k)      (regularization, >= 0)
                                          + 1/K sum_{z_k > z_gt} (z_gt - z_k)      (error enhancement, <= 0)
  Eq. (9)               d/dz [z_max - mean z] = (1 - 1/K) on the top-1 logit, -1/K elsewhere.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ['MaxSupLoss', 'MaxSupLossReference', 'LabelSmoothingLoss', 'LabelSmoothingPartLoss', 'ls_decomposition',
           'check_alpha', 'check_inputs']

SOFT_TARGET_TOL = 1e-3  # fp16 Mixup targets sum to 1 only to ~1e-4
# The value checks (label range, soft-target rows) read numbers back to the host: on an accelerator that is
# a sync per step. They run on the first call and then every VALUE_CHECK_EVERY calls there (always on CPU,
# where they cost nothing); the shape/dtype checks run on every call. An out-of-range label between two
# checks still stops training: CUDA's gather/cross_entropy raise a device-side assert on it.
VALUE_CHECK_EVERY = 1000


# --------------------------------------------------------------------------------------------------------
# input checks shared by every loss
# --------------------------------------------------------------------------------------------------------
def check_alpha(alpha: float, name: str = 'alpha') -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f'{name} must be in [0, 1), got {alpha}')
    return alpha


def value_check_due(module: nn.Module, logits: Tensor) -> bool:
    """Whether this call of ``module`` should run the value checks (see VALUE_CHECK_EVERY)."""
    if logits.device.type == 'cpu':
        return True
    calls = module.__dict__.get('_value_check_calls', 0)
    module.__dict__['_value_check_calls'] = calls + 1
    return calls % VALUE_CHECK_EVERY == 0


def validate_inputs(module: nn.Module, logits: Tensor, target: Tensor, who: str, hard_only: bool = False) -> None:
    """The losses' input check: nothing when ``module.validate`` is off; the value checks when due."""
    if module.validate:
        check_inputs(logits, target, hard_only, who, values=value_check_due(module, logits))


def check_inputs(logits: Tensor, target: Tensor, hard_only: bool = False, who: str = 'loss',
                 values: bool = True) -> None:
    """Raise ValueError naming what is wrong with (logits, target).

    ``values=False`` checks shapes and dtypes only (no host sync); ``values=True`` also checks the label
    range / soft-target rows, at the cost of one host sync.
    """
    if logits.dim() != 2:
        raise ValueError(f'{who}: logits must be (B, K), got shape {tuple(logits.shape)}')
    B, K = logits.shape
    if K < 2:
        raise ValueError(f'{who}: need at least 2 classes, got K={K}')
    if target.dim() == 1:
        if target.dtype.is_floating_point or target.dtype == torch.bool:
            raise ValueError(f'{who}: class-index targets must be integers, got {target.dtype}')
        if target.shape[0] != B:
            raise ValueError(f'{who}: {target.shape[0]} labels for a batch of {B} logits')
        if not values:
            return
        lo, hi = torch.stack(torch.aminmax(target)).tolist()
        if lo < 0 or hi >= K:
            raise ValueError(f'{who}: labels must be in [0, {K - 1}], got values in [{lo}, {hi}]')
    elif target.dim() == 2:
        if hard_only:
            raise ValueError(f'{who} is defined for hard labels only (the paper\'s Table 1 setting); '
                             f'disable Mixup/CutMix (--mixup 0 --cutmix 0) for it')
        if target.shape != logits.shape:
            raise ValueError(f'{who}: soft targets {tuple(target.shape)} do not match logits {tuple(logits.shape)}')
        if not target.dtype.is_floating_point:
            raise ValueError(f'{who}: soft targets must be floating point, got {target.dtype}')
        if not values:
            return
        err, neg = torch.stack([(target.float().sum(1) - 1).abs().max(), -target.min().float()]).tolist()
        if err > SOFT_TARGET_TOL or neg > 0:
            raise ValueError(f'{who}: soft targets must be probability rows (>= 0, summing to 1); '
                             f'largest |row sum - 1| is {err:.3g}, smallest entry {-neg:.3g}')
    else:
        raise ValueError(f'{who}: targets must be (B,) labels or (B, K) soft targets, got {tuple(target.shape)}')


def _target_logit(z: Tensor, target: Tensor) -> Tensor:
    """<t, z>: z_gt for hard labels, the target-weighted logit for soft targets."""
    if target.dim() == 1:
        return z.gather(1, target[:, None]).squeeze(1)
    # row dot without a (B, K) temporary; autocast would run bmm in fp16/bf16, so it is switched off here
    with torch.autocast(z.device.type, enabled=False):
        return torch.bmm(target.float().unsqueeze(1), z.float().unsqueeze(2)).view(-1)


def _cross_entropy(z: Tensor, target: Tensor) -> Tensor:
    """Per-sample CE for hard labels or soft targets (= timm SoftTargetCrossEntropy per row)."""
    if target.dim() == 1:
        return F.cross_entropy(z, target, reduction='none')
    return -(target.float() * F.log_softmax(z, dim=1)).sum(1)


# --------------------------------------------------------------------------------------------------------
# MaxSup
# --------------------------------------------------------------------------------------------------------
class _MaxSupFunction(torch.autograd.Function):
    """CE + alpha * (z_max - mean z), forward and backward written out.

    Forward: one max (with argmax), one exp pass and two row reductions. The unnormalised exponentials
    e = exp(z - z_max) and their row sums are kept, so backward is closed form in one fused pass
    (Eq. 9 for the penalty):
        dL/dz = [e / sum(e) - t + alpha * (onehot(argmax z) - 1/K)] / B
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, alpha: float) -> Tensor:
        z = logits.float()
        B, K = z.shape
        zmax, argmax = z.max(dim=1)
        e = (z - zmax[:, None]).exp_()
        s = e.sum(1)
        lse = zmax + s.log()
        loss = (lse - _target_logit(z, target) + alpha * (zmax - z.mean(1))).mean()
        ctx.save_for_backward(e, s, argmax, target)
        ctx.alpha, ctx.in_dtype = alpha, logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        e, s, argmax, target = ctx.saved_tensors
        B, K = e.shape
        scale = grad_out / B
        # softmax * scale - alpha * scale / K in one pass
        grad = torch.addcmul((-ctx.alpha / K * scale).view(1, 1), e, (scale / s)[:, None])
        if target.dim() == 1:
            grad.scatter_add_(1, target[:, None], (-scale).expand(B, 1))
        else:
            grad.addcmul_(target.float(), -scale)
        if ctx.alpha:
            grad.scatter_add_(1, argmax[:, None], (ctx.alpha * scale).expand(B, 1))
        return grad.to(ctx.in_dtype), None, None


class _AlphaLoss(nn.Module):
    """Common part of the losses weighted by a scheduled ``alpha`` (a plain attribute the trainer sets)."""

    def __init__(self, alpha: float = 0.1, validate: bool = True):
        super().__init__()
        self.alpha = check_alpha(alpha)
        self.validate = validate

    def extra_repr(self) -> str:
        return f'alpha={self.alpha}'


class MaxSupLoss(_AlphaLoss):
    """Maximum Suppression: ``CE(z, t) + alpha * (max_k z_k - mean_k z_k)``, batch mean (paper Eq. MaxSup).

    Needs no target for the penalty, so it works unchanged with Mixup/CutMix soft targets. ``alpha`` is a
    plain attribute: the trainer sets it each epoch from an :class:`AlphaSchedule`.
    Uses a fused autograd Function; :class:`MaxSupLossReference` is the plain formulation it is tested against.
    """

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        validate_inputs(self, logits, target, 'MaxSupLoss')
        return _MaxSupFunction.apply(logits, target, self.alpha)


class MaxSupLossReference(MaxSupLoss):
    """Autograd-through-torch MaxSup, the definition the fused version must equal."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        validate_inputs(self, logits, target, 'MaxSupLoss')
        z = logits.float()
        penalty = z.max(dim=1).values - z.mean(dim=1)
        return (_cross_entropy(z, target) + self.alpha * penalty).mean()


# --------------------------------------------------------------------------------------------------------
# Label smoothing and its Table-1 decomposition
# --------------------------------------------------------------------------------------------------------
class LabelSmoothingLoss(_AlphaLoss):
    """Label smoothing in logit form: ``CE(z, t) + alpha * (<t, z> - mean_k z_k)``.

    Hard labels: equals ``F.cross_entropy(z, y, label_smoothing=alpha)``. Soft targets: equals soft-target CE
    against ``(1 - alpha) * t + alpha / K`` (timm ``Mixup(label_smoothing=alpha)`` + ``SoftTargetCrossEntropy``).
    """

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        validate_inputs(self, logits, target, 'LabelSmoothingLoss')
        z = logits.float()
        return (_cross_entropy(z, target) + self.alpha * (_target_logit(z, target) - z.mean(1))).mean()


def ls_decomposition(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample (regularization, error_enhancement) of the LS term ``z_gt - mean z`` (Corollary 3.4).

    regularization    = 1/K * sum_{z_k < z_gt} (z_gt - z_k)   >= 0
    error_enhancement = 1/K * sum_{z_k > z_gt} (z_gt - z_k)   <= 0, and 0 when z_gt is the max
    """
    z = logits.float()
    diff = _target_logit(z, target)[:, None] - z  # z_gt - z_k
    K = z.shape[1]
    return diff.clamp(min=0).sum(1) / K, diff.clamp(max=0).sum(1) / K


class LabelSmoothingPartLoss(_AlphaLoss):
    """``CE + alpha * (one part of the LS term)``: the paper's Table 1 ablation (hard labels only).

    part='regularization' keeps only the term that shrinks the gap to smaller logits;
    part='error_enhancement' keeps only the term that pulls z_gt towards larger (wrong) logits.
    """

    PARTS = ('regularization', 'error_enhancement')

    def __init__(self, part: str, alpha: float = 0.1, validate: bool = True):
        super().__init__(alpha, validate)
        if part not in self.PARTS:
            raise ValueError(f'part must be one of {self.PARTS}, got {part!r}')
        self.part = part

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        validate_inputs(self, logits, target, f'LabelSmoothingPartLoss({self.part})', hard_only=True)
        z = logits.float()
        reg, err = ls_decomposition(z, target)
        term = reg if self.part == 'regularization' else err
        return (F.cross_entropy(z, target, reduction='none') + self.alpha * term).mean()

    def extra_repr(self) -> str:
        return f'part={self.part}, alpha={self.alpha}'


