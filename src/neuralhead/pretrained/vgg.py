"""VGG16 and VGG19 (Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale
Image Recognition", ICLR 2015, configurations D and E) as multi-layer feature extractors.

MegaPortraits (Sec. 3.2, "perceptual losses") matches ImageNet-trained VGG19 features of the
predicted and ground-truth images; LPIPS and the gaze network of MegaPortraits App. B.5 are
built on VGG16. The networks are written without torchvision, with the parameter names of
torchvision's ``vgg16().features`` / ``vgg19().features`` (``features.<index>.weight``), so
that torchvision's published ImageNet files load unchanged through :mod:`neuralhead.weights`.

Layers are named as in the paper's tables: ``conv<block>_<n>``, ``relu<block>_<n>`` and
``pool<block>``. A network is built only as deep as the deepest layer it is asked for.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import ClassVar, TypeVar

import torch
from torch import nn

from neuralhead import weights
from neuralhead.errors import InputError

#: Convolutions per block: configuration D (VGG16) and E (VGG19) of Simonyan & Zisserman.
VGG16_BLOCKS = (2, 2, 3, 3, 3)
VGG19_BLOCKS = (2, 2, 4, 4, 4)
_BLOCK_CHANNELS = (64, 128, 256, 512, 512)

#: The inputs torchvision's ImageNet models were trained on: RGB in [0, 1], normalised with
#: the ImageNet mean and standard deviation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

VGG19_IMAGENET = weights.WeightFile(
    name="vgg19-imagenet",
    filename="vgg19-dcbb9e9d.pth",
    # torchvision names the file after the first 8 hex digits of this digest. The full
    # digest and size are those recorded by several independent public projects that verify
    # this download (we cannot fetch the 575 MB file here to hash it ourselves).
    sha256="dcbb9e9dad569fff7a846263a77324fc34978fea2bfb039c012d710e1776ae44",
    url="https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
    license="BSD-3-Clause (torchvision)",
    used_by="neuralhead.pretrained.vgg.VGG19 (ImageNet perceptual loss)",
    description="torchvision VGG19 trained on ImageNet-1k (VGG19_Weights.IMAGENET1K_V1)",
    size=574_673_361,
)
weights.register_weights(VGG19_IMAGENET)

V = TypeVar("V", bound="VGGFeatures")


def vgg_layer_names(blocks: Sequence[int]) -> tuple[str, ...]:
    """Names of the layers of a VGG trunk in execution order: every convolution is followed by
    its ReLU and every block ends with a 2x2 max pool, which is also torchvision's indexing."""
    names = []
    for block, convs in enumerate(blocks, start=1):
        for index in range(1, convs + 1):
            names += [f"conv{block}_{index}", f"relu{block}_{index}"]
        names.append(f"pool{block}")
    return tuple(names)


def scaled_channels(channels: int, width: float) -> int:
    """``channels`` times the width multiplier, at least 1."""
    return max(1, round(channels * width))


