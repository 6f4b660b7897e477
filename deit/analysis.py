"""The paper's analyses as library functions (the CLIs in tools/ only parse arguments and plot).

- logits:     near-zero logit counts per sample, logit range statistics (the official README's logit figure)
- features:   penultimate features -> d_within / R^2 (deit.metrics.feature_variation), Table 2
- transfer:   linear probe on frozen penultimate features (Kornblith et al. 2021 protocol)
- projection: Mueller et al. 2019 projection of 3 classes onto the plane through their class templates
- gradcam:    Grad-CAM maps for DeiT (token grid) and ResNet via the grad-cam package
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm


@torch.no_grad()
def collect_outputs(model, loader, device='cpu', features: bool = True, progress: str | None = None) -> dict:
    """Logits, penultimate features (timm ``forward_head(pre_logits=True)``) and labels for a whole loader."""
    model.eval().to(device)
    logits, feats, labels = [], [], []
    for x, y in tqdm(loader, desc=progress, disable=progress is None, unit='batch'):
        x = x.to(device)
        f = model.forward_features(x)
        pre = model.forward_head(f, pre_logits=True)
        out = model.forward_head(f)
        logits.append(out.float().cpu())
        if features:
            feats.append(pre.float().cpu())
        labels.append(torch.as_tensor(y))
    res = {'logits': torch.cat(logits), 'labels': torch.cat(labels)}
    if features:
        res['features'] = torch.cat(feats)
    return res


NEAR_ZERO_THRESHOLD = 0.01  # official viz/logits.py analyze_logits


def logit_statistics(logits: torch.Tensor, labels: torch.Tensor | None = None,
                     threshold: float = NEAR_ZERO_THRESHOLD) -> dict:
    """Per-sample proportion of near-zero logits (|z| < threshold, as the official ``viz/logits.py``) and
    summary statistics of the logit distribution."""
    z = logits.float()
    near_zero = (z.abs() < threshold).float().mean(1)  # a proportion of the K classes, not a count
    top1_prob = z.softmax(1).max(1).values
    rng = z.max(1).values - z.min(1).values
    stats = {
        'threshold': threshold, 'n': len(z), 'num_classes': z.shape[1],
        'near_zero_fraction_mean': float(near_zero.mean()), 'near_zero_fraction_median': float(near_zero.median()),
        'logit_mean': float(z.mean()), 'logit_std': float(z.std()),
        'logit_range_mean': float(rng.mean()), 'logit_max_mean': float(z.max(1).values.mean()),
        'logit_min_mean': float(z.min(1).values.mean()), 'top1_prob_mean': float(top1_prob.mean()),
        'corr_top1prob_nearzero': float(np.corrcoef(top1_prob.numpy(), near_zero.numpy())[0, 1])
        if near_zero.std() > 0 and top1_prob.std() > 0 else float('nan'),
    }
    if labels is not None:
        stats['accuracy'] = float((z.argmax(1) == labels).float().mean())
    return stats | {'per_sample': {'near_zero_fraction': near_zero.tolist(), 'top1_prob': top1_prob.tolist()}}


def logit_densities(logits_by_run: dict[str, torch.Tensor], bins: int = 100) -> dict:
    """Histogram densities of all logit values per model on ONE shared set of bins (the paper's figure)."""
    lo = min(float(z.min()) for z in logits_by_run.values())
    hi = max(float(z.max()) for z in logits_by_run.values())
    edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    return {'edges': edges.tolist(), 'density': {
        k: np.histogram(z.float().numpy().ravel(), bins=edges, density=True)[0].tolist()
        for k, z in logits_by_run.items()}}


def linear_probe(train_x, train_y, test_x, test_y, Cs=(1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0), val_fraction=0.2,
                 seed: int = 0, max_iter: int = 1000) -> dict:
    """Multinomial logistic regression (L-BFGS) on frozen features.

    The L2 strength is chosen on a held-out split of the training features, then the probe is refit on all
    training features and scored on the test features (the paper's CIFAR-10 transfer protocol).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    strat = train_y if np.bincount(train_y).min() >= 2 else None
    tx, vx, ty, vy = train_test_split(train_x, train_y, test_size=val_fraction, random_state=seed, stratify=strat)
    scores = {}
    for C in Cs:
        scaler = StandardScaler().fit(tx)
        clf = LogisticRegression(C=C, solver='lbfgs', max_iter=max_iter)
        clf.fit(scaler.transform(tx), ty)
        scores[C] = float(clf.score(scaler.transform(vx), vy))
    best = max(Cs, key=lambda c: (scores[c], -abs(np.log10(c))))
    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(C=best, solver='lbfgs', max_iter=max_iter).fit(scaler.transform(train_x), train_y)
    return {'best_C': best, 'val_accuracy': scores, 'test_accuracy': float(clf.score(scaler.transform(test_x), test_y)),
            'n_train': len(train_y), 'n_test': len(test_y)}


def template_projection(features: torch.Tensor, labels: torch.Tensor, head_weight: torch.Tensor,
                        classes: tuple[int, int, int]) -> dict:
    """Project features of 3 classes onto the plane through their class templates (Mueller et al. 2019).

    The plane passes through the three rows of the classifier weight; an orthonormal basis (u, v) of it
    comes from Gram-Schmidt on (w_b - w_a, w_c - w_a). Returns 2-D coordinates of samples and templates.
    """
    if len(set(classes)) != 3:
        raise ValueError(f'need 3 distinct classes, got {classes}')
    w = head_weight.double()[list(classes)]
    u = w[1] - w[0]
    u = u / u.norm()
    v = w[2] - w[0]
    v = v - (v @ u) * u
    if v.norm() < 1e-12:
        raise ValueError(f'templates of classes {classes} are collinear')
    v = v / v.norm()
    basis = torch.stack([u, v], 1)  # (D, 2)
    mask = torch.isin(labels, torch.tensor(classes))
    pts = (features.double()[mask] - w[0]) @ basis
    return {'points': pts.numpy(), 'labels': labels[mask].numpy(), 'templates': ((w - w[0]) @ basis).numpy(),
            'classes': list(classes)}


def gradcam_maps(model, images: torch.Tensor, targets: list[int] | None = None) -> np.ndarray:
    """Grad-CAM heat maps (N, H, W) in [0, 1] for a timm ViT/DeiT (last block, token grid) or a ResNet."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model.eval()
    if hasattr(model, 'blocks'):  # ViT: tokens -> (B, C, h, w), dropping the prefix (class/dist) tokens
        n_prefix = getattr(model, 'num_prefix_tokens', 1)
        grid = model.patch_embed.grid_size

        def reshape(t):
            t = t[:, n_prefix:, :]
            return t.reshape(t.shape[0], grid[0], grid[1], t.shape[2]).permute(0, 3, 1, 2)

        layers, transform = [model.blocks[-1].norm1], reshape
    elif hasattr(model, 'layer4'):
        layers, transform = [model.layer4[-1]], None
    else:
        raise ValueError(f'Grad-CAM target layer unknown for {type(model).__name__}')
    cam_targets = [ClassifierOutputTarget(t) for t in targets] if targets is not None else None
    with GradCAM(model=model, target_layers=layers, reshape_transform=transform) as cam:
        return cam(input_tensor=images, targets=cam_targets)
