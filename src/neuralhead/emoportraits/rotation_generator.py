"""Head rotations from speech: EMOPortraits' audio-to-rotation GAN (supplementary Sec. 3).

A head-transformation sequence is ``X ∈ R^{T x 9}`` (Sec. 3.1): per frame the 6D rotation of
Zhou et al. (the first two columns of the rotation matrix, mapped back with the Gram–Schmidt
f_GS of Eq. 3-4, :func:`~neuralhead.geometry.rotation_6d_to_matrix`) and a translation, both
"the transformation from the reference frame", frame 0 of the sequence:

* rotation ``R_0^T R_t``: frame t's head rotation expressed in the head's own frame-0 axes
  (our choice of the two possible conventions: a nod stays a nod about the head's x axis
  whichever way the reference head faces the camera);
* translation ``p_t - p_0`` of the tracker's ``(tx, ty, tz)`` (crop units, log face scale).

:func:`relative_sequence` turns tracker poses ``(pitch, yaw, roll, tx, ty, tz)`` into this
form and :func:`apply_relative` is its exact inverse.

Generator (Sec. 3.2): a context encoder (the per-frame audio embeddings, e.g. Whisper's, are
computed outside, :mod:`neuralhead.emoportraits.audio_embedding`; here a linear input
projection, sinusoidal positional encoding and a Transformer encoder) and a head-pose decoder
(1D residual blocks and a per-frame MLP mapping ``R^{T x H}`` to ``R^{T x 9}``).
Discriminators (Sec. 3.3): :class:`LocalTemporalDiscriminator`, a 1D PatchGAN on windows of
N = 8 frames, and :class:`GlobalContentDiscriminator`, the whole sequence judged with its
audio. Losses (Sec. 3.4, Eq. 5-9): L1 reconstruction of rotation and translation, WGAN-GP
(gradient penalty 10, five critic updates per generator update) and a smoothness term
(:func:`generator_loss`, :func:`critic_loss`).

:func:`generate_head_motion` produces poses for audio of any length in overlapping windows
(with the drift that chaining them accumulates removed, :func:`remove_drift`);
:func:`angular_speed` and :func:`angular_acceleration` measure how lively and how smooth a pose
sequence is. The authors never released this model (see IMPLEMENTATION_NOTES.md): every size
below and all loss weights are our choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from neuralhead.errors import InputError
from neuralhead.geometry.rotation import (
    euler_to_matrix,
    matrix_to_euler,
    matrix_to_rotation_6d,
    rotation_6d_to_matrix,
    rotation_angle,
)
from neuralhead.losses.gan import gradient_penalty, wgan_discriminator_loss, wgan_generator_loss
from neuralhead.losses.temporal import temporal_smoothness
from neuralhead.nn.blocks import ResBlock1d
from neuralhead.nn.discriminators import SequenceDiscriminator, TemporalPatchDiscriminator1d
from neuralhead.nn.pretrained import PretrainedModel

#: The 6D rotation of the identity, the first two columns of I (Sec. 3.1).
IDENTITY_6D = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass
class RotationGeneratorConfig:
    """Sizes, loss weights and optimiser settings of the audio-to-rotation GAN.

    The supplementary (Sec. 3) fixes only the design, the patch length ``local_patch`` (N = 8),
    the gradient-penalty weight 10 and the 5 critic updates per generator update; the rest is
    ours. ``sequence_length`` is the training window (64 frames, 2.6 s at 25 fps) and
    ``window_overlap`` the overlap of consecutive windows at inference. ``embedder`` records the
    audio embedder's spec (``neuralhead.emoportraits.audio_embedding.load_audio_embedder``) so
    that inference computes the same features; ``audio_dim`` is its width (384: whisper-tiny).
    ``fps`` is the frame rate of the training videos, the rate at which generated motion plays.

    Loss weights (Eq. 5-6, no values in the paper): ``lambda_rot`` and ``lambda_trans`` weigh the
    L1 terms, ``lambda_adv`` the sum of both discriminators' WGAN generator losses (small: with
    the gradient penalty holding the critics' input gradients near unit norm per sequence, an
    unweighted adversarial term would outweigh the per-element L1 terms by about
    ``2 sqrt(T)``), ``lambda_smooth`` the first-difference L1 of Eq. 7 (in a short CPU trial
    on one 60 s clip with the substitute embedder, 0.1 let the generator move 2.7 times faster
    than the speaker after 650 steps, 1.0 brought that to 1.4 with a similar held-out L1).
    Optimiser: Adam with the WGAN-GP paper's settings (lr 1e-4, betas (0, 0.9)) at a constant
    learning rate for generator and critics. ``num_iterations`` is the default length of a run.
    """

    audio_dim: int = 384
    embedder: str = "substitute:384"
    fps: float = 25.0
    sequence_length: int = 64
    window_overlap: int = 16
    # Context encoder.
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    ff_dim: int = 1024
    dropout: float = 0.1
    # Head-pose decoder.
    decoder_blocks: int = 2
    decoder_channels: int = 256
    mlp_hidden: int = 256
    # Discriminators.
    local_patch: int = 8
    local_layers: int = 3
    disc_channels: int = 64
    global_blocks: int = 3
    disc_hidden: int = 256
    # Losses.
    lambda_rot: float = 1.0
    lambda_trans: float = 1.0
    lambda_adv: float = 0.05
    lambda_smooth: float = 1.0
    gp_weight: float = 10.0
    critic_steps: int = 5
    # Optimisation.
    lr: float = 1e-4
    betas: tuple[float, float] = (0.0, 0.9)
    batch_size: int = 32
    num_iterations: int = 20_000


#: Named configurations: the full model and a CPU-sized one for tests and smoke runs.
ROTATION_PRESETS: dict[str, RotationGeneratorConfig] = {
    "rotation": RotationGeneratorConfig(),
    "rotation-tiny": RotationGeneratorConfig(
        sequence_length=16,
        window_overlap=4,
        d_model=16,
        num_layers=1,
        num_heads=2,
        ff_dim=32,
        decoder_blocks=1,
        decoder_channels=16,
        mlp_hidden=16,
        local_layers=2,
        disc_channels=8,
        global_blocks=2,
        disc_hidden=16,
        batch_size=4,
        num_iterations=200,
    ),
}


def rotation_preset(name: str, **overrides) -> RotationGeneratorConfig:
    """The preset ``name`` (see :data:`ROTATION_PRESETS`) with fields overridden by keyword."""
    if name not in ROTATION_PRESETS:
        raise InputError(
            f"unknown rotation-generator preset {name!r}; available: "
            f"{', '.join(sorted(ROTATION_PRESETS))}"
        )
    try:
        return replace(ROTATION_PRESETS[name], **overrides)
    except TypeError as exc:
        raise InputError(f"bad rotation-generator override: {exc}") from None


def _sinusoidal_encoding(length: int, dim: int, device: torch.device) -> torch.Tensor:
    """The fixed ``(length, dim)`` sine/cosine position code of Vaswani et al. (2017)."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    rates = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )
    code = torch.zeros(length, dim, device=device)
    code[:, 0::2] = torch.sin(position * rates)
    code[:, 1::2] = torch.cos(position * rates)
    return code


