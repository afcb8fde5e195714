"""Sign-language digits: a linear head on earlier-layer features too, what `run.py advise` recommends here.

    JAXTL_DATA_DIR=../shared/data python run.py train --config configs/sign_language_earlier_layers.py --workdir runs/sign_language_earlier_layers

Small data unlike ImageNet (CS231n's "small and different" cell): the last stage's features are the most
ImageNet-specific, so the head reads the pooled stage2 and stage3 features as well as the pre-logits, all from
the feature cache (logistic regression, L2 chosen on val). Compare with sign_language_linear_probe.py (pre-logits
only) and sign_language_finetune_all.py. Measured on a 2-core CPU: see README.md.
"""

from jaxtl.config import base_config


def get_config():
    config = base_config()
    config.model.name = "efficientnet_lite0"
    config.model.weights = "default"
    config.data.path = "$JAXTL_DATA_DIR/sign_language_digits"
    config.data.val_fraction = 0.2
    config.data.test_fraction = 0.1
    config.data.input_size = 128
    config.transfer.strategy = "linear_probe"
    config.head.layers = ("stage2", "stage3", "pre_logits")
    return config
