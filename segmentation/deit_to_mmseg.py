"""timm/DeiT ViT state dicts <-> mmseg ``VisionTransformer`` backbone state dicts.

Key names (timm -> mmseg, as mmseg's own vit2mmseg converter):
    patch_embed.proj.*        -> patch_embed.projection.*
    blocks.i.norm1/norm2.*    -> layers.i.ln1/ln2.*
    blocks.i.attn.qkv.*       -> layers.i.attn.attn.in_proj_{weight,bias}
    blocks.i.attn.proj.*      -> layers.i.attn.attn.out_proj.*
    blocks.i.mlp.fc1/fc2.*    -> layers.i.ffn.layers.0.0.* / layers.i.ffn.layers.1.*
    norm.*                    -> ln1.*            (final norm)
    cls_token, pos_embed      -> same (pos_embed resampled to the crop's patch grid)
The classifier head (and a distilled model's dist token) has no place in a segmentation backbone.
"""
from __future__ import annotations

import math
import re

import torch
from timm.layers import resample_abs_pos_embed

from deit.checkpoint import CheckpointError

_RULES = [  # (timm regex, mmseg template)
    (r'^patch_embed\.proj\.(weight|bias)$', r'patch_embed.projection.\1'),
    (r'^blocks\.(\d+)\.norm1\.(weight|bias)$', r'layers.\1.ln1.\2'),
    (r'^blocks\.(\d+)\.norm2\.(weight|bias)$', r'layers.\1.ln2.\2'),
    (r'^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$', r'layers.\1.attn.attn.in_proj_\2'),
    (r'^blocks\.(\d+)\.attn\.proj\.(weight|bias)$', r'layers.\1.attn.attn.out_proj.\2'),
    (r'^blocks\.(\d+)\.mlp\.fc1\.(weight|bias)$', r'layers.\1.ffn.layers.0.0.\2'),
    (r'^blocks\.(\d+)\.mlp\.fc2\.(weight|bias)$', r'layers.\1.ffn.layers.1.\2'),
    (r'^norm\.(weight|bias)$', r'ln1.\1'),
    (r'^(cls_token|pos_embed)$', r'\1'),
]
_INVERSE = [  # mmseg regex, timm template
    (r'^patch_embed\.projection\.(weight|bias)$', r'patch_embed.proj.\1'),
    (r'^layers\.(\d+)\.ln1\.(weight|bias)$', r'blocks.\1.norm1.\2'),
    (r'^layers\.(\d+)\.ln2\.(weight|bias)$', r'blocks.\1.norm2.\2'),
    (r'^layers\.(\d+)\.attn\.attn\.in_proj_(weight|bias)$', r'blocks.\1.attn.qkv.\2'),
    (r'^layers\.(\d+)\.attn\.attn\.out_proj\.(weight|bias)$', r'blocks.\1.attn.proj.\2'),
    (r'^layers\.(\d+)\.ffn\.layers\.0\.0\.(weight|bias)$', r'blocks.\1.mlp.fc1.\2'),
    (r'^layers\.(\d+)\.ffn\.layers\.1\.(weight|bias)$', r'blocks.\1.mlp.fc2.\2'),
    (r'^ln1\.(weight|bias)$', r'norm.\1'),
    (r'^(cls_token|pos_embed)$', r'\1'),
]
DROPPED = re.compile(r'^(head|head_dist|fc_norm|dist_token)(\.|$)')


def vit_shape(state: dict) -> dict:
    """Width, depth, patch size and pos-embed grid of a timm ViT state dict, or a clear error."""
    if 'patch_embed.proj.weight' not in state or 'cls_token' not in state:
        kind = 'a ResNet' if any(k.startswith('layer1.') for k in state) else 'no ViT'
        raise CheckpointError(f'the checkpoint is {kind} (keys like {sorted(state)[:3]}); '
                              f'the segmentation backbone needs a DeiT/ViT checkpoint')
    width = state['cls_token'].shape[-1]
    depth = len({int(k.split('.')[1]) for k in state if k.startswith('blocks.')})
    n_prefix = 2 if 'dist_token' in state else 1
    grid = math.isqrt(state['pos_embed'].shape[1] - n_prefix)
    return {'width': width, 'depth': depth, 'patch': state['patch_embed.proj.weight'].shape[-1],
            'grid': grid, 'prefix_tokens': n_prefix}


def timm_to_mmseg(state: dict, expected_width: int | None = None, expected_depth: int | None = None,
                  img_size: int | None = None, final_norm: bool = False) -> dict:
    """Convert; check width/depth against the config; resample pos_embed to ``img_size / patch``.

    ``final_norm``: whether the mmseg backbone has a final LayerNorm (``ln1``); the DeiT configs use
    intermediate outputs without it, so timm's final ``norm`` is dropped by default.
    """
    shape = vit_shape(state)
    for what, want in (('width', expected_width), ('depth', expected_depth)):
        if want is not None and shape[what] != want:
            raise CheckpointError(f'checkpoint ViT has {what} {shape[what]}, the backbone expects {want} '
                                  f'(width {shape["width"]}, depth {shape["depth"]} found)')
    out = {}
    for k, v in state.items():
        if DROPPED.match(k) or (not final_norm and k.startswith('norm.')):
            continue
        for pat, rep in _RULES:
            if re.match(pat, k):
                out[re.sub(pat, rep, k)] = v
                break
        else:
            raise CheckpointError(f'unexpected ViT key {k!r}: no mmseg counterpart')
    pos = out['pos_embed']
    if shape['prefix_tokens'] == 2:  # distilled DeiT: keep the class token's position, drop the dist token's
        pos = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
    if img_size is not None:
        new_grid = img_size // shape['patch']
        if new_grid != shape['grid']:
            pos = resample_abs_pos_embed(pos, new_size=[new_grid, new_grid], old_size=[shape['grid']] * 2,
                                         num_prefix_tokens=1)
    out['pos_embed'] = pos
    return out


def mmseg_to_timm(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        for pat, rep in _INVERSE:
            if re.match(pat, k):
                out[re.sub(pat, rep, k)] = v
                break
        else:
            raise CheckpointError(f'unexpected mmseg ViT key {k!r}')
    return out


def convert_checkpoint(src, dst, expected_width=384, expected_depth=12, img_size=512, use_ema=False,
                       final_norm=False) -> dict:
    """Read any supported checkpoint (deit.checkpoint), convert, and save ``{'state_dict': ...}`` for mmseg."""
    from deit.checkpoint import read_state_dict, save_atomic
    state = timm_to_mmseg(read_state_dict(src, use_ema=use_ema), expected_width, expected_depth, img_size,
                          final_norm)
    save_atomic({'state_dict': state, 'meta': {'source': str(src), 'img_size': img_size}}, dst)
    return state
