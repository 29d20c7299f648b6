"""TRL 0.11's ``AutoModelForCausalLMWithValueHead`` as a :class:`MultiAdapterModel`.

``from_pretrained`` takes what TRL 0.11's took: a hub id or folder (``peft_config=``, ``reward_adapter=``,
``quantization_config=``, ``load_in_8bit=``, ``torch_dtype=``, ``device_map=``), an already built
``PeftModel`` (TRL's own test pattern and the usual QLoRA route), a folder holding a PEFT adapter, or a
folder written by ``save_pretrained``. The policy is always a LoRA adapter and the reference the base
with adapters disabled; without ``peft_config`` a default LoRA is trained (TRL 0.11 trained every weight).

TRL 0.11 attributes kept: ``pretrained_model`` (the peft model), ``v_head`` (``.summary`` is the value
head), ``compute_reward_score``, ``save_pretrained``, ``gradient_checkpointing_enable``, ``generate``,
``forward`` returning ``(lm_logits, loss, value)``, ``is_peft_model``, ``current_device``.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..model import REWARD_ADAPTER, MultiAdapterModel
from ..model_io import ROLES_FILE, read_score_head
from ..rollout import SamplingSettings, left_pad, sample_rollout
from .generation import sampling_overrides

V_HEAD_INIT_STRATEGIES = (None, "normal")


class ValueHeadView:
    """TRL 0.11's ``model.v_head``: ``summary`` is the value head ``Linear(hidden, 1)`` (the same parameters),
    ``dropout`` is the identity (every PPO forward runs without dropout)."""

    def __init__(self, summary: nn.Linear):
        self.summary = summary
        self.dropout = nn.Identity()

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Values (..., 1) float32 of final hidden states (..., H)."""
        return self.summary(hidden_states.to(self.summary.weight.dtype))


