"""Sign-language digits (2062 hand signs, 10 classes, very unlike ImageNet), seeded 70/20/10 split, 128x128.

    JAXTL_DATA_DIR=../shared/data python run.py train --config configs/sign_language.py:earlier_layers --workdir runs/sign_language_earlier_layers

Variants (`:VARIANT`; measured on a 2-core CPU in README.md's sign-language table):
- `linear_probe` (default): logistic regression on the cached pre-logits.
- `earlier_layers`: what `run.py advise` recommends here (CS231n's "small and different" cell): the last stage's
  features are the most ImageNet-specific, so the head also reads the pooled stage2 and stage3 features, all
  from the feature cache (logistic regression, L2 chosen on val).
- `norm_only`: re-normalise and re-weight the pretrained features (BatchNorm scales and biases) and train the
  head, 3 epochs: the cheap fine-tuning the field uses under domain shift.
- `bitfit`: every bias of the backbone and the head, 3 epochs (1.0% of Lite0's parameters): 0.725 / 0.712.
- `lora`: rank-8 LoRA factors beside the 1x1 convolutions and the head, 3 epochs (5.8% of the parameters; merged
  into plain kernels for evaluation and the kept model): 0.951 / 0.971 val / test, 8.8 train min on a 2-core CPU.
  With `--config.model.name=mobilenet_v2` LR 0.01 does not train (its frozen BatchNorm amplifies the adapters'
  changes, README); `--config.optimizer.lr=0.002`: 0.800 / 0.788.
- `finetune_all`: every layer, 3 epochs; `finetune_top`: the last stage and the head, 3 epochs.
- `finetune_top_recipe`, `finetune_all_recipe`: the same with the parts of the fine-tuning recipe that measured as
  not costing accuracy at 3 epochs (`jaxtl.config.with_recipe`: TrivialAugment); docs/measured/strategies.md.
  Measured (val / test): 0.961 / 0.981 (plain 0.964 / 0.976) and 0.939 / 0.933 (plain 0.939 / 0.938). The
  five-part recipe it replaced (with layer-wise LR decay 0.75 and Mixup 0.2) gave 0.854 / 0.880 and 0.815 / 0.832.
- `auto`: `transfer.strategy=auto` with the fine-tuning settings above: measures the data (medium: 1,443 training
  images, 144 a class; unlike ImageNet), tries the probes and the cell's four fine-tuning candidates by successive
  halving (each candidate's own 3-epoch run, paused after each epoch, the better half going on; the top-stage
  ones on cached maps of the frozen part), and continues the winner: here `finetune_top` of two stages on cached
  maps, val 0.976 / test 0.995, 4.1 min wall of its 10-minute budget (docs/measured/auto.md).
"""

from jaxtl.config import base_config, check_variant, with_recipe

VARIANTS = ("linear_probe", "earlier_layers", "norm_only", "bitfit", "lora", "finetune_all", "auto", "finetune_top",
            "finetune_top_recipe", "finetune_all_recipe")


def get_config(arg: str = "linear_probe"):
    variant = check_variant(arg, VARIANTS, "configs/sign_language.py")
    if variant.endswith("_recipe"):
        return with_recipe(get_config(variant.removesuffix("_recipe")))
    config = base_config()
    config.model.name = "efficientnet_lite0"
    config.model.weights = "default"
    config.data.path = "$JAXTL_DATA_DIR/sign_language_digits"
    config.data.val_fraction = 0.2
    config.data.test_fraction = 0.1
    config.data.input_size = 128
    if variant in ("linear_probe", "earlier_layers"):
        config.transfer.strategy = "linear_probe"
        if variant == "earlier_layers":
            config.head.layers = ("stage2", "stage3", "pre_logits")
        return config

    config.transfer.strategy = variant
    config.data.augment.crop_scale = (0.5, 1.0)
    config.data.augment.flip = False  # a mirrored hand sign may be another sign
    config.train.epochs = 3
    config.optimizer.lr = {"norm_only": 0.05, "bitfit": 0.05, "lora": 0.01}.get(variant, 0.02)
    if variant == "finetune_top":
        config.transfer.num_stages = 1
    return config
