"""MultiAdapterModel: one frozen base causal LM playing policy, value, reward and reference.

The base is wrapped once by peft and carries named LoRA adapters:

==========  ===========================================================================
role        what runs
==========  ===========================================================================
policy      base + adapter ``policy`` -> LM head (logits) and, with ``value_model="head"``,
            a value head ``Linear(hidden, 1)`` on the same final hidden states
critic      base + adapter ``critic`` -> its own value head (``value_model="critic"``)
            (``value_model="none"``, for the critic-free advantage estimators: no value head, no critic)
reward      base + adapter ``reward`` -> the reward adapter's sequence-classification score head
reference   base with every adapter disabled (``reference="base"``), or base + the frozen
            adapter ``policy_init``, a copy of the starting policy (``reference="policy_init"``)
==========  ===========================================================================

Value head on the policy vs. critic: with ``value_model="head"`` (the default, as in TRL's old
``AutoModelForCausalLMWithValueHead``) the value loss back-propagates through the shared policy LoRA,
so value regression also moves the policy, scaled by the value-loss coefficient. ``value_model="critic"``
avoids that coupling with a separate LoRA adapter ``critic`` and its own head (one more backbone
forward per step); ``critic_init="reward"`` starts the critic from the reward adapter and the reward
head's label column, a common warm start.

Role switches are flag flips: every peft tuner layer (LoRA layers and ``modules_to_save`` wrappers) is
cached once and a switch writes its ``_active_adapter`` / ``_disable_adapters`` attributes directly.
peft's own ``set_adapter`` is avoided because it also rewrites ``requires_grad`` on every adapter
weight (it marks the activated adapter trainable). ``requires_grad`` is set once at construction:
only ``trainable_parameters()`` require gradients, whatever role is active. Role state is owned by
this class: do not call peft's ``set_adapter``/``disable_adapter`` on ``peft_model`` directly.

Dropout is off in every forward: the peft model stays in eval mode permanently (``train()`` only
flips this wrapper's flag and, with gradient checkpointing, the checkpointing flag of the decoder
layers). Gradients flow in eval mode, so the policy/reference probability ratio is exactly 1 while
the policy equals its starting point.

Position ids come from the attention mask (``cumsum - 1``, as generation computes them), so a
left-padded row gives the same numbers as the same row without padding. Rewards are read at the last
position whose attention mask is 1, which works for left, right and no padding and never looks at
pad token ids.
"""

from __future__ import annotations

import contextlib
import copy
import json
import operator
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .model_io import (
    ROLES_FILE,
    SAVE_FORMAT_VERSION,
    VALUE_HEAD_FILE,
    add_score_head,
    check_adapter_dir,
    load_base,
    read_roles_file,
    read_score_head,
    score_key_kind,
)
from .model_quant import KBIT_CPU_TRAINING_ERROR, is_kbit_model, kbit_weights_on_cpu
from .ppo_math import last_token_indices
from .roles import NO_VALUE_MODEL, REFERENCE_MODES, VALUE_MODELS

POLICY_ADAPTER = "policy"
REWARD_ADAPTER = "reward"
CRITIC_ADAPTER = "critic"
POLICY_INIT_ADAPTER = "policy_init"

ROLES = ("policy", "critic", "reward", "reference")
CRITIC_INITS = (None, "reward")


def default_policy_config():
    """The LoRA config used when neither ``policy_config`` nor ``policy_adapter`` is given."""
    from .lora import policy_lora_config

    return policy_lora_config()


# ----------------------------------------------------------------------------------------------------
# small tensor helpers


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``cumsum(mask) - 1`` (0 on pad positions), as HF generation derives them. (B, T)."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 0)


