"""``trl-multiadapter ppo --config ppo.yaml`` with a flat, TRL-style config (parsed by ``trl.TrlParser``).

The YAML holds ``MultiAdapterPPOConfig`` fields and the ``PPOScriptArguments`` below side by side, as TRL's
own scripts do::

    model_name_or_path: meta-llama/Llama-3.1-8B-Instruct
    reward_adapter: runs/hh_squad/reward
    dataset_name: prompts.jsonl        # a `prompt` column (chat messages or text)
    output_dir: runs/flat-ppo
    learning_rate: 1.0e-5
    batch_size: 4
    mini_batch_size: 1
    gradient_accumulation_steps: 4

Checkpoints go to ``output_dir/checkpoint-*`` (a rerun resumes from the last one) and the trained adapters to
``output_dir/final``. Sectioned recipes (``model:``, ``ppo:``, ...) run through the pipeline instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .lora import LoraArguments


@dataclass
class PPOScriptArguments(LoraArguments):
    """The flat config's model, data and policy-LoRA fields (the LoRA fields come from ``lora.LoraArguments``)."""

    model_name_or_path: str = field(
        default=None, metadata={"help": "Base causal LM: hub id, local folder, or builtin:tiny."}
    )
    reward_adapter: str | None = field(
        default=None, metadata={"help": "Folder of the PEFT SEQ_CLS reward adapter (the reward stage's output)."}
    )
    dataset_name: str = field(
        default=None,
        metadata={"help": "Prompts: a folder saved with datasets' save_to_disk, a .json/.jsonl/.parquet file, or a "
                          "hub id; it needs a `prompt` (or `input_ids`) column."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub dataset."})
    dtype: str = field(default="float32", metadata={"help": "Dtype of the frozen base weights."})


def parse_flat_config(config_path: str | os.PathLike, output_dir: str | None = None):
    """(MultiAdapterPPOConfig, PPOScriptArguments) from a flat YAML file, TRL's way."""
    from trl import TrlParser

    from .devices import use_cpu
    from .ppo_config import MultiAdapterPPOConfig

    argv = ["--config", str(config_path)] + (["--output_dir", output_dir] if output_dir else [])
    if use_cpu():
        argv += ["--use_cpu", "true"]  # also what lets accelerate form a gloo group for CPU data parallelism
    args, script_args = TrlParser((MultiAdapterPPOConfig, PPOScriptArguments)).parse_args_and_config(argv)
    for name in ("model_name_or_path", "dataset_name"):
        if getattr(script_args, name) is None:
            raise ValueError(f"{config_path}: `{name}` is required in a flat PPO config.")
    return args, script_args


def load_prompts(name: str, split: str):
    from datasets import load_dataset, load_from_disk

    path = Path(name)
    if path.is_dir() and (path / "dataset_info.json").is_file():
        return load_from_disk(str(path))
    if path.is_file():
        kind = "parquet" if path.suffix == ".parquet" else "json"
        return load_dataset(kind, data_files=str(path), split="train")
    return load_dataset(name, split=split)


def run_flat_ppo(config_path: str | os.PathLike, output_dir: str | None = None) -> Path:
    """Train the policy adapter with a flat config; returns the folder of the final adapters."""
    from .checkpointing import latest_checkpoint
    from .lora import policy_lora_config
    from .ppo_trainer import MultiAdapterPPOTrainer

    args, script = parse_flat_config(config_path, output_dir)
    args.model_init_kwargs = {"dtype": script.dtype, **(args.model_init_kwargs or {})}
    lora = policy_lora_config(script)
    # The trainer's one builder resolves ids, folders and builtin: names, seeded by args.seed.
    trainer = MultiAdapterPPOTrainer(model=script.model_name_or_path, args=args, reward_adapter=script.reward_adapter,
                                     peft_config=None if args.policy_adapter else lora,
                                     train_dataset=load_prompts(script.dataset_name, script.dataset_split))
    checkpoint = latest_checkpoint(args.output_dir)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    final = Path(args.output_dir) / "final"
    trainer.save_model(str(final))
    return final
