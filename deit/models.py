"""Model creation on timm, plus a small ViT for the CPU demo, the official BlurPool ResNets, and DeiT's
fine-tuning surgery.

DeiT's own architectures (``deit_*_patch16_224``, ``deit_*_distilled_patch16_224``) live in timm 1.0; this
module registers ``deit_demo_patch4_32`` (a 4-block, 128-wide ViT for 32x32 inputs) and ``resnet*_blurpool``
(the official MaxSup ResNet pipeline's models; the CIFAR networks are in deit/cifar_models.py), maps the official code's model names onto timm's
(:data:`MODEL_ALIASES`), and wraps creation.
"""
from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from data.class_map import HEAD_KEYS
from data.io import CheckpointError
from deit import cifar_models  # noqa: F401  (registers the CIFAR networks with timm)

# Names the official MaxSup code gives its models -> the timm model with the same architecture and keys.
# Official Deit/models.py: ``our_patch16_224`` = DeiT-S (patch 16, 384 wide, 12 blocks, 6 heads, qkv_bias,
# LayerNorm eps 1e-6) on timm 0.4.12, whose ViT key names timm 1.0 still uses.
MODEL_ALIASES = {'our_patch16_224': 'deit_small_patch16_224'}


def resolve_model_name(name: str) -> str:
    return MODEL_ALIASES.get(name, name)


def is_known_model(name: str) -> bool:
    return timm.is_model(resolve_model_name(name))


class BlurPoolConv2d(torch.nn.Module):
    """A strided conv preceded by a fixed depthwise [1 2 1] x [1 2 1] / 16 blur (stride 1, padding 1).

    The official ResNet pipeline (``Conv/ffcv/model.py``, after FFCV's ImageNet example) wraps every Conv2d
    with stride > 1 and >= 16 input channels this way; the conv moves to ``.conv`` and the filter is a buffer
    ``blur_filter`` of shape (C, 1, 3, 3), so its checkpoints carry ``<name>.conv.weight`` and
    ``<name>.blur_filter``.
    """

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__()
        self.conv = conv
        kernel = torch.tensor([[1., 2., 1.], [2., 4., 2.], [1., 2., 1.]]) / 16.0
        self.register_buffer('blur_filter', kernel.expand(conv.in_channels, 1, 3, 3).contiguous())

    def forward(self, x):
        return self.conv(F.conv2d(x, self.blur_filter, stride=1, padding=1, groups=self.conv.in_channels))


def apply_blurpool(module: torch.nn.Module) -> torch.nn.Module:
    """Wrap, in place, every Conv2d with stride > 1 and in_channels >= 16 (the official rule)."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
            setattr(module, name, BlurPoolConv2d(child))
        else:
            apply_blurpool(child)
    return module


def _blurpool_resnet(base: str):
    def build(pretrained: bool = False, **kwargs):
        if pretrained:
            raise ValueError(f'{base}_blurpool has no pretrained weights here; load a checkpoint instead')
        for k in ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir'):
            kwargs.pop(k, None)
        return apply_blurpool(timm.create_model(base, pretrained=False, **kwargs))

    build.__name__ = f'{base}_blurpool'
    build.__doc__ = f'timm {base} (torchvision key names) with the official pipeline\'s BlurPool wrapping.'
    return build


for _base in ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152'):
    register_model(_blurpool_resnet(_base))


@register_model
def deit_demo_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Tiny DeiT for 32x32 inputs (64 patches + class token): trains on the digits demo in minutes on CPU."""
    if pretrained:
        raise ValueError('deit_demo_patch4_32 has no pretrained weights')
    for k in ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir'):  # timm's factory bookkeeping
        kwargs.pop(k, None)
    cfg = dict(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0)
    cfg.update(kwargs)
    return VisionTransformer(**cfg)


def create_model(name: str, num_classes: int, input_size: int | None = None, **kwargs) -> torch.nn.Module:
    """timm.create_model with a clear error for unknown names; passes img_size to models that take it.

    Official MaxSup names (``our_patch16_224``) resolve through :data:`MODEL_ALIASES`.
    """
    name = resolve_model_name(name)
    if name.startswith(('hf-hub:', 'hf_hub:', 'timm/')):
        raise ValueError(f'--model {name}: hub models are not downloaded here (compute nodes are often offline); '
                         f'download the weights, then give the architecture name and --finetune PATH')
    if not timm.is_model(name):
        raise ValueError(f'unknown model {name!r} (not in timm {timm.__version__} nor deit.models); '
                         f'see timm.list_models()')
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if input_size is not None:
        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=input_size, **kwargs)
        except TypeError as e:  # CNNs (resnet50, ...) take any input size and no img_size argument
            if 'img_size' not in str(e):
                raise
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def adapt_state_dict_for_finetune(state: dict, model: torch.nn.Module) -> tuple[dict, list[str]]:
    """DeiT's --finetune surgery: drop classifier heads whose shape differs, resample pos_embed.

    Returns the adapted state dict and the names of the heads that were reset.
    """
    state = dict(state)
    target = model.state_dict()
    reset = []
    for k in HEAD_KEYS:
        if k in state and k in target and state[k].shape != target[k].shape:
            del state[k]
            reset.append(k)
    if 'pos_embed' in state and 'pos_embed' in target and state['pos_embed'].shape != target['pos_embed'].shape:
        n_prefix = 0 if getattr(model, 'no_embed_class', False) else getattr(model, 'num_prefix_tokens', 1)
        new_grid = model.patch_embed.grid_size
        state['pos_embed'] = resample_abs_pos_embed(state['pos_embed'], new_size=list(new_grid),
                                                    num_prefix_tokens=n_prefix)
    return state, reset


def vit_shape(state: dict) -> dict:
    """Width, depth, patch size and pos-embed grid of a timm ViT state dict, or a clear error."""
    if 'patch_embed.proj.weight' not in state or 'cls_token' not in state:
        kind = 'a ResNet' if any(k.startswith('layer1.') for k in state) else 'no ViT'
        raise CheckpointError(f'the checkpoint is {kind} (keys like {sorted(state)[:3]}); '
                              f'a DeiT/ViT checkpoint is needed here')
    width = state['cls_token'].shape[-1]
    depth = len({int(k.split('.')[1]) for k in state if k.startswith('blocks.')})
    n_prefix = 2 if 'dist_token' in state else 1
    grid = math.isqrt(state['pos_embed'].shape[1] - n_prefix)
    return {'width': width, 'depth': depth, 'patch': state['patch_embed.proj.weight'].shape[-1],
            'grid': grid, 'prefix_tokens': n_prefix}
