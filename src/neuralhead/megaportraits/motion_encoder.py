"""The motion encoder E_mtn of MegaPortraits (Sec. 3.1, Fig. 2; A.1): two ResNet-18s.

* :class:`HeadPoseNetwork` regresses the head rotation ``R``, translation ``t`` and scale
  from the image. The paper uses "a pre-trained network to estimate head rotation data"
  (Sec. 3.1); the authors' code trains a ResNet-18 on a 128x128 crop against similarity
  transforms fitted between detected 3D landmarks and a canonical template (implementation
  notes), which is exactly what our tracker stores in a prepared dataset's ``pose.npy``
  (docs/dataset.md, "Head pose"). :mod:`neuralhead.megaportraits.pose_training` trains it;
  the base model then keeps it frozen.
* :class:`ExpressionEncoder` computes the latent expression code ``z`` from a face crop
  "aligned with the predicted pose" (notes), 128x128, with dropout 0.2 before its last layer
  (notes); it is trained from scratch with the base model (A.1).

Pose conventions are the tracker's (docs/dataset.md): ``pose = (pitch, yaw, roll, tx, ty, tz)``
with Euler angles in radians (``R = Rz(roll) Ry(yaw) Rx(pitch)``, camera x right, y down,
z away; as :func:`neuralhead.geometry.euler_to_matrix`), ``(tx, ty)`` the projection of the
template's origin (between the eyes) in normalised image coordinates (-1 left/top, +1
right/bottom) and ``tz = log(s / size)`` the log of the face's apparent size.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from neuralhead.errors import InputError
from neuralhead.fileio import save_safetensors_atomic
from neuralhead.megaportraits.config import MegaPortraitsConfig
from neuralhead.nn.blocks import Norm, check_input
from neuralhead.nn.resnet import ResNet, imagenet_normalize

#: Where the face-aligned crop of :func:`face_crop` is centred and how far it reaches, in
#: template units (outer eye corners one unit apart, origin between the eyes, y down). The
#: template mesh spans x in [-0.75, 0.75] and y in [-0.49, 1.28] (hairline to chin), so its
#: centre lies 0.4 below the origin; a half-side of 1.1 leaves a margin of about a quarter
#: of the face around it. Our choice: the paper only says "a center crop around the face".
FACE_CENTER_Y = 0.4
FACE_HALF_SIDE = 1.1

#: Pose file written by :meth:`HeadPoseNetwork.save`: a safetensors file whose metadata
#: names this format and records the architecture.
POSE_FORMAT = "neuralhead-megaportraits-pose"


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """``image`` resized to ``size x size`` (bilinear, antialiased when shrinking)."""
    if image.shape[-2:] == (size, size):
        return image
    return F.interpolate(
        image, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )


def face_crop(
    image: torch.Tensor,
    translation: torch.Tensor,
    log_scale: torch.Tensor,
    *,
    size: int,
    center_y: float = FACE_CENTER_Y,
    half_side: float = FACE_HALF_SIDE,
) -> torch.Tensor:
    """A differentiable square crop around the face given its pose: ``(B, 3, size, size)``.

    Our reading of the "face crop aligned with the predicted pose" of the expression encoder
    (notes; B.1: "a center crop around the face"): an axis-aligned square centred on the face
    and sized by its apparent scale, so that every face fills the crop alike whatever its
    position and distance, while rotation stays in the crop (the expression code sees the head
    as it is). A template unit spans ``2 exp(tz)`` normalised image units, so the crop is
    centred at ``(tx, ty + center_y * 2 exp(tz))`` with half-side ``half_side * 2 exp(tz)``.
    ``translation`` is ``(B, 2)`` or ``(B, 3)`` (only ``tx, ty`` are used) and ``log_scale``
    ``(B, 1)`` or ``(B,)`` (``tz``). Areas outside the image repeat its border, as the dataset's
    crops do. When a crop covers more than ``size`` source pixels its image is first shrunk
    with an antialiasing filter, so that bilinear sampling does not alias; every image is
    cropped independently of the others in the batch.
    """
    check_input(image, name="face_crop", channels=3, spatial_dims=2)
    batch = image.shape[0]
    if (
        translation.dim() != 2
        or translation.shape[0] != batch
        or translation.shape[1] not in (2, 3)
    ):
        raise InputError(
            f"face_crop expects a translation of shape ({batch}, 2) or ({batch}, 3), "
            f"got {tuple(translation.shape)}"
        )
    if log_scale.numel() != batch:
        raise InputError(
            f"face_crop expects one log-scale per image ({batch}), got {tuple(log_scale.shape)}"
        )
    unit = 2 * log_scale.reshape(batch).exp()
    half = half_side * unit
    zero = torch.zeros_like(half)
    theta = torch.stack(
        [
            torch.stack([half, zero, translation[:, 0]], dim=-1),
            torch.stack([zero, half, translation[:, 1] + center_y * unit], dim=-1),
        ],
        dim=1,
    ).to(image.dtype)
    grid = F.affine_grid(theta, [batch, 3, size, size], align_corners=False)
    # A crop's side covers half * side source pixels: shrink the image of each crop that would
    # be undersampled by its own factor, so that no image's crop depends on the others.
    shrink = (half.detach() * min(image.shape[-2:]) / size).tolist()
    if max(shrink) <= 1.0:
        return _sample(image, grid)
    crops = []
    for index, factor in enumerate(shrink):
        item = image[index : index + 1]
        if factor > 1.0:
            item = F.interpolate(
                item,
                scale_factor=1.0 / factor,
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        crops.append(_sample(item, grid[index : index + 1]))
    return torch.cat(crops)


def _sample(image: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)


class HeadPoseNetwork(nn.Module):
    """Head-pose regressor of E_mtn (Sec. 3.1, A.1): a ResNet-18 on a 128x128 view.

    ``forward(image)`` takes ``(B, 3, H, W)`` in ``[0, 1]`` (the whole source or driver frame,
    resized to ``config.pose_image_size``) and returns a dict:

    * ``rotation`` ``(B, 3)``: ``(pitch, yaw, roll)`` in radians;
    * ``translation`` ``(B, 3)``: ``(tx, ty, 0)`` in normalised image coordinates (depth is
      not observable under the tracker's weak-perspective camera);
    * ``scale`` ``(B, 1)``: the face's apparent size relative to the average face of the
      training data, ``exp(tz - mean tz)``, so that the warps of the base model keep a typical
      face at its size in the canonical volume (our choice: the tracker's absolute scale
      depends on the crop and template units);
    * ``log_scale`` ``(B, 1)``: the absolute ``tz``, which :func:`face_crop` needs.

    :meth:`predict` gives the raw ``(B, 6)`` in the dataset's layout. The network regresses
    the difference from the training data's mean pose (buffer ``pose_mean``, saved with the
    weights). It uses BatchNorm by default (``norm``), so that torchvision's ImageNet ResNet-18
    can initialise it (:meth:`load_imagenet`) before its pre-training. Once :meth:`freeze`
    (or :meth:`load`) has frozen it, it stays in eval mode even when a parent module calls
    ``train()``, so the base model's training never uses or updates its batch statistics.
    """

    def __init__(self, config: MegaPortraitsConfig, *, norm: Norm = "batch") -> None:
        super().__init__()
        self.image_size = config.pose_image_size
        self.backbone = ResNet(
            "basic",
            config.pose_layers,
            num_classes=6,
            width=config.pose_width,
            norm=norm,
            groups=config.norm_groups,
        )
        self.register_buffer("pose_mean", torch.zeros(6))
        self.frozen = False

    def freeze(self) -> HeadPoseNetwork:
        """Eval mode and no gradients from now on, whatever ``train()`` is called; ``self``."""
        self.frozen = True
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> HeadPoseNetwork:
        return super().train(mode and not self.frozen)

    def predict(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, 6)`` pose ``(pitch, yaw, roll, tx, ty, tz)`` of ``image`` ``(B, 3, H, W)`` in [0, 1]."""
        check_input(image, name="HeadPoseNetwork", channels=3, spatial_dims=2)
        x = imagenet_normalize(resize_square(image, self.image_size))
        return self.backbone(x) + self.pose_mean

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        pose = self.predict(image)
        log_scale = pose[:, 5:6]
        return {
            "rotation": pose[:, :3],
            "translation": F.pad(pose[:, 3:5], (0, 1)),
            "scale": (log_scale - self.pose_mean[5]).exp(),
            "log_scale": log_scale,
        }

    def load_imagenet(
        self, path: str | os.PathLike[str] | None = None, *, download: bool = False
    ) -> HeadPoseNetwork:
        """Start from torchvision's ImageNet ResNet-18 trunk (published sizes only); ``self``."""
        self.backbone.load_imagenet(path, download=download)
        return self

    def architecture(self) -> dict[str, object]:
        """What a weight file must match: block counts, width, norm and input size."""
        return {
            "layers": list(self.backbone.layers),
            "width": self.backbone.width,
            "norm": self.backbone.norm,
            "image_size": self.image_size,
        }

    def save(self, path: str | os.PathLike[str], **metadata: object) -> None:
        """Write the weights and ``pose_mean`` to a safetensors file, atomically.

        The file's metadata records :data:`POSE_FORMAT`, :meth:`architecture` and
        ``metadata`` (JSON-encoded values, e.g. the held-out error of the training run).
        """
        info = {"format": POSE_FORMAT, "architecture": json.dumps(self.architecture())}
        info.update({key: json.dumps(value) for key, value in metadata.items()})
        save_safetensors_atomic(self.state_dict(), path, metadata=info)

    def load(self, path: str | os.PathLike[str], *, freeze: bool = True) -> HeadPoseNetwork:
        """Load a file written by :meth:`save` (by ``neuralhead train megaportraits-pose``).

        With ``freeze`` (the default, as the base model uses it) the network is frozen
        (:meth:`freeze`). Returns ``self``.
        """
        if not os.path.isfile(path):
            raise InputError(
                f"no head-pose weights at {path}; train them with "
                "`neuralhead train megaportraits-pose DATASET... --out FILE`"
            )
        with safe_open(str(path), framework="pt") as handle:
            info = handle.metadata() or {}
        if info.get("format") != POSE_FORMAT:
            raise InputError(f"{path} is not a MegaPortraits head-pose file ({POSE_FORMAT})")
        saved = json.loads(info.get("architecture", "{}"))
        if saved != self.architecture():
            raise InputError(
                f"{path} holds a head-pose network with {saved}, but this configuration "
                f"builds {self.architecture()}"
            )
        self.load_state_dict(load_file(str(path), device="cpu"))
        return self.freeze() if freeze else self


