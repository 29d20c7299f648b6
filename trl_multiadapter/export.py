"""The export stage: servable adapters, the value head, the reward adapter and a model card.

``export/`` has the ``MultiAdapterModel.save_adapters`` layout, so ``MultiAdapterModel.from_pretrained(base,
from_saved="export")`` restores every role, and each adapter folder is a plain PEFT adapter:

    export/policy/             PEFT LoRA adapter + README.md (model card); serve with TGI or vLLM
    export/reward/             PEFT SEQ_CLS adapter with its score head
    export/value_head.safetensors
    export/multiadapter.json
    export/merged/             base + policy merged into one model (export.merged_model: true)

The policy adapter's ``base_model_name_or_path`` names the recipe's base model, so servers find it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

POLICY_DIR = "policy"
REWARD_DIR = "reward"
MERGED_DIR = "merged"
MODEL_CARD = "README.md"


def copy_saved_adapters(source: Path, target: Path, base_model: str) -> None:
    """Copy a save_adapters folder and point the adapters at ``base_model``."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json",
                                                                  "chat_template.jinja", "ppo_config.json"))
    for adapter_config in target.glob("*/adapter_config.json"):
        config = json.loads(adapter_config.read_text())
        config["base_model_name_or_path"] = base_model
        adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def merge_policy(base_model: str, policy_dir: Path, target: Path, dtype: str, tokenizer) -> None:
    """Save base + policy adapter merged into one plain causal LM (loaded unquantized for the merge)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch_dtype = None if dtype == "auto" else getattr(torch, dtype)
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch_dtype or "auto")
    merged = PeftModel.from_pretrained(base, str(policy_dir)).merge_and_unload()
    merged.save_pretrained(target)
    tokenizer.save_pretrained(target)


def push_policy(policy_dir: Path, repo_id: str, private: bool) -> str:
    """Upload the policy adapter folder (with its model card) to the hub; returns the repository URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(policy_dir), repo_id=repo_id, commit_message="trl-multiadapter export")
    return str(url)


def _format(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(recipe, metrics: dict[str, Any] | None, reward_metrics: dict[str, Any], base_model: str,
               adapter_name: str) -> str:
    """The README.md of the exported policy adapter: data, hyperparameters, metrics, intended use, serving."""
    ppo, data = recipe.ppo, recipe.data
    preference, prompts = data.preference, data.prompts
    lines = [
        "---",
        f"base_model: {base_model}",
        "library_name: peft",
        "tags: [trl-multiadapter, ppo, rlhf, lora]",
        "---",
        "",
        f"# {adapter_name}: policy adapter trained with multi-adapter PPO",
        "",
        f"A LoRA adapter for `{base_model}` trained with PPO against a LoRA reward adapter on the same frozen "
        "base (trl-multiadapter: one base model plays policy, value, reward and reference).",
        "",
        "## Data",
        "",
        f"- reward adapter: preference pairs from `{preference.source}`"
        + (f" (`{preference.path}`" + (f", `{preference.data_dir}`" if preference.data_dir else "") + ")"
           if preference.path else "")
        + f", split `{preference.train_split}`, max {preference.max_length} tokens",
        f"- PPO prompts: `{prompts.source}`" + (f" (`{prompts.path}`)" if prompts.path else "")
        + f", split `{prompts.train_split}`; held-out evaluation on `{prompts.eval_split}`",
        "",
        "## Hyperparameters",
        "",
        f"- policy LoRA: r={ppo.lora_r}, alpha={ppo.lora_alpha}, dropout={ppo.lora_dropout}, "
        f"target modules {ppo.lora_target_modules}",
        f"- PPO: learning rate {ppo.learning_rate}, batch size {ppo.batch_size} per process, mini-batch "
        f"{ppo.mini_batch_size}, gradient accumulation {ppo.gradient_accumulation_steps}, {ppo.ppo_epochs} PPO "
        f"epochs, init KL coefficient {ppo.init_kl_coef} ({'adaptive' if ppo.adap_kl_ctrl else 'fixed'}), "
        f"KL estimator {ppo.kl_estimator}",
        f"- sampling: temperature {ppo.temperature}, top-k {ppo.top_k}, top-p {ppo.top_p}, "
        f"{ppo.max_new_tokens} new tokens",
        f"- reward LoRA: r={recipe.reward.lora_r}, alpha={recipe.reward.lora_alpha}, dropout "
        f"{recipe.reward.lora_dropout}, learning rate {recipe.reward.learning_rate}",
        f"- base: {recipe.model.dtype}" + (", 4-bit NF4" if recipe.quantization.load_in_4bit else ""),
        "",
        "## Metrics",
        "",
    ]
    accuracy = reward_metrics.get("eval_pairwise_accuracy")
    if accuracy is not None:
        lines.append(f"- reward adapter held-out pairwise accuracy: {accuracy:.4f}")
    if metrics:
        lines += ["", "| held-out prompts | base | aligned |", "|---|---:|---:|"]
        for key in ("mean_reward", "kl", "response_length", "stop_rate", "exact_match", "f1"):
            if key in metrics.get("aligned", {}):
                lines.append(f"| {key} | {_format(metrics['base'][key])} | {_format(metrics['aligned'][key])} |")
        lines.append(f"\nReward win rate of the aligned policy over the base: {metrics['win_rate']:.4f} "
                     f"({metrics.get('num_prompts')} prompts).")
    else:
        lines.append("- no evaluation was run (the recipe has no evaluate stage).")
    lines += [
        "",
        "## Intended use",
        "",
        recipe.export.intended_use,
        "",
        "## Usage",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base_model}")',
        f'model = PeftModel.from_pretrained(base, "{adapter_name}")',
        "```",
        "",
        "Serve with TGI or vLLM (LoRA adapters on the base model):",
        "",
        "```bash",
        f"docker run --gpus all -p 8080:80 -v $PWD/{adapter_name}:/adapters/policy \\",
        "  -e LORA_ADAPTERS=policy=/adapters/policy \\",
        f"  ghcr.io/huggingface/text-generation-inference:latest --model-id {base_model}",
        f"vllm serve {base_model} --enable-lora --max-lora-rank {max(ppo.lora_r, 16)} \\",
        f"  --lora-modules policy=./{adapter_name}",
        "```",
        "",
    ]
    return "\n".join(lines)


def generate_from_adapter(base: str, adapter: str | None, prompts: list[str], *, system_prompt: str | None = None,
                          max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
                          do_sample: bool = True, seed: int = 0) -> list[tuple[str, str]]:
    """Answers of base (+ PEFT adapter) to chat prompts; ``base`` may be ``builtin:tiny``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .recipe import BUILTIN_MODEL_PREFIX

    if base.startswith(BUILTIN_MODEL_PREFIX):
        from .testing import build_tiny_model, build_tiny_tokenizer_for

        size = base[len(BUILTIN_MODEL_PREFIX):]
        model, tokenizer = build_tiny_model(size), build_tiny_tokenizer_for(size)
    else:
        model = AutoModelForCausalLM.from_pretrained(base)
        tokenizer = AutoTokenizer.from_pretrained(base)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    answers = []
    for prompt in prompts:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        input_ids = torch.tensor([ids])
        torch.manual_seed(seed)
        with torch.no_grad():
            output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    max_new_tokens=max_new_tokens, do_sample=do_sample,
                                    temperature=temperature if do_sample else None,
                                    top_p=top_p if do_sample else None, pad_token_id=tokenizer.pad_token_id)
        answers.append((prompt, tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True).strip()))
    return answers
