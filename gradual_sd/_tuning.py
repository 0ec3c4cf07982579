"""The numbers stage discovery decides by, each with what it decides (docs/design.md says why)."""

from __future__ import annotations


# Heads before the model's own classifier by default: the paper's three auxiliary classifiers.
DEFAULT_MAX_HEADS = 3

# The second dry run's input is this many times larger along each spatial axis: the axes that
# grow are spatial, the prefix tokens are those that do not.
SCALE = 2

# A map's spatial axis may grow this many pixels beyond SCALE times (a convolution's padding)
# and still count as growing with the input; more is an attention map or unfolded patches.
PADDING_PIXELS = 2

# At most this many class, distillation and register tokens before the patch tokens; a larger
# remainder is read as patches.
MAX_PREFIX = 16

# One reduction is a finer resolution than another from this factor on, so a map a pixel or two
# larger (padding) is not a finer resolution.
FINER = 1.5

# Outputs at a smaller reduction than this are the stem: timm's feature_info stages below it are
# not candidates, and shape-found stems are left out where enough deeper resolutions follow.
STEM_REDUCTION = 4

# The stem is left out where at least this many resolutions at STEM_REDUCTION or deeper are
# found (two intermediate ones and the last).
DEEP_RESOLUTIONS = 3

# A module holding at least this many listed outputs of its resolution (itself included) is a
# container of layers, which is preferred as a stage over single layers.
MIN_CONTAINER = 2

# A run of numbered sibling blocks needs at least this many to be an isotropic model's stages.
MIN_BLOCKS = 2

# Where more than this share of the parameters runs after the deepest resolution found (a
# Perceiver's latent blocks), that resolution's stages are not the model's stages.
MAX_SHARE_AFTER = 0.5
