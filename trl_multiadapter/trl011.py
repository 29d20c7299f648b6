"""TRL 0.11 names for multi-adapter PPO scripts: change the imports, keep the loop.

    # from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
    from trl_multiadapter.trl011 import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

``PPOConfig(**trl_0_11_kwargs)`` returns a :class:`MultiAdapterPPOConfig`; ``PPOTrainer(config, model,
ref_model=None, tokenizer=..., dataset=..., data_collator=...)`` a :class:`MultiAdapterPPOTrainer` whose
``dataloader``, ``generate``, ``step`` and ``log_stats`` behave like TRL 0.11's;
``AutoModelForCausalLMWithValueHead.from_pretrained(name, peft_config=..., reward_adapter=...)`` builds a
:class:`MultiAdapterModel` that also answers ``compute_reward_score``. The fixes of this package apply:
dropout is off, logprobs use the sampling temperature, gradients are clipped (``max_grad_norm``
defaults to 1.0 where TRL 0.11 did not clip), and scores are read at the last non-pad token.
New code should use the TRL-1.x-style classes directly (docs/migrating_from_trl_0_11.md).
"""

from __future__ import annotations

import tempfile
import warnings
from typing import Any

import torch

from .devices import use_cpu
from .model import MultiAdapterModel
from .ppo_config import MultiAdapterPPOConfig
from .ppo_trainer import MultiAdapterPPOTrainer
from .prompts import encode_prompts, select_columns
from .rollout import left_pad

# TRL 0.11 PPOConfig fields with no counterpart here (tracking, hub, device-cache and dataset knobs).
_IGNORED_FIELDS = {
    "exp_name", "task_name", "model_name", "query_dataset", "reward_model", "remove_unused_columns",
    "tracker_kwargs", "accelerator_kwargs", "project_kwargs", "tracker_project_name", "push_to_hub_if_best_kwargs",
    "steps", "forward_batch_size", "world_size", "optimize_cuda_cache", "optimize_device_cache", "compare_steps",
    "is_encoder_decoder", "is_peft_model", "backward_batch_size", "global_backward_batch_size", "global_batch_size",
    "dataset_num_proc",
}
_RENAMED_FIELDS = {"kl_penalty": "kl_estimator", "log_with": "report_to"}
_UNSUPPORTED_FIELDS = {"early_stopping": False, "target_kl": None}


def PPOConfig(**kwargs: Any) -> MultiAdapterPPOConfig:  # noqa: N802 - TRL 0.11's class name
    """A :class:`MultiAdapterPPOConfig` from TRL 0.11 ``PPOConfig`` keyword arguments."""
    # TRL 0.11 wrote no checkpoints; a temporary folder keeps the working directory clean.
    output_dir = kwargs.pop("output_dir", None) or tempfile.mkdtemp(prefix="trl011-ppo-")
    settings: dict[str, Any] = {"output_dir": output_dir, "save_strategy": "no"}
    if use_cpu():
        settings["use_cpu"] = True
    for name, value in kwargs.items():
        if name in _IGNORED_FIELDS:
            continue
        if name in _UNSUPPORTED_FIELDS:
            if value not in (_UNSUPPORTED_FIELDS[name], 1):
                warnings.warn(f"PPOConfig({name}=...) of TRL 0.11 is not supported and is ignored", stacklevel=2)
            continue
        if name == "max_grad_norm" and value is None:
            continue  # keep clipping on (TRL 0.11 did not clip by default)
        if name == "log_with" and value is None:
            value = "none"
        settings[_RENAMED_FIELDS.get(name, name)] = value
    return MultiAdapterPPOConfig(**settings)


