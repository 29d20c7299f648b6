"""The one builder of the shared-base model for PPO: library, pipeline and ``ppo --config`` call it.

``build_model(model, args, ...)`` takes a ``MultiAdapterModel`` (checked against ``args`` and returned),
a transformers causal LM, a hub id, a local folder or a ``builtin:<size>`` name, and returns the base +
policy LoRA + value head (or critic) + reward adapter, with the config's model fields applied.
"""

from __future__ import annotations

import os
from typing import Any

from .builtin_models import builtin_model, builtin_tokenizer, is_builtin
from .model import MultiAdapterModel


def build_model(model, args, *, reward_adapter: str | os.PathLike | None = None, peft_config=None,
                **load_kwargs: Any) -> MultiAdapterModel:
    """The ``MultiAdapterModel`` PPO trains (see the module docstring).

    ``args``: a ``MultiAdapterPPOConfig`` (its seed, value_model, reference, policy_adapter, critic_init,
    reward_label_index, model_init_kwargs and checkpointing fields). ``load_kwargs`` go to
    ``MultiAdapterModel.from_pretrained`` after ``args.model_init_kwargs`` (e.g. quantization_config,
    dtype, device_map).
    """
    if isinstance(model, MultiAdapterModel):
        check_built_model(model, args, reward_adapter, peft_config)
        return model
    from transformers import set_seed

    # The LoRA and value-head initial weights come from the global RNG: seed it before building, so
    # args.seed decides them (Trainer.__init__ seeds only after the model exists).
    set_seed(args.seed)
    kwargs = {**(args.model_init_kwargs or {}), **load_kwargs}
    if isinstance(kwargs.get("quantization_config"), dict):  # JSON-friendly form, as saved in ppo_config.json
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig.from_dict(kwargs["quantization_config"])
    kwargs.setdefault("gradient_checkpointing", uses_activation_checkpointing(args))
    if isinstance(model, (str, os.PathLike)) and is_builtin(str(model)):
        model = builtin_model(str(model))  # the base weights of a builtin: name are fixed (seed 0)
    return MultiAdapterModel.from_pretrained(
        model,
        policy_config=peft_config,
        policy_adapter=args.policy_adapter,
        reward_adapter=reward_adapter,
        reward_label_index=args.reward_label_index,
        value_model=args.value_model or "head",
        critic_init=args.critic_init,
        reference=args.reference or "base",
        **kwargs,
    )


def load_tokenizer(model, **kwargs: Any):
    """The tokenizer of a model id, folder or ``builtin:`` name."""
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError("processing_class (the tokenizer) is required when `model` is not an id or path")
    if is_builtin(str(model)):
        return builtin_tokenizer(str(model))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model), **kwargs)


def uses_activation_checkpointing(args) -> bool:
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing; either turns it on.
    return bool(getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False))


def check_built_model(model: MultiAdapterModel, args, reward_adapter, peft_config) -> None:
    given = {"reward_adapter": reward_adapter, "peft_config": peft_config, "args.policy_adapter": args.policy_adapter,
             "args.model_init_kwargs": args.model_init_kwargs}
    misplaced = [name for name, value in given.items() if value is not None]
    if misplaced:
        raise ValueError(
            f"{', '.join(misplaced)} only apply when `model` is an id or path; the given MultiAdapterModel already "
            "has its adapters: pass them to MultiAdapterModel.from_pretrained instead"
        )
    for name, wanted, actual in (("value_model", args.value_model, model.value_model),
                                 ("reference", args.reference, model.reference_mode)):
        if wanted is not None and wanted != actual:
            raise ValueError(
                f"args.{name}={wanted!r} but the given MultiAdapterModel was built with {name}={actual!r}; "
                f"leave args.{name}=None or rebuild the model"
            )