class ExpressionEncoder(nn.Module):
    """Expression encoder of E_mtn (Sec. 3.1, A.1): a ResNet-18 giving ``z`` ``(B, expression_dim)``.

    ``forward(image, pose=None)``: ``image`` ``(B, 3, H, W)`` in ``[0, 1]``. With the ``pose``
    dict of :class:`HeadPoseNetwork` for that image, the network sees the face crop of
    :func:`face_crop` at ``config.expression_image_size``; without it, ``image`` is taken to be
    a face crop already and is resized. The ResNet uses the base model's norms (GroupNorm,
    weight standardisation and spectral norm per the config; A.1) and dropout
    (``expression_dropout``, 0.2) before its last, linear layer (notes); EMOPortraits'
    dropout on ``z`` itself ("a last layer of E_motion", supplementary 1.1) is
    ``expression_output_dropout``.
    """

    def __init__(self, config: MegaPortraitsConfig) -> None:
        super().__init__()
        self.image_size = config.expression_image_size
        self.expression_dim = config.expression_dim
        self.backbone = ResNet(
            "basic",
            config.expression_layers,
            num_classes=config.expression_dim,
            width=config.expression_width,
            norm="group",
            groups=config.norm_groups,
            weight_standardization=config.weight_standardization,
            spectral_norm=config.spectral_norm,
            dropout=config.expression_dropout,
        )
        rate = config.expression_output_dropout
        if not 0.0 <= rate < 1.0:
            raise InputError(f"expression_output_dropout must be in [0, 1), got {rate}")
        self.output_dropout = nn.Dropout(rate) if rate > 0 else nn.Identity()

    def crop(self, image: torch.Tensor, pose: dict[str, torch.Tensor]) -> torch.Tensor:
        """The network's input: the face crop of ``image`` for ``pose`` at its input size."""
        missing = [key for key in ("translation", "log_scale") if key not in pose]
        if missing:
            raise InputError(
                f"ExpressionEncoder needs the HeadPoseNetwork output; the pose lacks {', '.join(missing)}"
            )
        return face_crop(image, pose["translation"], pose["log_scale"], size=self.image_size)

    def forward(
        self, image: torch.Tensor, pose: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        check_input(image, name="ExpressionEncoder", channels=3, spatial_dims=2)
        x = resize_square(image, self.image_size) if pose is None else self.crop(image, pose)
        return self.output_dropout(self.backbone(imagenet_normalize(x)))
