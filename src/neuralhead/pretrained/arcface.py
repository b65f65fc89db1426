"""ArcFace face-recognition network, for identity similarity (CSIM) and identity losses.

The embedding network of Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face
Recognition", CVPR 2019, in the form insightface's ``arcface_torch`` publishes it: the "IR"
ResNet the ArcFace paper trains (residual unit BN-conv-BN-PReLU-conv-BN, embedding head
BN-flatten-FC-BN), mapping a 112x112 aligned face to a 512-d embedding. HeadGAN (Appendix E),
Dynamic Neural Portraits (Sec. 4), MegaPortraits (Sec. 4.3) and EMOPortraits (Sec. 6.1)
measure identity preservation as the cosine similarity of these embeddings.

The module is written without torchvision or insightface, with the parameter names of
``arcface_torch``'s ``backbone.pth`` files (``conv1.weight``, ``bn1.*``, ``prelu.weight``,
``layer1.0.bn1.*``, ..., ``bn2.*``, ``fc.*``, ``features.*``), so the released MS1MV3 models
(``ms1mv3_arcface_{r18,r34,r50,r100}_fp16``) load unchanged once converted to safetensors.
insightface shares them only through a cloud folder without published digests, so their
registry entries are unpinned safetensors files whose ``obtain`` text gives the conversion
command. insightface's pretrained models are licensed for non-commercial research only.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from neuralhead import weights
from neuralhead.errors import InputError
from neuralhead.nn.pretrained import init_frozen_feature_network

#: Side of the aligned face crop the released models were trained on (insightface's
#: 5-point template); inputs are resized to it.
INPUT_SIZE = 112
#: Width of the identity embedding.
EMBEDDING_DIM = 512
#: Residual blocks per stage for each released depth (``arcface_torch/backbones/iresnet.py``).
ARCH_BLOCKS: dict[str, tuple[int, int, int, int]] = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
}

_STAGE_WIDTHS = (64, 128, 256, 512)
# Four stride-2 stages take the 112x112 input to the 7x7 grid that ``fc`` flattens.
_GRID = INPUT_SIZE // 16


def weights_name(arch: str) -> str:
    """Registry name of the released MS1MV3 ArcFace model of depth ``arch``."""
    return f"arcface-{arch}-ms1mv3"


class IBasicBlock(nn.Module):
    """IResNet residual block: BN, 3x3 conv, BN, PReLU, 3x3 conv (stride here), BN, plus the
    shortcut (a strided 1x1 conv and BN where the shape changes). No activation after the sum,
    unlike the original ResNet."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


