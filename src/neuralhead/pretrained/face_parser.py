"""BiSeNet face parser: per-pixel labels of the 19 CelebAMask-HQ classes, and region masks.

The network is BiSeNet (Yu et al., "BiSeNet: Bilateral Segmentation Network for Real-time
Semantic Segmentation", ECCV 2018) as trained for face parsing on CelebAMask-HQ (Lee et al.,
"MaskGAN: Towards Diverse and Interactive Facial Image Manipulation", CVPR 2020) by
``zllrunning/face-parsing.PyTorch`` (``79999_iter.pth``, MIT). EMOPortraits (supplementary
Sec. 1.3, L_head) takes its eye, mouth and ear masks from this network
(:meth:`FaceParser.masks`); its "foreground" mask serves where targets are masked to the
person.

That release differs from the paper's BiSeNet: the spatial path is deleted and the
ResNet-18's stride-8 features take its place in the feature fusion module; the context path
refines the stride-32 and stride-16 features with attention refinement modules plus a global
average (BiSeNet Sec. 3.2-3.3). It also carries the two auxiliary heads used in training
(``conv_out16``, ``conv_out32``); they are part of the module so that the file loads
strictly, and :meth:`FaceParser.forward` does not compute them. The module is written
without torchvision, with the parameter names of that file (``cp.resnet.conv1.weight``,
``cp.arm16.*``, ``ffm.*``, ``conv_out.*``, ...).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from neuralhead import weights
from neuralhead.errors import InputError
from neuralhead.nn.pretrained import init_frozen_feature_network

#: Side of the square input the network was trained and is run at.
INPUT_SIZE = 512

#: The 19 classes in the model's output order. Index 0 is the background; index ``k + 1``
#: is the ``k``-th CelebAMask-HQ attribute in the list ``atts`` with which
#: face-parsing.PyTorch built its training labels (``prepropess_data.py`` and
#: ``face_dataset.py``: ``for l, att in enumerate(atts, 1)``). ``eye_g`` is eyeglasses,
#: ``ear_r`` earrings, ``neck_l`` a necklace.
CLASSES: tuple[str, ...] = (
    "background",
    "skin",
    "l_brow",
    "r_brow",
    "l_eye",
    "r_eye",
    "eye_g",
    "l_ear",
    "r_ear",
    "ear_r",
    "nose",
    "mouth",
    "u_lip",
    "l_lip",
    "neck",
    "neck_l",
    "cloth",
    "hair",
    "hat",
)
NUM_CLASSES = len(CLASSES)

#: The classes each mask of :meth:`FaceParser.masks` covers. "mouth" is the inner mouth and
#: both lips. Our choices where the papers do not say: "ears" leaves earrings out,
#: "face" is the facial skin with brows, eyes, eyeglasses, nose, mouth and lips (ears, neck
#: and hair are separate), and "foreground" is every class but the background (person,
#: clothes and accessories included).
REGIONS: dict[str, tuple[str, ...]] = {
    "eyes": ("l_eye", "r_eye"),
    "mouth": ("mouth", "u_lip", "l_lip"),
    "ears": ("l_ear", "r_ear"),
    "face": (
        "skin",
        "l_brow",
        "r_brow",
        "l_eye",
        "r_eye",
        "eye_g",
        "nose",
        "mouth",
        "u_lip",
        "l_lip",
    ),
    "hair": ("hair",),
    "foreground": CLASSES[1:],
}

_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, the reference test.py's normalisation
_STD = (0.229, 0.224, 0.225)


def region_masks(
    labels: torch.Tensor, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Masks ``(B, 1, H, W)`` of value 0 or 1, one per entry of :data:`REGIONS`, from a label
    map ``(B, H, W)`` of class indices into :data:`CLASSES`."""
    if labels.ndim != 3:
        raise InputError(f"expected a label map shaped (B, H, W), got {tuple(labels.shape)}")
    masks = {}
    for region, names in REGIONS.items():
        indices = torch.tensor([CLASSES.index(n) for n in names], device=labels.device)
        masks[region] = torch.isin(labels, indices).unsqueeze(1).to(dtype)
    return masks


