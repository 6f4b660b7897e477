"""Command line of ``deit.main``: DeiT's flags on timm 1.0, grouped as timm's train.py, plus recipes as files.

``-c/--config recipes/<name>.yaml`` sets defaults (timm's convention: keys are the flags' dest names);
flags on the command line override them. ``parse_args`` resolves both; ``check_args`` refuses combinations
that would silently do something else than asked.
"""
from __future__ import annotations

import argparse
import sys

from timm.utils import ParseKwargs

from data.cifar import IMBALANCE_RATIO
from data.cli import USAGE_ERROR
from data.zip_cache import CACHE_MODES
from deit.datasets import DATA_SETS, DEFAULT_CROP_RATIO, auto_augment, mixup_active
from deit.device_decode import INTERPOLATIONS
from deit.criterion import ALPHA_DEFAULT, HARD_LABEL_LOSSES, loss_options, LOSSES

class UsageError(SystemExit):
    """A command-line or recipe mistake: its message on stderr, exit code 2 (argparse's, as every other usage
    error), the message kept as the exception's text."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = USAGE_ERROR
        print(message, file=sys.stderr, flush=True)


def image_size(values, option: str = '--input-size') -> int:
    """S from ``[S]`` or timm's ``[3, S, S]``; ValueError otherwise."""
    values = [values] if isinstance(values, int) else list(values)
    if len(values) == 1 and values[0] > 0:
        return values[0]
    if len(values) == 3 and values[0] == 3 and values[1] == values[2] > 0:
        return values[1]
    raise ValueError(f'{option} {" ".join(map(str, values))}: give one side S, or timm\'s 3 S S (square RGB '
                     f'inputs)')


class ImageSize(argparse.Action):
    """``--input-size S`` (DeiT) or ``--input-size 3 S S`` (timm); stores the side S."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, image_size(values, option_string))
        except ValueError as e:
            parser.error(str(e))


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default shown once: not again after a help text that states its own."""

    def _get_help_string(self, action):
        text = action.help or ''
        return text if 'default' in text else super()._get_help_string(action)


def _model(p) -> None:
    g = p.add_argument_group('model').add_argument
    g('--model', default='deit_small_patch16_224', help='any timm model, deit_demo_patch4_32, resnet*_blurpool, '
                                                        'or an official MaxSup name (our_patch16_224)')
    g('--input-size', '--img-size', default=224, type=int, nargs='+', action=ImageSize, metavar='S',
      help="image side in pixels; timm's form 3 S S (channels, height, width) is taken for square RGB inputs")
    g('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
      help="timm's: extra keyword arguments of the model's constructor (e.g. qkv_bias=False)")
    g('--drop', type=float, default=0.0, help='dropout rate')
    g('--drop-path', type=float, default=0.1, help='stochastic depth rate')
    g('--model-ema', action=argparse.BooleanOptionalAction, default=False, help='keep an EMA of the weights')
    g('--model-ema-decay', type=float, default=0.99996, help='EMA decay per step')
    g('--model-ema-force-cpu', action='store_true',
      help='keep the EMA on the CPU (saves GPU memory); it is then evaluated only after the last epoch, on a '
           'copy on the training device, not every epoch on the CPU while the GPUs wait (as timm)')
    g('--finetune', '--initial-checkpoint', default='',
      help="initialise from this checkpoint (head reset / pos-embed resize as needed; timm's --initial-checkpoint "
           "loads strictly instead)")
    g('--pretrained', action='store_true',
      help="timm's hub download of pretrained weights: not supported (runs start from a file: --finetune PATH)")
    g('--sync-bn', action='store_true', help="timm's: BatchNorm synchronised across processes (distributed runs)")
    g('--torchcompile', nargs='?', const='inductor', metavar='BACKEND',
      help="torch.compile the model (timm's flag; BACKEND default inductor); the checkpoint keeps plain names")
    g('--channels-last', action='store_true', help="channels-last memory format for model and batches (timm's "
                                                   "flag; faster convolutions, e.g. ResNet-50 under AMP)")


