"""CIFAR-style networks for 32x32 inputs, registered with timm (``create_model('resnet18_cifar')``).

- ``resnet32_cifar``: He et al. 2016 Sec. 4.2, the long-tailed CIFAR backbone (Cao et al. 2019's code, which
  the official long-tailed experiment builds on): a 3x3 stem of 16 channels, three stages of 5 basic blocks
  (16, 32, 64 channels), parameter-free shortcuts (option A: stride-2 subsampling, zero-padded channels).
- ``resnet{18,50,101}_cifar``: timm's ResNets with the CIFAR stem of the usual CIFAR-100 baselines (a 3x3
  stride-1 convolution, no max-pool), so a 32x32 input keeps 32x32 in the first stage.
- ``mobilenetv2_cifar``: timm's MobileNetV2 with the stem and the first stride-2 block at stride 1 (the usual
  CIFAR variant: 32 -> 4 before pooling, not 32 -> 1).
"""
from __future__ import annotations

import timm
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d
from timm.models import register_model
from torch import nn


def _no_pretrained(name: str, pretrained: bool, kwargs: dict) -> dict:
    if pretrained:
        raise ValueError(f'{name} has no pretrained weights here; load a checkpoint instead')
    return {k: v for k, v in kwargs.items() if k not in ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir')}


class BasicBlockA(nn.Module):
    """3x3 - BN - ReLU - 3x3 - BN, plus the identity; a stride-2 shortcut subsamples and zero-pads channels."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, cout - cin

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        if self.pad:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet of depth 6n + 2 (n blocks per stage); ``fc`` is the classifier (timm's name)."""

    def __init__(self, n: int = 5, num_classes: int = 10, widths=(16, 32, 64), **_):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, width in enumerate(widths):
            layers += [BasicBlockA(cin if j == 0 else width, width, 2 if i and j == 0 else 1) for j in range(n)]
            cin = width
        self.layers = nn.Sequential(*layers)
        self.num_features = cin
        self.global_pool = SelectAdaptivePool2d(pool_type='avg', flatten=True)  # timm's name and module
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward_features(self, x):
        return self.layers(F.relu(self.bn1(self.conv1(x))))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward_head(self, x, pre_logits: bool = False):
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    """ResNet-32 for CIFAR (n = 5), the official long-tailed table's backbone."""
    return CifarResNet(n=5, **_no_pretrained('resnet32_cifar', pretrained, kwargs))


def _cifar_stem_resnet(base: str):
    def build(pretrained: bool = False, **kwargs):
        model = timm.create_model(base, pretrained=False, **_no_pretrained(f'{base}_cifar', pretrained, kwargs))
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
        return model

    build.__name__ = f'{base}_cifar'
    build.__doc__ = f'timm {base} with the CIFAR stem (3x3 stride-1 convolution, no max-pool).'
    return build


for _base in ('resnet18', 'resnet50', 'resnet101'):
    register_model(_cifar_stem_resnet(_base))


@register_model
def mobilenetv2_cifar(pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's mobilenetv2_100 with the stem and the first stride-2 stage at stride 1."""
    model = timm.create_model('mobilenetv2_100', pretrained=False,
                              **_no_pretrained('mobilenetv2_cifar', pretrained, kwargs))
    model.conv_stem.stride = (1, 1)
    model.blocks[1][0].conv_dw.stride = (1, 1)
    return model