class RotationGenerator(PretrainedModel):
    """The generator of supplementary Sec. 3.2: audio embeddings ``(B, T, A)`` → ``X (B, T, 9)``.

    Context encoder: LayerNorm and a linear projection of each frame's audio embedding to
    ``d_model`` (the norm is ours: it keeps the input scale independent of the embedder),
    sinusoidal positional encoding (needed: the targets are relative to frame 0, so how far a
    frame is from it matters), and a pre-norm ``nn.TransformerEncoder`` attending over the whole
    window. Head-pose decoder: ``decoder_blocks`` 1D pre-activation residual blocks over time
    (3-frame convolutions, GroupNorm of 8 groups), then a per-frame MLP to 9 numbers, a raw 6D
    rotation and a translation.

    The output is made relative to frame 0 by construction: the raw rotations are mapped to
    matrices by f_GS (Eq. 3-4), composed as ``R_0^T R_t`` and returned as the 6D representation
    of that proper rotation, and the translations as ``t_t - t_0``. So frame 0 is exactly the
    identity, like the targets of :func:`relative_sequence`, and generated rotations lie on the
    same manifold as real ones, which the critics therefore cannot tell apart by normalisation
    alone. The last layer starts with small weights (std 1e-3) and the identity's 6D as bias,
    so an untrained generator outputs near-still heads.
    """

    config_class = RotationGeneratorConfig

    def __init__(self, config: RotationGeneratorConfig) -> None:
        super().__init__(config)
        c = config
        if not 1 <= c.window_overlap < c.sequence_length:
            raise InputError(
                f"window_overlap must be between 1 and sequence_length - 1 = "
                f"{c.sequence_length - 1}, got {c.window_overlap}"
            )
        if c.d_model % c.num_heads or c.d_model % 2:
            raise InputError(
                f"d_model ({c.d_model}) must be even and divisible by num_heads ({c.num_heads})"
            )
        self.input_norm = nn.LayerNorm(c.audio_dim)
        self.input_projection = nn.Linear(c.audio_dim, c.d_model)
        layer = nn.TransformerEncoderLayer(
            c.d_model,
            c.num_heads,
            dim_feedforward=c.ff_dim,
            dropout=c.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.context_encoder = nn.TransformerEncoder(
            layer, c.num_layers, norm=nn.LayerNorm(c.d_model), enable_nested_tensor=False
        )
        widths = [c.d_model] + [c.decoder_channels] * c.decoder_blocks
        self.decoder = nn.Sequential(
            *(ResBlock1d(a, b, groups=8) for a, b in zip(widths[:-1], widths[1:]))
        )
        self.head = nn.Sequential(
            nn.Linear(widths[-1], c.mlp_hidden), nn.GELU(), nn.Linear(c.mlp_hidden, 9)
        )
        nn.init.normal_(self.head[-1].weight, std=1e-3)
        with torch.no_grad():
            self.head[-1].bias.copy_(torch.tensor([*IDENTITY_6D, 0.0, 0.0, 0.0]))

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """Audio embeddings ``(B, T, audio_dim)`` → relative transformations ``(B, T, 9)``."""
        if audio.dim() != 3 or audio.shape[-1] != self.config.audio_dim or audio.shape[1] < 1:
            raise InputError(
                f"RotationGenerator expects audio embeddings of shape (B, T, "
                f"{self.config.audio_dim}), got {tuple(audio.shape)}"
            )
        h = self.input_projection(self.input_norm(audio))
        h = h + _sinusoidal_encoding(audio.shape[1], self.config.d_model, audio.device).to(h.dtype)
        h = self.context_encoder(h)
        h = self.decoder(h.transpose(1, 2)).transpose(1, 2)
        raw = self.head(h).float()
        # Orthonormalisation and composition in fp32: bf16 autocast would make the rotations
        # visibly non-orthogonal.
        with torch.autocast(raw.device.type, enabled=False):
            rotation = rotation_6d_to_matrix(raw[..., :6])
            relative = rotation[:, :1].transpose(-1, -2) @ rotation
            translation = raw[..., 6:] - raw[:, :1, 6:]
            return torch.cat([matrix_to_rotation_6d(relative), translation], dim=-1)


class LocalTemporalDiscriminator(nn.Module):
    """The local discriminator of supplementary Sec. 3.3: a 1D temporal PatchGAN (Isola et al.).

    Input ``X (B, T, 9)`` (time first, as the generator's output); output the patch scores
    ``(B, 1, T - N + 1)``, one per window of exactly ``patch_frames`` = N consecutive frames
    (N = 8 in the paper): unpadded stride-1 convolutions with LeakyReLU, no normalisation (a
    WGAN-GP critic must treat samples independently, so no batch norm). The losses of
    :mod:`neuralhead.losses.gan` average the patch scores, the paper's "averaging all responses".
    Built on :class:`~neuralhead.nn.discriminators.TemporalPatchDiscriminator1d`.
    """

    def __init__(
        self,
        in_channels: int = 9,
        *,
        patch_frames: int = 8,
        num_layers: int = 3,
        base_channels: int = 64,
        max_channels: int = 256,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.patch_frames = patch_frames
        self.network = TemporalPatchDiscriminator1d(
            in_channels,
            patch_frames=patch_frames,
            num_layers=num_layers,
            base_channels=base_channels,
            max_channels=max_channels,
            norm="none",
        )

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        _check_sequence(sequence, self.in_channels, "LocalTemporalDiscriminator")
        return self.network(sequence.transpose(1, 2))[-1]


class GlobalContentDiscriminator(nn.Module):
    """The global discriminator of supplementary Sec. 3.3: the whole sequence with its audio.

    ``X (B, T, 9)`` is encoded by 1D residual blocks and global average pooling over time
    (:class:`~neuralhead.nn.discriminators.SequenceDiscriminator`, no normalisation: WGAN-GP);
    the code is concatenated with the audio and an MLP gives one score per sequence ``(B,)``.
    The paper concatenates "the audio embeddings" without saying how their time axis is
    reduced: we pool the per-frame embeddings ``(B, T, A)`` to their mean and standard
    deviation over the frames (``2A`` numbers), so that the critic sees how much the speech
    varies as well as what it is on average.
    """

    def __init__(
        self,
        audio_dim: int = 384,
        in_channels: int = 9,
        *,
        num_blocks: int = 3,
        base_channels: int = 64,
        max_channels: int = 256,
        hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.audio_dim = audio_dim
        self.network = SequenceDiscriminator(
            in_channels,
            2 * audio_dim,
            num_blocks=num_blocks,
            base_channels=base_channels,
            max_channels=max_channels,
            hidden_dim=hidden_dim,
            norm="none",
            conditioning="concat",
        )

    def forward(self, sequence: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        _check_sequence(sequence, self.in_channels, "GlobalContentDiscriminator")
        batch, frames = sequence.shape[:2]
        if audio.shape != (batch, frames, self.audio_dim):
            raise InputError(
                f"GlobalContentDiscriminator expects audio of shape ({batch}, {frames}, "
                f"{self.audio_dim}), got {tuple(audio.shape)}"
            )
        pooled = torch.cat([audio.mean(dim=1), audio.std(dim=1, correction=0)], dim=1)
        score, _ = self.network(sequence.transpose(1, 2), pooled)
        return score


def _check_sequence(sequence: torch.Tensor, channels: int, name: str) -> None:
    if sequence.dim() != 3 or sequence.shape[-1] != channels:
        raise InputError(
            f"{name} expects a sequence of shape (B, T, {channels}), got {tuple(sequence.shape)}"
        )


def build_discriminators(
    config: RotationGeneratorConfig,
) -> tuple[LocalTemporalDiscriminator, GlobalContentDiscriminator]:
    """The two critics of a configuration, sized by its ``local_*``, ``global_*``, ``disc_*``."""
    local = LocalTemporalDiscriminator(
        patch_frames=config.local_patch,
        num_layers=config.local_layers,
        base_channels=config.disc_channels,
        max_channels=4 * config.disc_channels,
    )
    global_ = GlobalContentDiscriminator(
        config.audio_dim,
        num_blocks=config.global_blocks,
        base_channels=config.disc_channels,
        max_channels=4 * config.disc_channels,
        hidden_dim=config.disc_hidden,
    )
    return local, global_


# ------------------------------------------------------------------------------------ losses
def reconstruction_terms(
    pred: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 of rotations and of translations (Eq. 6), each a mean over batch, frames and numbers.

    Rotations are compared in the 6D representation of the proper rotations (the first two
    columns of the matrices; the generator's output is already orthonormalised), which for
    small errors is proportional to the matrices' L1. The mean instead of Eq. 6's sum over
    frames is ours: it keeps the weights independent of the window length.
    """
    if pred.shape != target.shape or pred.shape[-1] != 9:
        raise InputError(
            f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} must both be (B, T, 9)"
        )
    return F.l1_loss(pred[..., :6], target[..., :6]), F.l1_loss(pred[..., 6:], target[..., 6:])


def generator_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    audio: torch.Tensor,
    local_discriminator: nn.Module,
    global_discriminator: nn.Module,
    config: RotationGeneratorConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_tot of Eq. 5: ``λ_rot L_rot + λ_trans L_trans + λ_adv L_adv + λ_smooth L_smooth``.

    L_adv (Eq. 9) is the sum of both critics' ``-E[D(X̂)]``; L_smooth (Eq. 7) the mean
    ``|X_t - X_{t-1}|`` over all 9 numbers. Returns the total and the unweighted terms
    ``rot``, ``trans``, ``adv_local``, ``adv_global``, ``smooth``.
    """
    rot, trans = reconstruction_terms(pred, target)
    terms = {
        "rot": rot,
        "trans": trans,
        "adv_local": wgan_generator_loss(local_discriminator(pred)),
        "adv_global": wgan_generator_loss(global_discriminator(pred, audio)),
        "smooth": temporal_smoothness(pred),
    }
    total = (
        config.lambda_rot * rot
        + config.lambda_trans * trans
        + config.lambda_adv * (terms["adv_local"] + terms["adv_global"])
        + config.lambda_smooth * terms["smooth"]
    )
    return total, terms


def critic_loss(
    local_discriminator: nn.Module,
    global_discriminator: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    audio: torch.Tensor,
    *,
    gp_weight: float = 10.0,
    unwrapped: tuple[nn.Module, nn.Module] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_D of Eq. 8 for both critics, summed: ``E[D(fake)] - E[D(real)] + λ GP`` each.

    Real and generated sequences go through each critic in one batch; the global critic sees
    each with the audio of its window. ``fake`` is detached. The gradient penalty needs a
    second-order backward, which DistributedDataParallel does not support: when the two
    critics passed are DDP wrappers, ``unwrapped`` gives the plain modules to take it on (their
    gradients join the same backward pass, so they are still averaged over processes).
    Returns the total and the terms ``local_gap`` / ``global_gap`` (``E[D(real)] - E[D(fake)]``,
    the critics' Wasserstein estimates) and ``local_gp`` / ``global_gp``.
    """
    if real.shape != fake.shape:
        raise InputError(f"real {tuple(real.shape)} and fake {tuple(fake.shape)} sequences differ")
    fake = fake.detach()
    batch = real.shape[0]
    penalty_local, penalty_global = unwrapped or (local_discriminator, global_discriminator)
    local_scores = local_discriminator(torch.cat([real, fake]))
    global_scores = global_discriminator(torch.cat([real, fake]), torch.cat([audio, audio]))
    local_w = wgan_discriminator_loss(local_scores[:batch], local_scores[batch:])
    global_w = wgan_discriminator_loss(global_scores[:batch], global_scores[batch:])
    local_gp = gradient_penalty(penalty_local, real, fake, weight=gp_weight)
    global_gp = gradient_penalty(penalty_global, real, fake, condition=audio, weight=gp_weight)
    total = local_w + global_w + local_gp + global_gp
    terms = {
        "local_gap": -local_w,
        "global_gap": -global_w,
        "local_gp": local_gp,
        "global_gp": global_gp,
    }
    return total, terms


# ------------------------------------------------------------------------------ pose sequences
def _check_pose(pose: torch.Tensor, min_frames: int = 1) -> None:
    if pose.dim() < 2 or pose.shape[-1] != 6 or pose.shape[-2] < min_frames:
        raise InputError(
            f"pose must be (T, 6) tracker poses (pitch, yaw, roll, tx, ty, tz) with at least "
            f"{min_frames} frames, got shape {tuple(pose.shape)}"
        )


def relative_sequence(pose: torch.Tensor) -> torch.Tensor:
    """Tracker poses ``(..., T, 6)`` → transformations from frame 0 ``(..., T, 9)`` (Sec. 3.1).

    Rotation ``R_0^T R_t`` as 6D (first two columns), translation ``p_t - p_0`` of
    ``(tx, ty, tz)``; frame 0 becomes the identity. See the module docstring for the convention.
    """
    _check_pose(pose)
    rotation = euler_to_matrix(pose[..., :3])
    relative = rotation[..., :1, :, :].transpose(-1, -2) @ rotation
    translation = pose[..., 3:] - pose[..., :1, 3:]
    return torch.cat([matrix_to_rotation_6d(relative), translation], dim=-1)


def apply_relative(reference_pose: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
    """Transformations ``(..., T, 9)`` applied to a reference pose ``(..., 6)`` → poses ``(..., T, 6)``.

    ``R_t = R_ref f_GS(X_t[:6])`` and ``p_t = p_ref + X_t[6:]``, back in the tracker's layout:
    the exact inverse of :func:`relative_sequence`, ``apply_relative(pose[0],
    relative_sequence(pose)) == pose`` (up to rounding, for yaw within ±90°, the range of
    :func:`~neuralhead.geometry.matrix_to_euler`).
    """
    if reference_pose.shape[-1] != 6:
        raise InputError(
            f"reference_pose must be (6,) tracker pose, got {tuple(reference_pose.shape)}"
        )
    if sequence.dim() < 2 or sequence.shape[-1] != 9:
        raise InputError(f"sequence must be (T, 9) transformations, got {tuple(sequence.shape)}")
    reference = euler_to_matrix(reference_pose[..., :3])[..., None, :, :]
    rotation = reference @ rotation_6d_to_matrix(sequence[..., :6])
    translation = reference_pose[..., None, 3:] + sequence[..., 6:]
    return torch.cat([matrix_to_euler(rotation), translation], dim=-1)


def _gaussian_filter(values: torch.Tensor, sigma: float) -> torch.Tensor:
    """``(..., T, C)`` filtered along T by a Gaussian of ``sigma`` frames, ends held (replicated)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=values.dtype, device=values.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    channels = values.shape[-1]
    kernel = (kernel / kernel.sum()).expand(channels, 1, -1)
    flat = values.reshape(-1, *values.shape[-2:]).transpose(1, 2)
    padded = F.pad(flat, (radius, radius), mode="replicate")
    return F.conv1d(padded, kernel, groups=channels).transpose(1, 2).reshape(values.shape)


def _pose_parts(pose: torch.Tensor) -> torch.Tensor:
    """Tracker poses ``(..., 6)`` → ``(..., 9)``: 6D of the absolute rotation and translation."""
    rotation = matrix_to_rotation_6d(euler_to_matrix(pose[..., :3]))
    return torch.cat([rotation, pose[..., 3:]], dim=-1)


def _pose_from_parts(parts: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_pose_parts`; unnormalised 6D (after averaging) goes through f_GS."""
    rotation = matrix_to_euler(rotation_6d_to_matrix(parts[..., :6]))
    return torch.cat([rotation, parts[..., 6:]], dim=-1)


def smooth_head_motion(pose: torch.Tensor, sigma: float) -> torch.Tensor:
    """Poses ``(..., T, 6)`` filtered in time by a Gaussian of ``sigma`` frames (0: unchanged).

    Rotations are averaged as their 6D representations (first two matrix columns) and mapped
    back to rotations by f_GS, which avoids the wrap-around of Euler angles; translations are
    filtered directly. The sequence's ends are extended by repetition.
    """
    _check_pose(pose)
    if sigma < 0:
        raise InputError(f"smoothing sigma must be >= 0 frames, got {sigma}")
    if sigma == 0 or pose.shape[-2] == 1:
        return pose
    return _pose_from_parts(_gaussian_filter(_pose_parts(pose), sigma))


def remove_drift(pose: torch.Tensor, reference_pose: torch.Tensor, sigma: float) -> torch.Tensor:
    """Poses ``(T, 6)`` with their slow wandering away from ``reference_pose`` taken out.

    Chaining windows of relative motion (:func:`generate_head_motion`) adds up each window's net
    turn, a random walk: on a 60 s clip an unconstrained chain drifted 25° in yaw while the
    speaker stayed within ±10°. Real heads return to a rest pose, which per-window relative
    motion cannot know. With ``Q_t = R_ref^T R_t`` the motion relative to the reference and
    ``L_t`` its Gaussian low-pass over ``sigma`` frames (6D average, f_GS), the rotations become
    ``R_ref L_0 L_t^T Q_t`` and the translations ``p_t - (lp(p)_t - lp(p)_0)``: motion faster
    than about ``sigma`` frames is kept, slower drift removed, frame 0 unchanged. ``sigma`` 0
    returns ``pose``. Our addition: the paper does not say how it generates long sequences.
    """
    _check_pose(pose)
    if pose.dim() != 2 or reference_pose.shape != (6,):
        raise InputError(
            f"remove_drift takes poses (T, 6) and a reference (6,), got {tuple(pose.shape)} "
            f"and {tuple(reference_pose.shape)}"
        )
    if sigma < 0:
        raise InputError(f"the drift time scale must be >= 0 frames, got {sigma}")
    if sigma == 0:
        return pose
    reference = euler_to_matrix(reference_pose[:3])
    relative = reference.transpose(-1, -2) @ euler_to_matrix(pose[:, :3])
    slow = rotation_6d_to_matrix(_gaussian_filter(matrix_to_rotation_6d(relative), sigma))
    rotation = reference @ slow[:1] @ slow.transpose(-1, -2) @ relative
    slow_translation = _gaussian_filter(pose[:, 3:], sigma)
    translation = pose[:, 3:] - (slow_translation - slow_translation[:1])
    return torch.cat([matrix_to_euler(rotation), translation], dim=-1)


def _window_starts(num_frames: int, length: int, overlap: int) -> list[int]:
    """Starts of windows of ``length`` covering ``num_frames``, consecutive ones overlapping by at
    least ``overlap`` frames; the last ends at the last frame."""
    if num_frames <= length:
        return [0]
    return [*range(0, num_frames - length, length - overlap), num_frames - length]


@torch.no_grad()
def generate_head_motion(
    generator: RotationGenerator,
    audio: torch.Tensor,
    *,
    reference_pose: torch.Tensor,
    smoothing: float = 0.0,
    drift_seconds: float = 4.0,
) -> torch.Tensor:
    """Head poses ``(T, 6)`` (tracker layout) for per-frame audio embeddings ``(T, A)`` of any T.

    The audio is cut into windows of ``sequence_length`` frames overlapping by at least
    ``window_overlap`` (the last window is aligned to the end; Fig. 4's overlapping segments).
    The first window's motion starts from ``reference_pose``; each later window's relative
    motion is chained from the pose already generated at its first frame, and across the
    overlap the two windows are cross-faded with weights rising linearly from 0 to 1 (6D
    rotations averaged and re-orthonormalised, translations averaged), so the motion is
    continuous at every boundary. The slow drift that chaining accumulates is then removed
    (:func:`remove_drift` with a Gaussian of ``drift_seconds`` at the generator's fps; 0 keeps
    the pure chain). ``smoothing`` is the sigma in frames of an optional Gaussian filter on the
    result (:func:`smooth_head_motion`). Frame 0 is ``reference_pose`` unless smoothed. Runs
    the generator in eval mode on its own device; returns on ``audio``'s device.
    """
    config = generator.config
    if audio.dim() != 2 or audio.shape[1] != config.audio_dim or audio.shape[0] < 1:
        raise InputError(
            f"audio embeddings must be (T, {config.audio_dim}), got {tuple(audio.shape)}"
        )
    if reference_pose.shape != (6,):
        raise InputError(f"reference_pose must be (6,), got {tuple(reference_pose.shape)}")
    parameter = next(generator.parameters(), None)
    device = parameter.device if parameter is not None else audio.device
    num_frames = audio.shape[0]
    starts = _window_starts(num_frames, config.sequence_length, config.window_overlap)
    rotations = torch.empty(num_frames, 3, 3)
    translations = torch.empty(num_frames, 3)
    reference = reference_pose.detach().float().cpu()
    was_training = generator.training
    generator.eval()
    try:
        filled = 0
        for start in starts:
            end = min(start + config.sequence_length, num_frames)
            window = audio[None, start:end].to(device=device, dtype=torch.float32)
            relative = generator(window)[0].float().cpu()
            if start == 0:
                anchor_r, anchor_t = euler_to_matrix(reference[:3]), reference[3:]
            else:
                anchor_r, anchor_t = rotations[start], translations[start]
            window_r = anchor_r @ rotation_6d_to_matrix(relative[:, :6])
            window_t = anchor_t + relative[:, 6:]
            overlap = filled - start
            if overlap > 0:
                weight = (torch.arange(overlap, dtype=torch.float32) / overlap)[:, None]
                mixed = (1 - weight) * matrix_to_rotation_6d(rotations[start:filled]) + (
                    weight * matrix_to_rotation_6d(window_r[:overlap])
                )
                rotations[start:filled] = rotation_6d_to_matrix(mixed)
                translations[start:filled] = (1 - weight) * translations[start:filled] + (
                    weight * window_t[:overlap]
                )
            rotations[filled:end] = window_r[overlap:]
            translations[filled:end] = window_t[overlap:]
            filled = end
    finally:
        generator.train(was_training)
    pose = torch.cat([matrix_to_euler(rotations), translations], dim=-1)
    pose = remove_drift(pose, reference, drift_seconds * config.fps)
    return smooth_head_motion(pose, smoothing).to(audio.device)


# ------------------------------------------------------------------------------------ metrics
def angular_speed(pose: torch.Tensor, fps: float) -> float:
    """Mean angular speed in degrees per second of poses ``(..., T, 6)`` (T >= 2).

    The geodesic angle between the rotations of consecutive frames
    (:func:`~neuralhead.geometry.rotation_angle`) times ``fps``, averaged over all pairs.
    """
    _check_pose(pose, min_frames=2)
    rotation = euler_to_matrix(pose[..., :3].double())
    angles = rotation_angle(rotation[..., :-1, :, :], rotation[..., 1:, :, :])
    return float(torch.rad2deg(angles).mean() * fps)


def angular_acceleration(pose: torch.Tensor, fps: float) -> float:
    """Mean angular acceleration in degrees per second² of poses ``(..., T, 6)`` (T >= 3).

    A smoothness measure: with ``D_t = R_t^T R_{t+1}`` the motion from frame t to t+1 (in the
    head's axes), the second difference of the motion is the geodesic angle between consecutive
    motions, ``angle(D_{t-1}, D_t)``, times ``fps²``, averaged over all frames. It is zero for a
    rotation at constant angular velocity and, for small steps, equals the magnitude of the
    change of the angular-velocity vector per frame.
    """
    _check_pose(pose, min_frames=3)
    rotation = euler_to_matrix(pose[..., :3].double())
    motion = rotation[..., :-1, :, :].transpose(-1, -2) @ rotation[..., 1:, :, :]
    angles = rotation_angle(motion[..., :-1, :, :], motion[..., 1:, :, :])
    return float(torch.rad2deg(angles).mean() * fps**2)
