"""InceptionV3 in the variant that FID is defined with.

The network is the Inception-v3 of Szegedy et al., "Rethinking the Inception Architecture
for Computer Vision", CVPR 2016, as frozen in TensorFlow's ``inception-2015-12-05`` graph:
the graph Heusel et al. ("GANs Trained by a Two Time-Scale Update Rule Converge to a Local
Nash Equilibrium", NeurIPS 2017) took FID's features from. Its weights were ported to
PyTorch by the pytorch-fid project (``pt_inception-2015-12-05-6726825d.pth``, Apache-2.0);
this module is written without torchvision, with the parameter names of that file, so it
loads unchanged and strictly through :mod:`neuralhead.weights`.

That graph differs from the Inception-v3 of torchvision (and of the paper) in ways that
change FID, reproduced here: its average pools leave the zero padding out of the average
(``count_include_pad=False``), the pool branch of the last block (``Mixed_7c``) is a max
pool, and its classifier has 1008 outputs and no auxiliary head.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from neuralhead import weights
from neuralhead.nn.pretrained import init_frozen_feature_network

#: Side of the square input the network was trained at; images are resized to it.
INPUT_SIZE = 299
#: Width of the pooled features FID is computed on.
FEATURE_DIM = 2048
#: Outputs of the published classifier: the 1000 ImageNet classes and 8 unused ones
#: (TensorFlow's 2015 graph).
NUM_CLASSES = 1008

_BN_EPS = 0.001

_Size = int | tuple[int, int]


class BasicConv2d(nn.Module):
    """Convolution without bias, batch normalisation (eps 0.001, TensorFlow's) and ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _Size,
        stride: int = 1,
        padding: _Size = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=_BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's "SAME" average pool divides by the number of real pixels under the window,
    # not by 9: count_include_pad=False is what makes the border features match the graph.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Szegedy et al. 2016, Fig. 5; the published graph keeps a 5x5 branch
    beside the double 3x3 one)."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ]
        return torch.cat(branches, 1)


class InceptionB(nn.Module):
    """Grid reduction 35x35 -> 17x17 (Szegedy et al. 2016, Sec. 5 and Fig. 10)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ]
        return torch.cat(branches, 1)


class InceptionC(nn.Module):
    """17x17 block with 7x7 convolutions factorised into 1x7 and 7x1 (Szegedy et al. 2016,
    Fig. 6); ``channels_7x7`` is the width inside the factorised branches."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = self.branch7x7dbl_1(x)
        for layer in (
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            double = layer(double)
        branches = [self.branch1x1(x), single, double, self.branch_pool(_avg_pool(x))]
        return torch.cat(branches, 1)


class InceptionD(nn.Module):
    """Grid reduction 17x17 -> 8x8 (Szegedy et al. 2016, Sec. 5)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tower = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            tower = layer(tower)
        branches = [
            self.branch3x3_2(self.branch3x3_1(x)),
            tower,
            F.max_pool2d(x, kernel_size=3, stride=2),
        ]
        return torch.cat(branches, 1)


class InceptionE(nn.Module):
    """8x8 block with expanded filter banks (Szegedy et al. 2016, Fig. 7).

    ``pool`` is the pool branch's pooling: ``"avg"`` in ``Mixed_7b``; ``"max"`` in
    ``Mixed_7c``, where TensorFlow's 2015 graph (and so FID) uses a max pool although the
    paper describes an average pool.
    """

    def __init__(self, in_channels: int, pool: Literal["avg", "max"]) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        narrow = self.branch3x3_1(x)
        wide = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.pool == "avg":
            pooled = _avg_pool(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        branches = [
            self.branch1x1(x),
            self.branch3x3_2a(narrow),
            self.branch3x3_2b(narrow),
            self.branch3x3dbl_3a(wide),
            self.branch3x3dbl_3b(wide),
            self.branch_pool(pooled),
        ]
        return torch.cat(branches, 1)


class FIDInceptionV3(nn.Module):
    """The FID feature network: images in ``[0, 1]`` to 2048 pooled Inception features.

    ``forward`` takes RGB images ``(N, 3, H, W)`` in ``[0, 1]`` of any size, resizes them
    bilinearly to 299x299 (``align_corners=False``, as pytorch-fid does; the original
    TensorFlow code resized differently, which is why FIDs from the two implementations
    differ slightly), maps them to ``[-1, 1]`` and returns the global average of the last
    block's activations, ``(N, 2048)`` float32.

    Layout (Szegedy et al. 2016, Table 1): a stem of five convolutions and two max pools,
    three :class:`InceptionA` blocks, a reduction, four :class:`InceptionC` blocks, a
    reduction and two :class:`InceptionE` blocks. A fresh module has random weights (fine
    for tests, meaningless as a metric); :meth:`from_pretrained` loads the published ones.
    Parameters are frozen and the module never leaves evaluation mode: batch statistics
    would make the features depend on what else is in the batch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        # FID does not use the classifier; it is part of the module so that the published
        # file loads with strict=True, which proves that every tensor in it found its place.
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        # Our choice for untrained networks (the tests'): He initialisation keeps the
        # activations at a usable scale through the 94 convolutions.
        init_frozen_feature_network(self)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str] | None = None, *, download: bool = False
    ) -> FIDInceptionV3:
        """The network with the published weights (registry entry ``inception-v3-fid``).

        The file is found and verified by :func:`neuralhead.weights.load_state_dict` (an
        explicit ``path``, else the cache directory); a missing or corrupt file raises
        :class:`~neuralhead.errors.WeightsMissingError` saying how to obtain it.
        """
        model = cls()
        model.load_state_dict(
            weights.load_state_dict("inception-v3-fid", path, download=download), strict=True
        )
        return model

    def train(self, mode: bool = True) -> FIDInceptionV3:
        """Stay in evaluation mode whatever ``mode`` says (see the class docstring)."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images shaped (N, 3, H, W), got {tuple(images.shape)}")
        x = images.to(self.fc.weight.dtype)
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2.0 * x - 1.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
