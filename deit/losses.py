"""The loss family compared in the MaxSup paper, one small ``nn.Module`` each.

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

import inspect
from argparse import Namespace
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    'LOSSES', 'MaxSupLoss', 'MaxSupLossReference', 'LabelSmoothingLoss', 'LabelSmoothingPartLoss',
    'OnlineLabelSmoothing', 'ZipfLabelSmoothing', 'LogitPenaltyLoss', 'CrossEntropyLoss', 'AlphaSchedule',
    'BCEOnMixedLabels', 'build_criterion',
    'DistillationLoss', 'create_criterion', 'ls_decomposition',
]

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


# --------------------------------------------------------------------------------------------------------
# Other baselines of the paper
# --------------------------------------------------------------------------------------------------------
class CrossEntropyLoss(nn.Module):
    """Plain CE for hard labels or soft targets, with the same input checks as the rest of the family."""

    def __init__(self, validate: bool = True):
        super().__init__()
        self.validate = validate

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        validate_inputs(self, logits, target, 'CrossEntropyLoss')
        return _cross_entropy(logits.float(), target).mean()


class LogitPenaltyLoss(nn.Module):
    """Logit penalty (Dauphin & Cubuk, ICLR 2021): ``CE + beta / 2 * sum_k z_k^2``."""

    def __init__(self, beta: float = 2e-3, validate: bool = True):
        super().__init__()
        if beta < 0:
            raise ValueError(f'beta must be >= 0, got {beta}')
        self.beta, self.validate = float(beta), validate

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        validate_inputs(self, logits, target, 'LogitPenaltyLoss')
        z = logits.float()
        return (_cross_entropy(z, target) + self.beta / 2 * z.pow(2).sum(1)).mean()

    def extra_repr(self) -> str:
        return f'beta={self.beta}'


class BCEOnMixedLabels(nn.Module):
    """DeiT III's ``--bce-loss``: binary cross-entropy against the SET of labels a (Mixup/CutMix) target
    mixes, i.e. every class with a non-zero weight is a positive."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if target.dim() == 1:
            target = F.one_hot(target, logits.shape[1])
        return F.binary_cross_entropy_with_logits(logits.float(), target.gt(0.0).float())


