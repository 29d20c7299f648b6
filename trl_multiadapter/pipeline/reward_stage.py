"""The reward stage: the reward adapter, trained with ``trl.RewardTrainer`` (``reward/``)."""

from __future__ import annotations

from ..registry import register_stage
from .data_stage import load_stage_dataset
from .runner import (
    StageContext,
    StageFailedError,
    StageResult,
)
from .shared import base_model_path, load_tokenizer

# ----------------------------------------------------------------------------------------- reward stage


@register_stage("reward")
def reward_stage(context: StageContext) -> StageResult:
    """Train the reward adapter with trl.RewardTrainer; report held-out pairwise accuracy."""
    from ..recipe import build_reward_config
    from ..reward import train_reward_adapter

    recipe = context.recipe
    train = load_stage_dataset(context, "preference_train")
    if train is None:
        raise StageFailedError("the reward stage needs the data stage's preference pairs; run the 'data' stage.")
    eval_pairs = load_stage_dataset(context, "preference_eval")
    result = train_reward_adapter(
        base_model_path(context),
        train,
        tokenizer=load_tokenizer(context),
        output_dir=context.stage_dir,
        config=build_reward_config(recipe.reward, recipe.model),
        eval_dataset=eval_pairs,
        quantization_config=recipe.quantization.bitsandbytes_config(),
    )
    metrics = dict(result.metrics)
    epochs = recipe.reward.num_train_epochs if recipe.reward.max_steps < 0 else None
    pairs = metrics.get("train_pairs", len(train))
    samples = int(round(pairs * epochs)) if epochs else recipe.reward.max_steps * (
        recipe.reward.per_device_train_batch_size * recipe.reward.gradient_accumulation_steps * context.num_processes
    )
    return StageResult(samples=samples, tokens=int(metrics.get("train_tokens", 0)), metrics=metrics,
                       artifacts={"reward_adapter": "reward"})