class AutoModelForCausalLMWithValueHead(MultiAdapterModel):
    """``MultiAdapterModel`` under TRL 0.11's name, with ``compute_reward_score``."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, peft_config=None, reward_adapter=None,
                        reward_adapter_name: str | None = None, **kwargs):
        if args:
            raise TypeError("pass from_pretrained options as keywords")
        kwargs.pop("use_safetensors", None)
        if kwargs.pop("is_trainable", True) is False:
            raise ValueError("a PPO policy must be trainable")
        return super().from_pretrained(
            pretrained_model_name_or_path, policy_config=peft_config, reward_adapter=reward_adapter, **kwargs
        )

    @torch.no_grad()
    def compute_reward_score(self, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
        """Every label of the reward head at each row's last non-pad token, shape (B, 1, num_labels).

        TRL 0.11 returned (B, T, num_labels) and scripts read ``[:, -1, label]``, which under right
        padding is a pad position; here position -1 is the last real token of every row.
        """
        num_labels = self.reward_head.out_features if self.reward_head is not None else 1
        chosen = self.reward_label_index
        columns = []
        try:
            for label in range(num_labels):
                self.reward_label_index = label
                columns.append(self.score(input_ids, attention_mask))
        finally:
            self.reward_label_index = chosen
        return torch.stack(columns, dim=-1)[:, None, :]


class PPOTrainer(MultiAdapterPPOTrainer):
    """:class:`MultiAdapterPPOTrainer` with TRL 0.11's constructor and ``config`` attribute."""

    def __init__(self, config: MultiAdapterPPOConfig | None = None, model=None, ref_model=None, tokenizer=None,
                 dataset=None, optimizer=None, data_collator=None, num_shared_layers=None, lr_scheduler=None,
                 training_data_collator=None):
        if ref_model is not None:
            raise ValueError(
                "multi-adapter PPO uses the base model (adapters disabled) as the reference: pass ref_model=None"
            )
        if num_shared_layers is not None:
            raise ValueError("num_shared_layers does not apply: policy and reference already share one base")
        # data_collator: the dataloader already yields dicts of lists, what TRL 0.11's collators produced.
        super().__init__(model=model, args=config, processing_class=tokenizer, train_dataset=dataset,
                         optimizers=(optimizer, lr_scheduler))

    @property
    def config(self) -> MultiAdapterPPOConfig:
        return self.args

    # ------------------------------------------------------------------------------------------------
    # TRL 0.11's loop helpers: dataloader / generate / log_stats

    @property
    def dataloader(self):
        """One pass over this process's share of ``dataset`` in batches of ``batch_size``, as dicts of
        columns plus ``input_ids`` (a list of 1-D prompt tensors) and ``query`` (the prompt text)."""
        order = self._new_prompt_order()
        for _ in range(order.batches_per_epoch):
            columns = select_columns(self.train_dataset, order.next_batch())
            ids = encode_prompts(self.processing_class, columns)
            batch = {"query": self.processing_class.batch_decode(ids), **columns}
            batch["input_ids"] = [torch.tensor(row, device=self.device) for row in ids]
            yield batch

    def generate(self, query_tensor, return_prompt: bool = True, **generation_kwargs):
        """Sample responses like TRL 0.11's ``PPOTrainer.generate`` (cut after the first stop token).

        query_tensor: a 1-D prompt tensor or a list of them. Returns the same structure: token tensors
        of the response (``return_prompt=False``) or prompt + response. ``generation_kwargs`` may set
        max_new_tokens, top_k, top_p and temperature (which must equal ``args.temperature``, the one used
        in logprobs); other TRL 0.11 keys (do_sample, pad_token_id, min_length, eos_token_id) are accepted.
        """
        single = isinstance(query_tensor, torch.Tensor) and query_tensor.dim() == 1
        queries = [query_tensor] if single else list(query_tensor)
        overrides = _sampling_overrides(generation_kwargs, self.args.temperature)
        rollout = self._generate(*left_pad(queries, self.pad_token_id, self.device), for_training=False, **overrides)
        responses = [ids[mask.bool()] for ids, mask in zip(rollout.response_ids, rollout.response_mask)]
        outputs = [torch.cat([query, response]) if return_prompt else response for query, response in zip(queries, responses)]
        return outputs[0].unsqueeze(0) if single else outputs

    def log_stats(self, stats: dict[str, Any], batch=None, rewards=None, columns_to_log=None) -> None:
        """Log the metrics returned by :meth:`step` (``batch``/``rewards`` are accepted and ignored)."""
        self.log({key: float(value) for key, value in stats.items() if _is_number(value)})


_IGNORED_GENERATION_KEYS = {"do_sample", "pad_token_id", "eos_token_id", "min_length", "use_cache", "batch_size"}
_SAMPLING_KEYS = {"max_new_tokens", "top_k", "top_p", "temperature"}


def _sampling_overrides(generation_kwargs: dict, temperature: float) -> dict:
    unknown = set(generation_kwargs) - _IGNORED_GENERATION_KEYS - _SAMPLING_KEYS
    if unknown:
        raise ValueError(
            f"generation options {sorted(unknown)} are not supported; use {sorted(_SAMPLING_KEYS)} "
            "(set the defaults in PPOConfig)"
        )
    if generation_kwargs.get("do_sample") is False:
        raise ValueError("PPO samples responses: do_sample=False is not supported")
    if "temperature" in generation_kwargs and float(generation_kwargs["temperature"]) != temperature:
        raise ValueError(
            f"temperature={generation_kwargs['temperature']} differs from config.temperature={temperature}; logprobs "
            "must use the sampling temperature, so set PPOConfig(temperature=...) instead"
        )
    overrides = {key: generation_kwargs[key] for key in ("max_new_tokens", "top_k", "top_p") if key in generation_kwargs}
    if "top_k" in overrides:
        overrides["top_k"] = int(overrides["top_k"])
    return overrides


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1)
