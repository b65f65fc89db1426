"""Presets of the EMOPortraits main model (EMOPortraits Sec. 4; supplementary 1.1-1.3).

EMOPortraits keeps the MegaPortraits base model's components (:mod:`neuralhead.megaportraits`)
and changes its expression space and its objective, so its presets are
:class:`~neuralhead.megaportraits.config.MegaPortraitsConfig` values:

* the latent expression descriptor ``z`` has 128 dimensions instead of 512 (Sec. 4.1);
* dropout is "a last layer of E_motion that predicts z" (supplementary 1.1): it acts on ``z``
  (``expression_output_dropout`` 0.2) instead of before the ResNet's linear layer (the
  authors' code puts it before that layer; we follow the paper);
* the weights of L_main (supplementary Eq. 1 and 1.3): w_IN 20, w_face 10, w_gaze 10, w_adv 1,
  w_FM 40, w_cos 2 with s = 5 and m = 0.2, w_sdm 1 with margin 0.5 for the main dataset
  (10 and 0.25 for the second dataset, set by the trainer; Eq. 3), w_CV 1 (Eq. 2), and the
  eye / mouth / ear masked L1 of L_head at 500 each (the paper names w_eyes, w_mouth and
  w_ears without values; 500 is the authors' code);
* 250k iterations at batch 16 (supplementary 1.2).

The supplementary's Fig. 8 also resizes some components; its figure is not legible in the
text we have, so the widths stay those of the MegaPortraits presets.
"""

from __future__ import annotations

from dataclasses import replace

from neuralhead.errors import InputError
from neuralhead.megaportraits.config import PRESETS as MEGAPORTRAITS_PRESETS
from neuralhead.megaportraits.config import MegaPortraitsConfig

#: What EMOPortraits changes in every MegaPortraits preset (see the module docstring).
EMOPORTRAITS_CHANGES = dict(
    expression_dim=128,
    expression_dropout=0.0,
    expression_output_dropout=0.2,
    weight_vgg19=20.0,
    weight_vggface=10.0,
    weight_gaze=10.0,
    weight_adv=1.0,
    weight_fm=40.0,
    weight_cos=2.0,
    cos_scale=5.0,
    cos_margin=0.2,
    weight_mismatch=1.0,
    mismatch_margin=0.5,
    weight_canonical_l1=1.0,
    weight_region_l1=500.0,
)

#: Second-dataset (FEED in the paper) weight and margin of the source-driver mismatch loss (Eq. 3).
SECONDARY_MISMATCH_WEIGHT = 10.0
SECONDARY_MISMATCH_MARGIN = 0.25

PRESETS: dict[str, MegaPortraitsConfig] = {
    "emoportraits-512": replace(
        MEGAPORTRAITS_PRESETS["megaportraits-512"],
        **EMOPORTRAITS_CHANGES,
        num_iterations=250_000,
        batch_size=16,
    ),
    "emoportraits-256": replace(
        MEGAPORTRAITS_PRESETS["megaportraits-256"],
        **EMOPORTRAITS_CHANGES,
        num_iterations=250_000,
        batch_size=16,
    ),
    # CPU-sized, for tests and smoke runs: the tiny MegaPortraits widths; z stays small too.
    "emoportraits-tiny": replace(
        MEGAPORTRAITS_PRESETS["megaportraits-tiny"],
        **{**EMOPORTRAITS_CHANGES, "expression_dim": 16},
    ),
}


def preset(name: str, **overrides) -> MegaPortraitsConfig:
    """The EMOPortraits preset ``name`` (see :data:`PRESETS`) with fields overridden by keyword."""
    if name not in PRESETS:
        raise InputError(
            f"unknown EMOPortraits preset {name!r}; available: {', '.join(sorted(PRESETS))}"
        )
    try:
        return replace(PRESETS[name], **overrides)
    except TypeError as exc:
        raise InputError(f"bad EMOPortraits model override: {exc}") from None
