"""EMOPortraits (Drobyshev et al., CVPR 2024): emotion-enhanced multimodal one-shot head avatars.

The main model is the MegaPortraits base model (:mod:`neuralhead.megaportraits`) with a 128-d
expression space and new losses (:mod:`.config`, :mod:`.losses`, :mod:`.trainer`), tools to
analyse that space (:mod:`.latent_space`), a speech-driven expression encoder E_aud
(:mod:`.audio_embedding`, :mod:`.audio_encoder`, :mod:`.speech_losses`,
:mod:`.speech_training`), a generator of head rotations from speech
(:mod:`.rotation_generator`, :mod:`.rotation_training`) and reenactment by video, audio or both
(:mod:`.reenact`).
"""

from neuralhead.emoportraits.config import PRESETS, preset

__all__ = ["PRESETS", "preset"]
