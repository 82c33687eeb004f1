"""Figures written to PNG files: anomaly heatmaps over test images, training sample grids and the
loss curve. Inputs are numpy arrays (images uint8 H x W x C, maps and masks float H x W or
H x W x 1); each function writes its file atomically and returns its path. ``plot_test_examples``
draws a few items of a test set (a dataset with ``images``, ``labels``, ``masks``, ``has_mask``
and ``defect_types``) with their predicted maps.

Figures are drawn on matplotlib's Agg canvas directly, so nothing here touches pyplot's global
state or the backend of a notebook that calls it.
"""
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from experiments.atomic import write_atomic
from experiments.tables import failed

__all__ = ['plot_examples', 'plot_map_comparison', 'plot_sample_grid', 'plot_loss_curve',
           'example_indices', 'plot_test_examples', 'figure_path', 'figure_paths']

PANEL_INCHES = 2.2
HEATMAP_CMAP = 'jet'
CONTOUR_COLOR = 'red'
EXAMPLES_PER_CLASS = 3  # normal and defective test images in a figure of test examples


def _save(fig, path):
    """Write `fig` as PNG to `path` atomically (``write_atomic``); returns the Path."""
    FigureCanvasAgg(fig)
    return write_atomic(path, lambda f: fig.savefig(f, format='png', dpi=100))


def _as_map(values, name):
    """A float H x W array from H x W or H x W x 1 (or 1 x H x W)."""
    values = np.squeeze(np.asarray(values, dtype=np.float32))
    if values.ndim != 2:
        raise ValueError(f'{name} must be H x W (or with a channel of 1), got shape {np.shape(values)}')
    return values


def _show_image(ax, image):
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f'images must be uint8 H x W x C with C in (1, 3), got {image.dtype} {image.shape}')
    if image.shape[2] == 1:
        ax.imshow(image[:, :, 0], cmap='gray', vmin=0, vmax=255)
    else:
        ax.imshow(image)
    ax.set_axis_off()
    return image.shape[:2]


def _draw_contour(ax, mask):
    """The outline of the bool H x W ``mask`` over its image, with a frame of normal pixels around
    it, so that a mask reaching the border (or covering the image) is outlined there too."""
    if mask.any():
        height, width = mask.shape
        ax.contour(np.arange(-1, width + 1), np.arange(-1, height + 1), np.pad(mask, 1).astype(np.float32),
                   levels=[0.5], colors=CONTOUR_COLOR, linewidths=1)
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)


def _check_lengths(**sequences):
    lengths = {name: len(seq) for name, seq in sequences.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f'expected sequences of equal length, got {lengths}')
    if not next(iter(lengths.values())):
        raise ValueError(f'expected at least one item to plot, got {lengths}')


def plot_examples(images, masks, maps, titles, path, vmin=None, vmax=None):
    """Columns of test examples: the input image, the image with the ground-truth contour, and
    the predicted anomaly map as a heatmap over the image (with the same contour).

    images: uint8 H x W x C each; masks: binary H x W each (None for a missing mask; all None: no
    ground-truth row); maps: float H x W each; titles: str each. The heatmap colour scale is shared
    by all columns: [vmin, vmax], by default the range of all maps, so that normal and defective
    images compare directly.
    """
    _check_lengths(images=images, masks=masks, maps=maps, titles=titles)
    maps = [_as_map(m, 'maps') for m in maps]
    vmin = min(float(m.min()) for m in maps) if vmin is None else vmin
    vmax = max(float(m.max()) for m in maps) if vmax is None else vmax
    with_masks = any(m is not None for m in masks)
    rows = ('input', 'ground truth', 'prediction') if with_masks else ('input', 'prediction')
    fig = Figure(figsize=(PANEL_INCHES * len(maps) + 0.8, PANEL_INCHES * len(rows)), layout='constrained')
    axes = fig.subplots(len(rows), len(maps), squeeze=False)
    for col, (image, mask, anomaly_map, title) in enumerate(zip(images, masks, maps, titles)):
        size = [_show_image(axes[row, col], image) for row in range(len(rows))][0]
        if anomaly_map.shape != size:
            raise ValueError(f'map {col} has shape {anomaly_map.shape}, its image {size}')
        heat = axes[-1, col].imshow(anomaly_map, cmap=HEATMAP_CMAP, alpha=0.5, vmin=vmin, vmax=vmax)
        if mask is not None:
            mask = _as_map(mask, 'masks') > 0.5
            _draw_contour(axes[1, col], mask)
            _draw_contour(axes[2, col], mask)
        axes[0, col].set_title(title, fontsize=9, parse_math=False)  # '$' in a folder name is text
    for row, label in enumerate(rows):
        axes[row, 0].text(-0.05, 0.5, label, transform=axes[row, 0].transAxes, rotation=90,
                          ha='right', va='center', fontsize=9)
    fig.colorbar(heat, ax=axes[-1, :].tolist(), shrink=0.8)
    return _save(fig, path)