def _stage(in_channels: int, channels: int, blocks: int) -> nn.Sequential:
    layers = [IBasicBlock(in_channels, channels, stride=2)]
    layers += [IBasicBlock(channels, channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ArcFace(nn.Module):
    """Identity embeddings: RGB faces in ``[0, 1]`` to unit-length 512-d vectors.

    ``forward`` takes ``(B, 3, H, W)`` float images of roughly aligned face crops (the
    released models were trained on crops aligned to insightface's 5-point template; a
    portrait crop centred on the face works, with somewhat lower similarities), resizes them
    to 112x112, maps ``[0, 1]`` to ``[-1, 1]`` as ``arcface_torch``'s ``inference.py`` does
    and returns L2-normalised embeddings ``(B, 512)``. The resize is bilinear with
    antialiasing (our choice: insightface resizes with OpenCV's unfiltered bilinear, which
    aliases when a 256 or 512 generator output is shrunk to 112). Gradients reach the input,
    so ``1 - (a * b).sum(-1)`` serves as an identity loss.

    ``arch`` picks the depth of the released models (``"r18"``, ``"r34"``, ``"r50"``,
    ``"r100"``). A fresh module has random weights (for tests); :meth:`from_pretrained` loads
    the released ones. Parameters are frozen and the module never leaves evaluation mode: its
    batch-norm statistics are part of the trained model.
    """

    def __init__(self, arch: str = "r100") -> None:
        super().__init__()
        if arch not in ARCH_BLOCKS:
            raise InputError(f"unknown ArcFace arch {arch!r}; choose from {', '.join(ARCH_BLOCKS)}")
        self.arch = arch
        self.conv1 = nn.Conv2d(3, _STAGE_WIDTHS[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STAGE_WIDTHS[0])
        self.prelu = nn.PReLU(_STAGE_WIDTHS[0])
        widths = (_STAGE_WIDTHS[0], *_STAGE_WIDTHS)
        blocks = ARCH_BLOCKS[arch]
        self.layer1 = _stage(widths[0], widths[1], blocks[0])
        self.layer2 = _stage(widths[1], widths[2], blocks[1])
        self.layer3 = _stage(widths[2], widths[3], blocks[2])
        self.layer4 = _stage(widths[3], widths[4], blocks[3])
        self.bn2 = nn.BatchNorm2d(_STAGE_WIDTHS[-1])
        self.fc = nn.Linear(_STAGE_WIDTHS[-1] * _GRID * _GRID, EMBEDDING_DIM)
        self.features = nn.BatchNorm1d(EMBEDDING_DIM)
        # Our choice for untrained networks (the tests'): He initialisation keeps activations
        # at a usable scale; the released weights replace it.
        init_frozen_feature_network(self)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        download: bool = False,
        arch: str = "r100",
    ) -> ArcFace:
        """The network of depth ``arch`` with the released MS1MV3 weights (registry entry
        ``arcface-{arch}-ms1mv3``, e.g. ``arcface-r100-ms1mv3``).

        ``path`` is the converted ``.safetensors`` file or a directory holding it; without it
        the cache directory is searched. A missing file raises
        :class:`~neuralhead.errors.WeightsMissingError` that says where the original is
        published and how to convert it. ``download`` is accepted for a uniform interface;
        these files have no pinned download, so it cannot fetch them.
        """
        model = cls(arch)
        state = weights.load_state_dict(weights_name(arch), path, download=download)
        model.load_state_dict(state, strict=True)
        return model

    def train(self, mode: bool = True) -> ArcFace:
        """Stay in evaluation mode whatever ``mode`` says (see the class docstring)."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(
                f"ArcFace expects RGB images shaped (B, 3, H, W), got {tuple(images.shape)}"
            )
        x = images.to(self.fc.weight.dtype)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(
                x,
                size=(INPUT_SIZE, INPUT_SIZE),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        x = 2.0 * x - 1.0
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.features(self.fc(torch.flatten(self.bn2(x), 1)))
        return F.normalize(x, dim=1)


def _convert_command(arch: str) -> str:
    target = f"{weights_name(arch)}.safetensors"
    return (
        'python -c "import torch; from safetensors.torch import save_file; '
        "s = torch.load('backbone.pth', map_location='cpu', weights_only=True); "
        f"save_file({{k: v.contiguous() for k, v in s.items()}}, '{target}')\""
    )


def _weight_file(arch: str) -> weights.WeightFile:
    depth = arch[1:]
    release = f"ms1mv3_arcface_{arch}_fp16"
    return weights.WeightFile(
        name=weights_name(arch),
        filename=f"{weights_name(arch)}.safetensors",
        sha256=None,
        url=None,
        license="insightface pretrained models: non-commercial research use only "
        "(the arcface_torch code is MIT)",
        used_by="neuralhead.pretrained.arcface.ArcFace (CSIM, identity losses)",
        description=f"insightface arcface_torch IResNet-{depth} trained with the ArcFace loss "
        f"on MS1MV3 ({release}/backbone.pth), converted to safetensors",
        obtain=f"insightface publishes {release}/backbone.pth only through the model-zoo "
        "cloud folder linked from recognition/arcface_torch/README.md in "
        "github.com/deepinsight/insightface, with no digest to pin. Download it and convert "
        f"it in the same directory: {_convert_command(arch)}.",
    )


#: Registry entries of the released MS1MV3 models, by depth.
WEIGHT_FILES: dict[str, weights.WeightFile] = {arch: _weight_file(arch) for arch in ARCH_BLOCKS}
for _entry in WEIGHT_FILES.values():
    weights.register_weights(_entry)