class ConvBNReLU(nn.Module):
    """Convolution without bias, batch norm and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """ResNet-18 residual block (He et al., CVPR 2016, Fig. 2): two 3x3 convolutions with
    batch norm, a 1x1 projection shortcut where the shape changes, ReLU after the sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


def _stage(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        BasicBlock(in_channels, out_channels, stride), BasicBlock(out_channels, out_channels)
    )


class ResNet18(nn.Module):
    """ResNet-18 trunk without its classifier; returns the stride-8, -16 and -32 features
    (128, 256 and 512 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = _stage(64, 64, 1)
        self.layer2 = _stage(64, 128, 2)
        self.layer3 = _stage(128, 256, 2)
        self.layer4 = _stage(256, 512, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), kernel_size=3, stride=2, padding=1)
        feat8 = self.layer2(self.layer1(x))
        feat16 = self.layer3(feat8)
        return feat8, feat16, self.layer4(feat16)


class AttentionRefinementModule(nn.Module):
    """BiSeNet Sec. 3.3, Fig. 2(b): a 3x3 ConvBNReLU, then the features reweighted per
    channel by a sigmoid of their global average (1x1 conv and batch norm)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_channels, out_channels)
        self.conv_atten = nn.Conv2d(out_channels, out_channels, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        attention = self.bn_atten(self.conv_atten(feat.mean(dim=(2, 3), keepdim=True)))
        return feat * torch.sigmoid(attention)


class ContextPath(nn.Module):
    """BiSeNet Sec. 3.2: the ResNet-18 trunk; the stride-32 features refined and added to
    their projected global average, upsampled (nearest) to stride 16, added to the refined
    stride-16 features, upsampled to stride 8. Returns the trunk's stride-8 features (which
    replace the spatial path in this release) and the context at strides 8 and 16."""

    def __init__(self) -> None:
        super().__init__()
        self.resnet = ResNet18()
        self.arm16 = AttentionRefinementModule(256, 128)
        self.arm32 = AttentionRefinementModule(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128)
        self.conv_head16 = ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        # The projected global average broadcasts over the stride-32 grid (the reference
        # upsamples the 1x1 map with nearest neighbours, which is the same).
        context = self.arm32(feat32) + self.conv_avg(feat32.mean(dim=(2, 3), keepdim=True))
        cp16 = self.conv_head32(F.interpolate(context, size=feat16.shape[-2:], mode="nearest"))
        context = self.arm16(feat16) + cp16
        cp8 = self.conv_head16(F.interpolate(context, size=feat8.shape[-2:], mode="nearest"))
        return feat8, cp8, cp16


class FeatureFusionModule(nn.Module):
    """BiSeNet Sec. 3.4, Fig. 2(c): concatenation, a 1x1 ConvBNReLU, then the features plus
    themselves reweighted by a channel attention (global average, 1x1 conv to a quarter of
    the width, ReLU, 1x1 conv, sigmoid)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.convblk = ConvBNReLU(in_channels, out_channels, kernel_size=1)
        self.conv1 = nn.Conv2d(out_channels, out_channels // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(out_channels // 4, out_channels, 1, bias=False)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([spatial, context], dim=1))
        attention = feat.mean(dim=(2, 3), keepdim=True)
        attention = torch.sigmoid(self.conv2(F.relu(self.conv1(attention))))
        return feat + feat * attention


class BiSeNetOutput(nn.Module):
    """Segmentation head: 3x3 ConvBNReLU, then a 1x1 convolution to the class logits."""

    def __init__(self, in_channels: int, mid_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_channels, mid_channels)
        self.conv_out = nn.Conv2d(mid_channels, num_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class FaceParser(nn.Module):
    """Face parsing: RGB images in ``[0, 1]`` to logits of the 19 :data:`CLASSES`.

    ``forward`` takes ``(B, 3, H, W)`` float images of a face (a portrait crop, as in
    CelebAMask-HQ), resizes them to 512x512 (bilinear with antialiasing, like the PIL resize
    of the reference ``test.py``), normalises them with the ImageNet statistics and returns
    logits ``(B, 19, H, W)``: the stride-8 logits upsampled straight to the input size
    (bilinear, ``align_corners=True`` as the reference does to 512x512; one resize instead
    of two is our choice for other sizes). :meth:`masks` turns them into region masks.

    A fresh module has random weights (for tests); :meth:`from_pretrained` loads the
    published ones. Parameters are frozen and the module never leaves evaluation mode.
    """

    def __init__(self) -> None:
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusionModule(256, 256)
        self.conv_out = BiSeNetOutput(256, 256, NUM_CLASSES)
        self.conv_out16 = BiSeNetOutput(128, 64, NUM_CLASSES)
        self.conv_out32 = BiSeNetOutput(128, 64, NUM_CLASSES)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)
        # Our choice for untrained networks (the tests'), as the reference initialises its
        # convolutions before training: He initialisation with a = 1.
        init_frozen_feature_network(self, a=1)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str] | None = None, *, download: bool = False
    ) -> FaceParser:
        """The network with the published weights (registry entry ``face-parser-bisenet``).

        The file is found and verified by :func:`neuralhead.weights.load_state_dict` (an
        explicit ``path``, else the cache directory; ``download=True`` fetches it there); a
        missing or corrupt file raises :class:`~neuralhead.errors.WeightsMissingError` saying
        how to obtain it.
        """
        model = cls()
        state = weights.load_state_dict(FACE_PARSER_BISENET.name, path, download=download)
        model.load_state_dict(state, strict=True)
        return model

    def train(self, mode: bool = True) -> FaceParser:
        """Stay in evaluation mode whatever ``mode`` says (see the class docstring)."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(
                f"FaceParser expects RGB images shaped (B, 3, H, W), got {tuple(images.shape)}"
            )
        size = images.shape[-2:]
        x = images.to(self.mean.dtype)
        if size != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(
                x,
                size=(INPUT_SIZE, INPUT_SIZE),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        x = (x - self.mean) / self.std
        feat8, cp8, _ = self.cp(x)
        logits = self.conv_out(self.ffm(feat8, cp8))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)

    @torch.no_grad()
    def masks(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Region masks of ``images`` ``(B, 3, H, W)`` in ``[0, 1]``: a dict with the keys of
        :data:`REGIONS` (``"eyes"``, ``"mouth"``, ``"ears"``, ``"face"``, ``"hair"``,
        ``"foreground"``), each ``(B, 1, H, W)`` in the input's dtype, 1 where the most likely
        class belongs to the region and 0 elsewhere."""
        labels = self(images).argmax(dim=1)
        dtype = images.dtype if images.is_floating_point() else torch.float32
        return region_masks(labels, dtype)


FACE_PARSER_BISENET = weights.WeightFile(
    name="face-parser-bisenet",
    filename="79999_iter.pth",
    # Digest and size of 79999_iter.pth as recorded by several independent public projects
    # that verify it (we cannot fetch it here to hash it ourselves). The authors share it on
    # Google Drive only; facexlib re-publishes the same bytes (same digest) as
    # parsing_bisenet.pth in a GitHub release, which is the URL used here.
    sha256="468e13ca13a9b43cc0881a9f99083a430e9c0a38abd935431d1c28ee94b26567",
    url="https://github.com/xinntao/facexlib/releases/download/v0.2.0/parsing_bisenet.pth",
    license="MIT (face-parsing.PyTorch, facexlib); trained on CelebAMask-HQ, whose terms "
    "allow non-commercial research use only",
    used_by="neuralhead.pretrained.face_parser.FaceParser (eye/mouth/ear and foreground masks)",
    description="BiSeNet face parser (ResNet-18 context path) trained on CelebAMask-HQ by "
    "face-parsing.PyTorch, 19 classes; identical to facexlib's parsing_bisenet.pth",
    size=53_289_463,
)

weights.register_weights(FACE_PARSER_BISENET)
