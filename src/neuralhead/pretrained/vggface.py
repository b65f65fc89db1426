"""VGG-Face (Parkhi, Vedaldi & Zisserman, "Deep Face Recognition", BMVC 2015) as a
multi-layer feature extractor.

MegaPortraits (Sec. 3.2) matches the features of a VGGFace network trained for face
recognition to preserve facial appearance (weight ``w_face``). VGG-Face is a VGG16
(configuration D) trained to classify 2,622 identities on 224x224 face crops.

The module carries the parameter names of Samuel Albanie's PyTorch port of the authors'
MatConvNet model, ``vgg_face_dag.pth`` (``conv1_1.weight`` ... ``conv5_3.bias``; its
``fc6``-``fc8`` classifier is not needed for features and is ignored), and applies that
port's preprocessing: RGB on the 0-255 scale minus the per-channel training mean
(129.186, 104.762, 93.594), no division (its ``meta`` std is 1). Images are not resized:
face crops of about 224x224 match the training data best.

No copy of ``vgg_face_dag.pth`` with a recorded SHA-256 could be found, so the registry
entry ``vggface`` is an unpinned ``.safetensors`` file the user converts from the published
``.pth`` (see :data:`VGGFACE`).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from neuralhead import weights
from neuralhead.pretrained.vgg import VGG16_BLOCKS, VGGFeatures

#: URL of the published port (the authors' MatConvNet model converted by S. Albanie).
VGGFACE_DAG_URL = "http://www.robots.ox.ac.uk/~albanie/models/pytorch-mcn/vgg_face_dag.pth"

#: Per-channel mean (R, G, B) on the 0-255 scale, from the ``meta`` of ``vgg_face_dag``.
VGGFACE_MEAN = (129.186279296875, 104.76238250732422, 93.59396362304688)

VGGFACE = weights.WeightFile(
    name="vggface",
    filename="vgg_face_dag.safetensors",
    sha256=None,
    url=None,
    license="VGG-Face (Parkhi et al. 2015), released by Oxford VGG for research; "
    "check its terms before other use",
    used_by="neuralhead.pretrained.vggface.VGGFace (face perceptual loss)",
    description="VGG-Face convolutional weights from S. Albanie's PyTorch port "
    "vgg_face_dag.pth, converted to safetensors",
    obtain=(
        f"Download {VGGFACE_DAG_URL} and convert it (at your own risk; weights_only=True "
        'refuses code in the pickle): python -c "import torch; from safetensors.torch '
        "import save_file; s = torch.load('vgg_face_dag.pth', map_location='cpu', "
        "weights_only=True); save_file({k: v.contiguous() for k, v in s.items() if "
        "k.startswith('conv')}, 'vgg_face_dag.safetensors')\"."
    ),
)
weights.register_weights(VGGFACE)


class VGGFace(VGGFeatures):
    """VGG-Face features of RGB images ``(B, 3, H, W)`` in ``[0, 1]`` (Parkhi et al. 2015).

    ``forward`` returns the activations of ``layers`` (names ``conv<b>_<n>``,
    ``relu<b>_<n>``, ``pool<b>`` as in VGG16), computed only as deep as the deepest one.
    The defaults relu1_1 ... relu5_1 mirror the ImageNet loss (our choice: the papers do not
    list the VGGFace layers). Parameters are named as in ``vgg_face_dag.pth``.
    """

    blocks = VGG16_BLOCKS
    default_layers = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
    weights_name = "vggface"
    input_scale = 255.0
    mean = VGGFACE_MEAN
    std = (1.0, 1.0, 1.0)

    def _install(self, layers: list[tuple[str, nn.Module]]) -> None:
        """Store each layer under its own name, as the published port does."""
        self._order = tuple(name for name, _ in layers)
        for name, module in layers:
            self.add_module(name, module)

    def _trunk(self) -> Iterable[nn.Module]:
        return (getattr(self, name) for name in self._order)
