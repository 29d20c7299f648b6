"""Reward-adapter stage: a LoRA ``SEQ_CLS`` adapter and a 1-label score head, trained by trl.RewardTrainer.

The loss (Bradley-Terry, ``-log σ(r_chosen - r_rejected)``), tokenisation with the chat template, padding and
the length filter all come from TRL. This module builds the sequence-classification model, the LoRA and
trainer configs, holds out an evaluation split, scores it independently of the trainer, and saves a
directory that ``MultiAdapterModel.from_pretrained(..., reward_adapter=dir)`` loads:

    output_dir/
      adapter_config.json, adapter_model.safetensors   PEFT adapter, score head included (modules_to_save)
      tokenizer files                                  the tokenizer the adapter was trained with
      reward_metrics.json                              held-out accuracy and margin, throughput, config
      _COMPLETE                                        written last: the stage finished
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trl import RewardConfig

from . import devices
from .lora import SCORE_HEAD_MODULE, LoraArguments, check_lora_fields, lora_field, reward_lora_config
from .recipe.sections import BaseDtype

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

REWARD_METRICS_FILE = "reward_metrics.json"
COMPLETE_MARKER = "_COMPLETE"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass
class RewardAdapterConfig(LoraArguments, RewardConfig):
    """``trl.RewardConfig`` of the reward-adapter stage, plus its LoRA and held-out split.

    Every ``TrainingArguments`` / ``RewardConfig`` field is accepted (``optim``, ``warmup_steps``,
    ``eval_strategy``, ...). Defaults that differ from TRL's are the original multi-adapter PPO recipe's
    (LoRA r8 / alpha 32 / dropout 0.1, learning rate 2e-4, one epoch, 512 tokens) or what this stage needs
    (dropout kept on, no checkpoints: the final adapter is saved explicitly). ``use_cpu`` is turned on where
    no CUDA device is visible (``trl_multiadapter.devices``); ``output_dir`` is the stage's folder, set by
    ``train_reward_adapter``.
    """

    # ---- the reward adapter's LoRA (fields of LoraArguments, reward defaults) -----------------------
    lora_r: int = lora_field("lora_r", 8)
    lora_dropout: float = lora_field("lora_dropout", 0.1)

    # ---- ours ------------------------------------------------------------------------------------------
    eval_fraction: float = field(
        default=0.1,
        metadata={"help": "Share of the training pairs held out for evaluation when no eval dataset is given."},
    )
    dtype: BaseDtype = field(
        default="float32", metadata={"help": "Dtype of the base weights when the model is loaded from a path."}
    )

    # ---- defaults that differ from TRL's ---------------------------------------------------------------
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak AdamW learning rate."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the training pairs."})
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "Preference pairs per device per step (each pair is two sequences)."}
    )
    max_length: int | None = field(
        default=512,
        metadata={"help": "Pairs whose chosen or rejected sequence is longer are dropped (counted in metrics)."},
    )
    disable_dropout: bool = field(
        default=False,
        metadata={"help": "Turn every dropout (LoRA dropout included) off while training, as TRL does by default."},
    )
    eval_steps: float | None = field(
        default=None,
        metadata={
            "help": "Also evaluate every this many steps during training (turns eval_strategy 'no' into 'steps'); "
            "null: only at the end."
        },
    )
    save_strategy: str = field(
        default="no",
        metadata={"help": "Trainer checkpoints during training ('no': none; the final adapter is always saved)."},
    )
    include_num_input_tokens_seen: str | bool = field(
        default="non_padding", metadata={"help": "Count the trained tokens (the throughput in reward_metrics.json)."}
    )
    seed: int = field(default=42, metadata={"help": "Seed for the split, the score-head init and training."})
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; null turns it on where the GPU supports it."}
    )
    disable_tqdm: bool | None = field(
        default=None, metadata={"help": "Hide progress bars; null hides them when the CI variable is set."}
    )

    def __post_init__(self) -> None:
        self._check_reward_fields()
        self.use_cpu = self.use_cpu or devices.use_cpu()
        if self.bf16 is None:  # TRL's None means "bf16 unless fp16", which fails on GPUs without bf16
            self.bf16 = not self.fp16 and not self.use_cpu and _cuda_bf16_supported()
        if self.disable_tqdm is None:
            self.disable_tqdm = bool(os.environ.get("CI"))
        _prefer_activation_checkpointing(self)
        super().__post_init__()

    def _check_reward_fields(self) -> None:
        check_lora_fields(self, "reward")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"reward.{name} must be >= 1, got {getattr(self, name)}.")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"reward.eval_fraction must be in [0, 1), got {self.eval_fraction}; use 0 for no split.")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"reward.max_length must be >= 2 or null, got {self.max_length}.")
        if self.learning_rate <= 0:
            raise ValueError(f"reward.learning_rate must be > 0, got {self.learning_rate}.")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            raise ValueError("reward.num_train_epochs must be > 0 (or set reward.max_steps).")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"reward.max_steps must be -1 or >= 1, got {self.max_steps}.")
        if self.eval_steps is not None and self.eval_steps <= 0:
            raise ValueError(f"reward.eval_steps must be > 0 or null, got {self.eval_steps}.")
        if self.dtype not in typing.get_args(BaseDtype):
            raise ValueError(f"reward.dtype must be one of {typing.get_args(BaseDtype)}, got {self.dtype!r}.")

    def lora_config(self) -> LoraConfig:
        """The PEFT config: SEQ_CLS makes peft train and save the ``score`` head with the adapter."""
        return reward_lora_config(self)

    def reward_config(
        self, output_dir: str | os.PathLike, *, evaluate: bool, model_init_kwargs: dict | None = None
    ) -> RewardAdapterConfig:
        """A copy for ``trl.RewardTrainer`` in ``output_dir``: periodic evaluation only with held-out pairs."""
        periodic_eval = evaluate and (self.eval_steps is not None or self.eval_strategy != "no")
        eval_strategy = self.eval_strategy
        if not evaluate:
            eval_strategy = "no"
        elif self.eval_steps is not None and eval_strategy == "no":
            eval_strategy = "steps"
        return dataclasses.replace(
            self,
            output_dir=str(output_dir),
            eval_strategy=eval_strategy,
            eval_steps=self.eval_steps if periodic_eval else None,
            data_seed=self.data_seed if self.data_seed is not None else self.seed,
            model_init_kwargs=model_init_kwargs,
        )


def _cuda_bf16_supported() -> bool:
    import torch

    return devices.cuda_available() and torch.cuda.is_bf16_supported()


def _prefer_activation_checkpointing(config) -> None:
    """transformers 5.x renamed ``gradient_checkpointing`` to ``activation_checkpointing`` and warns on the old
    name; TRL still sets the old one (default True). The old name stays our documented key: carry it over."""
    if hasattr(config, "activation_checkpointing") and config.activation_checkpointing is None:
        config.activation_checkpointing = config.gradient_checkpointing


@dataclass
class RewardAdapterResult:
    """Where the adapter was saved and what it measured (the content of ``reward_metrics.json``)."""

    output_dir: Path
    metrics: dict[str, float]


def train_reward_adapter(
    model: str | os.PathLike | PreTrainedModel,
    train_dataset: Dataset | Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase | None = None,
    output_dir: str | os.PathLike = "reward_adapter",
    config: RewardAdapterConfig | None = None,
    eval_dataset: Dataset | Sequence[dict[str, Any]] | None = None,
    quantization_config: Any | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> RewardAdapterResult:
    """Train a LoRA reward adapter with ``trl.RewardTrainer`` and save it with its score head.

    ``model`` is a hub id or local path (loaded as a 1-label sequence classifier by TRL, honouring
    ``config.dtype`` and ``quantization_config``), a causal LM object (its backbone is copied into a
    sequence-classification twin with a freshly initialised score head; the object itself is not changed),
    or a 1-label sequence-classification model. Datasets hold preference pairs in TRL's format,
    conversational (``prompt`` messages, ``chosen``/``rejected`` assistant turns) or plain text. Without
    ``eval_dataset``, ``config.eval_fraction`` of the pairs is held out. The tokenizer is copied, never
    changed in place; it defaults to the one saved with a model path. ``model_kwargs`` (``revision``,
    ``attn_implementation``, ...) go to ``from_pretrained`` when ``model`` is a path.
    """
    from transformers import AutoTokenizer

    config = config or RewardAdapterConfig()
    output_dir = Path(output_dir)
    if tokenizer is None:
        if not isinstance(model, (str, os.PathLike)):
            raise ValueError(
                "Pass `tokenizer=` when `model` is a model object (it is only loaded from a path)."
            )
        tokenizer = AutoTokenizer.from_pretrained(str(model))
    tokenizer = prepare_reward_tokenizer(tokenizer)
    train_dataset = _as_dataset(train_dataset, "train_dataset")
    eval_dataset = None if eval_dataset is None else _as_dataset(eval_dataset, "eval_dataset")
    _check_chat_template(tokenizer, train_dataset)
    train_dataset, eval_dataset = _held_out_split(train_dataset, eval_dataset, config)

    (output_dir / COMPLETE_MARKER).unlink(missing_ok=True)  # a stale marker must not outlive a new run
    trainer = _reward_trainer(
        model, tokenizer, train_dataset, eval_dataset, output_dir, config, quantization_config, model_kwargs
    )
    metrics = _filter_counts(train_dataset, trainer.train_dataset, "train")
    _check_single_bos(trainer.train_dataset, tokenizer.bos_token_id)
    if eval_dataset is not None:
        metrics.update(_filter_counts(eval_dataset, trainer.eval_dataset, "eval"))

    train_output = trainer.train()
    metrics.update(_throughput(train_output.metrics, trainer.state.num_input_tokens_seen))
    if eval_dataset is not None:
        metrics.update(_held_out_metrics(trainer, tokenizer.pad_token_id, config.per_device_eval_batch_size))
    _save(trainer, tokenizer, output_dir, metrics, config)
    return RewardAdapterResult(output_dir=output_dir, metrics=metrics)


def _reward_trainer(
    model, tokenizer, train_dataset, eval_dataset, output_dir, config, quantization_config, model_kwargs
):
    from transformers import set_seed
    from trl import RewardTrainer

    set_seed(config.seed)  # the score head of a converted model is initialised here
    reward_model = _as_reward_model(model)
    from_path = isinstance(reward_model, str)
    if model_kwargs and not from_path:
        raise ValueError(
            "`model_kwargs` only apply when `model` is a hub id or path; the model object is used as is."
        )
    args = config.reward_config(
        output_dir,
        evaluate=eval_dataset is not None,
        model_init_kwargs={"dtype": config.dtype, **(model_kwargs or {})} if from_path else None,
    )
    return RewardTrainer(
        model=reward_model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=config.lora_config(),
        quantization_config=quantization_config,
    )


def _held_out_metrics(trainer, pad_token_id: int, batch_size: int) -> dict[str, float]:
    """TRL's evaluation (``trainer_eval_*``), and the held-out pairs scored again by ``score_pairs``."""
    trainer_eval = trainer.evaluate()
    metrics = {
        f"trainer_{key}": float(value)
        for key, value in trainer_eval.items()
        if key in ("eval_loss", "eval_accuracy", "eval_margin")
    }
    chosen, rejected = score_pairs(trainer.model, trainer.eval_dataset, pad_token_id, batch_size)
    return metrics | pairwise_metrics(chosen, rejected, prefix="eval_")


