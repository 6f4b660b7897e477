"""Model creation on timm, plus a small ViT for the CPU demo and DeiT's fine-tuning surgery.

DeiT's own architectures (``deit_*_patch16_224``, ``deit_*_distilled_patch16_224``) live in timm 1.0; this
module only registers ``deit_demo_patch4_32`` (a 4-block, 128-wide ViT for 32x32 inputs) and wraps creation.
"""
from __future__ import annotations

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer


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
    """timm.create_model with a clear error for unknown names; passes img_size to models that take it."""
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
    for k in ('head.weight', 'head.bias', 'head_dist.weight', 'head_dist.bias', 'fc.weight', 'fc.bias'):
        if k in state and k in target and state[k].shape != target[k].shape:
            del state[k]
            reset.append(k)
    if 'pos_embed' in state and 'pos_embed' in target and state['pos_embed'].shape != target['pos_embed'].shape:
        n_prefix = 0 if getattr(model, 'no_embed_class', False) else getattr(model, 'num_prefix_tokens', 1)
        new_grid = model.patch_embed.grid_size
        state['pos_embed'] = resample_abs_pos_embed(state['pos_embed'], new_size=list(new_grid),
                                                    num_prefix_tokens=n_prefix)
    return state, reset
