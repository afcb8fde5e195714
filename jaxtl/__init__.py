"""jaxtl: transfer learning with pretrained ImageNet backbones in JAX/Flax."""

from jaxtl.create import create_backbone, create_model, get_preprocessing, headless
from jaxtl.data.preprocess import Preprocessing, eval_transform, load_image
from jaxtl.errors import JaxtlError
from jaxtl.features.api import extract_to_folder
from jaxtl.features.extract import extract_features
from jaxtl.models.registry import MODELS
from jaxtl.weights.registry import WEIGHTS

__all__ = ["MODELS", "WEIGHTS", "JaxtlError", "Preprocessing", "create_backbone", "create_model", "eval_transform",
           "extract_features", "extract_to_folder", "get_preprocessing", "headless", "load_image"]
