"""Ants vs bees: fine-tune the last stage (stage4, with the 1x1 head conv) and the head.

    JAXTL_DATA_DIR=../shared/data python run.py train --config configs/ants_bees_finetune_top.py --workdir runs/ants_bees_finetune_top

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
    config.transfer.strategy = 'finetune_top'
    config.transfer.num_stages = 1
    config.optimizer.lr = 0.01
    config.train.epochs = 5
    return config
