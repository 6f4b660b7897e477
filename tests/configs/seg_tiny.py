# A miniature of the DeiT-S UperNet config for CPU tests: the demo DeiT backbone (128 wide, 4 blocks,
# patch 4) on 32x32 crops, 4 iterations. Everything else (heads, losses, TTA, optimizer) is inherited.
_base_ = ['../../segmentation/configs/_base_/upernet_deit-s16_8xb2-160k_ade20k-512x512.py']
crop_size = (32, 32)
data_root = 'data/ade/ADEChallengeData2016'  # tests pass the real root with --cfg-options
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(img_size=crop_size, embed_dims=128, num_layers=4, num_heads=4, patch_size=4, mlp_ratio=2,
                  out_indices=(0, 1, 2, 3), drop_path_rate=0.0),
    neck=dict(in_channels=[128] * 4, out_channels=128),
    decode_head=dict(in_channels=[128] * 4, channels=32),
    auxiliary_head=dict(in_channels=128, channels=16))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(128, 32), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs')]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(128, 32), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')]
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False,
                      dataset=dict(data_root=data_root, pipeline=test_pipeline))
test_dataloader = val_dataloader
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=2),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=2, end=4, by_epoch=False)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=4, val_interval=4)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=4))
