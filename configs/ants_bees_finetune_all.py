"""Ants vs bees: fine-tune every layer at a low LR.

    JAXTL_DATA_DIR=../shared/data python run.py train --config configs/ants_bees_finetune_all.py --workdir runs/ants_bees_finetune_all

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
    config.transfer.strategy = 'finetune_all'
    config.optimizer.lr = 0.01
    config.train.epochs = 5
    return config
