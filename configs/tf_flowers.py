"""tf_flowers from tensorflow-datasets (3670 photos, 5 classes) with torchvision's ResNet-50 (v2 weights).

    python run.py train --config configs/tf_flowers.py --workdir runs/tf_flowers

Needs network once: the ResNet-50 weights are downloaded into $JAXTL_CACHE_DIR and the dataset is prepared
into $JAXTL_DATA_DIR/tfds (preparing needs TensorFlow: `pip install -e ".[tfds]"`). Fine-tunes the last two
stages and the head; the dataset has only a train split, so 20% is held out for validation and 10% for test.
Not measured here (no network on the development machines).
"""

from jaxtl.config import base_config


def get_config():
    config = base_config()
    config.model.name = "resnet50"
    config.model.weights = "default"
    config.data.source = "tfds"
    config.data.name = "tf_flowers"
    config.data.val_fraction = 0.2
    config.data.test_fraction = 0.1
    config.transfer.strategy = "finetune_top"
    config.transfer.num_stages = 2
    config.optimizer.lr = 0.01
    config.train.epochs = 5
    return config
