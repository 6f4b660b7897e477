"""The parser of ``deit.main``: what a flag parses to, and the one line a mistake gets."""
from __future__ import annotations

import pytest

from deit.args import check_args, image_size
from deit.recipes import parse_args


@pytest.mark.parametrize('flag', ['--input-size', '--img-size'])
def test_a_bad_image_size_is_refused_naming_the_flag_as_typed(flag, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args([flag, '3', '96', '64'])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"python -m deit.main: error: {flag} 3 96 64: give one side S, or timm's 3 S S (square RGB inputs)"


HARD = ['--mixup', '0', '--cutmix', '0']
REFUSED = [
    (['--smoothing', '0.1'], '--smoothing 0.1 with --loss maxsup regularises twice; use --smoothing 0 (the paper '
                             'recipe) or --loss ce'),
    (['--bce-loss'], '--bce-loss replaces the loss; it only combines with --loss ce, not maxsup'),
    (['--loss', 'ls_reg_only'], '--loss ls_reg_only is defined for hard labels; add --mixup 0 --cutmix 0'),
    (['--loss', 'ls_err_only', *HARD, '--cutmix-minmax', '0.2', '0.8'],
     '--loss ls_err_only is defined for hard labels; add --mixup 0 --cutmix 0'),
    (['--distillation-type', 'soft', '--finetune', 'w.pth'], 'finetuning with distillation is not supported (as in '
                                                              'DeiT)'),
    (['--device-aug', '--no-prefetcher'], '--device-aug runs RandAugment on the uint8 batch on the device: it needs '
                                          '--prefetcher'),
    (['--device-aug', '--aa', 'none'], "--device-aug moves a RandAugment policy to the device; --aa 'none' has none "
                                       "to move"),
    (['--device-aug', '--aa', 'augmix-m5'], "--device-aug moves a RandAugment policy to the device; --aa 'augmix-m5' "
                                            "has none to move"),
    (['--device-aug', '--ThreeAugment'], "--device-aug moves a RandAugment policy to the device; --aa "
                                         "'rand-m9-mstd0.5-inc1' with --ThreeAugment has none to move"),
    (['--gpu-decode', '--aa', 'none', '--color-jitter', '0', '--no-prefetcher'], '--gpu-decode: it needs --prefetcher'),
    (['--gpu-decode', '--device-aug', '--data-set', 'DEMO'], '--gpu-decode: the DEMO set is not read from JPEG files'),
    (['--gpu-decode', '--device-aug', '--input-size', '32'], '--gpu-decode: --input-size 32: inputs <= 32 px are '
                                                             'padded and cropped, not RandomResizedCrop-ed'),
    (['--gpu-decode', '--ThreeAugment'], '--gpu-decode: 3-Augment needs the decoded image in the workers'),
    (['--gpu-decode', '--device-aug', '--jpeg-draft'], '--gpu-decode: choose one of --jpeg-draft and --gpu-decode'),
    (['--gpu-decode'], '--gpu-decode: RandAugment needs the decoded image: add --device-aug'),
    (['--gpu-decode', '--aa', 'none'], '--gpu-decode: colour jitter needs the decoded image: add --color-jitter 0'),
    (['--gpu-decode', '--device-aug', '--train-interpolation', 'lanczos'],
     '--gpu-decode: --train-interpolation lanczos: the device resizes with bicubic, bilinear, nearest or random'),
    (['--jpeg-draft', '--ThreeAugment'], "--jpeg-draft replaces the RandomResizedCrop of the RandAugment recipe, not "
                                         "3-Augment's"),
    (['--pretrained'], '--pretrained: not supported; a run starts from a file: download the weights, then --finetune '
                       'PATH'),
    (['--checkpoint-hist', '0'], '--checkpoint-hist 0: not supported; a run keeps checkpoint.pth and '
                                 'best_checkpoint.pth'),
    (['--log-wandb'], '--log-wandb: not supported; the scalars are in <run>/tb and summary.csv (wandb sync-tensorboard '
                      '<run>/tb imports them)'),
    (['--cooldown-epochs', '2'], '--cooldown-epochs 2: not supported; a run trains exactly --epochs (DeiT defines the '
                                 'flag but never applies it). Add the epochs to --epochs and set --min-lr'),
    (['--epochs', '0'], '--epochs 0: train for at least 1 epoch (or pass --eval to only evaluate)'),
    (['--eval-every', '0'], '--eval-every 0: must be >= 1'),
    (['--accum-iter', '0'], '--accum-iter 0: must be >= 1'),
    (['--epochs', '5'], '--warmup-epochs 5 >= --epochs 5: the whole run would be warm-up (the model would end near '
                        'chance); use e.g. --warmup-epochs 0'),
    (['--epochs', '20', '--warmup-epochs', '21'], '--warmup-epochs 21 >= --epochs 20: the whole run would be warm-up '
                                                  '(the model would end near chance); use e.g. --warmup-epochs 2'),
]
ACCEPTED = [
    [], ['--loss', 'ce', '--smoothing', '0.1'], ['--loss', 'ce', '--bce-loss'], ['--loss', 'ls_reg_only', *HARD],
    ['--distillation-type', 'hard', '--finetune', 'w.pth', '--eval'], ['--distillation-type', 'soft'],
    ['--device-aug'], ['--gpu-decode', '--device-aug'], ['--gpu-decode', '--aa', 'none', '--color-jitter', '0'],
    ['--gpu-decode', '--device-aug', '--input-size', '33', '--train-interpolation', 'random'],
    ['--gpu-decode', '--device-aug', '--train-interpolation', 'nearest'], ['--jpeg-draft'], ['--ThreeAugment'],
    ['--cooldown-epochs', '0'], ['--eval', '--epochs', '0', '--eval-every', '0', '--accum-iter', '0'],
    ['--epochs', '6'], ['--epochs', '1', '--warmup-epochs', '0'],
]


@pytest.mark.parametrize('flags, message', REFUSED, ids=[' '.join(f) for f, _ in REFUSED])
def test_check_args_refuses_in_one_line(flags, message):
    with pytest.raises(ValueError) as e:
        check_args(parse_args(flags))
    assert str(e.value) == message


@pytest.mark.parametrize('flags', ACCEPTED, ids=[' '.join(f) or 'defaults' for f in ACCEPTED])
def test_check_args_accepts(flags):
    assert check_args(parse_args(flags)) is None


@pytest.mark.parametrize('values, side', [(96, 96), ([96], 96), ((3, 96, 96), 96), ([1], 1), ([3, 1, 1], 1)])
def test_image_size_takes_deits_side_or_timms_channels_height_width(values, side):
    assert image_size(values) == side


@pytest.mark.parametrize('values', [[0], [-96], [3, 96, 64], [1, 96, 96], [96, 96], [3, 0, 0], [3, 96, 96, 96], []])
def test_image_size_refuses_other_forms(values):
    with pytest.raises(ValueError) as e:
        image_size(values)
    assert str(e.value) == f'--input-size {" ".join(map(str, values))}: give one side S, or timm\'s 3 S S (square ' \
                           f'RGB inputs)'