def _save(trainer, tokenizer, output_dir: Path, metrics: dict, config: RewardAdapterConfig) -> None:
    """Adapter + score head, tokenizer and metrics; the completion marker goes last (main process only)."""
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(output_dir)
        check_score_head_saved(output_dir)
        _write_json(output_dir / REWARD_METRICS_FILE, {"metrics": metrics, "config": config.to_dict()})
        (output_dir / COMPLETE_MARKER).write_text("reward adapter stage finished\n")
    trainer.accelerator.wait_for_everyone()


def is_reward_adapter_complete(output_dir: str | os.PathLike) -> bool:
    """True when ``output_dir`` holds a finished reward stage (its marker is written last)."""
    return (Path(output_dir) / COMPLETE_MARKER).is_file()


def load_reward_result(output_dir: str | os.PathLike) -> RewardAdapterResult:
    """The result of a finished stage, read back from disk (for pipelines that skip a finished stage)."""
    output_dir = Path(output_dir)
    if not is_reward_adapter_complete(output_dir):
        raise FileNotFoundError(
            f"{output_dir} holds no finished reward adapter (no {COMPLETE_MARKER} marker)."
        )
    saved = json.loads((output_dir / REWARD_METRICS_FILE).read_text())
    return RewardAdapterResult(output_dir=output_dir, metrics=saved["metrics"])