class AutoModelForCausalLMWithValueHead(MultiAdapterModel):
    """``MultiAdapterModel`` under TRL 0.11's name and with its attributes (see the module docstring)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, peft_config=None, reward_adapter=None,
                        reward_adapter_name: str | None = None, reward_label_index: int | None = None,
                        is_trainable: bool | None = None, summary_dropout_prob: float | None = None,
                        v_head_initializer_range: float = 0.2, v_head_init_strategy: str | None = None,
                        load_in_8bit: bool = False, load_in_4bit: bool = False, use_safetensors=None,
                        **kwargs) -> AutoModelForCausalLMWithValueHead:
        """Build the model from whatever TRL 0.11's ``from_pretrained`` accepted.

        reward_label_index: the column of a multi-label reward head the *trainer* reads when it scores by
        itself (``step(..., scores=None)``); ``compute_reward_score`` returns every column regardless, so a
        TRL 0.11 script that indexes ``raw_rewards[i, -1, 1]`` needs nothing. summary_dropout_prob: accepted;
        the value head runs without dropout (a warning says so when it is not 0). use_safetensors:
        ignored (transformers loads the weight format the folder has). reward_adapter_name: ignored (the
        adapter is called ``reward``).
        """
        if model_args:
            raise TypeError("AutoModelForCausalLMWithValueHead.from_pretrained takes its options as keywords")
        if is_trainable is False:
            raise ValueError("is_trainable=False: the PPO policy adapter must be trainable (drop the argument)")
        if v_head_init_strategy not in V_HEAD_INIT_STRATEGIES:
            raise ValueError(f"v_head_init_strategy={v_head_init_strategy!r} is not one of {V_HEAD_INIT_STRATEGIES}")
        if summary_dropout_prob:
            warnings.warn(f"summary_dropout_prob={summary_dropout_prob} is ignored: the value head runs without "
                          "dropout, like every PPO forward here (so the first probability ratio is exactly 1)",
                          stacklevel=2)
        if "torch_dtype" in kwargs:  # transformers 5 renamed it
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        kbit = _quantization_from_flags(kwargs, load_in_8bit, load_in_4bit)
        source = pretrained_model_name_or_path
        from peft import PeftModel

        if isinstance(source, PeftModel):
            model = cls._from_peft_model(source, reward_adapter, reward_label_index, kwargs)
        elif isinstance(source, (str, os.PathLike)) and (Path(source) / ROLES_FILE).is_file():
            model = cls._from_saved_folder(Path(source), kwargs)
        else:
            if isinstance(source, (str, os.PathLike)) and _is_adapter_folder(Path(source)):
                if peft_config is not None:
                    warnings.warn(f"peft_config is ignored: {source} holds a trained PEFT adapter, which the "
                                  "policy starts from (as in TRL 0.11)", stacklevel=2)
                kwargs["policy_adapter"], source, peft_config = str(source), _adapter_base(Path(source)), None
            if kbit:
                # TRL 0.11 prepared a k-bit base with peft's defaults, which checkpoint activations.
                kwargs.setdefault("gradient_checkpointing", kwargs.pop("use_gradient_checkpointing", True))
                kwargs.pop("gradient_checkpointing_kwargs", None)
                if kwargs.get("device_map") is None:
                    from ..devices import process_device_map

                    kwargs.update(process_device_map())
            model = cls._build(source, peft_config, reward_adapter, reward_label_index, kwargs)
        if v_head_init_strategy == "normal":
            with torch.no_grad():
                model.value_head.weight.normal_(mean=0.0, std=v_head_initializer_range)
                model.value_head.bias.zero_()
        return model

    @classmethod
    def _build(cls, source, peft_config, reward_adapter, reward_label_index, kwargs):
        provisional = reward_label_index
        if reward_adapter is not None and reward_label_index is None:
            num_labels = read_score_head(reward_adapter)[0].shape[0]
            # A TRL-0.11-era multi-label head loads without an index (scripts index compute_reward_score
            # themselves); the trainer refuses to score by itself until an index is chosen (see `score`).
            provisional = 0 if num_labels > 1 else None
        model = super().from_pretrained(source, policy_config=peft_config, reward_adapter=reward_adapter,
                                        reward_label_index=provisional, **kwargs)
        model.reward_label_index = reward_label_index
        return model

    @classmethod
    def _from_peft_model(cls, peft_model, reward_adapter, reward_label_index, kwargs):
        """Take over a ``PeftModel``'s one LoRA adapter as the policy (weights copied) on its own base."""
        from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

        names = list(peft_model.peft_config)
        if len(names) != 1:
            raise ValueError(f"the PeftModel has adapters {names}; pass a PeftModel with exactly one (the policy)")
        config = copy.deepcopy(peft_model.peft_config[names[0]])
        if not isinstance(config, LoraConfig):
            raise ValueError(f"the PeftModel's adapter is {type(config).__name__}; only LoRA adapters are supported")
        config.inference_mode = False
        state = {key: value.detach().clone() for key, value in
                 get_peft_model_state_dict(peft_model, adapter_name=names[0]).items()}
        with warnings.catch_warnings():  # peft 0.21 calls transformers 5's deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            base = peft_model.unload()  # the base model without LoRA layers, weights untouched
        model = cls._build(base, config, reward_adapter, reward_label_index, kwargs)
        result = set_peft_model_state_dict(model.peft_model, state, adapter_name="policy")
        unexpected = [key for key in getattr(result, "unexpected_keys", []) if "lora_" in key]
        if unexpected:
            raise ValueError(f"could not copy the PeftModel's adapter weights: {unexpected[:3]} ...")
        return model

    @classmethod
    def _from_saved_folder(cls, folder: Path, kwargs):
        """A folder written by ``save_pretrained``: base from the policy adapter's base_model_name_or_path."""
        base = _adapter_base(folder / "policy")
        return super().from_pretrained(base, from_saved=str(folder), **kwargs)

    # ------------------------------------------------------------------------------------------------
    # TRL 0.11 attributes

    @property
    def pretrained_model(self):
        """The peft model (TRL 0.11: the wrapped ``PeftModel``). Switch roles with ``model.role(...)``,
        not with peft's ``set_adapter``/``disable_adapter``."""
        return self.peft_model

    @property
    def v_head(self) -> ValueHeadView:
        return ValueHeadView(self.value_head)

    @property
    def is_peft_model(self) -> bool:
        return True

    @property
    def supports_rm_adapter(self) -> bool:
        return self.reward_head is not None

    @property
    def rm_adapter_name(self) -> str | None:
        return REWARD_ADAPTER if self.reward_head is not None else None

    @property
    def policy_adapter_name(self) -> str:
        return "policy"

    @property
    def is_loaded_in_8bit(self) -> bool:
        return bool(getattr(self.peft_model.get_base_model(), "is_loaded_in_8bit", False))

    @property
    def is_loaded_in_4bit(self) -> bool:
        return bool(getattr(self.peft_model.get_base_model(), "is_loaded_in_4bit", False))

    @property
    def is_sequential_parallel(self) -> bool:
        return False

    @property
    def current_device(self) -> torch.device:
        return self.device

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, return_past_key_values=False,
                labels=None, **kwargs):
        """``(lm_logits (B, T, V) float32, loss, value (B, T))`` of the policy, as TRL 0.11's forward;
        ``loss`` is the next-token cross-entropy when ``labels`` are given (-100 ignored), else None."""
        if past_key_values is not None or return_past_key_values:
            raise ValueError("past_key_values are not supported: the sampler keeps its own KV cache")
        kwargs.pop("output_hidden_states", None)
        kwargs.pop("token_type_ids", None)
        if kwargs:
            raise TypeError(f"unexpected forward arguments {sorted(kwargs)}")
        logits, values = self.policy_forward(input_ids, attention_mask)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(logits.device),
                                               ignore_index=-100)
        return logits, loss, values

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **generation_kwargs):
        """Sample with the policy adapter through the project's sampler; returns ``input_ids`` followed by the
        new tokens (B, P + R), padded with ``pad_token_id`` after each row's stop token (transformers'
        layout). Keywords as in :func:`~trl_multiadapter.trl011.generation.sampling_overrides`."""
        causal_lm = self.peft_model.get_base_model()
        pad_id = generation_kwargs.get("pad_token_id")
        if pad_id is None:
            pad_id = causal_lm.generation_config.pad_token_id
        if pad_id is None:
            pad_id = _first(causal_lm.generation_config.eos_token_id)
        if pad_id is None:
            raise ValueError("generate needs pad_token_id= (the model defines neither a pad nor an EOS token)")
        overrides = sampling_overrides(generation_kwargs)
        if "stop_token_ids" not in overrides:
            eos = causal_lm.generation_config.eos_token_id
            overrides["stop_token_ids"] = tuple(sorted(set(eos if isinstance(eos, (list, tuple)) else [eos])
                                                       - {None}))
        overrides.setdefault("max_new_tokens", causal_lm.generation_config.max_new_tokens or 20)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        rows = [ids[row_mask.bool()] for ids, row_mask in zip(input_ids, mask)]
        query_ids, query_mask = left_pad(rows, int(pad_id), self.device)
        settings = SamplingSettings(pad_token_id=int(pad_id), capture_values=False, **overrides)
        rollout = sample_rollout(self, query_ids, query_mask, settings)
        response = torch.where(rollout.response_mask.bool(), rollout.response_ids, int(pad_id))
        return torch.cat([input_ids.to(response.device), response], dim=1)

    @torch.no_grad()
    def compute_reward_score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                             **kwargs) -> torch.Tensor:
        """Every label of the reward head at every position, (B, T, num_labels) float32, as TRL 0.11.

        Position t holds the score of the last real token at or before t, so under right padding the pad
        positions repeat the row's final score and ``[:, -1, label]`` (what TRL scripts read) is the score
        at each row's last real token under any padding. TRL 0.11 returned the head's output at the pad
        positions themselves. Positions before a row's first real token (left padding) are 0.
        """
        kwargs.pop("token_type_ids", None)
        if kwargs:
            raise TypeError(f"compute_reward_score got unexpected arguments {sorted(kwargs)}")
        if self.reward_head is None:
            raise ValueError("this model has no reward adapter: pass reward_adapter=<dir> to from_pretrained")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        with self._adapters_of("reward"):
            hidden = self._hidden_states(input_ids, mask)  # (B, T, H)
        head = self.reward_head
        scores = head(hidden.to(device=head.weight.device, dtype=head.weight.dtype)).float()  # (B, T, L)
        positions = torch.arange(mask.shape[1], device=scores.device).expand(mask.shape[0], -1)
        last_real = torch.where(mask.bool().to(scores.device), positions, -1).cummax(dim=1).values  # (B, T)
        carried = scores.gather(1, last_real.clamp(min=0)[..., None].expand_as(scores))
        return torch.where((last_real >= 0)[..., None], carried, torch.zeros((), device=scores.device))

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The trainer's score (B,); a multi-label head needs ``reward_label_index`` to know which column."""
        if self.reward_label_index is None and self.reward_head is not None and self.reward_head.out_features > 1:
            raise ValueError(
                f"the reward adapter has a {self.reward_head.out_features}-label score head and no reward_label_index, "
                "so the trainer cannot score responses by itself: pass scores to step() (e.g. from "
                "compute_reward_score), or pass reward_label_index=<column> to from_pretrained"
            )
        return super().score(input_ids, attention_mask)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, push_to_hub: bool = False, **kwargs) -> None:
        """Write every adapter and head (``save_adapters`` layout); ``from_pretrained(save_directory)`` loads
        it back when the base is a folder or hub id. The keyword arguments of transformers'
        ``save_pretrained`` (``safe_serialization``, ...) are accepted and have no effect."""
        if push_to_hub:
            raise ValueError("save_pretrained(push_to_hub=True) is not supported: save, then upload the folder "
                             "with huggingface_hub.upload_folder (or use `trl-multiadapter export --push_to_hub`)")
        self.save_adapters(save_directory)

    def push_to_hub(self, *args, **kwargs):
        raise NotImplementedError("push_to_hub is not supported: save_pretrained(dir), then "
                                  "huggingface_hub.upload_folder(folder_path=dir, repo_id=...)")

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        """Recompute the decoder layers in backward from now on (non-reentrant checkpointing)."""
        set_gradient_checkpointing(self, True)

    def gradient_checkpointing_disable(self) -> None:
        set_gradient_checkpointing(self, False)

    def enable_input_require_grads(self) -> None:
        """The base's ``enable_input_require_grads`` (only reentrant checkpointing needs it; ours is not)."""
        self.peft_model.get_base_model().enable_input_require_grads()


