"""What the tools share: the arguments naming a checkpoint's model and the evaluation data, one set of
defaults for all of them. Errors: :func:`data.cli.one_line_errors`."""
from __future__ import annotations

import argparse

from deit.datasets import DATA_SETS

EVAL_BATCH_SIZE = 128  # evaluation holds no gradients: twice the training batch of the recipes fits
EVAL_WORKERS = 2


def add_model_args(ap: argparse.ArgumentParser, ema: bool = True,
                   model_help: str = "default: the checkpoint's (official names included), else inferred from "
                                     "its keys") -> None:
    ap.add_argument('--model', default=None, help=model_help)
    ap.add_argument('--num-classes', type=int, default=None, help="default: the checkpoint's head")
    if ema:
        ap.add_argument('--use-ema', action='store_true', help='the EMA weights of a training checkpoint')


def add_eval_data_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument('--data-set', default=None, choices=DATA_SETS,
                    help="default: the checkpoint's, IMNET with --cache, else FOLDER")
    ap.add_argument('--data-path', default=None)
    ap.add_argument('--cache', action='store_true', help='read the ZIP cache in --data-path')
    ap.add_argument('--split', default='val', choices=('train', 'val'))
    ap.add_argument('--input-size', type=int, default=None, help="default: the checkpoint's own")
    ap.add_argument('--batch-size', type=int, default=EVAL_BATCH_SIZE)
    ap.add_argument('--num-workers', type=int, default=EVAL_WORKERS)


def report_names(stats: dict) -> dict:
    """An evaluation's numbers as the tools report them: DeiT's ``loss`` (the mean NLL) is ``nll`` there, where
    ``loss`` names the loss function a model was trained with."""
    return {('nll' if k == 'loss' else k): v for k, v in stats.items()}
