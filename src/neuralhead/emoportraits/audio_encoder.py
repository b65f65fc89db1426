"""E_aud, EMOPortraits' speech-driven expression encoder (supplementary Sec. 2.1, Fig. 3).

From the audio embeddings of a clip (:mod:`.audio_embedding`, one per video frame) and the
expression code z_0 of its first frame, E_aud predicts an expression code for every frame::

    z_base = MLP_b(z_0)                         what stays from frame 0: gaze, upper face
    a_t    = MLP_a(z_prev)                      z_prev = z_0 at t = 0, z-hat_{t-1} after
    z-hat_t = z_base + MLP_c([audio_t, a_t])

so each code depends on the codes before it (autoregression) and on the audio around its
frame. The paper gives no sizes; ours (:class:`SpeechEncoderConfig`) are choices:

- ``audio_t`` is the embedding of frame t concatenated with those of ``audio_context`` frames
  on each side (zeros beyond the clip), since lip shapes anticipate and trail the sound.
- Every MLP has ``num_layers`` linear layers of width ``hidden_dim`` with LeakyReLU (0.2)
  between them; MLP_a outputs ``hidden_dim`` features.
- MLP_b is residual, ``z_base = z_0 + MLP_b(z_0)``, and the last layers of MLP_b and MLP_c
  start at 1/100 of PyTorch's default initialisation: an untrained E_aud returns about z_0
  for every frame (the first frame's expression, a sensible start for a teacher-student
  fit), while every parameter still receives a gradient from the first step (a zero
  initialisation would cut the layers before it off until the last one moved).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from neuralhead.errors import InputError
from neuralhead.nn.pretrained import PretrainedModel

#: Scale of the last layers of MLP_b and MLP_c at initialisation (module docstring).
LAST_LAYER_SCALE = 0.01


@dataclass
class SpeechEncoderConfig:
    """Sizes of E_aud (all our choices; the paper gives none).

    Attributes:
        audio_dim: width of one audio embedding (``AudioEmbedder.dim``).
        expression_dim: width of z (128 in EMOPortraits, Sec. 4.1).
        hidden_dim: width of the MLPs' hidden layers and of a_t.
        audio_context: neighbouring frames on each side concatenated to a frame's embedding.
        num_layers: linear layers per MLP (at least 2: one hidden layer).
        negative_slope: of the LeakyReLU between layers.
        embedder: spec of the embedder the encoder was trained with
            (:func:`~neuralhead.emoportraits.audio_embedding.load_audio_embedder`), so that
            inference embeds audio the same way.
    """

    audio_dim: int = 384
    expression_dim: int = 128
    hidden_dim: int = 256
    audio_context: int = 2
    num_layers: int = 3
    negative_slope: float = 0.2
    embedder: str = "substitute:384"

    def __post_init__(self) -> None:
        sizes = {
            "audio_dim": self.audio_dim,
            "expression_dim": self.expression_dim,
            "hidden_dim": self.hidden_dim,
        }
        bad = [f"{name}={value}" for name, value in sizes.items() if value < 1]
        if self.num_layers < 2:
            bad.append(f"num_layers={self.num_layers} (at least 2)")
        if self.audio_context < 0:
            bad.append(f"audio_context={self.audio_context}")
        if bad:
            raise InputError(f"invalid SpeechEncoderConfig: {', '.join(bad)}")


def _mlp(
    in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, slope: float
) -> nn.Sequential:
    widths = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i in range(num_layers):
        if i:
            layers.append(nn.LeakyReLU(slope))
        layers.append(nn.Linear(widths[i], widths[i + 1]))
    return nn.Sequential(*layers)


@torch.no_grad()
def _shrink_last_layer(mlp: nn.Sequential) -> None:
    last = mlp[-1]
    last.weight.mul_(LAST_LAYER_SCALE)
    last.bias.mul_(LAST_LAYER_SCALE)


class SpeechExpressionEncoder(PretrainedModel):
    """E_aud (supplementary Sec. 2.1): audio embeddings and z_0 to z-hat for every frame.

    MLP_c's first layer acts on the concatenation ``[audio_t, a_t]``; it is stored as two
    linear maps (``mlp_c_audio`` on the audio, with the bias, and ``mlp_c_state`` on a_t,
    without) whose sum is that layer, so that the audio part is computed for all frames at
    once and only the a_t part runs inside the frame loop. ``mlp_c`` holds its other layers.
    """

    config_class = SpeechEncoderConfig

    def __init__(self, config: SpeechEncoderConfig) -> None:
        super().__init__(config)
        c = config
        window_dim = (2 * c.audio_context + 1) * c.audio_dim
        self.mlp_b = _mlp(
            c.expression_dim, c.hidden_dim, c.expression_dim, c.num_layers, c.negative_slope
        )
        self.mlp_a = _mlp(
            c.expression_dim, c.hidden_dim, c.hidden_dim, c.num_layers, c.negative_slope
        )
        self.mlp_c_audio = nn.Linear(window_dim, c.hidden_dim)
        self.mlp_c_state = nn.Linear(c.hidden_dim, c.hidden_dim, bias=False)
        self.mlp_c = nn.Sequential(
            nn.LeakyReLU(c.negative_slope),
            *_mlp(c.hidden_dim, c.hidden_dim, c.expression_dim, c.num_layers - 1, c.negative_slope),
        )
        _shrink_last_layer(self.mlp_c)
        _shrink_last_layer(self.mlp_b)

    def audio_windows(self, audio: torch.Tensor) -> torch.Tensor:
        """``(B, T, A)`` to ``(B, T, (2 * audio_context + 1) * A)``: each frame's embedding
        with those of its neighbours, earlier frames first, zeros beyond the clip."""
        context = self.config.audio_context
        if context == 0:
            return audio
        steps = audio.shape[1]
        padded = F.pad(audio, (0, 0, context, context))
        return torch.cat([padded[:, k : k + steps] for k in range(2 * context + 1)], dim=2)

    def forward(self, audio: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
        """z-hat ``(B, T, expression_dim)`` for every frame of the clip, frame 0 included.

        Args:
            audio: per-frame audio embeddings ``(B, T, audio_dim)``, T >= 1.
            z0: expression code of the clip's first frame ``(B, expression_dim)``.
        """
        c = self.config
        if audio.ndim != 3 or audio.shape[2] != c.audio_dim or audio.shape[1] < 1:
            raise InputError(
                f"E_aud expects audio embeddings shaped (B, T, {c.audio_dim}) with T >= 1, "
                f"got {tuple(audio.shape)}"
            )
        if z0.ndim != 2 or z0.shape != (audio.shape[0], c.expression_dim):
            raise InputError(
                f"E_aud expects z0 shaped ({audio.shape[0]}, {c.expression_dim}) for audio "
                f"{tuple(audio.shape)}, got {tuple(z0.shape)}"
            )
        z_base = z0 + self.mlp_b(z0)
        audio_features = self.mlp_c_audio(self.audio_windows(audio))
        z_prev = z0
        outputs = []
        for t in range(audio.shape[1]):
            a_t = self.mlp_a(z_prev)
            z_prev = z_base + self.mlp_c(audio_features[:, t] + self.mlp_c_state(a_t))
            outputs.append(z_prev)
        return torch.stack(outputs, dim=1)
