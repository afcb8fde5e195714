"""Sign-language digits (2062 hand signs, very unlike ImageNet; seeded 70/20/10 split): linear probe.

    JAXTL_DATA_DIR=../shared/data python run.py train --config configs/sign_language_linear_probe.py --workdir runs/sign_language_linear_probe

A logistic-regression head on the cached pre-logits features (L2 chosen on val). With
sign_language_earlier_layers.py and sign_language_finetune_all.py, the decision matrix's check: on data unlike
ImageNet, the last layer's features alone are the weakest choice. Images are mostly 100x100, so the model runs
at 128x128. Measured on a 2-core CPU: see README.md.
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
    config.data.augment.crop_scale = (0.5, 1.0)
    config.data.augment.flip = False  # a mirrored hand sign may be another sign
    config.transfer.strategy = "linear_probe"
    config.optimizer.lr = 0.1
    config.train.epochs = 5
    return config
