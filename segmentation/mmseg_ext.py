"""mmseg additions the configs import (``custom_imports``): layer-wise lr decay for ``VisionTransformer``.

mmseg's own LearningRateDecayOptimizerConstructor only accepts BEiT/MAE/ConvNeXt backbones; its ViT layer
numbering (``backbone.layers.i`` -> i + 1, embeddings -> 0, heads -> last) fits mmseg's VisionTransformer as
well, so this constructor reuses it. lr of a parameter = base_lr * decay_rate ** (num_layers + 1 - layer_id);
no weight decay for biases, norms, pos_embed and cls_token.
"""
from __future__ import annotations

from mmengine.optim import DefaultOptimWrapperConstructor
from mmseg.engine.optimizers.layer_decay_optimizer_constructor import get_layer_id_for_vit
from mmseg.registry import OPTIM_WRAPPER_CONSTRUCTORS


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class ViTLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):

    def add_params(self, params, module, **kwargs):
        num_layers = self.paramwise_cfg['num_layers'] + 2
        decay_rate = self.paramwise_cfg['decay_rate']
        groups = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            no_decay = param.ndim == 1 or name.endswith('.bias') or name.split('.')[-1] in ('pos_embed', 'cls_token')
            layer_id = get_layer_id_for_vit(name, num_layers)
            key = f'layer_{layer_id}_{"no_decay" if no_decay else "decay"}'
            if key not in groups:
                scale = decay_rate ** (num_layers - layer_id - 1)
                groups[key] = {'params': [], 'lr': self.base_lr * scale, 'lr_scale': scale,
                               'weight_decay': 0.0 if no_decay else self.base_wd}
            groups[key]['params'].append(param)
        params.extend(groups.values())