class OnlineLabelSmoothing(nn.Module):
    """Online Label Smoothing (Zhang et al., "Delving Deep into Label Smoothing", TIP 2021).

    A per-class soft-label matrix ``S`` (column c = soft label of class c) supervises the current epoch:
        L = a * CE(z, y) + (1 - a) * CE_soft(z, S[:, y])
    During the epoch the softmax of every *correctly classified* training sample is accumulated into column
    y; :meth:`next_epoch` normalises it and swaps it in. ``S`` starts as ordinary label smoothing.
    A class with no correct sample in an epoch keeps its previous column (the reference implementation
    zeroes it, which silently switches the soft loss off for that class).
    Soft targets (Mixup): the soft label is ``t @ S^T`` and a sample counts for class argmax(t).
    Under DDP the accumulators are summed over ranks in :meth:`next_epoch`, so all ranks agree on ``S``.
    """

    def __init__(self, num_classes: int, a: float = 0.5, smoothing: float = 0.1, validate: bool = True):
        super().__init__()
        if not 0.0 <= a <= 1.0:
            raise ValueError(f'OLS weight a must be in [0, 1], got {a}')
        if num_classes < 2:
            raise ValueError(f'OLS needs num_classes >= 2, got {num_classes}')
        self.a, self.num_classes, self.validate = float(a), int(num_classes), validate
        S = torch.full((num_classes, num_classes), check_alpha(smoothing, 'smoothing') / (num_classes - 1))
        S.fill_diagonal_(1.0 - smoothing)
        self.register_buffer('supervise', S)
        self.register_buffer('update', torch.zeros_like(S))
        self.register_buffer('count', torch.zeros(num_classes))

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        validate_inputs(self, logits, target, 'OnlineLabelSmoothing')
        if self.validate and logits.shape[1] != self.num_classes:
            raise ValueError(f'OnlineLabelSmoothing built for {self.num_classes} classes, '
                             f'got logits with {logits.shape[1]}')
        z = logits.float()
        logp = F.log_softmax(z, dim=1)
        if target.dim() == 1:
            labels, soft = target, self.supervise[:, target].t()
            hard = -logp.gather(1, target[:, None]).squeeze(1)
        else:
            labels, soft = target.argmax(1), target.float() @ self.supervise.t()
            hard = -(target.float() * logp).sum(1)
        if self.training:
            with torch.no_grad():
                p = logp.exp()
                correct = p.argmax(1) == labels
                self.update.index_add_(1, labels[correct], p[correct].t())
                self.count.index_add_(0, labels[correct], torch.ones_like(labels[correct], dtype=p.dtype))
        soft_ce = -(soft * logp).sum(1)
        return (self.a * hard + (1 - self.a) * soft_ce).mean()

    @torch.no_grad()
    def next_epoch(self) -> None:
        """Swap in the soft labels accumulated this epoch (call once at every epoch end, on every rank)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.update)
            dist.all_reduce(self.count)
        seen = self.count > 0
        self.supervise[:, seen] = self.update[:, seen] / self.count[seen]
        self.update.zero_()
        self.count.zero_()

    def extra_repr(self) -> str:
        return f'num_classes={self.num_classes}, a={self.a}'


class ZipfLabelSmoothing(nn.Module):
    """Zipf's label smoothing (Liang et al., "Efficient One Pass Self-distillation with Zipf's LS", ECCV 2022),
    as its authors' code computes it (megvii-research/zipfls, pytorch_zipfls/losses.py gen_pdf + kl_loss):

    - every class is ranked by the model's own (detached) logits, target included, with
      ``rankdata(-z, method='min')``: ties share the smallest rank, and when the prediction is right the
      non-target ranks start at 2;
    - the non-target classes get mass ``(1 / rank) ** power``, renormalised over them;
    - the term is KL(q || softmax of the non-target logits), averaged over the batch, or with ``loss_mask``
      over the correctly classified samples only (0 when there are none); the authors' default is off.

        L = CE(z, y) + weight * KL

    Soft targets (Mixup): CE against t, and the excluded (target) class is argmax(t). The authors' ``--dense``
    variant ranks by votes of per-location predictions of a CNN feature map and is not reproduced here.
    """

    def __init__(self, weight: float = 1.0, power: float = 1.0, loss_mask: bool = False, validate: bool = True):
        super().__init__()
        if weight < 0 or power <= 0:
            raise ValueError(f'Zipf LS needs weight >= 0 and power > 0, got weight={weight}, power={power}')
        self.weight, self.power, self.loss_mask, self.validate = float(weight), float(power), loss_mask, validate

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        validate_inputs(self, logits, target, 'ZipfLabelSmoothing')
        z = logits.float()
        labels = target if target.dim() == 1 else target.argmax(1)
        is_gt = F.one_hot(labels, z.shape[1]).bool()
        with torch.no_grad():
            neg = -z
            rank = torch.searchsorted(neg.sort(dim=1).values.contiguous(), neg.contiguous()) + 1  # method='min'
            q = rank.double().pow(-self.power).masked_fill(is_gt, 0.0)
            q = (q / q.sum(1, keepdim=True)).float()
        logp_nt = F.log_softmax(z.masked_fill(is_gt, float('-inf')), dim=1).masked_fill(is_gt, 0.0)
        kl = (q * (q.clamp_min(1e-30).log() - logp_nt)).sum(1)
        if self.loss_mask:
            correct = (z.argmax(1) == labels).float()
            kl_term = (kl * correct).sum() / correct.sum() if correct.any() else kl.mean() * 0
        else:
            kl_term = kl.mean()
        return _cross_entropy(z, target).mean() + self.weight * kl_term

    def extra_repr(self) -> str:
        return f'weight={self.weight}, power={self.power}, loss_mask={self.loss_mask}'


# --------------------------------------------------------------------------------------------------------
# Schedule, distillation wrapper, factory
# --------------------------------------------------------------------------------------------------------
class AlphaSchedule:
    """alpha(epoch) linear from ``start`` (epoch 0) to ``end`` (last epoch), paper App. F.

    For 300 epochs this is the official DeiT code's ``0.1 + epoch * 0.1 / 299``.
    """

    def __init__(self, start: float = 0.1, end: float | None = 0.2, epochs: int = 300):
        self.start = check_alpha(start, 'alpha start')
        self.end = self.start if end is None else check_alpha(end, 'alpha end')
        if epochs < 1:
            raise ValueError(f'epochs must be >= 1, got {epochs}')
        self.epochs = int(epochs)

    def __call__(self, epoch: int) -> float:
        if self.epochs == 1:
            return self.start
        frac = min(max(epoch, 0), self.epochs - 1) / (self.epochs - 1)
        return self.start + (self.end - self.start) * frac

    def __repr__(self) -> str:
        return f'AlphaSchedule({self.start} -> {self.end} over {self.epochs} epochs)'


class DistillationLoss(nn.Module):
    """DeiT's hard/soft distillation around any base criterion (Touvron et al. 2021, Eq. 2-3).

    ``forward(inputs, outputs, labels)``: ``outputs`` is the class-token logits, or (class, dist) logits of a
    distilled model in training mode; the teacher sees ``inputs``.
    """

    def __init__(self, base_criterion: nn.Module, teacher_model: nn.Module | None = None,
                 distillation_type: str = 'none', alpha: float = 0.5, tau: float = 1.0):
        super().__init__()
        if distillation_type not in ('none', 'soft', 'hard'):
            raise ValueError(f'distillation_type must be none|soft|hard, got {distillation_type!r}')
        if distillation_type != 'none' and teacher_model is None:
            raise ValueError(f'distillation_type={distillation_type!r} needs a teacher model')
        self.base_criterion, self.teacher_model = base_criterion, teacher_model
        self.distillation_type, self.alpha, self.tau = distillation_type, float(alpha), float(tau)

    def forward(self, inputs: Tensor, outputs, labels: Tensor) -> Tensor:
        outputs_kd = None
        if not isinstance(outputs, Tensor):
            outputs, outputs_kd = outputs
        base_loss = self.base_criterion(outputs, labels)
        if self.distillation_type == 'none':
            return base_loss
        if outputs_kd is None:
            raise ValueError('distillation needs a model returning (class, dist) logits in training mode '
                             '(a *_distilled_* model with set_distilled_training(True))')
        with torch.no_grad():
            teacher_outputs = self.teacher_model(inputs)
        if self.distillation_type == 'soft':
            T = self.tau
            distill = F.kl_div(F.log_softmax(outputs_kd.float() / T, dim=1),
                               F.log_softmax(teacher_outputs.float() / T, dim=1),
                               reduction='sum', log_target=True) * (T * T) / outputs_kd.numel()
        else:
            distill = F.cross_entropy(outputs_kd.float(), teacher_outputs.argmax(dim=1))
        return base_loss * (1 - self.alpha) + distill * self.alpha


@dataclass(frozen=True)
class LossOption:
    """A loss's hyper-parameter flag; the default is its constructor parameter's (``param``): one home."""
    flag: str
    dest: str
    param: str
    help: str


@dataclass(frozen=True)
class LossSpec:
    """A loss of the registry: its class, how the trainer's options build it, its flags, and what the trainer
    must know of it (``scheduled``: alpha follows :class:`AlphaSchedule`; ``hard_only``: no Mixup/CutMix)."""
    cls: type
    make: Callable[[type, dict], nn.Module]
    options: tuple[LossOption, ...] = ()
    scheduled: bool = False
    hard_only: bool = False

    def defaults(self) -> dict:
        params = inspect.signature(self.cls).parameters
        return {o.dest: params[o.param].default for o in self.options}


ALPHA_DEFAULT = inspect.signature(_AlphaLoss).parameters['alpha'].default  # --alpha's default (0.1)

# The one list of losses: it drives the parser's choices and flags, the checks and create_criterion.
LOSS_REGISTRY: dict[str, LossSpec] = {
    'ce': LossSpec(CrossEntropyLoss, lambda cls, o: cls()),
    'ls': LossSpec(LabelSmoothingLoss, lambda cls, o: cls(o['alpha']), scheduled=True),
    'maxsup': LossSpec(MaxSupLoss, lambda cls, o: cls(o['alpha']), scheduled=True),
    'ls_reg_only': LossSpec(LabelSmoothingPartLoss, lambda cls, o: cls('regularization', o['alpha']),
                            scheduled=True, hard_only=True),
    'ls_err_only': LossSpec(LabelSmoothingPartLoss, lambda cls, o: cls('error_enhancement', o['alpha']),
                            scheduled=True, hard_only=True),
    'ols': LossSpec(OnlineLabelSmoothing, lambda cls, o: cls(o['nb_classes'], a=o['ols_a'], smoothing=o['alpha']),
                    (LossOption('--ols-a', 'ols_a', 'a', 'OLS: weight of the hard-label CE'),)),
    'zipf': LossSpec(ZipfLabelSmoothing, lambda cls, o: cls(o['zipf_weight'], o['zipf_power'],
                                                            loss_mask=o['zipf_loss_mask']),
                     (LossOption('--zipf-weight', 'zipf_weight', 'weight',
                                 "Zipf LS: weight of the KL term (the authors' loss_lambda)"),
                      LossOption('--zipf-power', 'zipf_power', 'power', 'Zipf LS: exponent of the rank law'),
                      LossOption('--zipf-loss-mask', 'zipf_loss_mask', 'loss_mask',
                                 "Zipf LS term on correctly classified samples only (the authors' --mask; off, "
                                 "as theirs)"))),
    'logit_penalty': LossSpec(LogitPenaltyLoss, lambda cls, o: cls(o['logit_penalty_beta']),
                              (LossOption('--logit-penalty-beta', 'logit_penalty_beta', 'beta',
                                          'logit penalty: beta / 2 * sum z^2'),)),
}
LOSSES = tuple(LOSS_REGISTRY)
HARD_LABEL_LOSSES = tuple(n for n, spec in LOSS_REGISTRY.items() if spec.hard_only)
SCHEDULED_LOSSES = tuple(n for n, spec in LOSS_REGISTRY.items() if spec.scheduled)


def loss_options() -> list[tuple[LossOption, object]]:
    """Every loss's options with their defaults, in registry order (for the parser)."""
    return [(o, spec.defaults()[o.dest]) for spec in LOSS_REGISTRY.values() for o in spec.options]


