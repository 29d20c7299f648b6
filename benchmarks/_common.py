"""Shared benchmark fixtures: one work dir of weights, adapters, prompts that every system loads.

Built once per settings in our venv (transformers 5, peft 0.21) and read by every worker, including
TRL 0.11.4's (transformers 4.46, peft 0.13), so all systems start from bit-identical weights:

    base/                 the frozen causal LM (config.json + model.safetensors)
    tokenizer/            tokenizer.json + a PreTrainedTokenizerFast tokenizer_config.json
    policy_adapter/       PEFT CAUSAL_LM LoRA (r16/a32 on q,v, dropout 0.05), small non-zero B
    reward_adapter/       PEFT SEQ_CLS LoRA (r8 on every projection) with its 1-label score head
    value_head.safetensors  weight (1, hidden) and bias (1,) of the value head
    prompts.json          token-id prompts (BOS + text, lengths uniform in [56, 72])
    parity.json           fixed query ids and response ids for the parity check
    manifest.json         the settings the dir was built for (reused when they match)

The policy adapter's B is non-zero on purpose: with B = 0 the policy equals the reference and the
parity check of policy logprobs would compare the base model with itself.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

FIXTURE_VERSION = 1
POLICY_TARGETS = ("q_proj", "v_proj")
REWARD_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Response tokens are drawn from ordinary tokens only: ids 0-5 are the special tokens.
FIRST_ORDINARY_TOKEN_ID = 6


@dataclass(frozen=True)
class FixtureSettings:
    """What the shared work dir is built from. Any change rebuilds it."""

    model_size: str = "medium"
    vocab_size: int = 8000
    prompt_min_tokens: int = 56
    prompt_max_tokens: int = 72
    num_prompts: int = 128
    parity_batch: int = 8
    parity_response_length: int = 32
    policy_lora: dict = field(default_factory=lambda: {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05})
    reward_lora: dict = field(default_factory=lambda: {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0})
    seed: int = 0
    version: int = FIXTURE_VERSION


def ensure_workdir(workdir: Path, settings: FixtureSettings) -> Path:
    """Build the work dir for ``settings`` unless it already holds exactly that build."""
    workdir = Path(workdir)
    manifest = workdir / "manifest.json"
    wanted = asdict(settings)
    if manifest.exists() and json.loads(manifest.read_text()) == wanted:
        return workdir
    workdir.mkdir(parents=True, exist_ok=True)
    build_workdir(workdir, settings)
    manifest.write_text(json.dumps(wanted, indent=1))
    return workdir


def build_workdir(workdir: Path, settings: FixtureSettings) -> None:
    import torch
    import transformers

    from trl_multiadapter.testing import build_tiny_model, build_tiny_tokenizer

    transformers.logging.disable_progress_bar()
    tokenizer = build_tiny_tokenizer(settings.vocab_size)
    save_tokenizer(tokenizer, workdir / "tokenizer")
    base = build_tiny_model(settings.model_size, task="causal", seed=settings.seed, vocab_size=settings.vocab_size)
    base.save_pretrained(workdir / "base")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed + 1)
        save_policy_adapter(base, settings, workdir / "policy_adapter")
        save_reward_adapter(base, settings, workdir / "reward_adapter")
        save_value_head(base.config.hidden_size, workdir / "value_head.safetensors")
    prompts = build_prompts(tokenizer, settings)
    (workdir / "prompts.json").write_text(json.dumps({"input_ids": prompts}))
    (workdir / "parity.json").write_text(json.dumps(build_parity_inputs(prompts, settings)))


def save_tokenizer(tokenizer, path: Path) -> None:
    """Save so that transformers 4.46 loads it too: its tokenizer_config must name PreTrainedTokenizerFast."""
    tokenizer.save_pretrained(path)
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    # transformers 5 writes extra special tokens as a list under a new key; 4.46 reads the old one.
    config.setdefault("additional_special_tokens", config.get("extra_special_tokens", []))
    config_path.write_text(json.dumps(config, indent=1))


def save_policy_adapter(base, settings: FixtureSettings, path: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type="CAUSAL_LM", target_modules=list(POLICY_TARGETS), bias="none", **settings.policy_lora)
    model = get_peft_model(_clone(base), config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.01)
    model.save_pretrained(path)


def sequence_classifier(base):
    """A 1-label LlamaForSequenceClassification holding ``base``'s weights (only the score head is new)."""
    from transformers import LlamaForSequenceClassification

    config = base.config.__class__.from_dict(base.config.to_dict())
    config.num_labels = 1
    classifier = LlamaForSequenceClassification(config)
    missing, _ = classifier.load_state_dict(base.state_dict(), strict=False)
    if set(missing) != {"score.weight"}:
        raise RuntimeError(f"reward model did not take the base weights; missing {missing}")
    return classifier


def save_reward_adapter(base, settings: FixtureSettings, path: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    classifier = sequence_classifier(base)
    lora = LoraConfig(task_type="SEQ_CLS", target_modules=list(REWARD_TARGETS), bias="none", **settings.reward_lora)
    model = get_peft_model(classifier, lora)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.02)
            elif "score" in name and "modules_to_save" in name:
                parameter.normal_(0.0, 0.05)
    model.save_pretrained(path)


def save_value_head(hidden_size: int, path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    head = torch.nn.Linear(hidden_size, 1)
    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()}, str(path))


def _clone(model):
    import copy

    return copy.deepcopy(model)


def build_prompts(tokenizer, settings: FixtureSettings) -> list[list[int]]:
    """BOS + synthetic question text, cut to a length drawn uniformly from the prompt range.

    Plain text rather than the chat template: the Llama-3.1 template's system block alone is ~70
    tokens with the tiny tokenizer, longer than the 56-72 token prompts the benchmark is specified on.
    """
    from trl_multiadapter.testing import words

    rng = random.Random(settings.seed)
    pool = words.TOPICS + words.VERBS + words.ADJECTIVES + words.NAMES + words.FILLER
    prompts = []
    for _ in range(settings.num_prompts):
        length = rng.randint(settings.prompt_min_tokens, settings.prompt_max_tokens)
        text = " ".join(rng.choice(pool) for _ in range(4 * length)) + "?"
        ids = tokenizer(text).input_ids  # the post-processor prepends one BOS
        if len(ids) < length or ids[0] != tokenizer.bos_token_id:
            raise RuntimeError("prompt text encoded shorter than its target length; lengthen the text")
        prompts.append(ids[:length])
    return prompts


def build_parity_inputs(prompts: list[list[int]], settings: FixtureSettings) -> dict:
    """Queries (the first prompts: different lengths, so batches are padded) and random responses."""
    rng = random.Random(settings.seed + 2)
    queries = prompts[: settings.parity_batch]
    responses = [
        [rng.randrange(FIRST_ORDINARY_TOKEN_ID, settings.vocab_size) for _ in range(settings.parity_response_length)]
        for _ in queries
    ]
    return {"queries": queries, "responses": responses}


def prompt_batch(prompts: list[list[int]], round_index: int, batch_size: int) -> list[list[int]]:
    """The prompts of one round: every system gets the same ones in the same round."""
    start = round_index * batch_size
    return [prompts[(start + offset) % len(prompts)] for offset in range(batch_size)]


def max_abs_difference(first, second) -> float:
    import torch

    first, second = torch.as_tensor(first, dtype=torch.float64), torch.as_tensor(second, dtype=torch.float64)
    if first.shape != second.shape:
        raise ValueError(f"cannot compare shapes {tuple(first.shape)} and {tuple(second.shape)}")
    return float((first - second).abs().max()) if first.numel() else 0.0
