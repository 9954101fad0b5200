"""Real layer shapes of the models the benchmarks cover (input side of every weight matrix)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConvShape:
    name: str
    c_in: int
    size: int  # input height = width
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    groups: int = 1
    dilation: int = 1

    @property
    def d(self) -> int:
        return self.c_in // self.groups * self.kernel**2


@dataclass(frozen=True)
class LinearShape:
    name: str
    d: int
    tokens_per_sample: int


# ResNet-18 with the CIFAR stem (3×3 conv, no max-pool), 32×32 inputs.
RESNET18_CIFAR = [
    ConvShape("resnet18.conv1", 3, 32),
    ConvShape("resnet18.layer1", 64, 32),
    ConvShape("resnet18.layer2.0.conv1", 64, 32, stride=2),
    ConvShape("resnet18.layer2", 128, 16),
    ConvShape("resnet18.layer3", 256, 8),
    ConvShape("resnet18.layer4", 512, 4),
]
# VGG-11-BN at 224×224.
VGG11_BN = [
    ConvShape("vgg11.features.0", 3, 224),
    ConvShape("vgg11.features.4", 64, 112),
    ConvShape("vgg11.features.8", 128, 56),
    ConvShape("vgg11.features.11", 256, 56),
    ConvShape("vgg11.features.15", 256, 28),
    ConvShape("vgg11.features.18", 512, 28),
    ConvShape("vgg11.features.22", 512, 14),
]
# Depthwise convs (groups = channels) of MobileNetV2 (3×3) and ConvNeXt-T (7×7) at 224×224: one
# channel per group, where the CPU kernel's fused pass makes the shifted form's sums.
DEPTHWISE = [
    ConvShape("mobilenet_v2.features.3.conv.1.0", 144, 56, groups=144),
    ConvShape("mobilenet_v2.features.15.conv.1.0", 960, 7, groups=960),
    ConvShape("convnext_tiny.features.1.0.block.0", 96, 56, kernel=7, padding=3, groups=96),
    ConvShape("convnext_tiny.features.5.0.block.0", 384, 14, kernel=7, padding=3, groups=384),
]
# Strided layers with few channels per group, where the CPU kernel takes the phase form: a strided
# depthwise conv of MobileNetV2 and the 7×7 stride-2 stem of the ImageNet ResNets, at 224×224.
STRIDED = [
    ConvShape("mobilenet_v2.features.4.conv.1.0", 144, 56, stride=2, groups=144),
    ConvShape("resnet50.conv1", 3, 224, kernel=7, stride=2, padding=3),
]
# Dilated layers: torchvision's ResNet-50 with its last two strides replaced by dilation (output
# stride 8, the DeepLabV3 backbone) at 224×224, where the ops take the residue form.
DILATED = [
    ConvShape("resnet50_os8.layer3.1.conv2", 256, 28, padding=2, dilation=2),
    ConvShape("resnet50_os8.layer4.1.conv2", 512, 28, padding=4, dilation=4),
]
# ViT-B/16: 197 tokens; d = 768 (qkv, out_proj, mlp.fc1, head) and 3072 (mlp.fc2).
VIT_B16 = [LinearShape("vit_b16.d768", 768, 197), LinearShape("vit_b16.d3072", 3072, 197)]
