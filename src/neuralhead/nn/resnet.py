"""ResNet-18/34/50 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016).

MegaPortraits builds its motion encoder from two ResNet-18s (head pose and expression,
Sec. 3.1 and A.1) and its global appearance descriptor ``e_s`` from a ResNet-50 (A.1); the
base model replaces every BatchNorm with GroupNorm and standardises the weights of every
convolution but the first and the last (A.1). The networks are written here without
torchvision, with the parameter names of torchvision's ``resnet18()`` / ``resnet50()``
(``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``, ..., ``fc``), so that
torchvision's published ImageNet files load unchanged through :mod:`neuralhead.weights`.

The layout is torchvision's "ResNet v1.5": bottleneck blocks stride in their 3x3
convolution. Options beyond the published network, each of which changes what can be
loaded from an ImageNet file:

- ``norm="group"``: GroupNorm in place of every BatchNorm (the norm layers keep the names
  ``bn1``, ``bn2``, ``downsample.1``, so only the running statistics disappear);
- ``weight_standardization`` on every convolution but the stem (the network's last layer is
  the linear ``fc``) and ``spectral_norm`` on every convolution: these store each weight as
  ``<conv>.parametrizations.weight.original``, see :mod:`neuralhead.nn.blocks`;
- ``width``: the stem's channel count (64 published; stages use 1, 2, 4 and 8 times it);
- ``num_classes=None`` drops the pooling and ``fc`` head; ``dropout`` acts before ``fc``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from neuralhead import weights
from neuralhead.errors import InputError
from neuralhead.nn.blocks import Norm, make_conv, make_norm
from neuralhead.pretrained.vgg import IMAGENET_MEAN, IMAGENET_STD

Block = Literal["basic", "bottleneck"]

#: Residual blocks per stage of the published depths.
RESNET18_LAYERS = (2, 2, 2, 2)
RESNET34_LAYERS = (3, 4, 6, 3)
RESNET50_LAYERS = (3, 4, 6, 3)

# torchvision names its files after the first 8 hex digits of the SHA-256. The full digests and
# sizes are those recorded by several independent public projects that verify these downloads
# (the files cannot be fetched here to hash them ourselves).
RESNET18_IMAGENET = weights.WeightFile(
    name="resnet18-imagenet",
    filename="resnet18-f37072fd.pth",
    sha256="f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec",
    url="https://download.pytorch.org/models/resnet18-f37072fd.pth",
    license="BSD-3-Clause (torchvision)",
    used_by="neuralhead.nn.resnet (initialisation of the MegaPortraits head-pose network)",
    description="torchvision ResNet-18 trained on ImageNet-1k (ResNet18_Weights.IMAGENET1K_V1)",
    size=46_830_571,
)
RESNET50_IMAGENET = weights.WeightFile(
    name="resnet50-imagenet",
    filename="resnet50-0676ba61.pth",
    sha256="0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a",
    url="https://download.pytorch.org/models/resnet50-0676ba61.pth",
    license="BSD-3-Clause (torchvision)",
    used_by="neuralhead.nn.resnet (ImageNet ResNet-50 backbone)",
    description="torchvision ResNet-50 trained on ImageNet-1k (ResNet50_Weights.IMAGENET1K_V1)",
    size=102_530_333,
)
weights.register_weights(RESNET18_IMAGENET)
weights.register_weights(RESNET50_IMAGENET)

#: Registry entry of the ImageNet file for each published configuration ``(block, layers)``.
IMAGENET_WEIGHTS: dict[tuple[str, tuple[int, ...]], str] = {
    ("basic", RESNET18_LAYERS): RESNET18_IMAGENET.name,
    ("bottleneck", RESNET50_LAYERS): RESNET50_IMAGENET.name,
}


def imagenet_normalize(images: torch.Tensor) -> torch.Tensor:
    """Map RGB ``images`` ``(B, 3, H, W)`` in ``[0, 1]`` to the input torchvision's ImageNet
    models were trained on (mean subtracted, divided by the standard deviation per channel)."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut (ResNet-18/34); ``stride`` in the first conv."""

    expansion = 1

    def __init__(
        self, in_channels: int, channels: int, *, stride: int, norm: Norm, groups: int, conv: dict
    ) -> None:
        super().__init__()
        out = channels * self.expansion
        self.conv1 = make_conv(2, in_channels, channels, 3, stride=stride, bias=False, **conv)
        self.bn1 = make_norm(norm, channels, dims=2, groups=groups)
        self.conv2 = make_conv(2, channels, out, 3, bias=False, **conv)
        self.bn2 = make_norm(norm, out, dims=2, groups=groups)
        self.downsample = _shortcut(in_channels, out, stride, norm, groups, conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (``stride`` here, v1.5), 1x1 expand by 4, with a shortcut (ResNet-50)."""

    expansion = 4

    def __init__(
        self, in_channels: int, channels: int, *, stride: int, norm: Norm, groups: int, conv: dict
    ) -> None:
        super().__init__()
        out = channels * self.expansion
        self.conv1 = make_conv(2, in_channels, channels, 1, bias=False, **conv)
        self.bn1 = make_norm(norm, channels, dims=2, groups=groups)
        self.conv2 = make_conv(2, channels, channels, 3, stride=stride, bias=False, **conv)
        self.bn2 = make_norm(norm, channels, dims=2, groups=groups)
        self.conv3 = make_conv(2, channels, out, 1, bias=False, **conv)
        self.bn3 = make_norm(norm, out, dims=2, groups=groups)
        self.downsample = _shortcut(in_channels, out, stride, norm, groups, conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return F.relu(h + (x if self.downsample is None else self.downsample(x)))


def _shortcut(
    in_channels: int, out: int, stride: int, norm: Norm, groups: int, conv: dict
) -> nn.Sequential | None:
    """torchvision's projection shortcut (strided 1x1 conv + norm) where the shape changes."""
    if stride == 1 and in_channels == out:
        return None
    return nn.Sequential(
        make_conv(2, in_channels, out, 1, stride=stride, bias=False, **conv),
        make_norm(norm, out, dims=2, groups=groups),
    )


_BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
}


