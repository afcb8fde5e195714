"""Ants vs bees: every layer trains, LRs geometric from 1/100 of the head's at the stem.

    JAXTL_DATA_DIR=../shared/data python run.py train --config configs/ants_bees_discriminative.py --workdir runs/ants_bees_discriminative

Measured on a 2-core CPU: see the strategy table in README.md (val accuracy and minutes).
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
    config.transfer.strategy = 'discriminative'
    config.transfer.lr_ratio = 0.01
    config.optimizer.lr = 0.03
    config.train.epochs = 5
    return config