def build_vgg_layers(
    blocks: Sequence[int], depth: int, *, width: float = 1.0
) -> list[tuple[str, nn.Module]]:
    """The first ``depth`` layers of a VGG trunk as ``(name, module)`` pairs.

    ``width`` scales every channel count (1 = the published network); smaller widths exist
    for tests and experiments and cannot load published weights. Convolutions get
    torchvision's initialisation (He normal, fan-out; zero bias), so that an untrained trunk
    still has activations of a sensible scale through all its layers.
    """
    layers: list[tuple[str, nn.Module]] = []
    channels = 3
    for name in vgg_layer_names(blocks)[:depth]:
        if name.startswith("conv"):
            block = int(name[4 : name.index("_")])
            out = scaled_channels(_BLOCK_CHANNELS[block - 1], width)
            conv = nn.Conv2d(channels, out, kernel_size=3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers.append((name, conv))
            channels = out
        elif name.startswith("relu"):
            layers.append((name, nn.ReLU()))
        else:
            layers.append((name, nn.MaxPool2d(kernel_size=2, stride=2)))
    return layers


class VGGFeatures(nn.Module):
    """Shared definition of the VGG feature extractors: validates the requested layers, builds
    the trunk up to the deepest one, normalises the input and collects the activations.

    Subclasses set the configuration (:attr:`blocks`), the default layers, the input
    normalisation the published weights expect (``x * input_scale`` minus ``mean``, divided
    by ``std``), the registry entry of their weight file and how the trunk's modules are
    stored (which fixes the parameter names).
    """

    blocks: ClassVar[tuple[int, ...]]
    default_layers: ClassVar[tuple[str, ...]]
    weights_name: ClassVar[str]
    input_scale: ClassVar[float] = 1.0
    mean: ClassVar[tuple[float, float, float]] = IMAGENET_MEAN
    std: ClassVar[tuple[float, float, float]] = IMAGENET_STD

    def __init__(self, layers: Sequence[str] | None = None, *, width: float = 1.0) -> None:
        super().__init__()
        names = vgg_layer_names(self.blocks)
        if isinstance(layers, str):
            layers = (layers,)
        layers = tuple(self.default_layers if layers is None else layers)
        if not layers:
            raise InputError(
                f"{type(self).__name__}: give at least one layer; valid: {', '.join(names)}"
            )
        unknown = [name for name in layers if name not in names]
        if unknown:
            raise InputError(
                f"{type(self).__name__}: unknown layer(s) {', '.join(map(repr, unknown))}; "
                f"valid: {', '.join(names)}"
            )
        if width <= 0:
            raise InputError(f"{type(self).__name__}: width must be positive, got {width}")
        self.layers = layers
        self.width = width
        self._taps = tuple(names.index(name) for name in layers)
        depth = max(self._taps) + 1
        self._pools = sum(name.startswith("pool") for name in names[:depth])
        self._install(build_vgg_layers(self.blocks, depth, width=width))
        # Constants, not weights: kept out of the state dict so that it holds exactly the
        # parameters of the published file.
        shift = torch.tensor(self.mean).view(1, 3, 1, 1)
        scale = torch.tensor(self.std).view(1, 3, 1, 1)
        self.register_buffer("input_mean", shift, persistent=False)
        self.register_buffer("input_std", scale, persistent=False)

    def _install(self, layers: list[tuple[str, nn.Module]]) -> None:
        """Store the trunk as torchvision does: ``features.<index>``."""
        self.features = nn.Sequential(*(module for _, module in layers))

    def _trunk(self) -> Iterable[nn.Module]:
        return self.features

    def out_channels(self) -> list[int]:
        """Channels of each requested layer's activation, in the order of :attr:`layers`."""
        channels, per_index = 3, []
        for module in self._trunk():
            if isinstance(module, nn.Conv2d):
                channels = module.out_channels
            per_index.append(channels)
        return [per_index[index] for index in self._taps]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map RGB images in ``[0, 1]`` to the input the published weights expect."""
        return (images * self.input_scale - self.input_mean) / self.input_std

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Activations of the requested layers for RGB ``images`` ``(B, 3, H, W)`` in ``[0, 1]``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(
                f"{type(self).__name__} expects RGB images shaped (B, 3, H, W), "
                f"got {tuple(images.shape)}"
            )
        smallest = 2**self._pools
        if min(images.shape[-2:]) < smallest:
            raise InputError(
                f"{type(self).__name__}: layer(s) {', '.join(self.layers)} pool {self._pools} "
                f"times and need images of at least {smallest}x{smallest} pixels, got "
                f"{images.shape[-2]}x{images.shape[-1]}"
            )
        return self.extract(self.normalize(images.to(self.input_mean.dtype)))

    def extract(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Run the trunk on an input that is already normalised; return the requested layers."""
        found: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(self._trunk()):
            x = layer(x)
            if index in self._taps:
                found[index] = x
        return [found[index] for index in self._taps]

    def load_published(self, state: dict[str, torch.Tensor]) -> None:
        """Load this trunk's parameters from a state dict keyed like the published file.

        Entries the truncated trunk does not have (deeper layers, the classifier) are
        ignored; every parameter of the trunk must be present with its published shape.
        """
        own = self.state_dict()
        missing = [key for key in own if key not in state]
        if missing:
            raise InputError(
                f"{type(self).__name__}: the weights lack {', '.join(missing[:4])}"
                f"{' ...' if len(missing) > 4 else ''} (is it the right file?)"
            )
        wrong = [key for key in own if tuple(state[key].shape) != tuple(own[key].shape)]
        if wrong:
            key = wrong[0]
            raise InputError(
                f"{type(self).__name__}: {key} has shape {tuple(state[key].shape)} in the "
                f"weights but {tuple(own[key].shape)} in the network (width {self.width})"
            )
        self.load_state_dict({key: state[key] for key in own}, strict=True)

    @classmethod
    def from_pretrained(
        cls: type[V],
        path: str | os.PathLike[str] | None = None,
        *,
        download: bool = False,
        layers: Sequence[str] | None = None,
    ) -> V:
        """The network with its published weights, in eval mode and frozen.

        The file is found and verified by :func:`neuralhead.weights.load_state_dict` (``path``
        is the file or its directory, else the cache directory); a missing or corrupt file
        raises :class:`~neuralhead.errors.WeightsMissingError` saying how to obtain it.
        """
        model = cls(layers)
        model.load_published(weights.load_state_dict(cls.weights_name, path, download=download))
        model.eval()
        model.requires_grad_(False)
        return model


class VGG19(VGGFeatures):
    """VGG19 (configuration E) features of ImageNet-normalised RGB images.

    The default layers relu1_1 ... relu5_1 are those of the ImageNet perceptual loss of
    MegaPortraits (Sec. 3.2) as weighted in the authors' code, and of Johnson et al. 2016.
    Weights: torchvision's ImageNet file (``vgg19-imagenet``).
    """

    blocks = VGG19_BLOCKS
    default_layers = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
    weights_name = "vgg19-imagenet"


class VGG16(VGGFeatures):
    """VGG16 (configuration D) features of ImageNet-normalised RGB images.

    The default layers relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 are those LPIPS uses.
    Weights: torchvision's ImageNet file (``vgg16-imagenet``).
    """

    blocks = VGG16_BLOCKS
    default_layers = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
    weights_name = "vgg16-imagenet"
