"""The images trainer: the classifier trained on augmented images through the input pipeline, phase by phase
(`jaxtl.train.loop.fit`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import ml_collections
from jax.sharding import Mesh

from jaxtl.core.errors import ConfigError
from jaxtl.data.augment import Policy
from jaxtl.data.pipeline import Augment
from jaxtl.train import plan as plans
from jaxtl.train.finish import Trained
from jaxtl.train.inputs import ImageSource
from jaxtl.train.loop import fit
from jaxtl.train.plan import FitSettings, Plan
from jaxtl.transfer.recipe import Mixing


@dataclass(frozen=True)
class Settings:
    fit: FitSettings
    augment: Augment


def settings(config: ml_collections.ConfigDict, groups: tuple[str, ...]) -> Settings:
    """What this trainer reads of the config (beyond what every run reads)."""
    a = config.data.augment
    policy = Policy(a.policy, a.magnitude, a.num_ops, a.color_jitter, a.random_erasing) if a.enabled else Policy()
    augment = Augment(crop_scale=tuple(a.crop_scale), flip=a.flip, enabled=a.enabled, policy=policy)
    fit = plans.fit_settings(config, groups, config.transfer.train_frozen_bn)
    mixing = Mixing(a.mixup, a.cutmix, a.mix_switch_prob) if a.mixup or a.cutmix else Mixing()
    return Settings(dataclasses.replace(fit, recipe=dataclasses.replace(fit.recipe, mixing=mixing)), augment)


def image_source(plan: Plan) -> ImageSource:
    """The plan's batches: its dataset through the input pipeline, augmented as its settings say."""
    return ImageSource(plan.dataset, plan.prep, plan.settings.augment, plan.batch_size, plan.seed, plan.workers,
                       balanced=plan.settings.fit.recipe.sampler == "balanced")


def train(plan: Plan, mesh: Mesh) -> Trained:
    model, variables = plan.model.create(plan.num_classes)
    source = image_source(plan)
    if source.steps_per_epoch() == 0:
        raise ConfigError(f"train.batch_size={plan.batch_size} is larger than the train split "
                          f"({len(plan.dataset.splits['train'])} images)")
    return fit(plan, plan.settings.fit, model, variables, source, mesh)