def score_pairs(model, pairs, pad_token_id: int, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``(N,)`` of the ``chosen_ids`` and ``rejected_ids`` of tokenised pairs, dropout off."""
    chosen = score_sequences(model, pairs["chosen_ids"], pad_token_id, batch_size)
    rejected = score_sequences(model, pairs["rejected_ids"], pad_token_id, batch_size)
    return chosen, rejected


def score_sequences(model, sequences: Sequence[Sequence[int]], pad_token_id: int, batch_size: int = 8):
    """Float32 scores ``(N,)`` of a sequence-classification model, right-padded as in reward training.

    The model is put in eval mode for the call and its previous mode restored afterwards.
    """
    import torch

    was_training = model.training
    device = next(model.parameters()).device
    scores = []
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                input_ids, attention_mask = _right_padded(sequences[start : start + batch_size], pad_token_id)
                logits = model(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)
                ).logits
                scores.append(logits[:, 0].float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(scores) if scores else torch.zeros(0)


def pairwise_metrics(chosen_scores, rejected_scores, prefix: str = "") -> dict[str, float]:
    """Pairwise accuracy (``r_chosen > r_rejected``, ties lose) and mean margin ``r_chosen - r_rejected``."""
    if len(chosen_scores) != len(rejected_scores):
        raise ValueError(f"{len(chosen_scores)} chosen scores but {len(rejected_scores)} rejected scores.")
    if len(chosen_scores) == 0:
        raise ValueError(
            "no pairs to evaluate: every held-out pair was filtered out (see reward.max_length)."
        )
    margins = chosen_scores.float() - rejected_scores.float()
    return {
        f"{prefix}pairwise_accuracy": (margins > 0).float().mean().item(),
        f"{prefix}mean_margin": margins.mean().item(),
        f"{prefix}num_pairs": len(margins),
    }


def check_score_head_saved(adapter_dir: str | os.PathLike) -> list[str]:
    """Names of the score-head tensors in a saved adapter; raises when there are none."""
    from safetensors import safe_open

    weights = Path(adapter_dir) / ADAPTER_WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights} is missing: the reward adapter was not saved in safetensors format."
        )
    with safe_open(str(weights), framework="pt") as saved:
        head_keys = [key for key in saved.keys() if f".{SCORE_HEAD_MODULE}." in f".{key}"]
    if not head_keys:
        raise RuntimeError(
            f"{weights} has no '{SCORE_HEAD_MODULE}' head weights: it would score with a random head. "
            "Train with task_type=SEQ_CLS (which saves the head via modules_to_save)."
        )
    return head_keys


def _as_reward_model(model):
    """A path stays a path (TRL loads it); a causal LM object becomes a 1-label seq-cls twin."""
    from peft import PeftModel
    from transformers import PreTrainedModel

    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    if isinstance(model, PeftModel):
        raise ValueError(
            "`model` is already a PeftModel: merge and unload its adapters (or pass the plain base model); "
            "the reward adapter is trained on the frozen base."
        )
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"`model` must be a hub id, a path or a transformers PreTrainedModel, got {type(model).__name__}."
        )
    if type(model).__name__.endswith("ForSequenceClassification"):
        if model.config.num_labels != 1:
            raise ValueError(
                f"the reward model needs num_labels=1, the given model has {model.config.num_labels}."
            )
        return model
    return _sequence_classifier_from_causal_lm(model)


def _sequence_classifier_from_causal_lm(causal_lm):
    """A sequence-classification model with the causal LM's backbone weights copied and a fresh score head.

    Copying (not sharing modules) keeps the caller's model free of the LoRA layers peft injects.
    """
    from transformers import AutoModelForSequenceClassification

    if getattr(causal_lm, "is_loaded_in_4bit", False) or getattr(causal_lm, "is_loaded_in_8bit", False):
        raise ValueError(
            "a quantized model object cannot be converted: pass its path and `quantization_config=`."
        )
    config = copy.deepcopy(causal_lm.config)
    config.num_labels = 1
    config.architectures = None
    reward_model = AutoModelForSequenceClassification.from_config(config, dtype=causal_lm.dtype)
    reward_model.base_model.load_state_dict(causal_lm.base_model.state_dict(), strict=True)
    return reward_model.to(causal_lm.device)


def prepare_reward_tokenizer(tokenizer):
    """A copy of ``tokenizer`` whose pad token is not its EOS.

    Sequence classifiers read the score at the last token that is not the pad token; with pad == EOS
    (a common default) that is the token *before* the closing EOS, while ``MultiAdapterModel.score``
    reads at the last attended token. A distinct pad keeps training and PPO scoring on the same token.
    """
    tokenizer = copy.deepcopy(tokenizer)
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return tokenizer
    for candidate in ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", tokenizer.unk_token):
        if candidate is not None and candidate in tokenizer.get_vocab() and candidate != tokenizer.eos_token:
            tokenizer.pad_token = candidate
            return tokenizer
    raise ValueError(
        f"the tokenizer's pad token is {tokenizer.pad_token!r}, the same as its EOS (or unset), and it has "
        "no spare special token: set `tokenizer.pad_token` to a token that is not a stop token."
    )


def _as_dataset(data, name: str):
    from datasets import Dataset

    if not isinstance(data, Dataset):
        if not isinstance(data, Sequence) or not all(isinstance(row, dict) for row in data):
            raise TypeError(
                f"{name} must be a datasets.Dataset or a list of dicts, got {type(data).__name__}."
            )
        data = Dataset.from_list(list(data))
    if len(data) == 0:
        raise ValueError(f"{name} is empty.")
    columns = set(data.column_names)
    if not ({"chosen", "rejected"} <= columns or {"chosen_ids", "rejected_ids"} <= columns):
        raise ValueError(
            f"{name} has columns {sorted(columns)}; a preference dataset needs 'chosen' and 'rejected' "
            "(optionally 'prompt'), e.g. from trl_multiadapter.data.prepare_preference_pairs."
        )
    return data


def _check_chat_template(tokenizer, dataset) -> None:
    from trl.data_utils import is_conversational

    if "chosen" in dataset.column_names and is_conversational(dataset[0]) and not tokenizer.chat_template:
        raise ValueError(
            "the preference pairs are conversational but the tokenizer has no chat template: set "
            "`tokenizer.chat_template` (e.g. trl.chat_template_utils.llama3_1_chat_template)."
        )


def _held_out_split(train_dataset, eval_dataset, config: RewardAdapterConfig):
    if eval_dataset is not None or config.eval_fraction == 0:
        return train_dataset, eval_dataset
    held_out = round(len(train_dataset) * config.eval_fraction)
    if held_out < 1 or held_out >= len(train_dataset):
        raise ValueError(
            f"reward.eval_fraction={config.eval_fraction} of {len(train_dataset)} pairs leaves "
            f"{held_out} for evaluation; pass more pairs, an eval dataset, or eval_fraction=0."
        )
    split = train_dataset.train_test_split(test_size=held_out, seed=config.seed)
    return split["train"], split["test"]


def _filter_counts(raw, prepared, split: str) -> dict[str, int]:
    """How many pairs TRL kept after its ``max_length`` filter; an empty training set is an error."""
    kept = len(prepared)
    dropped = len(raw) - kept
    if dropped:
        logger.warning(
            "%d of %d %s pairs exceed reward.max_length and were dropped.", dropped, len(raw), split
        )
    if kept == 0:
        raise ValueError(
            f"every {split} pair is longer than reward.max_length; raise it or shorten the pairs "
            "(prepare_preference_pairs(max_length=...) drops the earliest turns)."
        )
    return {f"{split}_pairs": kept, f"{split}_pairs_dropped_too_long": dropped}


def _check_single_bos(prepared, bos_token_id: int | None) -> None:
    """TRL renders conversations with ``apply_chat_template`` as is; a template that writes BOS with a
    tokenizer that adds one too would train on two, and the PPO scores (one BOS) would be off-distribution."""
    if bos_token_id is None:
        return
    first = prepared[0]["chosen_ids"]
    if len(first) >= 2 and first[0] == first[1] == bos_token_id:
        raise ValueError(
            "the tokenized pairs start with two BOS tokens: the chat template writes one and the tokenizer "
            "adds "
            "another. Remove the BOS from the template or turn off the tokenizer's add_bos_token."
        )


def _throughput(train_metrics: dict[str, float], tokens_seen: int) -> dict[str, float]:
    runtime = float(train_metrics["train_runtime"])
    return {
        "train_runtime": runtime,
        "train_loss": float(train_metrics["train_loss"]),
        "train_samples_per_second": float(train_metrics["train_samples_per_second"]),
        "train_tokens": int(tokens_seen),
        "train_tokens_per_second": tokens_seen / runtime if runtime > 0 else 0.0,
    }


def _right_padded(sequences, pad_token_id: int):
    import torch

    longest = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def _write_json(path: Path, payload: dict) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)


__all__ = [
    "COMPLETE_MARKER",
    "REWARD_METRICS_FILE",
    "RewardAdapterConfig",
    "RewardAdapterResult",
    "check_score_head_saved",
    "is_reward_adapter_complete",
    "load_reward_result",
    "pairwise_metrics",
    "prepare_reward_tokenizer",
    "score_pairs",
    "score_sequences",
    "train_reward_adapter",
]
