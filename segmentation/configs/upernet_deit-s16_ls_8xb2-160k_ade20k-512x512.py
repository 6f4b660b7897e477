# DeiT-S backbone trained with label smoothing; only the checkpoint differs.
_base_ = ['./_base_/upernet_deit-s16_8xb2-160k_ade20k-512x512.py']
checkpoint = 'pretrain/deit_s_ls_mmseg.pth'  # from segmentation/tools/convert_deit_to_mmseg.py
model = dict(backbone=dict(init_cfg=dict(_delete_=True, type='Pretrained', checkpoint=checkpoint)))
