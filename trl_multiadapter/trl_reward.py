"""A reward adapter trained by our reward stage as a reward function of TRL's ``GRPOTrainer`` / ``RLOOTrainer``.

TRL turns a reward *model* in ``reward_funcs`` into a separate ``AutoModelForSequenceClassification``: a
second full copy of the base. Here the frozen reward adapter is loaded onto the very ``PeftModel`` the TRL
trainer optimises, next to its policy adapter, with its score head beside it::

    reward = RewardAdapterFunction("runs/tiny_cpu/reward/adapter")
    trainer = GRPOTrainer(model=base, reward_funcs=[reward], peft_config=LoraConfig(...), ...)
    reward.attach(trainer)        # before train(); or RewardAdapterFunction(dir, model=peft_model) up front
    trainer.train()

Each call switches the reward adapter in (adapter flags only: no ``requires_grad`` change, unlike peft's
``set_adapter``), runs one no-grad, dropout-off pass over the base, reads the score head at the last
token, and restores the active adapters and every module's train/eval flag, also when the pass raises.

Scores come from token ids in the format the adapter was trained on: TRL's own prompt ids (the prompt
encoded exactly as TRL encodes it for generation) + the sampled ``completion_ids``, a final stop token
replaced by the chat template's end-of-turn tokens (see ``scoring``). Nothing is decoded and re-encoded.

Not covered: tool calling / environments (multi-turn completions), and sharded training (DeepSpeed
ZeRO-3, FSDP), where the scoring pass would see sharded weights.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from .model import (
    REWARD_ADAPTER,
    _check_label_index,
    _linear_from_weights,
    _load_frozen_adapter,
    _quiet_peft_setup,
    last_non_pad_index,
    position_ids_from_mask,
)
from .model_io import check_adapter_dir, read_score_head
from .prompts import is_conversational, pad_token_id
from .rollout import left_pad
from .scoring import end_of_turn_ids, training_format_ids

REWARD_FUNCTION_NAME = "reward_adapter"  # TRL logs the scores as rewards/<name>/mean
_FLAG_KEYS = ("_active_adapter", "_disable_adapters")


def tuner_layers(peft_model) -> list[nn.Module]:
    """Every peft layer whose active-adapter flags decide what runs (LoRA layers, modules_to_save wrappers)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    return [module for module in peft_model.modules() if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper))]


@contextlib.contextmanager
def adapter_active(peft_model, adapter_name: str) -> Iterator[None]:
    """Run the body with only ``adapter_name`` active and every module in eval mode (dropout off).

    The adapter flags of each peft layer are written directly, as ``MultiAdapterModel`` does: peft's
    ``set_adapter`` would also mark the activated adapter trainable and freeze the others. On exit each
    layer's flags and each module's ``training`` flag are restored exactly, also when the body raises.
    """
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"the model has no adapter {adapter_name!r}; its adapters: {sorted(peft_model.peft_config)}")
    layers = [vars(layer) for layer in tuner_layers(peft_model)]
    previous_flags = [{key: layer[key] for key in _FLAG_KEYS if key in layer} for layer in layers]
    previous_modes = [(module, module.training) for module in peft_model.modules()]
    try:
        for layer in layers:
            layer.update({"_active_adapter": [adapter_name], "_disable_adapters": False})
        peft_model.eval()
        yield
    finally:
        for layer, flags in zip(layers, previous_flags):
            layer.update(flags)
        for module, mode in previous_modes:
            module.training = mode