def _optimizer(p) -> None:
    g = p.add_argument_group('optimizer').add_argument
    g('--opt', default='adamw', help='timm optimizer name')
    g('--opt-eps', default=1e-8, type=float, help='optimizer epsilon')
    g('--opt-betas', type=float, nargs='+', help='optimizer betas (default: the optimizer\'s)')
    g('--clip-grad', type=float, help='gradient clipping threshold (off when unset)')
    g('--clip-mode', default='norm', choices=('norm', 'value', 'agc'),
      help="timm's: what --clip-grad bounds: the global norm, each value, or adaptive (AGC)")
    g('--layer-decay', type=float, help="timm's layer-wise lr decay (e.g. 0.65 to fine-tune a ViT)")
    g('--opt-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
      help="timm's: extra keyword arguments of the optimizer (e.g. foreach=False)")
    g('--momentum', type=float, default=0.9, help='SGD momentum')
    g('--weight-decay', type=float, default=0.05, help='weight decay')
    g('--fused-opt', action='store_true',
      help="torch's fused optimizer kernel (adam, adamw, sgd, momentum: one kernel for all parameters)")
    g('--lr', type=float, default=5e-4, help='base learning rate, for a total batch of 512 (see --unscale-lr)')
    g('--unscale-lr', action='store_true', help='use --lr as is, not lr * batch * world * accum / 512')
    g('--batch-size', '-b', default=64, type=int, help='per-process batch size')
    g('--total-batch-size', type=int,
      help='images per optimizer step over all processes; sets --batch-size = total / (world * accum)')
    g('--accum-iter', default=1, type=int, help='micro-batches per optimizer step (gradient accumulation)')


def _schedule(p) -> None:
    g = p.add_argument_group('schedule').add_argument
    g('--epochs', default=300, type=int, help='epochs to train')
    g('--sched', default='cosine', help='timm lr scheduler')
    g('--lr-noise', type=float, nargs='+', help='lr noise on/off epoch fractions')
    g('--lr-noise-pct', type=float, default=0.67, help='lr noise limit')
    g('--lr-noise-std', type=float, default=1.0, help='lr noise std')
    g('--warmup-lr', type=float, default=1e-6, help='lr at the start of warm-up')
    g('--min-lr', type=float, default=1e-5, help='lower lr bound of the schedule')
    g('--decay-epochs', type=float, default=30, help='epoch interval of --sched step')
    g('--decay-milestones', type=int, nargs='+', default=[90, 180, 270],
      help="--sched multistep multiplies the lr by --decay-rate at each (timm's flag, default and convention: "
           "milestone m is in effect from epoch m - 1; torch's MultiStepLR from epoch m)")
    g('--warmup-epochs', type=int, default=5, help='linear warm-up epochs (must be < --epochs)')
    g('--cooldown-epochs', type=int, default=0,
      help="timm's epochs at --min-lr after the schedule: not supported (DeiT's flag of that name is never "
           "applied either); a run trains exactly --epochs")
    g('--patience-epochs', type=int, default=10, help='plateau scheduler patience')
    g('--decay-rate', '--dr', type=float, default=0.1, help='lr decay rate of step schedules')
    g('--lr-step', choices=('timm', 'deit'), default='timm',
      help="timm: epoch e trains at the schedule's lr(e) (timm's train.py steps with epoch + 1); deit: at lr(e - 1), "
           "one epoch behind, as DeiT's and the official MaxSup main.py step with epoch (warm-up epoch 5 of the "
           "DeiT-S recipe: 9.99e-4 vs 8.0e-4)")


