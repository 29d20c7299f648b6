"""The evaluate stage: base vs aligned on held-out prompts (``evaluate/``)."""

from __future__ import annotations

import json
from typing import Any

from ..progress import plain_progress
from ..registry import register_stage
from .data_stage import load_stage_dataset
from .ppo_stage import LOG_HISTORY_FILE, PPO_FINAL_DIR
from .runner import (
    StageContext,
    StageFailedError,
    StageResult,
)
from .shared import base_model_path, load_tokenizer

# --------------------------------------------------------------------------------------- evaluate stage


def load_trained_model(context: StageContext):
    """The shared base with every adapter of the finished PPO stage (policy, reward, value head)."""
    from ..devices import process_device_map
    from ..model import MultiAdapterModel

    recipe = context.recipe
    final = context.path("ppo") / PPO_FINAL_DIR
    if not final.is_dir():
        raise StageFailedError(f"{final} is missing; run the 'ppo' stage first.")
    model = MultiAdapterModel.from_pretrained(
        base_model_path(context), from_saved=str(final), quantization_config=recipe.quantization.bitsandbytes_config(),
        dtype=recipe.model.dtype, **process_device_map(),
    )
    return model.eval()


@register_stage("evaluate")
def evaluate_stage(context: StageContext) -> StageResult:
    """Base vs aligned on held-out prompts, sampled by PPO's sampler with PPO's settings: metrics.json,
    samples.jsonl, PNG plots (main process only)."""
    from ..evaluate import evaluate_policies, mixed_precision, sampling_settings, write_outputs
    from ..ground_truth import ground_truth_for
    from ..plots import plot_reward_histogram, plot_training_curves

    settings, ppo, data = context.recipe.evaluate, context.recipe.ppo, context.recipe.data
    metrics: dict[str, Any] = {}
    samples = tokens = 0
    if context.is_main_process:
        prompts = load_stage_dataset(context, "prompts_eval")
        if prompts is None or len(prompts) == 0:
            raise StageFailedError("the evaluate stage needs held-out prompts (data.prompts.eval_split).")
        prompts = prompts.select(range(min(settings.num_prompts, len(prompts))))
        model = load_trained_model(context)
        tokenizer = load_tokenizer(context)
        with mixed_precision(ppo, model.device):
            metrics, records, scores = evaluate_policies(
                model, tokenizer, prompts, sampling_settings(ppo, settings, tokenizer, model),
                batch_size=settings.batch_size, seed=settings.seed,
                end_of_turn_token=getattr(ppo, "end_of_turn_token", "auto"),
                ground_truth=ground_truth_for((data.preference.source, data.prompts.source)),
                progress=plain_progress("evaluate prompts"),
            )
        write_outputs(context.stage_dir, metrics, records, settings.num_shown_samples)
        plot_reward_histogram(scores, context.stage_dir / "reward_histogram.png")
        history_file = context.path("ppo") / LOG_HISTORY_FILE
        if history_file.is_file():
            plot_training_curves(json.loads(history_file.read_text()), context.stage_dir / "training_curves.png")
        prompt_tokens = sum(len(ids) for ids in prompts["input_ids"])
        samples = 2 * len(prompts)
        tokens = 2 * prompt_tokens + int(len(prompts) * (metrics["base"]["response_length"]
                                                         + metrics["aligned"]["response_length"]))
    context.wait_for_everyone()
    summary = {f"{policy}_{key}": value for policy in ("base", "aligned")
               for key, value in metrics.get(policy, {}).items()}
    if "win_rate" in metrics:
        summary["win_rate"] = metrics["win_rate"]
    return StageResult(samples=samples, tokens=tokens, metrics=summary,
                       artifacts={"metrics": "evaluate/metrics.json", "samples": "evaluate/samples.jsonl",
                                  "reward_histogram": "evaluate/reward_histogram.png",
                                  "training_curves": "evaluate/training_curves.png"})
