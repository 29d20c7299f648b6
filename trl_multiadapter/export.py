"""The export stage: servable adapters, the value head, the reward adapter and a model card.

``export/`` has the ``MultiAdapterModel.save_adapters`` layout, so ``MultiAdapterModel.from_pretrained(base,
from_saved="export")`` restores every role, and each adapter folder is a plain PEFT adapter:

    export/README.md           the model card: base, data, hyperparameters, held-out metrics, usage, serving
    export/policy/             PEFT LoRA adapter (+ the same README.md, for the hub push); serve with TGI or vLLM
    export/reward/             PEFT SEQ_CLS adapter with its score head
    export/value_head.safetensors
    export/multiadapter.json
    export/merged/             base + policy merged into one model (export.merged_model: true)

The adapters' ``base_model_name_or_path`` is where the base can be loaded from (the hub id, or the run's
``base_model/`` folder for a builtin model), so servers and ``AutoPeftModel`` find it. The model card
names the base by its hub id, or says it is the built-in tiny model: never a local path.

This module also holds ``generate_from_adapter``, behind ``trl-multiadapter generate``: it samples with
the project's one sampler (``rollout.sample_rollout``), as PPO and the evaluate stage do.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
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
    # README.md: peft's empty card template; the stage writes the real card instead.
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json",
                                                                  "chat_template.jinja", "ppo_config.json",
                                                                  "README.md"))
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


@dataclass(frozen=True)
class BaseModelName:
    """How the model card names the base: never by a local absolute path."""

    hub_id: str | None  # for the card's metadata; None when the base is not on the hub
    description: str  # for the text
    load: str  # a Python expression that loads it
    cli: str  # what `trl-multiadapter generate --base` takes
    folder: str | None  # a local folder to mount for serving (relative to the run folder, or a placeholder)


def base_model_name(model_section) -> BaseModelName:
    """The card's name of the recipe's base (``recipe.model``): hub id, built-in model or local folder."""
    from .builtin_models import is_builtin

    name = model_section.name_or_path
    if is_builtin(name):
        return BaseModelName(
            hub_id=None,
            description=f"the built-in tiny model `{name}` (a small random Llama-architecture model built offline "
            f"by `trl_multiadapter.testing`, weight seed {model_section.seed}; for tests and demos)",
            load=f'builtin_model("{name}", seed={model_section.seed})', cli=name, folder="base_model",
        )
    if Path(name).expanduser().exists() or Path(name).is_absolute() or name.startswith("."):
        placeholder = f"<path to {Path(name).name}>"
        return BaseModelName(hub_id=None, description=f"a local model (folder `{Path(name).name}`)",
                             load=f'AutoModelForCausalLM.from_pretrained("{placeholder}")', cli=placeholder,
                             folder=placeholder)
    return BaseModelName(hub_id=name, description=f"`{name}`", load=f'AutoModelForCausalLM.from_pretrained("{name}")',
                         cli=name, folder=None)


def _serving_lines(base: BaseModelName, lora_rank: int) -> list[str]:
    """TGI (its options before the image name) and vLLM commands, run from the run folder."""
    placeholder = base.folder is not None and base.folder.startswith("<")
    if base.folder is None:  # a hub id: both servers download it
        mount, model_id, served = "", base.hub_id, base.hub_id
    else:  # a local folder, mounted into the TGI container
        host = base.folder if placeholder else f"$PWD/{base.folder}"
        mount, model_id, served = f" -v {host}:/base", "/base", base.folder if placeholder else f"./{base.folder}"
    return [
        "```bash",
        f"docker run --gpus all -p 8080:80 -v $PWD/export/{POLICY_DIR}:/adapters/policy{mount} \\",
        "  -e LORA_ADAPTERS=policy=/adapters/policy \\",
        f"  ghcr.io/huggingface/text-generation-inference:latest --model-id {model_id}",
        f"vllm serve {served} --enable-lora --max-lora-rank {max(lora_rank, 16)} \\",
        f"  --lora-modules policy=./export/{POLICY_DIR}",
        "```",
    ]


def metrics_table(metrics: dict[str, Any]) -> list[str]:
    """Markdown rows base | aligned of the evaluate stage's metrics.json (ground truth first)."""
    from .report import METRIC_ROWS

    lines = ["| held-out prompts | base | aligned |", "|---|---:|---:|"]
    for key, label in METRIC_ROWS:
        if key in metrics.get("aligned", {}) and key in metrics.get("base", {}):
            lines.append(f"| {label} (`{key}`) | {_format(metrics['base'][key])} | {_format(metrics['aligned'][key])} |")
    return lines


