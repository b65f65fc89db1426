"""HeadGAN (Doukas, Zafeiriou, Sharmanska, ICCV 2021): one-shot reenactment driven by 3D
face renders and audio, with compression, editing and frontalisation.

Files mirror the paper: the 3D face representation (:mod:`.face_model`, :mod:`.fitting`,
:mod:`.renderer`, Sec. 3.1 and App. A), the audio features (:mod:`.audio_features`, Sec. 3.2),
the dense flow network F and the rendering network R (:mod:`.flow_network`,
:mod:`.rendering_network`, :mod:`.generator`, Sec. 3.3 and App. C), the discriminators and
losses (App. B).
"""

from neuralhead.headgan.config import PRESETS, HeadGANConfig, preset
from neuralhead.headgan.face_model import MorphableModel, build_face_model, template_face_model
from neuralhead.headgan.fitting import FitResult, adapt_camera, driving_shape, fit_frames, project
from neuralhead.headgan.generator import HeadGANGenerator, create_generator
from neuralhead.headgan.renderer import render_ncc

__all__ = [
    "PRESETS",
    "FitResult",
    "HeadGANConfig",
    "HeadGANGenerator",
    "MorphableModel",
    "adapt_camera",
    "build_face_model",
    "create_generator",
    "driving_shape",
    "fit_frames",
    "preset",
    "project",
    "render_ncc",
    "template_face_model",
]
