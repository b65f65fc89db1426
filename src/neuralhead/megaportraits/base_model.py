"""The MegaPortraits base model G_base (Sec. 3.1, Eq. 1-3, Fig. 2; A.1; B.6).

``x_s->d = G2D(P(w_->d ∘ G3D(w_s-> ∘ v_s)))`` (Eq. 1-2). The order of warps is that of the
authors' code (implementation notes): inverse source rotation / translation / scale, source
expression warp, G3D, driver expression warp, driver rotation / translation / scale. Each
side's rigid and expression warps are composed into one sampling grid
(:func:`neuralhead.geometry.content_transform_grid_3d`, :func:`~neuralhead.geometry.compose_grids`),
so the volume is resampled once per side, as the paper's single warp fields ``w_s->`` and
``w_->d`` do.

The work splits into three calls so that a source is encoded once for many drivers:
:meth:`MegaPortraitsBase.encode_source` (E_app, pose, z_s, the warp to the canonical space
and G3D), :meth:`MegaPortraitsBase.encode_driver` (pose and z_d) and
:meth:`MegaPortraitsBase.render` (the warp to the driver, P and G2D).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from neuralhead.errors import InputError
from neuralhead.geometry import (
    compose_grids,
    content_transform_grid_3d,
    euler_to_matrix,
    identity_grid_3d,
    offset_to_grid,
    warp_volume_3d,
)
from neuralhead.megaportraits.appearance_encoder import AppearanceEncoder
from neuralhead.megaportraits.config import MegaPortraitsConfig
from neuralhead.megaportraits.g2d import G2D
from neuralhead.megaportraits.g3d import G3D
from neuralhead.megaportraits.motion_encoder import ExpressionEncoder, HeadPoseNetwork
from neuralhead.megaportraits.warping_generator import WarpingGenerator
from neuralhead.nn.blocks import check_input
from neuralhead.nn.pretrained import PretrainedModel

Pose = dict[str, torch.Tensor]


@dataclass
class SourceState:
    """What G_base keeps of a source image (Sec. 3.1).

    Attributes:
        v_s: appearance volume ``(B, C, D, S, S)`` from E_app.
        e_s: global descriptor ``(B, 512, 4, 4)`` from E_app.
        pose: the head-pose network's dict (``rotation`` ``(B, 3)`` Euler (pitch, yaw, roll)
            radians, ``translation`` ``(B, 3)``, ``scale`` ``(B, 1)``, ``log_scale``).
        z_s: source expression code ``(B, expression_dim)``.
        v_c: canonical volume ``G3D(w_s-> ∘ v_s)`` ``(B, C, D, S, S)``, the source with its
            pose and expression removed (EMOPortraits Sec. 3 and 4.2 compare these).
    """

    v_s: torch.Tensor
    e_s: torch.Tensor
    pose: Pose
    z_s: torch.Tensor
    v_c: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.v_c.shape[0]


@dataclass
class DriverMotion:
    """The motion G_base reads from a driver: head pose and expression code ``z_d`` (Sec. 3.1)."""

    pose: Pose
    z_d: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.z_d.shape[0]

    def with_pose(
        self,
        *,
        rotation: torch.Tensor | None = None,
        translation: torch.Tensor | None = None,
        scale: torch.Tensor | float | None = None,
    ) -> DriverMotion:
        """This motion with the given parts of the pose replaced (B.6, explicit pose control).

        ``rotation`` is ``(B, 3)`` or ``(3,)`` Euler (pitch, yaw, roll) radians (zeros
        frontalise the head), ``translation`` ``(B, 3)`` or ``(3,)`` in normalised image
        units, ``scale`` ``(B, 1)``, ``(B,)`` or a number; an unbatched value applies to the
        whole batch. The expression code is kept.
        """
        batch, like = self.batch_size, self.z_d
        pose = dict(self.pose)
        for name, value, width in (("rotation", rotation, 3), ("translation", translation, 3)):
            if value is None:
                continue
            value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
            if value.shape not in ((width,), (batch, width)):
                raise InputError(
                    f"{name} must have shape ({batch}, {width}) or ({width},), got {tuple(value.shape)}"
                )
            pose[name] = value.expand(batch, width)
        if scale is not None:
            value = torch.as_tensor(scale, dtype=like.dtype, device=like.device)
            if value.numel() not in (1, batch):
                raise InputError(f"scale must hold 1 or {batch} values, got {tuple(value.shape)}")
            pose["scale"] = value.reshape(-1, 1).expand(batch, 1)
        return replace(self, pose=pose)


def _rigid(pose: Pose, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scale (B,), rotation (B, 3, 3), translation (B, 3))`` of a pose dict."""
    missing = [key for key in ("rotation", "translation", "scale") if key not in pose]
    if missing:
        raise InputError(f"the {name} pose lacks {', '.join(missing)}")
    return pose["scale"].reshape(-1), euler_to_matrix(pose["rotation"]), pose["translation"]