def model_card(recipe, metrics: dict[str, Any] | None, reward_metrics: dict[str, Any],
               prompts_held_out: str | None = None) -> str:
    """The model card (README.md) of the export: base, data, hyperparameters, metrics, intended use, serving.

    prompts_held_out: how the data stage made the held-out prompts (``data_report.json``'s ``held_out.reason``,
    e.g. a carved share of the train split); None names the recipe's eval split.
    """
    ppo, data = recipe.ppo, recipe.data
    preference, prompts = data.preference, data.prompts
    base = base_model_name(recipe.model)
    metadata = ["---", *([f"base_model: {base.hub_id}"] if base.hub_id else []), "library_name: peft",
                "tags: [trl-multiadapter, ppo, rlhf, lora]", "---"]
    lines = [
        *metadata,
        "",
        "# Policy adapter trained with multi-adapter PPO",
        "",
        f"A LoRA adapter for {base.description}, trained with PPO against a LoRA reward adapter on the same "
        "frozen base (trl-multiadapter: one base model plays policy, value, reward and reference).",
        "",
        "The export folder holds `policy/` (this adapter, PEFT format), `reward/` (the reward adapter with its "
        "score head), "
        + ("" if getattr(ppo, "advantage_estimator", "gae") != "gae" else "`value_head.safetensors`, ")
        + "and `multiadapter.json`: "
        "`MultiAdapterModel.from_pretrained(base, from_saved=\"export\")` restores every role.",
        "",
        "## Data",
        "",
        f"- reward adapter: preference pairs from `{preference.source}`"
        + (f" (`{Path(preference.path).name}`" + (f", `{preference.data_dir}`" if preference.data_dir else "") + ")"
           if preference.path else "")
        + f", split `{preference.train_split}`, max {preference.max_length} tokens",
        f"- PPO prompts: `{prompts.source}`" + (f" (`{Path(prompts.path).name}`)" if prompts.path else "")
        + f", split `{prompts.train_split}`; held-out evaluation on "
        + (prompts_held_out if prompts_held_out else f"`{prompts.eval_split}`"),
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
        lines += ["", "Base and aligned policy on the same held-out prompts, sampled as in PPO:", "",
                  *metrics_table(metrics)]
        lines.append(f"\nReward win rate of the aligned policy over the base: {metrics['win_rate']:.4f} "
                     f"({metrics.get('num_prompts')} prompts).")
    else:
        lines.append("- no evaluation was run (the recipe has no evaluate stage).")
    loader = ("from trl_multiadapter.builtin_models import builtin_model" if base.hub_id is None and
              base.load.startswith("builtin_model") else "from transformers import AutoModelForCausalLM")
    lines += [
        "",
        "## Intended use",
        "",
        recipe.export.intended_use,
        "",
        "## Usage",
        "",
        "From the run folder:",
        "",
        "```python",
        "from peft import PeftModel",
        loader,
        "",
        f"base = {base.load}",
        f'model = PeftModel.from_pretrained(base, "export/{POLICY_DIR}")',
        "```",
        "",
        f"or `trl-multiadapter generate --base {base.cli} --adapter export/{POLICY_DIR} --prompt \"...\"` (PPO's "
        "sampler). Serve with TGI or vLLM (LoRA adapters on the base model):",
        "",
        *_serving_lines(base, ppo.lora_r),
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- generate


def check_policy_adapter(adapter: str | Path) -> Path:
    """Refuse, in one line, a folder that is not a causal-LM PEFT adapter (e.g. the reward adapter)."""
    path = Path(adapter)
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        hint = (f"; it holds a saved multi-adapter model: pass {path / POLICY_DIR}" if (path / POLICY_DIR /
                "adapter_config.json").is_file() else "; pass a PEFT adapter folder such as RUN/export/policy")
        raise FileNotFoundError(f"--adapter {path} has no adapter_config.json{hint}")
    task_type = json.loads(config_file.read_text()).get("task_type")
    if task_type == "SEQ_CLS":
        raise ValueError(f"--adapter {path} is a reward adapter (task_type SEQ_CLS): it scores answers and cannot "
                         f"generate; pass the policy adapter (task_type CAUSAL_LM), e.g. RUN/export/{POLICY_DIR}")
    if task_type not in (None, "CAUSAL_LM"):
        raise ValueError(f"--adapter {path} has task_type {task_type}; generate needs a CAUSAL_LM (policy) adapter, "
                         f"e.g. RUN/export/{POLICY_DIR}")
    return path


def _load_generation_model(base: str, adapter: str | None):
    """(MultiAdapterModel, tokenizer) for base (+ adapter); a size mismatch is one line naming both."""
    from .builder import load_tokenizer
    from .builtin_models import builtin_model, is_builtin
    from .devices import process_device_map
    from .model import MultiAdapterModel

    if adapter:
        check_policy_adapter(adapter)
    tokenizer = load_tokenizer(base)
    model_or_path, placement = (builtin_model(base), {}) if is_builtin(base) else (base, process_device_map())
    try:
        model = MultiAdapterModel.from_pretrained(model_or_path, policy_adapter=adapter, **placement)
    except RuntimeError as error:
        mismatch = _size_mismatch(str(error))
        if mismatch is None:
            raise
        trained_on = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")
        named = f" (its adapter_config.json names {trained_on})" if trained_on else ""
        raise ValueError(f"--adapter {adapter} does not fit --base {base}: {mismatch} (another model size); pass as "
                         f"--base the model the adapter was trained on{named}") from None
    return model.eval(), tokenizer


_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                            r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)")


def _size_mismatch(message: str) -> str | None:
    """The first weight of torch's ``load_state_dict`` size-mismatch error, in words; None for other errors."""
    found = _SIZE_MISMATCH.search(message)
    if found is None:
        return None
    weight = found.group(1).removeprefix("base_model.model.")
    return f"its weight {weight} has shape {found.group(2)}, the base needs {found.group(3)}"


def generate_from_adapter(base: str, adapter: str | None, prompts: list[str], *, system_prompt: str | None = None,
                          max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                          do_sample: bool = True, seed: int = 0, stop_token: str | None = "eos",
                          ) -> list[tuple[str, str]]:
    """Answers of base (+ policy adapter) to chat prompts, sampled by PPO's sampler.

    ``base`` may be ``builtin:tiny``; without ``adapter`` the base itself answers (the reference role).
    Each prompt is sampled alone with ``torch.manual_seed(seed)``, so an answer does not depend on the
    other prompts. The answer is decoded up to its stop token, special tokens dropped.
    """
    import torch

    from .prompts import pad_token_id as pad_token_id_of
    from .rollout import SamplingSettings, left_pad, sample_rollout, stop_token_ids

    model, tokenizer = _load_generation_model(base, adapter)
    pad_token_id = pad_token_id_of(tokenizer)
    settings = SamplingSettings(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        stop_token_ids=stop_token_ids(tokenizer, model, stop_token), pad_token_id=pad_token_id,
        do_sample=do_sample, role="policy" if adapter else "reference",
    )
    answers = []
    for prompt in prompts:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        query_ids, query_mask = left_pad([ids], pad_token_id, model.device)
        torch.manual_seed(seed)
        rollout = sample_rollout(model, query_ids, query_mask, settings)
        response = rollout.responses()[0].tolist()
        content = response[:-1] if bool(rollout.stopped[0]) else response  # cut at the stop token
        answers.append((prompt, tokenizer.decode(content, skip_special_tokens=True).strip()))
    return answers