def last_non_pad_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position whose mask is 1, per row, for any padding side. (B,) long.

    Raises ValueError naming the first row that has no token at all.
    """
    mask = attention_mask.bool()
    has_token = mask.any(dim=-1)
    if not bool(has_token.all()):
        empty_row = int((~has_token).nonzero()[0])
        raise ValueError(f"attention_mask row {empty_row} has no tokens (all zeros); drop empty rows before scoring")
    return last_token_indices(mask)


def _check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D (batch, seq_len), got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids shape "
            f"{tuple(input_ids.shape)}"
        )
    return attention_mask


# ----------------------------------------------------------------------------------------------------
# the model


@dataclass
class _Parts:
    """Plain references into the peft model (kept out of nn.Module registration to avoid duplicates)."""

    causal_lm: nn.Module  # the transformers causal LM with LoRA layers injected
    decoder: nn.Module  # its transformer body (embeddings, layers, final norm)
    lm_head: nn.Module
    tuner_layers: tuple[nn.Module, ...]  # every peft layer whose active adapter a role switch sets
    checkpoint_layers: tuple[nn.Module, ...]  # decoder layers that checkpoint when in training mode


class MultiAdapterModel(nn.Module):
    """One base causal LM with named LoRA adapters for PPO's policy, value, reward and reference roles.

    Build it with :meth:`from_pretrained`. See the module docstring for roles, the value-head
    trade-off, dropout and padding conventions.
    """

    def __init__(
        self,
        peft_model,
        *,
        value_head: nn.Linear | None,
        reward_head: nn.Linear | None,
        reward_label_index: int | None,
        value_model: str,
        reference_mode: str,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.peft_model = peft_model
        self.value_head = value_head
        self.reward_head = reward_head
        self.reward_label_index = reward_label_index
        self.value_model = value_model
        self.reference_mode = reference_mode
        self.gradient_checkpointing = gradient_checkpointing
        self._parts = self._find_parts(peft_model)
        self._kbit_on_cpu = is_kbit_model(self._parts.causal_lm) and kbit_weights_on_cpu(self._parts.causal_lm)
        self._role_adapters = self._build_role_table()
        self._role_flags = {role: _layer_flags(adapters) for role, adapters in self._role_adapters.items()}
        self._tuner_layer_dicts = tuple(vars(layer) for layer in self._parts.tuner_layers)
        self._trainable = tuple(self._collect_trainable())
        self._switch_parameters = self._collect_switch_parameters()
        self._freeze_all_but_trainable()
        self._active_role = None
        self._activate("policy")
        self.train(False)

    # ---------------------------------------------------------------- construction helpers
    @staticmethod
    def _find_parts(peft_model) -> _Parts:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        causal_lm = peft_model.get_base_model()
        tuner_layers = tuple(
            module for module in peft_model.modules() if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper))
        )
        checkpoint_layers = tuple(
            module for module in causal_lm.modules() if getattr(module, "gradient_checkpointing", False) is True
        )
        return _Parts(
            causal_lm=causal_lm,
            decoder=causal_lm.base_model,
            lm_head=causal_lm.get_output_embeddings(),
            tuner_layers=tuner_layers,
            checkpoint_layers=checkpoint_layers,
        )

    def _build_role_table(self) -> dict[str, list[str] | None]:
        table: dict[str, list[str] | None] = {"policy": [POLICY_ADAPTER]}
        if self.has_adapter(CRITIC_ADAPTER):
            table["critic"] = [CRITIC_ADAPTER]
        if self.has_adapter(REWARD_ADAPTER):
            table["reward"] = [REWARD_ADAPTER]
        table["reference"] = [POLICY_INIT_ADAPTER] if self.reference_mode == "policy_init" else None
        return table

    def has_adapter(self, name: str) -> bool:
        return name in self.peft_model.peft_config

    def _adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        marker = f".{adapter_name}."
        return [
            parameter
            for name, parameter in self.peft_model.named_parameters()
            if marker in name or name.endswith(f".{adapter_name}")
        ]

    def _collect_trainable(self) -> list[nn.Parameter]:
        trainable = self._adapter_parameters(POLICY_ADAPTER)
        if self.value_model == "critic":
            trainable += self._adapter_parameters(CRITIC_ADAPTER)
        if self.value_head is not None:
            trainable += list(self.value_head.parameters())
        return trainable

    def _collect_switch_parameters(self) -> tuple[nn.Parameter, ...]:
        """Adapter and head parameters whose requires_grad a role context restores on exit."""
        parameters = []
        for adapter_name in self.peft_model.peft_config:
            parameters += self._adapter_parameters(adapter_name)
        if self.value_head is not None:
            parameters += list(self.value_head.parameters())
        if self.reward_head is not None:
            parameters += list(self.reward_head.parameters())
        return tuple(parameters)

    def _freeze_all_but_trainable(self) -> None:
        trainable_ids = {id(parameter) for parameter in self._trainable}
        for parameter in self.parameters():
            parameter.requires_grad_(id(parameter) in trainable_ids)

    # ---------------------------------------------------------------- from_pretrained
    @classmethod
    def from_pretrained(
        cls,
        model_or_path,
        *,
        policy_config=None,
        policy_adapter: str | os.PathLike | None = None,
        reward_adapter: str | os.PathLike | None = None,
        reward_label_index: int | None = None,
        value_model: str = "head",
        critic_init: str | None = None,
        critic_config=None,
        reference: str = "base",
        quantization_config=None,
        dtype=None,
        device_map=None,
        from_saved: str | os.PathLike | None = None,
        gradient_checkpointing: bool = False,
        **model_kwargs,
    ) -> MultiAdapterModel:
        """Load or take a base causal LM and add the adapters of every role.

        Args:
            model_or_path: a hub id or local directory (loaded with ``AutoModelForCausalLM``), or an
                already built ``PreTrainedModel``, which is wrapped in place (peft injects LoRA layers
                into it; its weights are shared, not copied).
            policy_config: ``LoraConfig`` of a fresh policy adapter (default: ``default_policy_config()``).
            policy_adapter: directory of a PEFT adapter to start the policy from (e.g. an SFT adapter).
            reward_adapter: directory of a PEFT SEQ_CLS adapter with its score head (RewardTrainer output).
            reward_label_index: None for a 1-label head; the column to read from a multi-label head.
            value_model: "head" (value head on the policy's hidden states), "critic" (own LoRA + head) or
                "none" (no value model, for the critic-free advantage estimators; no head parameters exist).
            critic_init: None (fresh critic LoRA from ``critic_config`` or the policy's config) or
                "reward" (critic LoRA and head start as copies of the reward adapter and its label column).
            reference: "base" (adapters disabled) or "policy_init" (frozen copy of ``policy_adapter``).
            quantization_config: e.g. ``BitsAndBytesConfig(load_in_4bit=True, ...)``; needs the
                ``quant`` extra. k-bit training is refused on CPU (see ``model_quant``).
            dtype: torch dtype or its name; None means float32 on CPU and the checkpoint's dtype
                ("auto") when a device_map or quantization is given.
            device_map: passed to ``from_pretrained``; with a built model, a single device to move to.
            from_saved: directory written by :meth:`save_adapters`; restores every adapter and head
                (do not combine with the adapter arguments).
            gradient_checkpointing: recompute decoder layers in backward to save activation memory.
            model_kwargs: passed to ``AutoModelForCausalLM.from_pretrained``.
        """
        _validate_choice("value_model", value_model, VALUE_MODELS)
        _validate_choice("reference", reference, REFERENCE_MODES)
        _validate_choice("critic_init", critic_init, CRITIC_INITS)
        if from_saved is not None:
            saved = read_roles_file(from_saved)
            _reject_arguments_with_from_saved(
                policy_config=policy_config,
                policy_adapter=policy_adapter,
                reward_adapter=reward_adapter,
                reward_label_index=reward_label_index,
                critic_init=critic_init,
                critic_config=critic_config,
                value_model=value_model if value_model != "head" else None,
                reference=reference if reference != "base" else None,
            )
            with _quiet_peft_setup():
                return cls._from_saved(
                    model_or_path,
                    saved,
                    Path(from_saved),
                    quantization_config=quantization_config,
                    dtype=dtype,
                    device_map=device_map,
                    gradient_checkpointing=gradient_checkpointing,
                    **model_kwargs,
                )
        _validate_adapter_arguments(
            policy_config, policy_adapter, reward_adapter, reward_label_index, value_model, critic_init, critic_config,
            reference,
        )
        # read and check the adapter files before loading a (possibly large) base model
        score_weight = score_bias = None
        if reward_adapter is not None:
            check_adapter_dir(reward_adapter, "reward_adapter")
            score_weight, score_bias = read_score_head(reward_adapter)
            _check_label_index(score_weight, reward_label_index, reward_adapter)
        if policy_adapter is not None:
            check_adapter_dir(policy_adapter, "policy_adapter")

        with _quiet_peft_setup():
            base = load_base(model_or_path, quantization_config, dtype, device_map, model_kwargs)
            peft_model = _wrap_policy(base, policy_config, policy_adapter)
            if reward_adapter is not None:
                _load_frozen_adapter(peft_model, reward_adapter, REWARD_ADAPTER)
            if reference == "policy_init":
                _load_frozen_adapter(peft_model, policy_adapter, POLICY_INIT_ADAPTER)
            head_device = base.get_output_embeddings().weight.device
            reward_head = None
            if score_weight is not None:
                reward_head = _linear_from_weights(score_weight, score_bias, head_device)
            if value_model == "critic" and critic_init == "reward":
                peft_model.load_adapter(str(reward_adapter), adapter_name=CRITIC_ADAPTER, is_trainable=True)
                value_head = _critic_head_from_reward(reward_head, reward_label_index)
            elif value_model == NO_VALUE_MODEL:
                value_head = None
            else:
                if value_model == "critic":
                    config = critic_config if critic_config is not None else peft_model.peft_config[POLICY_ADAPTER]
                    peft_model.add_adapter(CRITIC_ADAPTER, copy.deepcopy(config))
                value_head = _new_value_head(_hidden_size(base), head_device)
            return cls(
                peft_model,
                value_head=value_head,
                reward_head=reward_head,
                reward_label_index=reward_label_index,
                value_model=value_model,
                reference_mode=reference,
                gradient_checkpointing=_enable_checkpointing(base, gradient_checkpointing),
            )

    @classmethod
    def _from_saved(cls, model_or_path, saved: dict, directory: Path, *, quantization_config, dtype, device_map,
                    gradient_checkpointing, **model_kwargs) -> MultiAdapterModel:
        from safetensors.torch import load_file

        base = load_base(model_or_path, quantization_config, dtype, device_map, model_kwargs)
        peft_model = _wrap_policy(base, None, directory / POLICY_ADAPTER)
        reward_head = None
        if saved["has_reward"]:
            reward_dir = directory / REWARD_ADAPTER
            score_weight, score_bias = read_score_head(reward_dir)
            _load_frozen_adapter(peft_model, reward_dir, REWARD_ADAPTER)
            reward_head = _linear_from_weights(score_weight, score_bias, base.get_output_embeddings().weight.device)
        if saved["reference"] == "policy_init":
            _load_frozen_adapter(peft_model, directory / POLICY_INIT_ADAPTER, POLICY_INIT_ADAPTER)
        if saved["value_model"] == "critic":
            peft_model.load_adapter(str(directory / CRITIC_ADAPTER), adapter_name=CRITIC_ADAPTER, is_trainable=True)
        value_head = None
        if saved["value_model"] != NO_VALUE_MODEL:
            head_state = load_file(str(directory / VALUE_HEAD_FILE))
            value_head = _linear_from_weights(
                head_state["weight"], head_state.get("bias"), base.get_output_embeddings().weight.device
            )
        return cls(
            peft_model,
            value_head=value_head,
            reward_head=reward_head,
            reward_label_index=saved["reward_label_index"],
            value_model=saved["value_model"],
            reference_mode=saved["reference"],
            gradient_checkpointing=_enable_checkpointing(base, gradient_checkpointing),
        )

    # ---------------------------------------------------------------- properties
    @property
    def config(self):
        return self._parts.causal_lm.config

    @property
    def device(self) -> torch.device:
        return self._parts.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the base model's (non-quantized) LM head, i.e. the compute dtype of logits."""
        return self._parts.lm_head.weight.dtype

    @property
    def active_role(self) -> str:
        return self._active_role

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles this model can switch to (critic/reward only when their adapters are loaded)."""
        return tuple(self._role_adapters)

    # ---------------------------------------------------------------- modes and roles
    def train(self, mode: bool = True) -> MultiAdapterModel:
        """Set the wrapper's training flag; the base and adapters stay in eval mode (dropout off).

        With gradient checkpointing, the decoder layers' own flag follows ``mode`` (it only decides
        whether they recompute in backward; their dropout-bearing submodules stay in eval mode).
        """
        self.training = mode
        if self.value_head is not None:
            self.value_head.train(mode)
        if self.reward_head is not None:
            self.reward_head.eval()
        self.peft_model.eval()
        for layer in self._parts.checkpoint_layers:
            layer.training = mode
        return self

    def _activate(self, role: str) -> None:
        # Write the peft layers' flags straight into their instance dicts: nn.Module.__setattr__ costs
        # ~1 us per call in isinstance checks, which made a switch 10x slower on an 8-layer model.
        # Both attributes are plain (non-tensor) instance attributes, so this is what __setattr__ does too.
        flags = self._role_flags[role]
        for layer_dict in self._tuner_layer_dicts:
            layer_dict.update(flags)
        self._active_role = role

    def _layers_follow_role(self) -> bool:
        """O(1) check that the tuner layers still hold this model's flags for the active role.

        peft's own set_adapter/disable_adapter (misuse, but possible) write new flag objects to every
        layer; comparing one layer's flags by identity detects that without walking all layers.
        """
        first_layer = self._tuner_layer_dicts[0]
        flags = self._role_flags[self._active_role]
        return all(first_layer.get(key) is value for key, value in flags.items())

    def _layer_flags_snapshot(self) -> list[dict[str, Any]]:
        return [{key: layer[key] for key in _FLAG_KEYS if key in layer} for layer in self._tuner_layer_dicts]

    @contextlib.contextmanager
    def role(self, name: str):
        """Context manager running its body in role ``name``; restores the previous role, the
        adapters' ``requires_grad`` flags and train/eval mode on exit, also when the body raises.

        The switch is a flag flip on cached peft layers (no requires_grad changes, no module walk);
        the restore of requires_grad flags the body may have changed is one pass over adapter weights.
        """
        if name not in self._role_adapters:
            raise ValueError(self._unknown_role_message(name))
        previous_mode = self.training
        previous_grads = list(map(_requires_grad, self._switch_parameters))  # map+attrgetter: one C-level pass
        try:
            with self._adapters_of(name):
                yield self
        finally:
            if list(map(_requires_grad, self._switch_parameters)) != previous_grads:
                for parameter, flag in zip(self._switch_parameters, previous_grads):
                    parameter.requires_grad_(flag)
            if self.training is not previous_mode:
                self.train(previous_mode)

    @contextlib.contextmanager
    def _adapters_of(self, name: str):
        """The internal switch of this class's own forwards: only the adapter flags flip and are restored.

        The bodies that use it (our forwards) never touch requires_grad or train/eval mode, so the
        requires_grad snapshot of :meth:`role` (the bulk of its cost) is skipped.
        """
        if name not in self._role_adapters:
            raise ValueError(self._unknown_role_message(name))
        previous_role = self._active_role
        previous_layers = None if self._layers_follow_role() else self._layer_flags_snapshot()
        self._activate(name)
        try:
            yield
        finally:
            self._activate(previous_role)
            if previous_layers is not None:
                for layer, flags in zip(self._tuner_layer_dicts, previous_layers):
                    layer.update(flags)

    def _unknown_role_message(self, name: str) -> str:
        if name == "critic":
            return "role 'critic' needs value_model='critic' in from_pretrained"
        if name == "reward":
            return "role 'reward' needs a reward adapter: pass reward_adapter=<dir> to from_pretrained"
        return f"unknown role {name!r}; choose one of {list(self._role_adapters)}"

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Policy LoRA + value head, and with value_model='critic' the critic LoRA (its head is the value head);
        with value_model='none' the policy LoRA alone."""
        return list(self._trainable)

    # ---------------------------------------------------------------- forwards
    def _hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states (after the last norm) of the active role. (B, T, H)."""
        if self._kbit_on_cpu and torch.is_grad_enabled():
            raise RuntimeError(KBIT_CPU_TRAINING_ERROR)
        outputs = self._parts.decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        return outputs.last_hidden_state

    def _lm_logits(self, hidden: torch.Tensor, logits_to_keep: int | None) -> torch.Tensor:
        if logits_to_keep:
            if logits_to_keep < 0:
                raise ValueError(f"logits_to_keep must be a positive int or None, got {logits_to_keep}")
            hidden = hidden[:, -logits_to_keep:]
        return self.logits_from_hidden(hidden)

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits from final (post-norm) hidden states of the active role: ``(..., H) -> (..., V)``
        float32; the LM head every forward, the sampler and the shared-prompt passes use."""
        return self._parts.lm_head(hidden).float()

    def scores_from_hidden(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """Reward from the reward role's hidden state at each row's last token: ``(B, H) -> (B,)`` float32
        (the score head, its ``reward_label_index`` column)."""
        if self.reward_head is None:
            raise ValueError(self._unknown_role_message("reward"))
        head = self.reward_head
        scores = head(final_hidden.to(device=head.weight.device, dtype=head.weight.dtype))  # (B, num_labels)
        return scores[:, self.reward_label_index or 0].float()

    def values_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """V(s) from final (post-norm) hidden states: ``(..., H) -> (...)`` float32.

        The exact computation ``policy_forward`` uses, so a KV-cache sampler that already holds the
        hidden state of each step gets the same values without a second forward.
        """
        head = self.value_head
        if head is None:
            raise ValueError("this model has no value model (value_model='none'); build it with 'head' or 'critic'")
        return head(hidden.to(device=head.weight.device, dtype=head.weight.dtype)).squeeze(-1).float()

    def policy_forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, logits_to_keep: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Policy logits and values with gradients: ``([B, T', V] float32, [B, T] float32)``.

        ``T' = T``, or the last ``logits_to_keep`` positions. Values cover every position; with
        ``value_model="critic"`` they come from a second forward in the critic role; with
        ``value_model="none"`` they are None.
        """
        attention_mask = _check_inputs(input_ids, attention_mask)
        with self._adapters_of("policy"):
            hidden = self._hidden_states(input_ids, attention_mask)
            logits = self._lm_logits(hidden, logits_to_keep)
            if self.value_model == "head":
                return logits, self.values_from_hidden(hidden)
            if self.value_model == NO_VALUE_MODEL:
                return logits, None
        return logits, self.critic_values(input_ids, attention_mask)

    def forward(self, input_ids, attention_mask=None, logits_to_keep=None):
        """Same as :meth:`policy_forward`, so DDP/accelerate wrappers can call the module directly."""
        return self.policy_forward(input_ids, attention_mask, logits_to_keep)

    def critic_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Values at every position ``[B, T]`` float32 (grad mode follows the caller)."""
        attention_mask = _check_inputs(input_ids, attention_mask)
        with self._adapters_of("critic" if self.value_model == "critic" else "policy"):
            return self.values_from_hidden(self._hidden_states(input_ids, attention_mask))

    @torch.no_grad()
    def reference_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, logits_to_keep: int | None = None
    ) -> torch.Tensor:
        """Reference-model logits ``[B, T', V]`` float32, without gradients."""
        attention_mask = _check_inputs(input_ids, attention_mask)
        with self._adapters_of("reference"):
            return self._lm_logits(self._hidden_states(input_ids, attention_mask), logits_to_keep)

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Reward per sequence ``[B]`` float32: the score head at the last non-pad token of each row."""
        attention_mask = _check_inputs(input_ids, attention_mask)
        if self.reward_head is None:
            raise ValueError(self._unknown_role_message("reward"))
        last = last_non_pad_index(attention_mask)
        with self._adapters_of("reward"):
            hidden = self._hidden_states(input_ids, attention_mask)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.scores_from_hidden(hidden[rows, last.to(hidden.device)])  # (B, H) -> (B,)

    # ---------------------------------------------------------------- saving
    def save_adapters(self, directory: str | os.PathLike) -> None:
        """Write every adapter and head to ``directory``.

        Layout: ``policy/`` (standard PEFT adapter, loadable with ``PeftModel.from_pretrained(base, dir/policy)``),
        ``reward/`` (PEFT SEQ_CLS adapter with its score head, as RewardTrainer writes it),
        ``critic/`` and ``policy_init/`` when present, ``value_head.safetensors`` (the head producing
        values: on the policy, or the critic's; absent with value_model='none'), and ``multiadapter.json``
        describing the roles.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        adapters = [name for name in (POLICY_ADAPTER, CRITIC_ADAPTER, POLICY_INIT_ADAPTER) if self.has_adapter(name)]
        for name in adapters:
            self.peft_model.save_pretrained(str(directory), selected_adapters=[name])
        if self.reward_head is not None:
            self.peft_model.save_pretrained(str(directory), selected_adapters=[REWARD_ADAPTER])
            add_score_head(directory / REWARD_ADAPTER, self.reward_head)
        if self.value_head is not None:
            head_state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.value_head.state_dict().items()}
            save_file(head_state, str(directory / VALUE_HEAD_FILE), metadata={"format": "pt"})
        roles = {
            "format_version": SAVE_FORMAT_VERSION,
            "value_model": self.value_model,
            "reference": self.reference_mode,
            "reward_label_index": self.reward_label_index,
            "has_reward": self.reward_head is not None,
            "adapters": adapters + ([REWARD_ADAPTER] if self.reward_head is not None else []),
        }
        (directory / ROLES_FILE).write_text(json.dumps(roles, indent=2) + "\n")


_FLAG_KEYS = ("_disable_adapters", "_active_adapter")
_requires_grad = operator.attrgetter("requires_grad")


def _layer_flags(adapters: list[str] | None) -> dict[str, Any]:
    """peft tuner-layer attributes that make ``adapters`` active (None: all adapters disabled)."""
    if adapters is None:
        # the active list is irrelevant while disabled; fixing it keeps the state fully determined by the role
        return {"_disable_adapters": True, "_active_adapter": [POLICY_ADAPTER]}
    return {"_disable_adapters": False, "_active_adapter": adapters}


# ----------------------------------------------------------------------------------------------------
# from_pretrained helpers


def _validate_choice(argument: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{argument}={value!r} is not valid; choose one of {list(choices)}")


def _validate_adapter_arguments(
    policy_config, policy_adapter, reward_adapter, reward_label_index, value_model, critic_init, critic_config, reference
) -> None:
    if policy_config is not None and policy_adapter is not None:
        raise ValueError("pass either policy_config (a fresh policy LoRA) or policy_adapter (a path), not both")
    if reference == "policy_init" and policy_adapter is None:
        raise ValueError(
            "reference='policy_init' is a frozen copy of the starting policy adapter: pass policy_adapter=<dir>, "
            "or use reference='base'"
        )
    if value_model != "critic" and (critic_init is not None or critic_config is not None):
        raise ValueError("critic_init/critic_config apply to value_model='critic' only")
    if critic_init == "reward" and reward_adapter is None:
        raise ValueError("critic_init='reward' needs reward_adapter=<dir>")
    if critic_init == "reward" and critic_config is not None:
        raise ValueError("critic_init='reward' takes the critic's LoRA config from the reward adapter: drop critic_config")
    if reward_adapter is None and reward_label_index is not None:
        raise ValueError("reward_label_index needs reward_adapter=<dir>")


def _reject_arguments_with_from_saved(**arguments) -> None:
    given = [name for name, value in arguments.items() if value is not None]
    if given:
        raise ValueError(
            f"from_saved restores every adapter and role setting from its directory; drop {', '.join(given)}"
        )


def _wrap_policy(base, policy_config, policy_adapter):
    from peft import PeftModel, get_peft_model

    if policy_adapter is not None:
        return PeftModel.from_pretrained(base, str(policy_adapter), adapter_name=POLICY_ADAPTER, is_trainable=True)
    config = copy.deepcopy(policy_config) if policy_config is not None else default_policy_config()
    return get_peft_model(base, config, adapter_name=POLICY_ADAPTER)


@contextlib.contextmanager
def _quiet_peft_setup():
    """Silence two harmless warnings of adapter setup: peft's note that a model built in memory has no
    base_model_name_or_path, and peft 0.21 calling transformers 5's deprecated is_gradient_checkpointing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _load_frozen_adapter(peft_model, adapter_dir, adapter_name: str) -> None:
    """Load an adapter for inference only; unexpected keys may only be the (separately read) score head."""
    result = peft_model.load_adapter(str(adapter_dir), adapter_name=adapter_name, is_trainable=False)
    unexpected = [key for key in getattr(result, "unexpected_keys", []) if not score_key_kind(key)]
    if unexpected:
        raise ValueError(
            f"adapter {adapter_dir} has weights that do not fit this base model: {unexpected[:5]}"
            + (" ..." if len(unexpected) > 5 else "")
        )


def _hidden_size(base) -> int:
    """Width of the final hidden states: the LM head's input size (never quantized by bitsandbytes)."""
    return base.get_output_embeddings().weight.shape[-1]


def _check_label_index(score_weight: torch.Tensor, reward_label_index: int | None, adapter_dir) -> None:
    num_labels = score_weight.shape[0]
    if reward_label_index is None and num_labels != 1:
        raise ValueError(
            f"reward adapter {adapter_dir} has a {num_labels}-label score head; pass reward_label_index=<column> "
            "(e.g. 1 for a legacy 2-label head whose column 1 scores 'chosen')"
        )
    if reward_label_index is not None and not 0 <= reward_label_index < num_labels:
        raise ValueError(
            f"reward_label_index={reward_label_index} is out of range for the {num_labels}-label score head of "
            f"{adapter_dir}; use 0..{num_labels - 1}"
        )


def _linear_from_weights(weight: torch.Tensor, bias: torch.Tensor | None, device) -> nn.Linear:
    """A float32 Linear holding ``weight`` [out, in] and ``bias`` (kept in float32 for precise heads)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=device, dtype=torch.float32)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def _new_value_head(hidden_size: int, device) -> nn.Linear:
    """Value head ``Linear(hidden, 1)`` in float32 with PyTorch's default init (TRL's ValueHead init)."""
    return nn.Linear(hidden_size, 1, device=device, dtype=torch.float32)


def _critic_head_from_reward(reward_head: nn.Linear, reward_label_index: int | None) -> nn.Linear:
    column = reward_label_index or 0
    bias = reward_head.bias[column : column + 1] if reward_head.bias is not None else torch.zeros(1)
    return _linear_from_weights(
        reward_head.weight[column : column + 1].detach(), bias.detach(), reward_head.weight.device
    )


def _enable_checkpointing(base, enabled: bool) -> bool:
    if not enabled:
        return False
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers < 5.x naming
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return True