class RewardAdapterFunction:
    """A TRL reward function: ``f(prompts=, completions=, completion_ids=, **kwargs) -> list[float]``.

    Scores each completion with a reward adapter (a PEFT SEQ_CLS LoRA + its score head, as
    ``trl_multiadapter.reward`` / ``trl.RewardTrainer`` save it) loaded, frozen, onto the ``PeftModel`` the
    TRL trainer optimises. See the module docstring for the scoring format.

    Args:
        reward_adapter: the reward adapter directory.
        model: the ``PeftModel`` to load it onto now (when the trainer gets an existing ``PeftModel``);
            otherwise call :meth:`attach` with the trainer once it is built.
        processing_class: the tokenizer the trainer encodes prompts with (default: the attached trainer's).
        adapter_name: name of the loaded adapter in the model ("reward").
        reward_label_index: None for a 1-label head; the column to read from a multi-label head.
        end_of_turn_token: "auto" (what the chat template writes after an assistant turn), a token, or
            None (score completions exactly as sampled).
        stop_token_ids: ids that end sampling (default: the trainer's ``eos_token_ids``, else the model's
            ``generation_config.eos_token_id`` and the tokenizer's EOS, as TRL's trainers collect them).
        chat_template_kwargs: passed to ``apply_chat_template`` for prompts (default: the trainer's).
        batch_size: rows per scoring forward.
        name: the function's ``__name__``, under which TRL logs its rewards.
    """

    def __init__(
        self,
        reward_adapter: str | os.PathLike,
        *,
        model=None,
        processing_class=None,
        adapter_name: str = REWARD_ADAPTER,
        reward_label_index: int | None = None,
        end_of_turn_token: str | None = "auto",
        stop_token_ids: Sequence[int] | None = None,
        chat_template_kwargs: dict | None = None,
        batch_size: int = 8,
        name: str = REWARD_FUNCTION_NAME,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.adapter_dir = Path(check_adapter_dir(reward_adapter, "reward_adapter"))
        # read and check the score head before anything is loaded onto a model
        self._score_weight, self._score_bias = read_score_head(self.adapter_dir)
        _check_label_index(self._score_weight, reward_label_index, self.adapter_dir)
        self.adapter_name, self.reward_label_index = adapter_name, reward_label_index
        self.processing_class, self.end_of_turn_token = processing_class, end_of_turn_token
        self._given_stop_ids, self._given_template_kwargs = stop_token_ids, chat_template_kwargs
        self._trainer_stop_ids: list[int] | None = None
        self.batch_size, self.__name__ = batch_size, name
        self.peft_model = None
        self.score_head: nn.Linear | None = None
        self.stop_ids: frozenset[int] = frozenset()
        self.end_ids: tuple[int, ...] = ()
        self.chat_template_kwargs: dict = dict(chat_template_kwargs or {})
        if model is not None:
            self.attach(model)

    # ------------------------------------------------------------------------------------------ attaching
    def attach(self, target) -> RewardAdapterFunction:
        """Load the reward adapter onto ``target``: a TRL ``GRPOTrainer`` / ``RLOOTrainer`` (its model, prompt
        encoding and stop ids are used) or a ``PeftModel``. Call it before ``trainer.train()``. Attaching the
        model it is already on only refreshes the settings read from a trainer."""
        trainer = target if hasattr(target, "accelerator") and hasattr(target, "model") else None
        peft_model = trainer.accelerator.unwrap_model(trainer.model) if trainer is not None else target
        if not hasattr(peft_model, "peft_config") or not hasattr(peft_model, "load_adapter"):
            raise TypeError(
                f"attach() takes a TRL GRPOTrainer/RLOOTrainer or a peft PeftModel, got {type(target).__name__}; "
                "give the trainer a peft_config= (or a PeftModel) so the reward adapter has a PeftModel to join"
            )
        if self.peft_model is not None and self.peft_model is not peft_model:
            raise ValueError("this reward function is already attached to another model; build one per trainer")
        if trainer is not None:
            self._read_trainer_settings(trainer)
        if self.peft_model is peft_model:
            return self
        if self.adapter_name in peft_model.peft_config:
            raise ValueError(
                f"the model already has an adapter named {self.adapter_name!r}; pass adapter_name= a free name"
            )
        if self.processing_class is None:
            raise ValueError("pass processing_class= (the trainer's tokenizer), or attach the trainer itself")
        self._load_onto(peft_model)
        return self

    def _read_trainer_settings(self, trainer) -> None:
        if getattr(trainer, "tools", None) or getattr(trainer, "environment_factories", None):
            raise ValueError(
                "RewardAdapterFunction scores single-turn completions; this trainer has tools or environments, whose "
                "multi-turn completions it cannot put in the reward's training format"
            )
        if self.processing_class is None:
            self.processing_class = trainer.processing_class
        if self._given_template_kwargs is None:
            self.chat_template_kwargs = dict(getattr(trainer, "chat_template_kwargs", None) or {})
        if getattr(trainer, "eos_token_ids", None):
            self._trainer_stop_ids = list(trainer.eos_token_ids)  # exactly what cuts TRL's completions
        if self.peft_model is not None:
            self.stop_ids = self._stop_ids(self.peft_model)

    def _load_onto(self, peft_model) -> None:
        parameters = list(peft_model.parameters())
        requires_grad = [parameter.requires_grad for parameter in parameters]
        modes = [(module, module.training) for module in peft_model.modules()]
        with _quiet_peft_setup():
            _load_frozen_adapter(peft_model, self.adapter_dir, self.adapter_name)
        # loading must not change what trains or the train/eval state of the model being trained
        for parameter, flag in zip(parameters, requires_grad):
            parameter.requires_grad_(flag)
        for module, mode in modes:
            module.training = mode
        causal_lm = peft_model.get_base_model()
        self.score_head = _linear_from_weights(
            self._score_weight, self._score_bias, causal_lm.get_output_embeddings().weight.device
        ).requires_grad_(False).eval()
        self.peft_model = peft_model
        self.stop_ids = self._stop_ids(peft_model)
        self.end_ids = tuple(end_of_turn_ids(self.processing_class, self.end_of_turn_token))

    def _stop_ids(self, peft_model) -> frozenset[int]:
        chosen = self._given_stop_ids if self._given_stop_ids is not None else self._trainer_stop_ids
        if chosen is not None:
            return frozenset(int(token) for token in chosen)
        # TRL's rule: every EOS id of the generation config, plus the tokenizer's EOS
        configured = getattr(peft_model.get_base_model().generation_config, "eos_token_id", None)
        ids = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
        if self.processing_class.eos_token_id is not None:
            ids.append(self.processing_class.eos_token_id)
        return frozenset(int(token) for token in ids)

    # ------------------------------------------------------------------------------------------ scoring
    def __call__(self, prompts, completions=None, completion_ids=None, **kwargs) -> list[float]:
        """Scores of TRL's reward-function call; ``completion_ids`` (TRL always passes them) are what is scored."""
        if completion_ids is None:
            raise ValueError(
                "RewardAdapterFunction scores token ids: call it with completion_ids= (TRL's trainers pass them)"
            )
        if len(completion_ids) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(completion_ids)} completion_ids; give one per completion")
        return self.score_ids(self.prompt_ids(prompts), completion_ids).tolist()

    def prompt_ids(self, prompts: Sequence) -> list[list[int]]:
        """Prompts encoded as TRL's GRPO/RLOO trainers encode them for generation: chat messages through the
        chat template with the assistant header, plain text through the tokenizer (with its special tokens)."""
        tokenizer = self._require_attached().processing_class
        if is_conversational(prompts[0]):
            encoded = tokenizer.apply_chat_template(
                conversation=list(prompts), add_generation_prompt=True, tokenize=True, return_dict=True,
                **self.chat_template_kwargs,
            )
            return [list(ids) for ids in encoded["input_ids"]]
        return [list(ids) for ids in tokenizer(text=list(prompts))["input_ids"]]

    def score_ids(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Scores (B,) float32 on the CPU of prompt + completion ids, each completion in the training format."""
        self._require_attached()
        if len(prompt_ids) != len(completion_ids):
            raise ValueError(f"got {len(prompt_ids)} prompts but {len(completion_ids)} completions; give one per completion")
        sequences = [
            [int(token) for token in prompt] + training_format_ids(completion, self.stop_ids, self.end_ids)
            for prompt, completion in zip(prompt_ids, completion_ids)
        ]
        scores = [self._score_batch(sequences[start:start + self.batch_size])
                  for start in range(0, len(sequences), self.batch_size)]
        return torch.cat(scores)

    def _score_batch(self, sequences: list[list[int]]) -> torch.Tensor:
        causal_lm = self.peft_model.get_base_model()
        device = causal_lm.get_input_embeddings().weight.device
        input_ids, attention_mask = left_pad(sequences, pad_token_id(self.processing_class), device)
        with torch.no_grad(), adapter_active(self.peft_model, self.adapter_name):
            hidden = causal_lm.base_model(  # the decoder body: final hidden states after the last norm
                input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), use_cache=False,
            ).last_hidden_state  # (B, T, H)
            last = last_non_pad_index(attention_mask).to(hidden.device)
            final_hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
            head = self.score_head.to(final_hidden.device)  # the trainer may have moved the model after attach
            self.score_head = head
            scores = head(final_hidden.to(head.weight.dtype))  # (B, num_labels)
        return scores[:, self.reward_label_index or 0].float().cpu()

    def _require_attached(self) -> RewardAdapterFunction:
        if self.peft_model is None:
            raise RuntimeError(
                "RewardAdapterFunction is not attached to the model being trained: call reward.attach(trainer) after "
                "building the GRPOTrainer/RLOOTrainer, or pass model=<PeftModel> when the trainer gets a PeftModel"
            )
        return self

    def __repr__(self) -> str:
        state = "attached" if self.peft_model is not None else "not attached"
        return f"RewardAdapterFunction({str(self.adapter_dir)!r}, adapter_name={self.adapter_name!r}, {state})"