def create_criterion(args: Namespace | Mapping | None = None, **kwargs) -> nn.Module:
    """Build a loss by name from :data:`LOSS_REGISTRY`. Accepts the trainer's argparse Namespace, a dict, or
    keyword arguments: ``loss`` (default maxsup), ``alpha`` (``maxsup_alpha`` is accepted too), ``nb_classes``
    (OLS), and the losses' own options (``ols_a``, ``zipf_weight``, ...; default: their constructors')."""
    opts = dict(vars(args) if isinstance(args, Namespace) else (args or {}))
    opts.update(kwargs)
    name = opts.get('loss', 'maxsup')
    spec = LOSS_REGISTRY.get(name)
    if spec is None:
        raise ValueError(f'unknown loss {name!r}; choose one of {", ".join(LOSSES)}')
    if name == 'ols' and opts.get('nb_classes') is None:
        raise ValueError('loss "ols" needs nb_classes')
    values = {**spec.defaults(), **{k: v for k, v in opts.items() if v is not None},
              'alpha': opts.get('alpha', opts.get('maxsup_alpha', ALPHA_DEFAULT))}
    return spec.make(spec.cls, values)


def build_criterion(args, num_classes: int, mixup: bool = False, teacher: nn.Module | None = None):
    """The trainer's loss, decided here alone: (criterion, base_criterion, alpha schedule or None).

    base: ``--loss`` (create_criterion), or DeiT III's BCE (``--bce-loss``), or DeiT's label smoothing for
    ``--loss ce --smoothing s`` without Mixup (with Mixup, timm's Mixup smooths the targets itself);
    schedule: alpha from ``--alpha`` to ``--alpha-end`` (or constant) for the scheduled losses;
    criterion: the base inside DeiT's distillation wrapper (a no-op without a teacher).
    """
    base = create_criterion(args, nb_classes=num_classes)
    if args.bce_loss:
        base = BCEOnMixedLabels()
    elif args.loss == 'ce' and args.smoothing > 0 and not mixup:
        base = LabelSmoothingLoss(args.smoothing)
    end = args.alpha if args.alpha_schedule == 'constant' else args.alpha_end
    schedule = AlphaSchedule(args.alpha, end, args.epochs) if args.loss in SCHEDULED_LOSSES else None
    criterion = DistillationLoss(base, teacher, args.distillation_type, args.distillation_alpha, args.distillation_tau)
    return criterion, base, schedule
