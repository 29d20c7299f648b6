"""The export stage: servable adapters, value head, model card (``export/``)."""

from __future__ import annotations

import json
from typing import Any

from ..registry import register_stage
from .data_stage import DATA_REPORT_FILE
from .ppo_stage import PPO_FINAL_DIR
from .runner import (
    StageContext,
    StageFailedError,
    StageResult,
)
from .shared import base_model_path, load_tokenizer

# ----------------------------------------------------------------------------------------- export stage


@register_stage("export")
def export_stage(context: StageContext) -> StageResult:
    """Servable policy adapter + model card, value head, reward adapter; optional merged model and hub push."""
    from ..export import (
        MERGED_DIR,
        MODEL_CARD,
        POLICY_DIR,
        copy_saved_adapters,
        merge_policy,
        model_card,
        push_policy,
    )

    recipe = context.recipe
    artifacts = {"model_card": f"export/{MODEL_CARD}", "policy_adapter": f"export/{POLICY_DIR}",
                 "reward_adapter": "export/reward", "value_head": "export/value_head.safetensors"}
    metrics: dict[str, Any] = {}
    if context.is_main_process:
        final = context.path("ppo") / PPO_FINAL_DIR
        if not final.is_dir():
            raise StageFailedError(f"{final} is missing; run the 'ppo' stage first.")
        base = base_model_path(context)
        copy_saved_adapters(final, context.stage_dir, base)
        evaluation = context.path("evaluate") / "metrics.json"
        reward_metrics_file = context.path("reward") / "reward_metrics.json"
        reward_metrics = json.loads(reward_metrics_file.read_text())["metrics"] if reward_metrics_file.is_file() else {}
        card = model_card(recipe, json.loads(evaluation.read_text()) if evaluation.is_file() else None,
                          reward_metrics, prompts_held_out=_prompts_held_out(context))
        # One card: at the top of the export, and in policy/ because that folder is what the hub push uploads.
        for folder in (context.stage_dir, context.stage_dir / POLICY_DIR):
            (folder / MODEL_CARD).write_text(card)
        if recipe.export.merged_model:
            merge_policy(base, context.stage_dir / POLICY_DIR, context.stage_dir / MERGED_DIR, recipe.model.dtype,
                         load_tokenizer(context))
            artifacts["merged_model"] = f"export/{MERGED_DIR}"
        if recipe.export.push_to_hub:
            metrics["hub_url"] = push_policy(context.stage_dir / POLICY_DIR, recipe.export.hub_model_id,
                                             recipe.export.hub_private)
    context.wait_for_everyone()
    if not (context.stage_dir / "value_head.safetensors").is_file():
        del artifacts["value_head"]  # a critic-free advantage estimator trains no value model
    return StageResult(metrics=metrics, artifacts=artifacts)


def _prompts_held_out(context: StageContext) -> str | None:
    """How the data stage made the held-out prompts (its report's ``held_out.reason``), if it says."""
    report = context.path("data") / DATA_REPORT_FILE
    if not report.is_file():
        return None
    return ((json.loads(report.read_text()).get("prompts_eval") or {}).get("held_out") or {}).get("reason")
