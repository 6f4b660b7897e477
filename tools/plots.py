"""Matplotlib figures for the tools and the study (Agg backend: files only, no display)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


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


def logit_figures(stats_by_run: dict, path) -> Path:
    """Near-zero-count histograms side by side + scatter of top-1 probability vs near-zero count."""
    runs = list(stats_by_run)
    fig, axes = plt.subplots(1, len(runs) + 1, figsize=(4 * (len(runs) + 1), 3.6), squeeze=False)
    for ax, name in zip(axes[0], runs):
        nz = stats_by_run[name]['per_sample']['near_zero']
        ax.hist(nz, bins=min(40, max(5, len(set(nz)))), color='C0', alpha=0.8)
        ax.set(title=f'{name}', xlabel=f'# logits with |z| < {stats_by_run[name]["threshold"]}', ylabel='samples')
    ax = axes[0][-1]
    for i, name in enumerate(runs):
        ps = stats_by_run[name]['per_sample']
        ax.scatter(ps['near_zero'], ps['top1_prob'], s=6, alpha=0.5, color=f'C{i}', label=name)
    ax.set(xlabel='# near-zero logits', ylabel='top-1 probability', title='confidence vs near-zero logits')
    ax.legend(fontsize=7)
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


def gradcam_grid(images: np.ndarray, maps_by_run: dict, path) -> Path:
    """Rows = images, columns = input + one Grad-CAM overlay per checkpoint (the paper's Figure 3 layout)."""
    runs = list(maps_by_run)
    n = len(images)
    fig, axes = plt.subplots(n, len(runs) + 1, figsize=(2.2 * (len(runs) + 1), 2.2 * n), squeeze=False)
    for i in range(n):
        axes[i][0].imshow(images[i])
        axes[i][0].set_title('input' if i == 0 else '')
        for j, name in enumerate(runs):
            axes[i][j + 1].imshow(images[i])
            axes[i][j + 1].imshow(maps_by_run[name][i], cmap='jet', alpha=0.45)
            if i == 0:
                axes[i][j + 1].set_title(name, fontsize=8)
        for ax in axes[i]:
            ax.axis('off')
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