def _augmentation(p) -> None:
    g = p.add_argument_group('augmentation').add_argument
    g('--color-jitter', type=float, default=0.3, help='colour jitter factor')
    g('--aa', default='rand-m9-mstd0.5-inc1', help='timm auto-augment policy, "none" to disable')
    g('--train-interpolation', default='bicubic', help='resize interpolation for training')
    g('--repeated-aug', action=argparse.BooleanOptionalAction, default=True, help='repeated augmentation (DDP)')
    g('--train-mode', action=argparse.BooleanOptionalAction, default=True, help='dropout/drop-path on in training')
    g('--ThreeAugment', action='store_true', help="DeiT III's 3-Augment instead of RandAugment")
    g('--src', action='store_true', help='simple random crop (with --ThreeAugment)')
    g('--reprob', type=float, default=0.25, help='random erasing probability')
    g('--remode', default='pixel', help='random erasing mode')
    g('--recount', type=int, default=1, help='random erasing count')
    g('--resplit', action='store_true', help='accepted for DeiT commands; no effect, as in DeiT')
    g('--mixup', type=float, default=0.8, help='Mixup alpha (0: off)')
    g('--cutmix', type=float, default=1.0, help='CutMix alpha (0: off)')
    g('--cutmix-minmax', type=float, nargs='+', help='CutMix min/max ratio')
    g('--mixup-prob', type=float, default=1.0, help='probability of Mixup or CutMix per batch')
    g('--mixup-switch-prob', type=float, default=0.5, help='probability of CutMix when both are on')
    g('--mixup-mode', default='batch', choices=('batch', 'pair', 'elem'), help='how Mixup params are drawn')


def _loss(p) -> None:
    g = p.add_argument_group('loss').add_argument
    g('--loss', default='maxsup', choices=LOSSES, help='the regulariser compared in the paper')
    g('--alpha', '--maxsup-alpha', type=float, default=ALPHA_DEFAULT,
      help='regulariser weight at epoch 0 (maxsup, ls, ls_reg_only, ls_err_only; ols: its initial smoothing)')
    g('--alpha-end', '--maxsup-alpha-end', type=float, default=0.2,
      help='weight at the last epoch, linear in between: the paper schedules MaxSup AND label smoothing '
           '0.1 -> 0.2 by default (Sec. 5.1, App. F)')
    g('--alpha-schedule', choices=('linear', 'constant'), default='linear',
      help="'constant': the weight stays --alpha all run (Table 1; Table 8's fixed column)")
    g('--smoothing', type=float, default=0.0,
      help="DeiT's label smoothing; 0 because the regulariser is chosen with --loss")
    g('--bce-loss', action='store_true', help='BCE on mixed labels (DeiT III); only with --loss ce')
    for option, default in loss_options():  # each loss's own flags, defaults from its constructor
        if isinstance(default, bool):
            g(option.flag, action='store_true', help=option.help)
        else:
            g(option.flag, type=type(default), default=default, help=option.help)
    g('--teacher-model', default='regnety_160', help='distillation teacher (timm name)')
    g('--teacher-path', default='', help='distillation teacher checkpoint')
    g('--distillation-type', default='none', choices=['none', 'soft', 'hard'], help='DeiT distillation')
    g('--distillation-alpha', default=0.5, type=float, help='weight of the distillation loss')
    g('--distillation-tau', default=1.0, type=float, help='soft distillation temperature')


