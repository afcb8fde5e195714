"""Backbones as Flax Linen modules: one file per family (`resnet`, `efficientnet_lite`, `vgg`, `mobilenet_v2`,
`vit`), each registering its variants and pretrained weights (`registry.MODELS`, `registry.WEIGHTS`) next to
the model; the contract they share and its vocabulary (`backbone`), shared layers and blocks, and the classifier
that composes a backbone with a head. Importing this package registers every family, in this order."""

from jaxtl.models import resnet  # noqa: F401  (registration, in the order `MODELS` lists the families)
from jaxtl.models import efficientnet_lite  # noqa: F401
from jaxtl.models import vgg  # noqa: F401
from jaxtl.models import mobilenet_v2  # noqa: F401
from jaxtl.models import vit  # noqa: F401
