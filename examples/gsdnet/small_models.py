"""ResNets for small images (Fashion-MNIST's 28 px), registered in timm's model registry so that
``--model`` and ``timm.create_model`` know them by name.

timm's ResNet stem (a stride-2 7x7 convolution, then a stride-2 max pool) leaves a 28 px image
7 px wide at ``layer1`` and 1 px at ``layer4``. These keep the stride-2 convolution and drop the
max pool (``layer1`` at 14 px, ``layer4`` at 2 px), and halve timm's widths (32 to 256
channels) so that a CPU trains them in minutes per epoch:

* ``small_resnet18``: ResNet-18's blocks (2, 2, 2, 2), 2.8 M parameters.
* ``small_resnet10``: one block per stage, the shallower static model of the same family.
* ``small_resnet18_narrow``: ResNet-18's blocks at a quarter of timm's widths (16 to 128).
"""

from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn


class SmallResNet(ResNet):
    """timm's ResNet of basic blocks without the stem's max pool; stage widths ``width * 2**i``."""

    def __init__(self, layers: tuple[int, ...], width: int, **kwargs) -> None:
        channels = tuple(width * 2**i for i in range(len(layers)))
        super().__init__(BasicBlock, layers, channels=channels, stem_width=width, **kwargs)
        self.maxpool = nn.Identity()
        for info in self.feature_info[1:]:  # every stage after the stem: one max pool finer
            info["reduction"] //= 2


def _cfg() -> dict:
    # No weights to download: these train from scratch. The input is Fashion-MNIST's.
    return dict(
        url="",
        num_classes=10,
        input_size=(1, 28, 28),
        pool_size=(2, 2),
        mean=(0.2860,),
        std=(0.3530,),
        first_conv="conv1",
        classifier="fc",
    )


default_cfgs = generate_default_cfgs(
    {name: _cfg() for name in ("small_resnet18", "small_resnet10", "small_resnet18_narrow")}
)


def _create(variant: str, pretrained: bool, layers: tuple[int, ...], width: int, **kwargs) -> SmallResNet:
    return build_model_with_cfg(SmallResNet, variant, pretrained, layers=layers, width=width, **kwargs)


@register_model
def small_resnet18(pretrained: bool = False, **kwargs) -> SmallResNet:
    return _create("small_resnet18", pretrained, (2, 2, 2, 2), 32, **kwargs)


@register_model
def small_resnet10(pretrained: bool = False, **kwargs) -> SmallResNet:
    return _create("small_resnet10", pretrained, (1, 1, 1, 1), 32, **kwargs)


@register_model
def small_resnet18_narrow(pretrained: bool = False, **kwargs) -> SmallResNet:
    return _create("small_resnet18_narrow", pretrained, (2, 2, 2, 2), 16, **kwargs)
