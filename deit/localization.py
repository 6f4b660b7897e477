"""Grad-CAM against ImageNet val bounding boxes (paper Sec. 5.4): precision and recall of the thresholded map.

    precision = |active AND boxes| / |active|        recall = |active AND boxes| / |boxes|
where ``active`` is the set of pixels whose min-max normalised Grad-CAM value is >= the threshold and
``boxes`` the union of the image's ground-truth boxes, both in the evaluation crop's pixel grid.

Boxes come from the standard ``LOC_val_solution.csv`` (``ImageId,PredictionString`` with repeated
``<synset> x0 y0 x1 y1``) or from a folder of the per-image PASCAL-VOC XML files of ILSVRC2012 val.
"""
from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from deit.datasets import eval_resize

CAM_THRESHOLD = 0.5  # the paper's value could not be found in its text or code; a flag changes it

Box = tuple[float, float, float, float]


def read_boxes(source) -> dict[str, list[Box]]:
    """image id (file stem) -> boxes (x0, y0, x1, y1) in original pixels."""
    source = Path(source)
    if source.is_dir():
        return {p.stem: _xml_boxes(p) for p in sorted(source.glob('*.xml'))}
    if source.suffix.lower() == '.csv':
        return _csv_boxes(source)
    if source.suffix.lower() == '.xml':
        return {source.stem: _xml_boxes(source)}
    raise FileNotFoundError(f'{source}: give LOC_val_solution.csv or a folder of val XML annotations')


def _csv_boxes(path: Path) -> dict[str, list[Box]]:
    out = {}
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {'ImageId', 'PredictionString'} <= set(reader.fieldnames):
            raise ValueError(f'{path}: expected the columns ImageId,PredictionString (LOC_val_solution.csv)')
        for n, row in enumerate(reader, 2):
            parts = row['PredictionString'].split()
            if len(parts) % 5:
                raise ValueError(f'{path}:{n}: PredictionString is not "<synset> x0 y0 x1 y1" repeated')
            out[row['ImageId']] = [tuple(float(v) for v in parts[i + 1:i + 5]) for i in range(0, len(parts), 5)]
    return out


def _xml_boxes(path: Path) -> list[Box]:
    try:
        root = ET.parse(path).getroot()
        return [tuple(float(obj.find(f'bndbox/{k}').text) for k in ('xmin', 'ymin', 'xmax', 'ymax'))
                for obj in root.iter('object')]
    except (ET.ParseError, AttributeError, ValueError) as e:
        raise ValueError(f'{path}: not a VOC-style annotation with object/bndbox entries ({e})') from None


def boxes_in_crop(boxes: list[Box], width: int, height: int, size: int, crop_ratio: float) -> list[Box]:
    """Boxes through the evaluation transform: shorter side resized to size / crop_ratio, centre crop size."""
    scale = eval_resize(size, crop_ratio) / min(width, height)
    off_x, off_y = (width * scale - size) / 2, (height * scale - size) / 2
    out = []
    for x0, y0, x1, y1 in boxes:
        b = (x0 * scale - off_x, y0 * scale - off_y, x1 * scale - off_x, y1 * scale - off_y)
        b = tuple(float(np.clip(v, 0, size)) for v in b)
        if b[2] > b[0] and b[3] > b[1]:
            out.append(b)
    return out


def box_mask(boxes: list[Box], shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre lies inside any box."""
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]] + 0.5
    mask = np.zeros(shape, bool)
    for x0, y0, x1, y1 in boxes:
        mask |= (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    return mask


def cam_precision_recall(cam: np.ndarray, boxes: list[Box], threshold: float = CAM_THRESHOLD) -> tuple[float, float]:
    """(precision, recall) of the pixels with cam >= threshold against the union of ``boxes``."""
    active = cam >= threshold
    inside = box_mask(boxes, cam.shape)
    hit = float((active & inside).sum())
    return (hit / active.sum() if active.any() else 0.0), (hit / inside.sum() if inside.any() else float('nan'))