class MegaPortraitsBase(PretrainedModel):
    """G_base of MegaPortraits (Sec. 3.1, Eq. 1-3): source and driver images → output image.

    Submodules: ``appearance_encoder`` (E_app), ``head_pose`` and ``expression_encoder``
    (E_mtn), ``source_warping`` (W_s->), ``driver_warping`` (W_->d), ``g3d`` and ``g2d``
    (P and G2D). The head-pose network is pre-trained and frozen (Sec. 3.1): it has no
    trainable parameters here, stays in eval mode whatever :meth:`train` is asked, and runs
    without gradients; load its weights with :meth:`load_head_pose` (it is random until
    then, which only suits tests). Images are ``(B, 3, H, W)`` in [0, 1]; sources must be
    ``config.image_size`` square, drivers any size (the motion encoder crops and resizes).
    """

    config_class = MegaPortraitsConfig

    def __init__(self, config: MegaPortraitsConfig) -> None:
        super().__init__(config)
        self.appearance_encoder = AppearanceEncoder(config)
        self.head_pose = HeadPoseNetwork(config)
        self.head_pose.requires_grad_(False)
        self.expression_encoder = ExpressionEncoder(config)
        self.source_warping = WarpingGenerator(config)
        self.driver_warping = WarpingGenerator(config)
        self.g3d = G3D(config)
        self.g2d = G2D(config)
        self.head_pose.eval()

    def train(self, mode: bool = True) -> MegaPortraitsBase:
        super().train(mode)
        self.head_pose.eval()
        return self

    def load_head_pose(self, path: str) -> MegaPortraitsBase:
        """Load the pre-trained head-pose network (a file from ``HeadPoseNetwork.save``); ``self``."""
        self.head_pose.load(path, freeze=True)
        return self

    def estimate_pose(self, image: torch.Tensor) -> Pose:
        """The frozen head-pose network's dict for ``image`` ``(B, 3, H, W)``, without gradients."""
        with torch.no_grad():
            return self.head_pose(image)

    # --- warps (Eq. 1, A.1) -------------------------------------------------------------------

    def to_canonical(
        self, volume: torch.Tensor, z_s: torch.Tensor, e_s: torch.Tensor, pose: Pose
    ) -> torch.Tensor:
        """``w_s-> ∘ volume``: remove the source pose, then apply W_s->'s expression warp.

        One resampling of ``volume`` ``(B, C, D, S, S)``: the expression grid is moved by the
        inverse pose (see :func:`~neuralhead.geometry.content_transform_grid_3d`).
        """
        scale, rotation, translation = _rigid(pose, "source")
        grid = offset_to_grid(self.source_warping(z_s, e_s))
        grid = content_transform_grid_3d(grid, scale, rotation, translation, inverse=True)
        return warp_volume_3d(volume, grid)

    def to_driver(
        self, volume: torch.Tensor, z_d: torch.Tensor, e_s: torch.Tensor, pose: Pose
    ) -> torch.Tensor:
        """``w_->d ∘ volume``: W_->d's expression warp, then the driver pose; one resampling."""
        scale, rotation, translation = _rigid(pose, "driver")
        expression = offset_to_grid(self.driver_warping(z_d, e_s))
        identity = identity_grid_3d(
            1, *expression.shape[1:4], dtype=expression.dtype, device=expression.device
        )
        posed = content_transform_grid_3d(identity, scale, rotation, translation)
        return warp_volume_3d(volume, compose_grids(expression, posed))

    # --- the three stages -----------------------------------------------------------------

    def encode_source(self, source: torch.Tensor, mask: torch.Tensor | None = None) -> SourceState:
        """E_app, pose and z_s of ``source``, and its canonical volume ``G3D(w_s-> ∘ v_s)``.

        ``mask`` ``(B, 1, H, W)``, the source's foreground, is applied to the input of the
        global descriptor (see :class:`~neuralhead.megaportraits.appearance_encoder.AppearanceEncoder`).
        """
        size = self.config.image_size
        check_input(source, name="MegaPortraitsBase source", channels=3, spatial_dims=2)
        if source.shape[-2:] != (size, size):
            raise InputError(
                f"MegaPortraitsBase expects {size}x{size} sources (config.image_size), got "
                f"{source.shape[-2]}x{source.shape[-1]}"
            )
        v_s, e_s = self.appearance_encoder(source, mask)
        pose = self.estimate_pose(source)
        z_s = self.expression_encoder(source, pose)
        v_c = self.g3d(self.to_canonical(v_s, z_s, e_s, pose))
        return SourceState(v_s=v_s, e_s=e_s, pose=pose, z_s=z_s, v_c=v_c)

    def encode_driver(
        self,
        driver: torch.Tensor,
        *,
        rotation: torch.Tensor | None = None,
        translation: torch.Tensor | None = None,
        scale: torch.Tensor | float | None = None,
    ) -> DriverMotion:
        """Pose and ``z_d`` of ``driver`` ``(B, 3, H, W)``; given pose parts replace the
        predicted ones (B.6; see :meth:`DriverMotion.with_pose`)."""
        check_input(driver, name="MegaPortraitsBase driver", channels=3, spatial_dims=2)
        pose = self.estimate_pose(driver)
        motion = DriverMotion(pose=pose, z_d=self.expression_encoder(driver, pose))
        return motion.with_pose(rotation=rotation, translation=translation, scale=scale)

    def render(
        self,
        source: SourceState,
        motion: DriverMotion,
        *,
        keep_source_scale_translation: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Impose ``motion`` on ``source``: ``{"image": (B, 3, H, W) in [0, 1], "driver_volume":
        v_s->d (B, C, D, S, S)}`` (Eq. 1-2).

        A source with batch 1 is shared by all the motions' batch. With
        ``keep_source_scale_translation`` the source's scale and translation replace the
        driver's, and only its rotation and expression are followed (B.6, e.g. for video
        conferencing).
        """
        batch = motion.batch_size
        e_s, v_c = source.e_s, source.v_c
        if source.batch_size != batch:
            if source.batch_size != 1:
                raise InputError(
                    f"source batch {source.batch_size} and driver batch {batch} differ "
                    "(a source with batch 1 is shared by all drivers)"
                )
            e_s, v_c = e_s.expand(batch, *e_s.shape[1:]), v_c.expand(batch, *v_c.shape[1:])
        pose = motion.pose
        if keep_source_scale_translation:
            pose = {
                **pose,
                "scale": source.pose["scale"].expand(batch, 1),
                "translation": source.pose["translation"].expand(batch, 3),
            }
        volume = self.to_driver(v_c, motion.z_d, e_s, pose)
        return {"image": self.g2d(volume), "driver_volume": volume}

    def forward(
        self,
        source: torch.Tensor,
        driver: torch.Tensor,
        *,
        source_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``G_base(x_s, x_d)`` (Eq. 3) and what the losses need.

        Returns ``image`` and ``driver_volume`` (as :meth:`render`), ``canonical_volume``
        (v_c), ``z_s``, ``z_d`` (for the cycle-consistency loss, Eq. 6-7), ``e_s``, and the
        two pose dicts' entries prefixed ``source_`` / ``driver_`` (``driver_rotation``, ...).
        """
        state = self.encode_source(source, source_mask)
        motion = self.encode_driver(driver)
        out = self.render(state, motion)
        out.update(canonical_volume=state.v_c, z_s=state.z_s, z_d=motion.z_d, e_s=state.e_s)
        out.update({f"source_{key}": value for key, value in state.pose.items()})
        out.update({f"driver_{key}": value for key, value in motion.pose.items()})
        return out


def parameter_counts(model: MegaPortraitsBase) -> dict[str, int]:
    """Trainable parameters per submodule of ``model`` (and ``"total"``), e.g. to compare with
    the sizes the implementation notes give (G3D ~58M, G2D ~36M, W ~9M each, ~160M in all)."""
    counts = {
        name: sum(p.numel() for p in module.parameters() if p.requires_grad)
        for name, module in model.named_children()
    }
    counts["total"] = sum(counts.values())
    return counts
