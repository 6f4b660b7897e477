"""Matplotlib figures for the tools and the study (Agg backend: files only, no display)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import PercentFormatter  # noqa: E402


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches='tight')
    plt.close(fig)
    return path


def reliability_diagram(rel: dict, path, title: str = '') -> Path:
    n = rel['n_bins']
    centers = (np.arange(n) + 0.5) / n
    acc = np.array([a if a is not None else np.nan for a in rel['accuracy']])
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.bar(centers, np.nan_to_num(acc), width=1 / n, edgecolor='k', alpha=0.7, label='accuracy')
    ax.plot([0, 1], [0, 1], 'k--', label='perfect calibration')
    ax.set(xlabel='confidence', ylabel='accuracy', xlim=(0, 1), ylim=(0, 1), title=title)
    ax.legend(loc='upper left')
    return _save(fig, path)


def logit_figures(stats_by_run: dict, densities: dict, path) -> Path:
    """Per model: histogram of the near-zero proportion (shared fractional x axis); then all models' logit
    densities on shared axes (the paper's logit figure), and top-1 probability vs near-zero proportion."""
    runs = list(stats_by_run)
    thr = stats_by_run[runs[0]]['threshold']
    n = len(runs) + 2
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8), squeeze=False, constrained_layout=True)
    top = max(max(s['per_sample']['near_zero_fraction']) for s in stats_by_run.values())
    bins = np.linspace(0, max(top, 1e-3), 31)
    for i, (ax, name) in enumerate(zip(axes[0], runs)):
        ax.hist(stats_by_run[name]['per_sample']['near_zero_fraction'], bins=bins, color=f'C{i}', alpha=0.85)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(f'proportion of logits with |z| < {thr:g}', fontsize=9)
        ax.set_ylabel('samples', fontsize=9)
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=1))
        ax.tick_params(labelsize=8)
    ax = axes[0][-2]
    centers = (np.asarray(densities['edges'][:-1]) + np.asarray(densities['edges'][1:])) / 2
    for i, name in enumerate(runs):
        ax.plot(centers, densities['density'][name], color=f'C{i}', label=name, lw=1.4)
    ax.set_title('logit density', fontsize=10)
    ax.set_xlabel('logit value', fontsize=9)
    ax.set_ylabel('density', fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[0][-1]
    for i, name in enumerate(runs):
        ps = stats_by_run[name]['per_sample']
        ax.scatter(ps['near_zero_fraction'], ps['top1_prob'], s=5, alpha=0.4, color=f'C{i}', label=name)
    ax.set_title('confidence vs near-zero logits', fontsize=10)
    ax.set_xlabel('near-zero proportion', fontsize=9)
    ax.set_ylabel('top-1 probability', fontsize=9)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=1))
    ax.legend(fontsize=8, markerscale=3)
    return _save(fig, path)


def projection_figure(proj_by_run: dict, path) -> Path:
    runs = list(proj_by_run)
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 4), squeeze=False)
    for ax, name in zip(axes[0], runs):
        p = proj_by_run[name]
        for j, c in enumerate(p['classes']):
            sel = p['labels'] == c
            ax.scatter(p['points'][sel, 0], p['points'][sel, 1], s=6, alpha=0.6, color=f'C{j}', label=f'class {c}')
            ax.scatter(*p['templates'][j], marker='*', s=200, color=f'C{j}', edgecolor='k')
        ax.set(title=name, xlabel='u', ylabel='v')
        ax.legend(fontsize=7)
    return _save(fig, path)


def gradcam_grid(images: np.ndarray, maps_by_run: dict, path, labels=None, preds_by_run=None) -> Path:
    """Rows = images (labelled with their class), columns = input + one Grad-CAM overlay per checkpoint with
    its prediction and probability (the paper's Figure 3 layout); one colour bar for the shared 0..1 scale."""
    runs = list(maps_by_run)
    n = len(images)
    fig, axes = plt.subplots(n, len(runs) + 1, figsize=(2.4 * (len(runs) + 1) + 0.6, 2.5 * n), squeeze=False,
                             constrained_layout=True)
    mappable = None
    for i in range(n):
        axes[i][0].imshow(images[i])
        axes[i][0].set_title(f'class {labels[i]}' if labels is not None else 'input', fontsize=8)
        for j, name in enumerate(runs):
            axes[i][j + 1].imshow(images[i])
            mappable = axes[i][j + 1].imshow(maps_by_run[name][i], cmap='jet', alpha=0.45, vmin=0, vmax=1)
            title = name if i == 0 else ''
            if preds_by_run is not None:
                pred, prob = preds_by_run[name][i]
                title = f'{title}\npred {pred} ({prob:.2f})'.strip()
            axes[i][j + 1].set_title(title, fontsize=8)
        for ax in axes[i]:
            ax.axis('off')
    if mappable is not None:
        fig.colorbar(mappable, ax=axes, shrink=0.6, label='Grad-CAM (normalised)')
    return _save(fig, path)


def bar_table(rows: dict, metric: str, path, title: str = '') -> Path:
    """Mean +- std bars per loss: rows = {name: [values...]}."""
    names = list(rows)
    means = [np.mean(rows[n]) for n in names]
    stds = [np.std(rows[n]) for n in names]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 3.5))
    ax.bar(names, means, yerr=stds, capsize=4, color=[f'C{i}' for i in range(len(names))])
    lo = min(m - s for m, s in zip(means, stds))
    hi = max(m + s for m, s in zip(means, stds))
    pad = (hi - lo) * 0.5 + 1e-6
    ax.set(ylabel=metric, title=title, ylim=(max(0, lo - pad), hi + pad))
    ax.tick_params(axis='x', rotation=30)
    return _save(fig, path)