def set_gradient_checkpointing(model: MultiAdapterModel, enabled: bool) -> None:
    """Switch activation checkpointing of a built ``MultiAdapterModel``'s base on or off."""
    base = model.peft_model.get_base_model()
    if enabled:
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # transformers < 5 naming
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(base, "activation_checkpointing_disable"):
        base.activation_checkpointing_disable()
    else:
        base.gradient_checkpointing_disable()
    model.gradient_checkpointing = enabled
    # The model caches the layers whose checkpointing flag follows train(); find them again.
    model._parts = model._find_parts(model.peft_model)
    model.train(model.training)


def _quantization_from_flags(kwargs: dict, load_in_8bit: bool, load_in_4bit: bool) -> bool:
    """TRL 0.11's ``load_in_8bit``/``load_in_4bit`` flags as a ``BitsAndBytesConfig``; True for a k-bit base."""
    if load_in_8bit or load_in_4bit:
        if load_in_8bit and load_in_4bit:
            raise ValueError("pass load_in_8bit=True or load_in_4bit=True, not both")
        if kwargs.get("quantization_config") is not None:
            raise ValueError("pass either quantization_config or load_in_8bit/load_in_4bit, not both")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)
    from ..model_quant import is_kbit_config

    return is_kbit_config(kwargs.get("quantization_config"))


def _is_adapter_folder(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def _adapter_base(adapter_dir: Path) -> str:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(
            f"{adapter_dir}/adapter_config.json names no base_model_name_or_path (the base was built in memory): "
            f"load it with AutoModelForCausalLMWithValueHead.from_pretrained(<base>, from_saved=...) or "
            f"policy_adapter=... instead"
        )
    return base


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) and value else value