def _weight(conv: nn.Module) -> torch.Tensor:
    """The stored weight of a conv, below any parametrization (WS, spectral norm)."""
    if parametrize.is_parametrized(conv, "weight"):
        return conv.parametrizations.weight.original
    return conv.weight


class ResNet(nn.Module):
    """A ResNet: 7x7 stride-2 stem, 3x3 stride-2 max pool, four stages, optional pooled head.

    ``(B, in_channels, H, W)`` (already normalised, see :func:`imagenet_normalize`) →
    :meth:`features` ``(B, feature_channels, H/32, W/32)`` (rounded up per stride) →
    ``forward`` ``(B, num_classes)``. ``block`` and ``layers`` pick the depth (see
    :func:`resnet18`, :func:`resnet34`, :func:`resnet50`); the keyword options are described
    in the module docstring. Initialisation follows torchvision (He normal, fan-out, on the
    convolutions; norms at identity); ``zero_init_residual`` starts each block's last norm at
    zero so that every block begins as the identity (Goyal et al. 2017).
    """

    def __init__(
        self,
        block: Block = "basic",
        layers: Sequence[int] = RESNET18_LAYERS,
        *,
        num_classes: int | None = 1000,
        in_channels: int = 3,
        width: int = 64,
        norm: Norm = "batch",
        groups: int = 32,
        weight_standardization: bool = False,
        spectral_norm: bool = False,
        dropout: float = 0.0,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if block not in _BLOCKS:
            raise InputError(f"unknown ResNet block {block!r}; expected 'basic' or 'bottleneck'")
        layers = tuple(int(n) for n in layers)
        if len(layers) != 4 or min(layers) < 1:
            raise InputError(f"a ResNet needs four stages of at least one block, got {layers}")
        if width < 1 or in_channels < 1:
            raise InputError(
                f"ResNet width and in_channels must be positive, got {width}, {in_channels}"
            )
        if not 0.0 <= dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {dropout}")
        self.block = block
        self.layers = layers
        self.in_channels = in_channels
        self.width = width
        self.norm = norm
        self.weight_standardization = weight_standardization
        self.spectral_norm = spectral_norm
        cls = _BLOCKS[block]
        conv = dict(weight_standardization=weight_standardization, spectral_norm=spectral_norm)
        # A.1: the first convolution is not standardised.
        self.conv1 = make_conv(
            2, in_channels, width, 7, stride=2, bias=False, spectral_norm=spectral_norm
        )
        self.bn1 = make_norm(norm, width, dims=2, groups=groups)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = width
        for index, blocks in enumerate(layers):
            planes = width * 2**index
            stage = []
            for b in range(blocks):
                stride = 2 if index > 0 and b == 0 else 1
                stage.append(
                    cls(channels, planes, stride=stride, norm=norm, groups=groups, conv=conv)
                )
                channels = planes * cls.expansion
            self.add_module(f"layer{index + 1}", nn.Sequential(*stage))
        self.feature_channels = channels
        self.num_classes = num_classes
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(channels, num_classes) if num_classes is not None else None
        self._initialise(zero_init_residual)

    def _initialise(self, zero_init_residual: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(_weight(module), mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d | nn.GroupNorm) and module.affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, BasicBlock | Bottleneck):
                    last = module.bn3 if isinstance(module, Bottleneck) else module.bn2
                    if isinstance(last, nn.BatchNorm2d | nn.GroupNorm) and last.affine:
                        nn.init.zeros_(last.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (after ``layer4``), ``(B, feature_channels, h, w)``."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise InputError(
                f"ResNet expects images shaped (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled features through ``dropout`` and ``fc``: ``(B, num_classes)``."""
        if self.fc is None:
            raise InputError(
                "this ResNet was built without a head (num_classes=None); use features()"
            )
        pooled = self.features(x).mean(dim=(2, 3))
        return self.fc(self.dropout(pooled))

    @property
    def imagenet_weights_name(self) -> str | None:
        """Registry name of the ImageNet file this network can load, or None if none fits."""
        published = (
            self.norm == "batch"
            and self.width == 64
            and self.in_channels == 3
            and not self.weight_standardization
            and not self.spectral_norm
        )
        return IMAGENET_WEIGHTS.get((self.block, self.layers)) if published else None

    def load_published(self, state: dict[str, torch.Tensor]) -> None:
        """Load parameters from a state dict keyed like torchvision's file.

        Every parameter and buffer of the trunk must be present with its published shape.
        The ``fc`` head is loaded when its shape matches (1000 classes) and otherwise left as
        initialised, so that a network with its own head starts from the ImageNet trunk.
        """
        own = self.state_dict()
        head = {key for key in own if key.startswith("fc.")}
        missing = [key for key in own if key not in state and key not in head]
        if missing:
            raise InputError(
                f"ResNet: the weights lack {', '.join(missing[:4])}"
                f"{' ...' if len(missing) > 4 else ''} (is it the right file?)"
            )
        wrong = [
            key
            for key in own
            if key not in head and tuple(state[key].shape) != tuple(own[key].shape)
        ]
        if wrong:
            key = wrong[0]
            raise InputError(
                f"ResNet: {key} has shape {tuple(state[key].shape)} in the weights but "
                f"{tuple(own[key].shape)} in the network"
            )
        take_head = all(key in state and state[key].shape == own[key].shape for key in head)
        keys = [key for key in own if key not in head or take_head]
        self.load_state_dict({key: state[key] for key in keys}, strict=not head or take_head)

    def load_imagenet(
        self, path: str | os.PathLike[str] | None = None, *, download: bool = False
    ) -> ResNet:
        """Load torchvision's ImageNet weights for this configuration; returns ``self``.

        The file is found and verified by :func:`neuralhead.weights.load_state_dict` (``path``
        is the file or its directory, else the cache directory); a missing or corrupt file
        raises :class:`~neuralhead.errors.WeightsMissingError` saying how to obtain it.
        Only the published configurations (ResNet-18, ResNet-50; BatchNorm, width 64, plain
        convolutions) have a file; others raise :class:`InputError`.
        """
        name = self.imagenet_weights_name
        if name is None:
            raise InputError(
                f"no ImageNet weights for a ResNet with {self.block} blocks {self.layers}, "
                f"width {self.width}, norm {self.norm!r}"
                f"{', weight standardisation' if self.weight_standardization else ''}"
                f"{', spectral norm' if self.spectral_norm else ''}: only torchvision's "
                "ResNet-18 and ResNet-50 (BatchNorm, width 64, plain convolutions) are published"
            )
        self.load_published(weights.load_state_dict(name, path, download=download))
        return self


def resnet18(**options) -> ResNet:
    """ResNet-18: basic blocks ``(2, 2, 2, 2)``; ``options`` as for :class:`ResNet`."""
    return ResNet("basic", RESNET18_LAYERS, **options)


def resnet34(**options) -> ResNet:
    """ResNet-34: basic blocks ``(3, 4, 6, 3)``; ``options`` as for :class:`ResNet`."""
    return ResNet("basic", RESNET34_LAYERS, **options)


def resnet50(**options) -> ResNet:
    """ResNet-50: bottleneck blocks ``(3, 4, 6, 3)``; ``options`` as for :class:`ResNet`."""
    return ResNet("bottleneck", RESNET50_LAYERS, **options)