def _data(p) -> None:
    g = p.add_argument_group('data').add_argument
    g('--data-path', help='data set root (ImageNet folders, or the ZIP cache with --cache)')
    g('--data-set', default='IMNET', choices=DATA_SETS,
      help='DEMO: the built-in digits set; CIFAR*: the official python archives (deit/datasets.py)')
    g('--imbalance-ratio', type=float, default=IMBALANCE_RATIO,
      help='CIFAR*_LT: images of the largest / the smallest training class (Cao et al. 2019; 50 and 100 in the '
           'official long-tailed table)')
    g('--cache', action='store_true', help='read IMNET from the in-memory ZIP cache (data/)')
    g('--cache-mode', default='full', choices=CACHE_MODES,
      help="'part': each rank keeps a fixed 1/world shard (the official --cache sampling, no repetition)")
    g('--skip-bad-images', action='store_true',
      help='drop unreadable images (ZIP cache or folders) from their batch, counted and logged, instead of failing')
    g('--eval-crop-ratio', '--crop-pct', default=DEFAULT_CROP_RATIO, type=float, help='centre-crop ratio of evaluation')
    g('--prefetcher', action=argparse.BooleanOptionalAction, default=True,
      help="timm's prefetcher convention: workers return uint8, normalisation and random erasing run batched on "
           "the device (same augmentations; --no-prefetcher: float tensors from the workers, as DeiT)")
    g('--jpeg-draft', action='store_true',
      help='opt-in deviation: decode a JPEG at 1/2, 1/4 or 1/8 DCT scale when the sampled crop is >= 2x the '
           'output (same crops; the reduction filter differs)')
    g('--device-aug', '--gpu-aug', action='store_true',
      help='RandAugment of the batch on the device (GPU); workers only decode, crop and flip (needs --prefetcher)')
    g('--gpu-decode', '--device-decode', action='store_true',
      help='decode training JPEGs on the device (nvJPEG via torchvision), batched: workers only read the header and '
           "draw timm's crop and flip (needs --prefetcher; with RandAugment, --device-aug)")
    g('--num_workers', '--num-workers', '-j', default=10, type=int, help='DataLoader workers per process')
    g('--pin-mem', action=argparse.BooleanOptionalAction, default=True, help='pinned host memory (CUDA)')


def _run(p) -> None:
    g = p.add_argument_group('run').add_argument
    g('-c', '--config', default='', help='recipe YAML (recipes/); its keys set defaults, flags override')
    g('--output_dir', '--output-dir',
      help="run folder (default: output/train/<time>-<model>-<loss>); '' for none")
    g('--device', help='cuda or cpu (default: cuda when available)')
    g('--seed', default=0, type=int, help='random seed (+ rank)')
    g('--resume', default='', help='checkpoint to resume from on purpose (other run arguments are allowed)')
    g('--auto-resume', action=argparse.BooleanOptionalAction, default=True,
      help='continue from output_dir/checkpoint.pth when its run arguments match')
    g('--no-resume-opt', action='store_true',
      help="timm's: a resume restores weights, epoch, EMA and RNG streams, not the optimizer and loss-scaler state")
    g('--experiment', default='', help="timm's run name: the run folder is output/train/<name> (when no --output_dir)")
    g('--checkpoint-hist', type=int,
      help="timm's count of best checkpoints kept: not supported (checkpoint.pth and best_checkpoint.pth)")
    g('--eval-metric', default='top1', choices=('top1',),
      help="timm's metric that picks the best checkpoint: top-1 here, as DeiT")
    g('--log-wandb', action='store_true',
      help='not supported: the scalars are in <run>/tb (TensorBoard) and summary.csv; wandb sync-tensorboard '
           'imports the former')
    g('--start_epoch', '--start-epoch', default=0, type=int, help='first epoch (set by resume)')
    g('--eval', action='store_true', help='evaluate only')
    g('--eval-every', default=1, type=int, help='evaluate every N epochs (and always after the last)')
    g('--dist-eval', action='store_true', help='shard evaluation over ranks (exact)')
    g('--amp', action=argparse.BooleanOptionalAction, help='mixed precision (default: on for CUDA)')
    g('--amp-dtype', choices=('float16', 'bfloat16'),
      help="timm's flag: float16 (with loss scaling; the CUDA default) or bfloat16 (no scaling; the CPU's only "
           "choice); the losses compute in float32 either way")
    g('--print-freq', default=50, type=int, help='log every N steps (0: epoch summaries only)')
    g('--max-steps-per-epoch', type=int, help='cap steps per epoch (smoke tests)')


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m deit.main',
                                usage='%(prog)s [-c RECIPE.yaml] [flags] (--help: the flags by group)',
                                description='DeiT training and evaluation with MaxSup', formatter_class=Formatter)
    for group in (_model, _optimizer, _schedule, _augmentation, _loss, _data, _run):
        group(p)
    return p


