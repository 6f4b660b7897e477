"""The paper's other baselines, one small ``nn.Module`` each: cross-entropy, logit penalty, BCE on mixed labels,
Online Label Smoothing, Zipf's label smoothing and focal loss. Notation and the float32 rule: :mod:`deit.losses`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from deit.losses import _cross_entropy, check_alpha, validate_inputs

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


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., ICCV 2017, Eq. 4): ``-(1 - p_t)^gamma log p_t``, the baseline of the official
    long-tailed CIFAR-10 table. Soft targets (Mixup/CutMix) weight each class's focal term by its target
    mass, ``-sum_k y_k (1 - p_k)^gamma log p_k``, which is Eq. 4 for one-hot targets. ``gamma`` 2 is the
    paper's recommended value (the official LT configs leave their loss at its defaults)."""

    def __init__(self, gamma: float = 2.0, validate: bool = True):
        super().__init__()
        if gamma < 0:
            raise ValueError(f'gamma must be >= 0, got {gamma}')
        self.gamma, self.validate = float(gamma), validate

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        validate_inputs(self, logits, target, 'FocalLoss')
        logp = F.log_softmax(logits.float(), dim=1)
        weight = target.float() if target.dim() == 2 else F.one_hot(target, logp.shape[1]).float()
        return -(weight * (1 - logp.exp()).pow(self.gamma) * logp).sum(1).mean()

    def extra_repr(self) -> str:
        return f'gamma={self.gamma}'


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

    Soft targets (Mixup): CE against t, and the excluded (target) class is argmax(t).

    ``dense`` is the authors' ``--dense`` (their README's runs): the classes are ranked by votes instead of
    logits, one vote per location of the CNN's last feature map, for the class the classifier predicts there
    (``gen_pdf``: counts of the per-location argmax, then the same ``rankdata``). :func:`attach_dense_votes`
    collects the votes of each training forward into ``votes``; each loss call consumes them.
    """

    def __init__(self, weight: float = 1.0, power: float = 1.0, loss_mask: bool = False, dense: bool = False,
                 validate: bool = True):
        super().__init__()
        if weight < 0 or power <= 0:
            raise ValueError(f'Zipf LS needs weight >= 0 and power > 0, got weight={weight}, power={power}')
        self.weight, self.power, self.loss_mask, self.validate = float(weight), float(power), loss_mask, validate
        self.dense, self.votes = dense, None

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        validate_inputs(self, logits, target, 'ZipfLabelSmoothing')
        z = logits.float()
        labels = target if target.dim() == 1 else target.argmax(1)
        is_gt = F.one_hot(labels, z.shape[1]).bool()
        with torch.no_grad():
            neg = -self._take_votes(z) if self.dense else -z
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

    def _take_votes(self, z: Tensor) -> Tensor:
        votes, self.votes = self.votes, None
        if votes is None or votes.shape != z.shape:
            raise RuntimeError(f'Zipf LS --zipf-dense: no votes of this batch ({tuple(z.shape)} logits, votes '
                               f'{None if votes is None else tuple(votes.shape)}): attach_dense_votes must hook the '
                               f'model whose logits these are, and each training forward needs its loss call')
        return votes

    def extra_repr(self) -> str:
        return (f'weight={self.weight}, power={self.power}, loss_mask={self.loss_mask}'
                f'{", dense voting" if self.dense else ""}')


def attach_dense_votes(model: nn.Module, zipf: ZipfLabelSmoothing):
    """Zipf LS's dense voting: in training forwards, the classifier is applied at every location of the feature
    map that ``model.global_pool`` pools (the authors apply their fc to the last feature map of a ResNet,
    DenseNet or MobileNet the same way), and the per-location argmax classes are counted into ``zipf.votes``
    (N x K). Models whose pooled features do not go straight to the classifier (a ViT's tokens; ConvNeXt's
    norm after pooling) are refused. Returns the hook's handle."""
    pool = getattr(model, 'global_pool', None)
    classifier = model.get_classifier() if hasattr(model, 'get_classifier') else None
    if not isinstance(pool, nn.Module) or not isinstance(classifier, nn.Linear):
        raise ValueError(f'--zipf-dense votes with the classifier at each location of a CNN\'s last feature map; '
                         f'{type(model).__name__} has no global_pool module feeding a linear classifier')

    def vote(module, inputs, output):
        if module.training:
            with torch.no_grad():
                picks = classifier(inputs[0].flatten(2).transpose(1, 2)).argmax(-1)  # N x HW
                zipf.votes = torch.zeros(picks.shape[0], classifier.out_features, device=picks.device).scatter_add_(
                    1, picks, torch.ones(picks.shape, device=picks.device))

    return pool.register_forward_hook(vote)


