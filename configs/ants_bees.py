"""Ants vs bees (hymenoptera_data: 245 train / 153 val images), the built-in default, and every strategy on it.

    JAXTL_DATA_DIR=../shared/data python run.py train --config configs/ants_bees.py --workdir runs/ants_bees
    JAXTL_DATA_DIR=../shared/data python run.py train --config configs/ants_bees.py:finetune_top --workdir runs/ants_bees_finetune_top

Variants (`:VARIANT`; measured on a 2-core CPU in README.md's strategy table):
- `linear_probe` (default): small data, similar to ImageNet (`run.py advise` measures it so), so the decision
  matrix says train a linear classifier on the pretrained features. The backbone runs once per image, its
  pooled features go to the feature cache, and a logistic-regression head (L2 chosen on val) trains on them; a
  second run reads the cache. Val accuracy 0.961, well under a minute.
- `finetune_top` (stage4 + head), `finetune_all`, `discriminative` (first group's LR = head's / 100): 5 epochs.
- `gradual`: head for 2 epochs, then +stage4 for 2, then +stage3 for 2.
- `norm_only`: the BatchNorm scales and biases and the head, 5 epochs.
- `scratch`: random init, 8 epochs (the baseline that shows what the pretrained weights are worth).
- `auto`: `transfer.strategy=auto` with the fine-tuning settings above: measures the data (small, ImageNet-like),
  scores the probes on val and trains the winner.
- `finetune_top_recipe`, `finetune_all_recipe`: the same runs with the parts of the fine-tuning recipe that
  measured as not costing accuracy here (`jaxtl.config.with_recipe`: TrivialAugment, flip TTA); docs/measured/
  strategies.md. Measured (best val, 5 epochs, 2-core CPU): 0.954 and 0.954 (plain 0.954 and 0.954).

EfficientNet-Lite0 with real ImageNet weights from the pip package (works offline).
Data: $JAXTL_DATA_DIR/hymenoptera_data; if missing, PyTorch's tutorial archive is fetched.
"""

from jaxtl.config import base_config, check_variant, with_recipe

VARIANTS = ("linear_probe", "finetune_top", "finetune_all", "discriminative", "gradual", "norm_only", "scratch",
            "auto", "finetune_top_recipe", "finetune_all_recipe")


def get_config(arg: str = "linear_probe"):
    variant = check_variant(arg, VARIANTS, "configs/ants_bees.py")
    if variant.endswith("_recipe"):
        return with_recipe(get_config(variant.removesuffix("_recipe")))
    config = base_config()
    config.model.name = "efficientnet_lite0"
    config.model.weights = "default"
    config.data.path = "$JAXTL_DATA_DIR/hymenoptera_data"
    config.data.download_url = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
    config.transfer.strategy = variant
    if variant == "linear_probe":
        return config  # logistic regression on cached features: no epochs, LR or augmentation to set

    config.data.augment.crop_scale = (0.25, 1.0)
    config.train.epochs = 5
    config.optimizer.lr = 0.01
    if variant == "discriminative":
        config.transfer.lr_ratio = 0.01
        config.optimizer.lr = 0.03
    elif variant == "gradual":
        config.transfer.phase_epochs = (2, 2, 2)  # the run's 6 epochs
        config.train.epochs = base_config().train.epochs  # derived from the phases, so left at its default
        config.optimizer.lr = 0.03
    elif variant == "norm_only":
        config.optimizer.lr = 0.03
    elif variant == "scratch":
        config.optimizer.lr = 0.05
        config.train.epochs = 8
    return config