def check_args(args) -> None:
    """Reject flag combinations that would silently do something else than asked."""
    if args.loss != 'ce' and args.smoothing > 0:
        raise ValueError(f'--smoothing {args.smoothing} with --loss {args.loss} regularises twice; '
                         f'use --smoothing 0 (the paper recipe) or --loss ce')
    if args.bce_loss and args.loss != 'ce':
        raise ValueError(f'--bce-loss replaces the loss; it only combines with --loss ce, not {args.loss}')
    if args.loss in HARD_LABEL_LOSSES and mixup_active(args):
        raise ValueError(f'--loss {args.loss} is defined for hard labels; add --mixup 0 --cutmix 0')
    if args.distillation_type != 'none' and args.finetune and not args.eval:
        raise ValueError('finetuning with distillation is not supported (as in DeiT)')
    if args.device_aug and not args.prefetcher:
        raise ValueError('--device-aug runs RandAugment on the uint8 batch on the device: it needs --prefetcher')
    if args.device_aug and (args.ThreeAugment or not (auto_augment(args) or '').startswith('rand')):
        raise ValueError(f'--device-aug moves a RandAugment policy to the device; --aa {args.aa!r}'
                         f'{" with --ThreeAugment" if args.ThreeAugment else ""} has none to move')
    if args.gpu_decode:  # the workers hand over JPEG bytes + timm's crop and flip: nothing else may need pixels
        aa = auto_augment(args) is not None
        for wrong, why in ((not args.prefetcher, 'it needs --prefetcher'),
                           (args.data_set == 'DEMO', 'the DEMO set is not read from JPEG files'),
                           (args.input_size <= 32, f'--input-size {args.input_size}: inputs <= 32 px are padded and '
                                                   f'cropped, not RandomResizedCrop-ed'),
                           (args.ThreeAugment, '3-Augment needs the decoded image in the workers'),
                           (args.jpeg_draft, 'choose one of --jpeg-draft and --gpu-decode'),
                           (aa and not args.device_aug, 'RandAugment needs the decoded image: add --device-aug'),
                           (not aa and bool(args.color_jitter), 'colour jitter needs the decoded image: add '
                                                                '--color-jitter 0'),
                           (args.train_interpolation not in (*INTERPOLATIONS, 'random'),
                            f'--train-interpolation {args.train_interpolation}: the device resizes with bicubic, '
                            f'bilinear, nearest or random')):
            if wrong:
                raise ValueError(f'--gpu-decode: {why}')
    if args.jpeg_draft and args.ThreeAugment:
        raise ValueError('--jpeg-draft replaces the RandomResizedCrop of the RandAugment recipe, not 3-Augment\'s')
    for given, why in ((args.pretrained, '--pretrained: not supported; a run starts from a file: download the '
                                         'weights, then --finetune PATH'),
                       (args.checkpoint_hist is not None, f'--checkpoint-hist {args.checkpoint_hist}: not supported; '
                                                          f'a run keeps checkpoint.pth and best_checkpoint.pth'),
                       (args.log_wandb, '--log-wandb: not supported; the scalars are in <run>/tb and summary.csv '
                                        '(wandb sync-tensorboard <run>/tb imports them)')):
        if given:
            raise ValueError(why)
    if args.cooldown_epochs:
        raise ValueError(f'--cooldown-epochs {args.cooldown_epochs}: not supported; a run trains exactly --epochs '
                         f'(DeiT defines the flag but never applies it). Add the epochs to --epochs and set --min-lr')
    if args.eval:
        return
    if args.epochs < 1:
        raise ValueError(f'--epochs {args.epochs}: train for at least 1 epoch (or pass --eval to only evaluate)')
    if args.eval_every < 1:
        raise ValueError(f'--eval-every {args.eval_every}: must be >= 1')
    if args.accum_iter < 1:
        raise ValueError(f'--accum-iter {args.accum_iter}: must be >= 1')
    if args.warmup_epochs >= args.epochs:
        raise ValueError(f'--warmup-epochs {args.warmup_epochs} >= --epochs {args.epochs}: the whole run would be '
                         f'warm-up (the model would end near chance); use e.g. --warmup-epochs '
                         f'{max(0, args.epochs // 10)}')
