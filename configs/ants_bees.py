"""Ants vs bees (hymenoptera_data: 245 train / 153 val images), the built-in default: linear probe.

    JAXTL_DATA_DIR=../shared/data python run.py train --config configs/ants_bees.py --workdir runs/ants_bees

Small data, similar to ImageNet (`run.py advise` measures it so): the decision matrix says train a linear
classifier on the pretrained features. EfficientNet-Lite0 with real ImageNet weights from the pip package (works
offline). The backbone runs once per image, its pooled features go to the feature cache, and a logistic
regression head (L2 chosen on val) trains on them; a second run reads the cache.

Measured on a 2-core CPU: see README.md (val accuracy 0.961, well under a minute).
Data: $JAXTL_DATA_DIR/hymenoptera_data; if missing, PyTorch's tutorial archive is fetched.
"""

from jaxtl.config import base_config


def get_config():
    config = base_config()
    config.model.name = "efficientnet_lite0"
    config.model.weights = "default"
    config.data.path = "$JAXTL_DATA_DIR/hymenoptera_data"
    config.data.download_url = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
    config.data.augment.crop_scale = (0.25, 1.0)
    config.transfer.strategy = "linear_probe"
    config.optimizer.lr = 0.1
    config.train.epochs = 10
    return config
