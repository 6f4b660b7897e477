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

import re

import torch
from timm.layers import resample_abs_pos_embed

from data.io import CheckpointError, save_atomic
from deit.models import vit_shape
from deit.releases import read_state_dict

# (timm name, mmseg name); {i} = block index, {p} = weight|bias
KEY_PAIRS = [
    ('patch_embed.proj.{p}', 'patch_embed.projection.{p}'),
    ('blocks.{i}.norm1.{p}', 'layers.{i}.ln1.{p}'),
    ('blocks.{i}.norm2.{p}', 'layers.{i}.ln2.{p}'),
    ('blocks.{i}.attn.qkv.{p}', 'layers.{i}.attn.attn.in_proj_{p}'),
    ('blocks.{i}.attn.proj.{p}', 'layers.{i}.attn.attn.out_proj.{p}'),
    ('blocks.{i}.mlp.fc1.{p}', 'layers.{i}.ffn.layers.0.0.{p}'),
    ('blocks.{i}.mlp.fc2.{p}', 'layers.{i}.ffn.layers.1.{p}'),
    ('norm.{p}', 'ln1.{p}'),
    ('cls_token', 'cls_token'),
    ('pos_embed', 'pos_embed'),
]


def _pattern(template: str) -> re.Pattern:
    rx = re.escape(template).replace(r'\{i\}', r'(?P<i>\d+)').replace(r'\{p\}', r'(?P<p>weight|bias)')
    return re.compile(f'^{rx}$')


_TO_MMSEG = [(_pattern(t), m) for t, m in KEY_PAIRS]
_TO_TIMM = [(_pattern(m), t) for t, m in KEY_PAIRS]


def _rename(key: str, rules, what: str) -> str:
    for pat, template in rules:
        m = pat.match(key)
        if m:
            return template.format(**m.groupdict())
    raise CheckpointError(f'unexpected {what} key {key!r}: no counterpart')


DROPPED = re.compile(r'^(head|head_dist|fc_norm|dist_token)(\.|$)')


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
        out[_rename(k, _TO_MMSEG, 'ViT')] = v
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
    return {_rename(k, _TO_TIMM, 'mmseg ViT'): v for k, v in state.items()}


def convert_checkpoint(src, dst, expected_width=384, expected_depth=12, img_size=512, use_ema=False,
                       final_norm=False) -> dict:
    """Read any supported checkpoint (deit.releases), convert, and save ``{'state_dict': ...}`` for mmseg."""
    state = timm_to_mmseg(read_state_dict(src, use_ema=use_ema), expected_width, expected_depth, img_size,
                          final_norm)
    save_atomic({'state_dict': state, 'meta': {'source': str(src), 'img_size': img_size}}, dst)
    return state
