"""The PPO stage: the policy adapter + value head, trained by ``MultiAdapterPPOTrainer`` (``ppo/``)."""

from __future__ import annotations

import json
from pathlib import Path

from ..registry import register_stage
from .data_stage import load_stage_dataset
from .runner import (
    STAGE_MARKER,
    StageContext,
    StageFailedError,
    StageResult,
    _json_default,
    _write_text_atomically,
)
from .shared import base_model_path, load_tokenizer

# -------------------------------------------------------------------------------------------- ppo stage

PPO_FINAL_DIR = "final"
LOG_HISTORY_FILE = "log_history.json"


def ppo_config_for(context: StageContext):
    """The MultiAdapterPPOConfig of this run: the recipe's ppo section, checkpoints under the stage folder, and
    the model's load options (dtype, 4-bit, this process's device) for the trainer's one model builder."""
    from ..devices import process_device_map, use_cpu
    from ..recipe import build_ppo_config

    recipe = context.recipe
    quantization = recipe.quantization.bitsandbytes_config()
    model_init_kwargs = {"dtype": recipe.model.dtype, **process_device_map()}
    if quantization is not None:
        model_init_kwargs["quantization_config"] = quantization.to_dict()  # JSON-friendly, as ppo_config.json keeps it
    return build_ppo_config(recipe.ppo, output_dir=context.stage_dir, model_init_kwargs=model_init_kwargs,
                            **({"use_cpu": True} if use_cpu() else {}))


@register_stage("ppo")
def ppo_stage(context: StageContext) -> StageResult:
    """Train the policy adapter + value head with PPO; checkpoints under ppo/, resumed after a kill."""
    from ..checkpointing import latest_checkpoint
    from ..ppo_trainer import MultiAdapterPPOTrainer

    prompts = load_stage_dataset(context, "prompts_train")
    if prompts is None:
        raise StageFailedError("the ppo stage needs the data stage's prompts; run the 'data' stage.")
    if not (context.path("reward") / STAGE_MARKER).is_file() and not (context.path("reward") / "_COMPLETE").is_file():
        raise StageFailedError("the ppo stage needs a finished reward adapter; run the 'reward' stage.")
    from ..recipe import ppo_lora_config

    args = ppo_config_for(context)
    # The trainer builds base + policy LoRA + value head + reward adapter (seeded by args.seed, so a resumed
    # run that skipped the earlier stages starts from the same weights).
    trainer = MultiAdapterPPOTrainer(
        model=base_model_path(context),
        args=args,
        processing_class=load_tokenizer(context),
        train_dataset=prompts,
        reward_adapter=str(context.path("reward")),
        reward_funcs=_reward_functions(context),
        peft_config=None if args.policy_adapter else ppo_lora_config(context.recipe.ppo),
    )
    checkpoint = latest_checkpoint(context.stage_dir)
    if checkpoint is not None:
        print(f"[ppo] resuming from {checkpoint}", flush=True)
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    trainer.save_model(str(context.stage_dir / PPO_FINAL_DIR))
    history = trainer.state.log_history
    if context.is_main_process:
        _write_text_atomically(context.stage_dir / LOG_HISTORY_FILE, json.dumps(history, indent=1,
                                                                              default=_json_default))
    iterations = output.global_step
    # Throughput counts what this process did: a resumed stage ran only the iterations after its checkpoint.
    resumed_at = trainer_checkpoint_step(checkpoint)
    samples = (iterations - resumed_at) * args.batch_size * context.num_processes
    lengths = [entry["val/response_length"] for entry in history if "val/response_length" in entry]
    mean_response = sum(lengths) / len(lengths) if lengths else float(args.max_new_tokens)
    mean_prompt = sum(len(ids) for ids in prompts["input_ids"]) / max(len(prompts), 1)
    final = {key: value for key, value in (history[-1] if history else {}).items() if isinstance(value, (int, float))}
    metrics = {"iterations": iterations, "iterations_this_run": iterations - resumed_at,
               "resumed_from": str(checkpoint) if checkpoint else None, **final}
    return StageResult(samples=samples, tokens=int(samples * (mean_prompt + mean_response)), metrics=metrics,
                       artifacts={"adapters": f"ppo/{PPO_FINAL_DIR}", "log_history": f"ppo/{LOG_HISTORY_FILE}"})


def trainer_checkpoint_step(checkpoint: Path | None) -> int:
    """The PPO iteration a ``checkpoint-<step>`` folder was written at (0 without one)."""
    return int(checkpoint.name.rsplit("-", 1)[1]) if checkpoint is not None else 0


def _reward_functions(context: StageContext) -> list | None:
    """Registered reward functions named in stage_options.ppo.reward_funcs (instead of the reward adapter)."""
    from ..registry import reward_functions

    names = context.options.get("reward_funcs")
    if not names:
        return None
    return [reward_functions.get(name) for name in names]