def plot_map_comparison(images, masks, maps_by_name, titles, path):
    """Several models on the same test images: a first row of inputs with the ground-truth contour,
    then one row of heatmaps per model (``maps_by_name``: {row name: [float H x W per image]}).

    Each row has its own colour scale (the range of its maps), since models differ in how far
    their maps spread; within a row normal and defective images compare directly.
    """
    _check_lengths(images=images, masks=masks, titles=titles, **maps_by_name)
    rows = 1 + len(maps_by_name)
    fig = Figure(figsize=(PANEL_INCHES * len(images) + 0.8, PANEL_INCHES * rows), layout='constrained')
    axes = fig.subplots(rows, len(images), squeeze=False)
    contours = [None if mask is None else _as_map(mask, 'masks') > 0.5 for mask in masks]
    for col, (image, mask, title) in enumerate(zip(images, contours, titles)):
        _show_image(axes[0, col], image)
        if mask is not None:
            _draw_contour(axes[0, col], mask)
        axes[0, col].set_title(title, fontsize=9, parse_math=False)
    for row, (name, maps) in enumerate(maps_by_name.items(), start=1):
        maps = [_as_map(m, name) for m in maps]
        vmin, vmax = min(float(m.min()) for m in maps), max(float(m.max()) for m in maps)
        for col, (image, anomaly_map, mask) in enumerate(zip(images, maps, contours)):
            _show_image(axes[row, col], image)
            heat = axes[row, col].imshow(anomaly_map, cmap=HEATMAP_CMAP, alpha=0.5, vmin=vmin, vmax=vmax)
            if mask is not None:
                _draw_contour(axes[row, col], mask)
        axes[row, 0].text(-0.05, 0.5, name, transform=axes[row, 0].transAxes, rotation=90,
                          ha='right', va='center', fontsize=9, parse_math=False)
        fig.colorbar(heat, ax=axes[row, :].tolist(), shrink=0.8)
    return _save(fig, path)


def plot_sample_grid(images, labels, preds, path):
    """Training samples as rows: the (synthetic-anomaly) input image, its label map and the
    model's prediction, one column per sample. Label and prediction share the range [0, 1], or
    [0, their largest value] where that is above 1 (the raw intensity labels of
    ``Shift-Raw-Intensity``, in grey levels).

    images: uint8 H x W x C each; labels, preds: float H x W (or H x W x 1, 1 x H x W) each.
    """
    _check_lengths(images=images, labels=labels, preds=preds)
    labels, preds = [_as_map(label, 'labels') for label in labels], [_as_map(pred, 'preds') for pred in preds]
    vmax = max([1.0] + [float(values.max()) for values in labels + preds])
    fig = Figure(figsize=(PANEL_INCHES * len(images), PANEL_INCHES * 3), layout='constrained')
    axes = fig.subplots(3, len(images), squeeze=False)
    for col, (image, label, pred) in enumerate(zip(images, labels, preds)):
        _show_image(axes[0, col], image)
        for row, values in ((1, label), (2, pred)):
            axes[row, col].imshow(values, cmap='viridis', vmin=0, vmax=vmax)
            axes[row, col].set_axis_off()
    for row, name in enumerate(('image', 'label', 'prediction')):
        axes[row, 0].set_title(name, fontsize=9, loc='left')
    return _save(fig, path)


