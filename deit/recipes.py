"""From a recipe file and the command line to the parsed flags: recipes (``-c``, YAML mappings of flag names
to values, checked against each flag now), the flags given on the command line, and ``args.yaml`` written
back as a recipe. The flags themselves are :mod:`deit.args`; what a run resolves from them, :mod:`deit.config`.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import yaml
from timm.utils import ParseKwargs

from data.io import CheckpointError, torch_load
from deit.args import ImageSize, UsageError, get_args_parser, image_size
from deit.releases import recorded_settings


def parse_args(argv=None) -> argparse.Namespace:
    """Flags over the recipe file's values over the parser's defaults."""
    parser = get_args_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('-c', '--config', default='')
    known, _ = pre.parse_known_args(argv)
    recipe = read_recipe(known.config, parser) if known.config else {}
    parser.set_defaults(**recipe)
    args = parser.parse_args(argv)
    given = given_flags(parser, argv)
    if 'batch_size' in given and args.total_batch_size:
        # the recipe's total would set the per-process batch; a batch on the command line overrides it
        if 'total_batch_size' in given:
            parser.error(f'--batch-size {args.batch_size} and --total-batch-size {args.total_batch_size} both given: '
                         f'choose one (per process, or in total over all processes)')
        args.total_batch_size = None
    if args.eval and args.resume and Path(args.resume).is_file():
        args = adopt_recorded_model(args, given | set(recipe))
    return args


def adopt_recorded_model(args: argparse.Namespace, chosen: set[str]) -> argparse.Namespace:
    """--eval of a training checkpoint: the model and input size it was trained with, where neither the command
    line nor the recipe chose them (they would not load otherwise; timm's validate.py takes them from the
    checkpoint's own config likewise). An unreadable file is left for the run to report."""
    try:
        recorded = recorded_settings(torch_load(args.resume), args.resume)
    except (CheckpointError, OSError):
        return args
    adopt = {k: recorded[k] for k in ('model', 'input_size')
             if k not in chosen and recorded.get(k) is not None and recorded[k] != getattr(args, k)}
    if adopt:
        print(f'--eval: {args.resume} was trained with ' + ', '.join(f'--{k.replace("_", "-")} {v}'
                                                                 for k, v in adopt.items()) + '; evaluating it so')
    return argparse.Namespace(**{**vars(args), **adopt})


def given_flags(parser: argparse.ArgumentParser, argv) -> set[str]:
    """The dests set on the command line itself (not by defaults or a recipe)."""
    probe = copy.deepcopy(parser)
    probe._defaults.clear()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def as_recipe(args) -> dict:
    """The parsed flags only (no run-time values such as the scaled lr or the rank), as ``-c`` reads them."""
    dests = {a.dest for a in get_args_parser()._actions} - {'help', 'config'}
    return {k: v for k, v in vars(args).items() if k in dests}


def read_recipe(path, parser) -> dict:
    """The recipe's values, each checked against its flag (type, choices, on/off, list) now: a wrong value
    found after the data and model are built would stop the run late, with args.yaml already written."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f'error: recipe not found: {path}')
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f':{mark.line + 1}' if mark is not None else ''
        raise UsageError(f'error: {path}{where}: not valid YAML ({getattr(e, "problem", None) or e})') from None
    if not isinstance(values, dict):
        raise UsageError(f'error: {path}: a recipe is a mapping of flag names to values, not a '
                         f'{type(values).__name__}')
    actions = {a.dest: a for a in parser._actions}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise UsageError(f'error: {path}: unknown keys {unknown} (keys are deit.main flag names with _ for -)')
    return {k: _recipe_value(path, k, v, actions[k]) for k, v in values.items()}


def _recipe_value(path: Path, key: str, value, action: argparse.Action):
    """``value`` as the flag would have parsed it; SystemExit naming file, key and what was expected."""
    def bad(expected: str):
        return UsageError(f'error: {path}: {key}: {value!r} is not {expected}')

    if value is None:
        return None
    if isinstance(action, ImageSize):  # 224, or timm's [3, 224, 224]
        ints = value if isinstance(value, list) else [value]
        ints = [int(v) if isinstance(v, float) and v.is_integer() else v for v in ints]  # 224.0 is 224
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
            raise bad('an int (or [3, S, S])')
        try:
            return image_size(ints, key)
        except ValueError:
            raise bad('an int (or [3, S, S])') from None
    if isinstance(action, ParseKwargs):  # a mapping of keyword arguments
        if not isinstance(value, dict):
            raise bad('a mapping of keyword arguments')
        return value
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):  # on/off flags
        if not isinstance(value, bool):
            raise bad('true or false')
        return value
    items = value if action.nargs in ('+', '*') or isinstance(action.nargs, int) else [value]
    if items is value and not isinstance(value, list):
        raise bad('a list')
    convert = action.type or str
    kind = {int: 'an int', float: 'a number', str: 'a string'}.get(convert, 'a valid value')
    out = []
    for item in items:
        if isinstance(item, (dict, list)) or (isinstance(item, bool) and convert is not str):
            raise bad(kind)
        if convert is int and isinstance(item, float):  # 224.0 is 224; 2.5 is no epoch count
            if not item.is_integer():
                raise bad(kind)
            item = int(item)
        try:  # as from the command line (YAML reads 1e-3 as a string; float() takes it)
            item = convert(str(item))
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise bad(kind) from None
        if action.choices is not None and item not in action.choices:
            raise bad(f'one of {list(action.choices)}')
        out.append(item)
    return out if items is value else out[0]
