"""The run configuration: the parsed flags plus what a run resolves once, at its start, and never changes.

Resolved here, in one place: the process's place in the job (``distributed``, ``rank``, ``world_size``,
``gpu``, ``dist_backend``), the per-process batch (from --total-batch-size, one recipe for any world
size) and the images per optimizer step (``total_batch``), the lr scaled by that batch (``base_lr`` is the
given one; DeiT's rule lr x batch / 512 unless --unscale-lr), the start time (``started``, rank 0's), the
run folder (timm's ``output/train/<started>-<model>-<loss>`` when none is given) and the class count.
``args.yaml`` records the parsed flags (:func:`recipe_text`), not these values.
"""
from __future__ import annotations

import argparse
import time

import yaml

from deit import distributed as du
from deit.recipes import as_recipe


class RunConfig(argparse.Namespace):
    """A read-only namespace: the phases of a run read it; none of them changes it."""

    def __init__(self, **values):
        for k, v in values.items():
            object.__setattr__(self, k, v)

    def __setattr__(self, name, value):
        raise AttributeError(f'the run configuration is resolved once; {name!r} cannot change during the run')

    __delattr__ = __setattr__


def resolve_config(args: argparse.Namespace, nb_classes: int, place: du.DistInfo = du.DistInfo()) -> RunConfig:
    """The run configuration of ``args`` (parsed, unchanged) for a process at ``place``."""
    per_step = place.world_size * args.accum_iter
    batch = args.batch_size
    if args.total_batch_size:
        if args.total_batch_size % per_step:
            raise ValueError(f'--total-batch-size {args.total_batch_size} is not divisible by {place.world_size} '
                             f'process(es) x --accum-iter {args.accum_iter}')
        batch = args.total_batch_size // per_step
    total = batch * per_step
    started = du.broadcast_object(time.strftime('%Y%m%d-%H%M%S'))  # rank 0's clock names the run on every rank
    output_dir = args.output_dir
    if output_dir is None and not args.eval:  # timm's convention: never no run folder by default
        output_dir = f'output/train/{args.experiment or f"{started}-{args.model}-{args.loss}"}'
    return RunConfig(**{**vars(args), 'distributed': place.distributed, 'rank': place.rank,
                        'world_size': place.world_size, 'gpu': place.gpu, 'dist_backend': place.backend,
                        'batch_size': batch, 'total_batch': total, 'base_lr': args.lr,
                        'lr': args.lr if args.unscale_lr else args.lr * total / 512.0,
                        'output_dir': output_dir, 'nb_classes': nb_classes, 'started': started})


def recipe_text(args: argparse.Namespace, config: RunConfig) -> str:
    """args.yaml: the parsed flags as a recipe (``-c args.yaml`` runs the same configuration), with the
    per-process batch that ran."""
    return yaml.safe_dump({**as_recipe(args), 'batch_size': config.batch_size}, sort_keys=True)
