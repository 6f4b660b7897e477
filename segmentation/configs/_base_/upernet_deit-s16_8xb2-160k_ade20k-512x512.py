# UperNet + DeiT-S/16 on ADE20K, 512x512 crops, 160k iterations, 8 GPUs x 2 images (the paper's setting).
# Model, data pipeline (incl. multi-scale + flip TTA), runtime and schedule come from mmseg's own DeiT-S
# config; this file sets what differs: the backbone weights come from a converted DeiT checkpoint
# (segmentation/tools/convert_deit_to_mmseg.py, or train.py --backbone-checkpoint) and patch_bias.
# Optimiser: mmseg's own (plain AdamW, lr 6e-5, weight decay 0.01, none on pos_embed/cls_token/norm) -
# the paper fine-tunes with mmseg's UperNet DeiT-S setup and names no layer-wise lr decay. The layer-decay
# variant is upernet_deit-s16_maxsup-layerdecay0.65_8xb2-160k_ade20k-512x512.py (not the paper's setting).
_base_ = ['mmseg::vit/vit_deit-s16_mln_upernet_8xb2-160k_ade20k-512x512.py']

custom_imports = dict(imports=['segmentation.mmseg_ext'], allow_failed_imports=False)

data_root = 'data/ade/ADEChallengeData2016'

model = dict(
    pretrained=None,
    backbone=dict(
        # patch_bias=True: DeiT's patch embedding has a bias; mmseg's stock DeiT-S config drops it
        # (patch_bias=False), which would leave that weight behind with only a log line
        embed_dims=384, num_layers=12, num_heads=6, patch_size=16, mlp_ratio=4, patch_bias=True,
        out_indices=(2, 5, 8, 11), drop_path_rate=0.1, final_norm=False,
        init_cfg=None),  # children / train.py --backbone-checkpoint point it at converted weights
    neck=dict(in_channels=[384, 384, 384, 384], out_channels=384, scales=[4, 2, 1, 0.5]),
    decode_head=dict(in_channels=[384, 384, 384, 384], num_classes=150),
    auxiliary_head=dict(in_channels=384, num_classes=150))

train_dataloader = dict(batch_size=2, dataset=dict(data_root=data_root))
# the lr and 160k iterations are for 8 GPUs x 2 = 16 images; train.py --total-batch-size 16 keeps that on any GPU
# count, --auto-scale-lr turns this on (lr x actual batch / 16)
auto_scale_lr = dict(enable=False, base_batch_size=16)
val_dataloader = dict(batch_size=1, dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
