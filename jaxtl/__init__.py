"""jaxtl: transfer learning with pretrained ImageNet backbones in JAX/Flax.

The public API: models with their weights (`create_model`, `create_backbone`, `get_preprocessing`), features
(`extract_features`, `extract_to_folder`), and the functional core for a training loop of one's own
(`create_train_state`, `make_train_step`, `make_eval_step`, `evaluate`, `optimizer_from_rules`, `Freezing`,
`strategy_rules`, `make_mesh`, `global_batch`); README's "Your own loop" shows them together.
"""

from jaxtl.core.errors import JaxtlError
from jaxtl.core.preprocessing import Preprocessing
from jaxtl.core.sharding import global_batch, make_mesh
from jaxtl.data.images import load_image
from jaxtl.data.preprocess import eval_transform
from jaxtl.features.api import extract_to_folder
from jaxtl.features.extract import extract_features
from jaxtl.models.registry import MODELS, WEIGHTS
from jaxtl.train.evaluate import evaluate
from jaxtl.train.steps import (TrainState, create_train_state, eval_metrics, image_inputs, make_eval_step,
                               make_train_step)
from jaxtl.transfer.freeze import Freezing
from jaxtl.transfer.optimizer import optimizer_from_rules
from jaxtl.transfer.strategies import preset_rules as strategy_rules
from jaxtl.weights.create import create_backbone, create_model, get_preprocessing, headless

__all__ = ["MODELS", "WEIGHTS", "Freezing", "JaxtlError", "Preprocessing", "TrainState", "create_backbone",
           "create_model", "create_train_state", "eval_metrics", "evaluate", "eval_transform", "extract_features",
           "extract_to_folder", "get_preprocessing", "global_batch", "headless", "image_inputs", "load_image",
           "make_eval_step", "make_mesh", "make_train_step", "optimizer_from_rules", "strategy_rules"]
