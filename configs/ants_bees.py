"""Ants vs bees (hymenoptera_data, 245 train / 153 val images), the built-in default.

    JAXTL_DATA_DIR=../shared/data python run.py train --config configs/ants_bees.py --workdir runs/ants_bees

Fine-tunes the pretrained EfficientNet-Lite0 (weights from the pip package, offline) at a low LR.
Expected on a 2-core CPU: see README (best val accuracy and minutes, measured).
The data is read from $JAXTL_DATA_DIR/hymenoptera_data; if missing, PyTorch's tutorial archive is fetched.
"""

from jaxtl.config import base_config


def get_config():
    config = base_config()
    config.model.name = "efficientnet_lite0"
    config.model.weights = "default"
    config.data.path = "$JAXTL_DATA_DIR/hymenoptera_data"
    config.data.download_url = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
    config.data.augment.crop_scale = (0.25, 1.0)
    config.transfer.strategy = "finetune_all"
    config.optimizer.name = "sgd"
    config.optimizer.lr = 0.01
    config.optimizer.warmup_epochs = 1.0
    config.train.epochs = 5
    config.train.batch_size = 32
    return config
