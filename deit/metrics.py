"""Every metric of the project in one place: accuracy counts, ECE, feature variation (d_within, R^2).

All accumulate as *sums* so that distributed evaluation can add them over ranks and stay exact.
"""
from __future__ import annotations

import torch
from torch import Tensor


def topk_correct(logits: Tensor, target: Tensor, ks=(1, 5)) -> list[int]:
    """Number of samples whose label is within the top-k logits, for each k (k capped at K)."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred == target[:, None]
    return [int(hit[:, :min(k, maxk)].any(1).sum()) for k in ks]


class CalibrationBins:
    """Equal-width confidence bins for ECE (Guo et al. 2017): ECE = sum_b n_b/N * |acc_b - conf_b|.

    Confidence = max softmax probability; bin b holds confidences in (b/n, (b+1)/n] (0 goes to bin 0).
    """

    def __init__(self, n_bins: int = 15):
        self.n_bins = n_bins
        self.count = torch.zeros(n_bins, dtype=torch.float64)
        self.conf_sum = torch.zeros(n_bins, dtype=torch.float64)
        self.correct_sum = torch.zeros(n_bins, dtype=torch.float64)

    def update(self, probs: Tensor, target: Tensor) -> None:
        conf, pred = probs.float().max(1)
        b = (conf * self.n_bins).ceil().long().clamp(1, self.n_bins) - 1
        self.count += torch.bincount(b, minlength=self.n_bins).double().cpu()
        self.conf_sum += torch.bincount(b, weights=conf.double(), minlength=self.n_bins).cpu()
        self.correct_sum += torch.bincount(b, weights=(pred == target).double(), minlength=self.n_bins).cpu()

    def as_tensor(self) -> Tensor:
        return torch.stack([self.count, self.conf_sum, self.correct_sum])

    def load_tensor(self, t: Tensor) -> None:
        self.count, self.conf_sum, self.correct_sum = (x.clone() for x in t.double().cpu())

    def ece(self) -> float:
        n = self.count.sum()
        if n == 0:
            return float('nan')
        gap = (self.correct_sum - self.conf_sum).abs()  # = count * |acc - conf|
        return float(gap.sum() / n)

    def reliability(self) -> dict:
        """Per-bin accuracy/confidence/count for a reliability diagram (empty bins give None)."""
        acc = [float(c / n) if n else None for c, n in zip(self.correct_sum, self.count)]
        conf = [float(c / n) if n else None for c, n in zip(self.conf_sum, self.count)]
        return {'n_bins': self.n_bins, 'accuracy': acc, 'confidence': conf, 'count': self.count.tolist()}


def expected_calibration_error(probs: Tensor, target: Tensor, n_bins: int = 15) -> float:
    bins = CalibrationBins(n_bins)
    bins.update(probs, target)
    return bins.ece()


def feature_variation(features: Tensor, labels: Tensor) -> dict:
    """Intra-class variation and class separation with cosine distance (Kornblith et al. 2021, Eq. 1-2).

        d_within = 1/K sum_k  mean_{m,n in class k}  (1 - cos(x_m, x_n))
        d_total  = 1/K^2 sum_{j,k} mean_{m in j, n in k} (1 - cos(x_m, x_n))
        R^2      = 1 - d_within / d_total

    With unit-normalised features the mean cosine similarity over all pairs of two sets is the dot product of
    their means, so both averages are exact in O(N D) (no pair sampling needed, whatever the set size):
        d_within = 1 - 1/K sum_k |mu_k|^2,   d_total = 1 - |1/K sum_k mu_k|^2.
    """
    x = torch.nn.functional.normalize(features.double(), dim=1)
    classes = labels.unique()
    mu = torch.stack([x[labels == c].mean(0) for c in classes])
    d_within = float(1 - (mu * mu).sum(1).mean())
    d_total = float(1 - mu.mean(0).pow(2).sum())
    r2 = 1 - d_within / d_total if d_total > 1e-12 else float('nan')
    return {'d_within': d_within, 'd_total': d_total, 'r2': r2, 'num_classes': len(classes), 'n': len(labels)}


def summary(loss_sum: float, correct1: float, correct5: float, n: float, bins: CalibrationBins) -> dict:
    """An evaluation's numbers from its sums, under DeiT's names (log.txt's test_*): top-1 / top-5 (%), ``loss``
    (the mean negative log-likelihood; the tools' reports call it ``nll``), ECE, and the image count."""
    if n == 0:
        raise ValueError('evaluation set is empty')
    return {'acc1': 100.0 * correct1 / n, 'acc5': 100.0 * correct5 / n, 'loss': loss_sum / n, 'ece': bins.ece(),
            'n': int(n)}


def classification_summary(logits: Tensor, labels: Tensor, n_bins: int = 15) -> dict:
    """:func:`summary` of a whole set of logits."""
    logits = logits.float()
    c1, c5 = topk_correct(logits, labels, (1, 5))
    bins = CalibrationBins(n_bins)
    bins.update(logits.softmax(1), labels)
    return summary(float(torch.nn.functional.cross_entropy(logits, labels, reduction='sum')), c1, c5, len(labels),
                   bins)


MANY_SHOT, FEW_SHOT = 100, 20  # training images per class: many > 100, few < 20, medium between (Liu et al. 2019)


def shot_accuracy(correct: Tensor, seen: Tensor, train_counts) -> dict:
    """Top-1 (%) of the many-, medium- and few-shot classes, each the mean of its classes' accuracies (the
    long-tailed literature's convention, as the official long-tailed code). ``correct`` / ``seen``: per-class
    counts of the evaluation; ``train_counts``: training images per class. A group without classes is None
    (the official table prints 0.0 there)."""
    counts = torch.as_tensor(train_counts)
    acc = 100.0 * correct.double() / seen.double().clamp(min=1)
    groups = {'many_acc1': counts > MANY_SHOT, 'medium_acc1': (counts <= MANY_SHOT) & (counts >= FEW_SHOT),
              'few_acc1': counts < FEW_SHOT}
    return {k: float(acc[m & (seen > 0)].mean()) if bool((m & (seen > 0)).any()) else None for k, m in groups.items()}
