"""CSIM: identity preservation as the cosine similarity of face-recognition embeddings.

HeadGAN (Appendix E, "Cosine Similarity") computes ArcFace (Deng et al., CVPR 2019)
embeddings of each generated frame and of the corresponding driving frame and averages
their cosine similarity over the data set; in cross-reenactment, where there is no ground
truth, every generated frame is compared with the one source image instead. MegaPortraits
(Sec. 4.3) and EmoPortraits (Sec. 6.1) report the same measure. 1 is the same identity
embedding, higher is better.

The network is :class:`neuralhead.pretrained.arcface.ArcFace` (registry entry
:data:`ARCFACE_WEIGHTS`), or any module with its call signature: RGB images ``(B, 3, H, W)``
in ``[0, 1]`` in, embeddings ``(B, D)`` out. Frames are given to it whole: the network does
its own resizing, and a portrait crop as neuralhead prepares it is centred on the face.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

#: Registry name of the ArcFace weights (:mod:`neuralhead.weights`).
ARCFACE_WEIGHTS = "arcface-r100-ms1mv3"

#: Images per forward pass in :class:`CSIM`; our choice, small enough for a CPU.
DEFAULT_BATCH_SIZE = 16


def _check_images(images: torch.Tensor, name: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected {name} as RGB images (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"expected {name} as float images in [0, 1], got {images.dtype}")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError(
            f"expected {name} in [0, 1], got values in [{float(images.min()):.3g}, "
            f"{float(images.max()):.3g}]"
        )


def _device(network: nn.Module) -> torch.device:
    parameter = next(network.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def identity_embeddings(images: torch.Tensor, network: nn.Module) -> torch.Tensor:
    """Unit-length identity embeddings ``(B, D)`` of images ``(B, 3, H, W)`` in ``[0, 1]``.

    The network's output is normalised again, so a module that does not normalise (an
    untrained stand-in) gives cosine similarities all the same.
    """
    _check_images(images, "images")
    embeddings = network(images.to(_device(network)))
    return F.normalize(embeddings.float(), dim=-1)


def csim(pred: torch.Tensor, target: torch.Tensor, network: nn.Module) -> torch.Tensor:
    """Cosine similarity of identity embeddings, one value per pair, ``(B,)`` in [-1, 1].

    ``pred`` is ``(B, 3, H, W)`` in ``[0, 1]``; ``target`` has the same shape, or one image
    ``(1, 3, H', W')`` that every ``pred`` image is compared with (HeadGAN's reenactment
    protocol, where the source image is the only reference). Gradients reach ``pred``, so the
    function also serves as an identity loss (``1 - csim``).
    """
    _check_images(pred, "pred")
    _check_images(target, "target")
    if target.shape[0] != 1 and target.shape != pred.shape:
        raise ValueError(
            "target must have the shape of pred or be a single reference image, got "
            f"{tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if target.shape == pred.shape:
        # One pass over both: half the per-call overhead of two.
        u, v = identity_embeddings(torch.cat([pred, target]), network).split(pred.shape[0])
    else:
        u, v = identity_embeddings(pred, network), identity_embeddings(target, network)
    return (u * v).sum(dim=-1)


class CSIM:
    """Running mean of :func:`csim` over batches, for evaluation scripts and training loops.

    ``update(pred, target)`` adds one similarity per pair (``batch_size`` images per forward
    pass, without gradients) and returns them; :meth:`compute` is their mean over everything
    added since construction or :meth:`reset`.
    """

    def __init__(self, network: nn.Module, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.network = network
        self.batch_size = batch_size
        self.reset()

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        download: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> CSIM:
        """A :class:`CSIM` on ArcFace IResNet-100 with its released weights (an explicit
        ``path``, else the cache directory); raises
        :class:`~neuralhead.errors.WeightsMissingError` saying how to obtain the file when
        it is absent."""
        from neuralhead.pretrained.arcface import ArcFace

        return cls(ArcFace.from_pretrained(path, download=download), batch_size)

    def reset(self) -> None:
        self.total = 0.0
        self.count = 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Add the similarities of a batch of pairs (see :func:`csim`); returns them, ``(B,)``."""
        chunks = []
        for start in range(0, pred.shape[0], self.batch_size):
            stop = start + self.batch_size
            reference = target if target.shape[0] == 1 else target[start:stop]
            chunks.append(csim(pred[start:stop], reference, self.network).cpu())
        values = torch.cat(chunks) if chunks else torch.zeros(0)
        self.total += float(values.double().sum())
        self.count += values.numel()
        return values

    def compute(self) -> float:
        """Mean similarity over every pair added so far."""
        if self.count == 0:
            raise ValueError("CSIM: no images were added")
        return self.total / self.count
