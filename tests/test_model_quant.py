"""4-bit (bitsandbytes NF4) bases: configuration path, kbit preparation, and the CPU gradient verdict.

The reference for every number is a plain float32 transformers model holding the 4-bit model's
weights dequantized by bitsandbytes itself, with the same LoRA weights.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from trl_multiadapter import model_quant
from trl_multiadapter.model import MultiAdapterModel
from trl_multiadapter.testing import build_tiny_model

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*is_gradient_checkpointing.*:FutureWarning",
    "ignore:.*gemv_4bit.*:UserWarning",
    "ignore:Training on a 4-bit.*:UserWarning",
)
try:
    import bitsandbytes as bnb
except ImportError:  # CI installs the quant extra; without it only the missing-package message is checked
    bnb = None
requires_bnb = pytest.mark.skipif(bnb is None, reason="needs bitsandbytes (the quant extra)")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def nf4_config(compute_dtype=torch.float32):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)


def dequantized_copy(quantized_lm) -> torch.nn.Module:
    """A plain float32 tiny Llama with the quantized model's weights, 4-bit ones dequantized by bitsandbytes."""
    reference = build_tiny_model("tiny", task="causal", seed=0)
    with torch.no_grad():
        for name, module in quantized_lm.named_modules():
            if "lora_" in name or not hasattr(module, "weight") or hasattr(module, "base_layer"):
                continue  # LoRA weights are not base weights; peft wrappers are visited through base_layer
            target = reference.get_submodule(name.replace(".base_layer", ""))
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            else:
                weight = module.weight
            target.weight.copy_(weight.float().cpu())
    return reference.eval()


def token_batch(seed: int, batch: int = 2, length: int = 10) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(6, 1024, (batch, length), generator=generator)


def lora_gradient_errors(quantized_lm, reference_lm, ids, warm_up_without_grad: bool) -> float:
    """Max relative error of LoRA gradients on the 4-bit model vs the dequantized float32 reference."""
    config = LoraConfig(target_modules="all-linear", r=4, lora_alpha=8, init_lora_weights=False)
    torch.manual_seed(1)
    quantized = get_peft_model(quantized_lm, config)
    torch.manual_seed(1)
    reference = get_peft_model(reference_lm, config)
    gradients = []
    for model in (quantized, reference):
        model.eval()
        if warm_up_without_grad:  # what generation does before every PPO update
            with torch.no_grad():
                model(input_ids=ids)
        model(input_ids=ids).logits.float().pow(2).mean().backward()
        gradients.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    quantized_grads, reference_grads = gradients
    assert quantized_grads.keys() == reference_grads.keys() and reference_grads
    return max(
        float((quantized_grads[n] - reference_grads[n]).norm() / reference_grads[n].norm()) for n in reference_grads
    )


def load_4bit(model_dir, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=nf4_config(), **kwargs)


# ------------------------------------------------------------------------------------------------


def test_missing_bitsandbytes_names_the_quant_extra(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(model_quant, "bitsandbytes_installed", lambda: False)
    with pytest.raises(ImportError, match=r'pip install "trl-multiadapter\[quant\]"'):
        MultiAdapterModel.from_pretrained(str(tiny_model_dir), quantization_config=nf4_config())


@requires_bnb
def test_cpu_4bit_lora_gradients_are_wrong_after_a_no_grad_forward(tiny_model_dir):
    """The measurement behind the CPU refusal (bitsandbytes 0.50.2). If this starts failing because
    the warm-up error dropped, bitsandbytes fixed its CPU backward: lift KBIT_CPU_TRAINING_ERROR."""
    ids = token_batch(seed=0)
    fresh_error = lora_gradient_errors(
        load_4bit(tiny_model_dir), dequantized_copy(load_4bit(tiny_model_dir)), ids, warm_up_without_grad=False
    )
    warm_error = lora_gradient_errors(
        load_4bit(tiny_model_dir), dequantized_copy(load_4bit(tiny_model_dir)), ids, warm_up_without_grad=True
    )
    assert fresh_error < 0.02, f"the dequantized reference itself disagrees: {fresh_error:.3%}"
    assert warm_error > 0.1, (
        f"CPU 4-bit LoRA gradients now match after a no-grad forward (error {warm_error:.3%}): "
        "bitsandbytes fixed its CPU path; remove the refusal in trl_multiadapter.model_quant"
    )


@requires_bnb
def test_cpu_4bit_model_prepares_the_base_runs_inference_and_refuses_training(tiny_model_dir):
    with pytest.warns(UserWarning, match="refused on CPU"):
        model = MultiAdapterModel.from_pretrained(
            str(tiny_model_dir), quantization_config=nf4_config(), dtype=torch.bfloat16
        )
    causal_lm = model.peft_model.get_base_model()
    quantized = [m for m in causal_lm.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # every decoder Linear of the 2-layer model; the LM head stays unquantized
    # prepare_model_for_kbit_training: base frozen, non-quantized bf16 parameters upcast to float32
    trainable = {id(p) for p in model.trainable_parameters()}
    assert all(not p.requires_grad for p in model.parameters() if id(p) not in trainable)
    non_quantized = [p for n, p in causal_lm.named_parameters() if "lora_" not in n and p.__class__.__name__ != "Params4bit"]
    assert non_quantized and {p.dtype for p in non_quantized} == {torch.float32}

    ids = token_batch(seed=1)
    with torch.no_grad():
        expected = dequantized_copy(causal_lm)(input_ids=ids).logits
    torch.testing.assert_close(model.reference_logits(ids), expected, atol=5e-3, rtol=0)
    with torch.no_grad():
        logits, _ = model.policy_forward(ids)  # inference is allowed
    torch.testing.assert_close(logits, expected, atol=5e-3, rtol=0)  # fresh LoRA == reference
    with pytest.raises(RuntimeError, match="refused on CPU.*Use a CUDA GPU"):
        model.policy_forward(ids)
    with pytest.raises(RuntimeError, match="refused on CPU"):
        model.critic_values(ids)


@pytest.mark.gpu
@requires_cuda
@requires_bnb
def test_cuda_4bit_lora_gradients_match_the_dequantized_reference(tiny_model_dir):
    ids = token_batch(seed=2).cuda()
    quantized = load_4bit(tiny_model_dir, device_map="cuda:0")
    reference = dequantized_copy(quantized).cuda()
    error = lora_gradient_errors(quantized, reference, ids, warm_up_without_grad=True)
    assert error < 0.02


@pytest.mark.gpu
@requires_cuda
@requires_bnb
def test_cuda_4bit_multiadapter_model_trains_only_its_adapters(tiny_model_dir):
    model = MultiAdapterModel.from_pretrained(
        str(tiny_model_dir), quantization_config=nf4_config(torch.bfloat16), dtype=torch.bfloat16, device_map="cuda:0"
    ).train()
    ids = token_batch(seed=3).cuda()
    frozen = {n: t.detach().clone() for n, t in model.state_dict().items()}
    trainable_names = {n for n, p in model.named_parameters() if any(p is q for q in model.trainable_parameters())}
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        model.reference_logits(ids)
        logits, values = model.policy_forward(ids)
        (logits.logsumexp(-1).mean() + values.pow(2).mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    changed = {n for n in frozen if not torch.equal(frozen[n], after[n])}
    assert changed == trainable_names