def plot_loss_curve(losses, path):
    """Training loss per epoch (log scale when all losses are positive)."""
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 1 or losses.size == 0:
        raise ValueError(f'losses must be a non-empty 1-d sequence of numbers, got shape {losses.shape}')
    fig = Figure(figsize=(5, 3.5), layout='constrained')
    ax = fig.subplots()
    epochs = np.arange(1, losses.size + 1)
    ax.plot(epochs, losses, marker='.' if losses.size < 50 else None)
    if np.all(losses > 0):
        ax.set_yscale('log')
    ax.set_xlabel('epoch')
    ax.set_ylabel('training loss')
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_validation_curve(entries, path):
    """Validation scores over the epochs: one line per metric of ``entries`` (dicts with 'epoch'
    and float scores, as ``experiments.training.validate`` records them)."""
    if not entries:
        raise ValueError('entries must hold at least one validation')
    fig = Figure(figsize=(5, 3.5), layout='constrained')
    ax = fig.subplots()
    epochs = [entry['epoch'] for entry in entries]
    for name in (key for key in entries[0] if key != 'epoch'):
        ax.plot(epochs, [entry[name] for entry in entries], marker='.', label=name,
                linewidth=2.5 if name == 'score' else 1)
    ax.set_xlabel('epoch')
    ax.set_ylabel('validation')
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize='small')
    return _save(fig, path)


# ------------------------------------------------------------------------------ test examples

def example_indices(groups, per_group=EXAMPLES_PER_CLASS, first=None):
    """Indices of up to ``per_group`` items of each value of ``groups`` (e.g. the labels 0 and 1,
    or the defect types), evenly spread over the items of that value: the value ``first`` first,
    then the others in sorted order."""
    groups = np.asarray(groups)
    values = sorted(set(groups.tolist()) - {first})
    if first in set(groups.tolist()):
        values.insert(0, first)
    chosen = []
    for value in values:
        items = np.flatnonzero(groups == value)
        spread = np.linspace(0, items.size - 1, min(per_group, items.size)).round().astype(int)
        chosen += sorted(set(items[spread].tolist()))
    return chosen


def plot_test_examples(dataset, maps, path, per_class=EXAMPLES_PER_CLASS):
    """Figure of a few normal and defective test images: input, ground truth (unless no defect image
    of the category has a mask) and predicted map."""
    indices = example_indices(dataset.labels, per_class)
    with_masks = dataset.has_mask[dataset.labels == 1].any()
    masks = [dataset.masks[i] if with_masks and dataset.has_mask[i] else None for i in indices]
    titles = [f'{dataset.defect_types[i]}\nmean {maps[i].mean():.3f}, max {maps[i].max():.3f}'
              for i in indices]
    return plot_examples([dataset.images[i] for i in indices], masks,
                         [maps[i] for i in indices], titles, path)


def figure_path(figure_dir, category, setting_key):
    """``figure_dir/<category>_<setting without seed>.png``: the examples of a category and setting."""
    return Path(figure_dir) / f'{category}_{setting_key}.png'


def figure_paths(records, figure_dir):
    """The example figures of the results ``records`` that exist in ``figure_dir``, in record order;
    none of a category and setting whose evaluations all failed or that has no model (a requested
    pair without a checkpoint): its figure is an earlier one."""
    paths = dict.fromkeys(figure_path(figure_dir, r['category'], r['setting']) for r in records
                          if not failed(r) and isinstance(r.get('checkpoint'), str))
    return [path for path in paths if path.is_file()]


def remove_failed_figures(records, figure_dir):
    """Remove the example figures in ``figure_dir`` of each category and setting of ``records``
    whose evaluations all failed or that has no model: an earlier evaluation's, which would look
    current."""
    shown = set(figure_paths(records, figure_dir))
    for path in dict.fromkeys(figure_path(figure_dir, r['category'], r['setting']) for r in records):
        if path not in shown and path.is_file():
            path.unlink()
