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
    """Accuracy per confidence bin against the diagonal; the number over each bar is its image count (a bin
    of 3 images says little)."""
    n = rel['n_bins']
    centers = (np.arange(n) + 0.5) / n
    acc = np.array([a if a is not None else np.nan for a in rel['accuracy']])
    fig, ax = plt.subplots(figsize=(4.8, 4.8))
    bars = ax.bar(centers, np.nan_to_num(acc), width=1 / n, edgecolor='k', alpha=0.7, label='accuracy')
    ax.plot([0, 1], [0, 1], 'k--', label='perfect calibration')
    counts = rel.get('count')
    if counts is not None:
        ax.bar_label(bars, labels=[str(int(c)) if c else '' for c in counts], fontsize=6, padding=1)
    ax.set(xlabel='confidence', ylabel='accuracy', xlim=(0, 1), ylim=(0, 1.08),
           title=title + ('\n(numbers: images per bin)' if counts is not None else ''))
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
        ax.xaxis.set_major_formatter(PercentFormatter(1.0))  # as many decimals as the ticks need
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
    right = max(top, 1e-3) * 1.05
    ax.set_xlim(-0.02 * right, right)  # a proportion: no negative ticks, even when every sample has none
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.legend(fontsize=8, markerscale=3)
    return _save(fig, path)


def projection_figure(proj_by_run: dict, path) -> Path:
    """Features of 3 classes in the plane of their class templates (Mueller et al. 2019), one panel per model.
    Stars: the class means. The templates sit at the plane's origin scale (the head's weights are small next
    to the features), so they are drawn scaled to the points' spread, as labelled squares."""
    runs = list(proj_by_run)
    fig, axes = plt.subplots(1, len(runs), figsize=(4.6 * len(runs), 4.4), squeeze=False, constrained_layout=True)
    for ax, name in zip(axes[0], runs):
        p = proj_by_run[name]
        pts, temps = np.asarray(p['points']), np.asarray(p['templates'])
        spread = np.ptp(pts, axis=0).max() if len(pts) else 1.0
        scale = spread / max(np.ptp(temps, axis=0).max(), 1e-12) / 2
        for j, c in enumerate(p['classes']):
            sel = p['labels'] == c
            ax.scatter(pts[sel, 0], pts[sel, 1], s=6, alpha=0.5, color=f'C{j}', label=f'class {c}')
            if sel.any():
                ax.scatter(*pts[sel].mean(0), marker='*', s=260, facecolor='none', edgecolor=f'C{j}', linewidth=1.5,
                           zorder=3)  # hollow: the points under it stay visible
            ax.scatter(*(temps[j] * scale), marker='s', s=60, color=f'C{j}', edgecolor='k', zorder=3)
            ax.annotate(f'w{c}', temps[j] * scale, textcoords='offset points', xytext=(6, 6), fontsize=8)
        ax.scatter([], [], marker='*', s=120, facecolor='none', edgecolor='k', label='class mean')
        ax.scatter([], [], marker='s', s=40, color='w', edgecolor='k', label=f'template (x{scale:.3g})')
        ax.set(title=name, xlabel='u (template plane)', ylabel='v (template plane)')
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


def _bar_axes(ax, bars, means, stds) -> None:
    """Bars start at 0 and carry their values (mean ± std when there is a spread); no offset notation."""
    labels = [f'{m:.4g}' + (f' ± {s:.2g}' if s else '') for m, s in zip(means, stds)]
    ax.bar_label(bars, labels=labels, fontsize=7, padding=2)
    top = max(m + s for m, s in zip(means, stds)) if means else 1.0
    ax.set_ylim(min(0.0, min(means, default=0.0)) * 1.15, (top if top > 0 else 1.0) * 1.15)
    ax.ticklabel_format(axis='y', useOffset=False, style='plain')


def bar_table(rows: dict, metric: str, path, title: str = '') -> Path:
    """One bar per entry (e.g. per loss): rows = {name: [values...]}; mean ± std over the values (seeds)."""
    names = list(rows)
    means = [float(np.mean(rows[n])) for n in names]
    stds = [float(np.std(rows[n])) if len(rows[n]) > 1 else 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 3.8))
    bars = ax.bar(names, means, yerr=[s or None for s in stds] if any(stds) else None, capsize=4,
                  color=[f'C{i}' for i in range(len(names))])
    _bar_axes(ax, bars, means, stds)
    ax.set(ylabel=metric, title=title)
    ax.tick_params(axis='x', rotation=30)
    return _save(fig, path)


def grouped_bars(values: dict, ylabel: str, path, title: str = '', ax=None) -> Path | None:
    """Groups of bars: values = {model: {quantity: number}}; one colour per model (the legend), one group per
    quantity (e.g. precision and recall), each bar labelled with its value. With ``ax``: drawn there, not saved."""
    models = list(values)
    quantities = list(dict.fromkeys(q for v in values.values() for q in v))
    width = 0.8 / max(len(models), 1)
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(0.8 * len(quantities) * max(len(models), 1) + 3, 3.8))
    x = np.arange(len(quantities))
    shown = []
    for i, m in enumerate(models):
        ys = [float(values[m].get(q, np.nan)) for q in quantities]
        bars = ax.bar(x + (i - (len(models) - 1) / 2) * width, ys, width, color=f'C{i}', label=m)
        ax.bar_label(bars, labels=[f'{y:.3g}' for y in ys], fontsize=7, padding=2)
        shown += [y for y in ys if np.isfinite(y)]
    top = max(shown, default=1.0)
    ax.set_ylim(min(0.0, min(shown, default=0.0)) * 1.15, (top if top > 0 else 1.0) * 1.15)
    ax.ticklabel_format(axis='y', useOffset=False, style='sci' if 0 < top < 1e-2 else 'plain', scilimits=(-3, 4))
    ax.set_xticks(x, quantities)
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return _save(fig, path) if fig is not None else None


def feature_figure(table: dict, path) -> Path:
    """Table 2's feature variation per checkpoint: d_within and R² (train, val) in panels of their own scale."""
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * len(table), 3.8), constrained_layout=True)
    for ax, (key, label) in zip(axes, (('d_within', 'd_within (within-class distance)'),
                                       ('r2', 'R² (class-explained variance)'))):
        grouped_bars({name: {split: t[split][key] for split in ('train', 'val')} for name, t in table.items()},
                     label, None, ax=ax)
    fig.suptitle('feature variation (Table 2)')
    return _save(fig, path)
