"""Building the criterion of a run: the one registry of losses (name -> class, flags and defaults, scheduled or
not, hard-label only or not), the alpha schedule (paper App. F) and DeiT's distillation wrapper.
"""
from __future__ import annotations

import inspect
from argparse import Namespace
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deit.baselines import (BCEOnMixedLabels, CrossEntropyLoss, FocalLoss, LogitPenaltyLoss, OnlineLabelSmoothing,
                            ZipfLabelSmoothing)
from deit.losses import LabelSmoothingLoss, LabelSmoothingPartLoss, MaxSupLoss, _AlphaLoss, check_alpha

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
    param: str
    help: str

    @property
    def dest(self) -> str:
        """The attribute the parsed flag sets, as argparse names it."""
        return self.flag.removeprefix('--').replace('-', '_')


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
                    (LossOption('--ols-a', 'a', 'OLS: weight of the hard-label CE'),)),
    'zipf': LossSpec(ZipfLabelSmoothing, lambda cls, o: cls(o['zipf_weight'], o['zipf_power'],
                                                            loss_mask=o['zipf_loss_mask'], dense=o['zipf_dense']),
                     (LossOption('--zipf-weight', 'weight',
                                 "Zipf LS: weight of the KL term (the authors' loss_lambda; its default in their "
                                 "train.py; their README's runs use 0.1 with --zipf-dense)"),
                      LossOption('--zipf-power', 'power', 'Zipf LS: exponent of the rank law'),
                      LossOption('--zipf-loss-mask', 'loss_mask',
                                 "Zipf LS term on correctly classified samples only (the authors' --mask; off, "
                                 "as theirs)"),
                      LossOption('--zipf-dense', 'dense',
                                 "Zipf LS ranks by dense votes: the classifier at each location of a CNN's last "
                                 "feature map (the authors' --dense, used in their README's runs)"))),
    'logit_penalty': LossSpec(LogitPenaltyLoss, lambda cls, o: cls(o['logit_penalty_beta']),
                              (LossOption('--logit-penalty-beta', 'beta', 'logit penalty: beta / 2 * sum z^2'),)),
    'focal': LossSpec(FocalLoss, lambda cls, o: cls(o['focal_gamma']),
                      (LossOption('--focal-gamma', 'gamma', 'focal loss: the exponent gamma'),)),
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
