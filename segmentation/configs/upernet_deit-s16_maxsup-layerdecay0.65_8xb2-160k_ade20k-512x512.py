# Variant (NOT the paper's setting): the MaxSup config with BEiT/MAE-style layer-wise lr decay 0.65 over the
# 12 blocks; no weight decay on biases, norms, pos_embed and cls_token (segmentation/mmseg_ext.py).
_base_ = ['./upernet_deit-s16_maxsup_8xb2-160k_ade20k-512x512.py']
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    constructor='ViTLayerDecayOptimizerConstructor',
    paramwise_cfg=dict(num_layers=12, decay_rate=0.65))
