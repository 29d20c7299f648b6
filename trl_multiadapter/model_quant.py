"""k-bit (bitsandbytes) base models for ``MultiAdapterModel``: dependency check, preparation, CPU verdict.

4-bit NF4 is meant for CUDA. On CPU, bitsandbytes 0.50.2 loads a 4-bit model and runs its forward,
but once a forward has run in eval mode without gradients (as generation does before every PPO
update) the next backward silently returns wrong LoRA gradients: measured on the tiny model against
the same LoRA on the dequantized weights in float32, the relative error of the LoRA gradients was
0.07% before any no-grad forward and up to 150% (median 38%) after one, with only a
"gemv_4bit: an autograd kernel was not registered" warning. ``tests/test_model_quant.py`` repeats
this measurement. So a k-bit base on CPU may be loaded and used for inference (scoring, reference
logits, generation) but refuses gradient-enabled forwards with ``KBIT_CPU_TRAINING_ERROR``.
"""

from __future__ import annotations

import importlib.util

QUANT_EXTRA_HINT = 'pip install "trl-multiadapter[quant]"'

KBIT_CPU_TRAINING_ERROR = (
    "Training on a 4-bit/8-bit (bitsandbytes) base model is refused on CPU: bitsandbytes computes wrong LoRA "
    "gradients there after a no-grad forward (such as generation), silently. Use a CUDA GPU for k-bit "
    "training, or load the base without quantization_config (dtype=torch.float32 or torch.bfloat16) on CPU. "
    "Inference (score, reference_logits, generate) on a k-bit CPU model is allowed."
)


def is_kbit_config(quantization_config) -> bool:
    """True when ``quantization_config`` asks bitsandbytes for a 4-bit or 8-bit base."""
    if quantization_config is None:
        return False
    if isinstance(quantization_config, dict):
        return bool(quantization_config.get("load_in_4bit") or quantization_config.get("load_in_8bit"))
    return bool(getattr(quantization_config, "load_in_4bit", False) or getattr(quantization_config, "load_in_8bit", False))


def bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def require_bitsandbytes() -> None:
    """Raise an ImportError naming the ``quant`` extra when bitsandbytes is not installed."""
    if not bitsandbytes_installed():
        raise ImportError(
            "quantization_config with load_in_4bit/load_in_8bit needs the bitsandbytes package, which is not "
            f"installed. Install the quant extra: {QUANT_EXTRA_HINT}"
        )


def is_kbit_model(model) -> bool:
    """True when ``model`` (a transformers model) was loaded in 4-bit or 8-bit by bitsandbytes."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def kbit_weights_on_cpu(model) -> bool:
    """True when any bitsandbytes-quantized weight of ``model`` lives on the CPU."""
    for parameter in model.parameters():
        if parameter.__class__.__name__ in ("Params4bit", "Int8Params") and parameter.device.type == "cpu":
            return True
    return False


def prepare_kbit_base(model) -> None:
    """Prepare a k-bit base for LoRA training with ``peft.prepare_model_for_kbit_training``.

    Choices: the base is frozen and its non-quantized half-precision parameters (norms, embeddings,
    LM head) are cast to float32, as in the QLoRA recipe, for numerically stable training at the
    price of float32 copies of the embedding and LM head. Gradient checkpointing is NOT switched on
    here (peft would do it through the deprecated reentrant path and put the model in train mode);
    ``MultiAdapterModel`` enables it separately when asked (``gradient_checkpointing=True``).
    """
    from peft import prepare_model_for_kbit_training

    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
