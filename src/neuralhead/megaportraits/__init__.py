"""MegaPortraits (Drobyshev et al., ACM MM 2022): one-shot megapixel neural head avatars.

Files mirror the paper: the appearance encoder E_app (:mod:`.appearance_encoder`), the motion
encoder E_mtn (:mod:`.motion_encoder`: head pose and expression), the warping generators
W_s→ and W_→d (:mod:`.warping_generator`), G3D (:mod:`.g3d`), the projection P and G2D
(:mod:`.g2d`), assembled into G_base (:mod:`.base_model`, Sec. 3.1 and A.1); the high-resolution
model G_enh (:mod:`.enhancer`, Sec. 3.2) and the student G_DT (:mod:`.student`, Sec. 3.3).
"""

from neuralhead.megaportraits.base_model import DriverMotion, MegaPortraitsBase, SourceState
from neuralhead.megaportraits.config import PRESETS, MegaPortraitsConfig, preset

__all__ = ["PRESETS", "DriverMotion", "MegaPortraitsBase", "MegaPortraitsConfig", "SourceState", "preset"]
