"""TRL 0.11.4's multi-adapter PPOTrainer, driven by ``run.py`` (runs inside TRL 0.11.4's own venv).

The loop is the one of TRL 0.11.4's ``examples/scripts/ppo_multi_adapter.py`` (the SageMaker recipe's
trainer): one ``AutoModelForCausalLMWithValueHead`` over a PEFT policy adapter plus a reward adapter
loaded with ``reward_adapter=``, then per iteration ``trainer.generate`` -> ``compute_reward_score``
-> ``trainer.step``. Two deliberate differences from the example, both in TRL's favour or neutral:
the reward is read from the same token ids (no decode/re-encode round trip) and generation runs the
whole batch at once (the example's default generates in chunks of 4).

``CONFIG["systems"]`` maps names to the trainers this process hosts (normally one). Commands (see
``_protocol.py``): ``setup``, ``iteration(system, queries)``, ``parity(system, out_path)``.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
import warnings
from pathlib import Path

import _protocol

CONFIG = _protocol.read_worker_config()

import torch  # noqa: E402

torch.set_num_threads(CONFIG["threads"])

import peft  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from peft import LoraConfig, PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

EXPECTED_VERSIONS = {"trl": "0.11.4", "transformers": "4.46.3", "peft": "0.13.2"}
WORKDIR = Path(CONFIG["workdir"])
SYSTEMS: dict[str, dict] = {}
# Keys of newer peft configs that carry no setting at these values (peft_version is bookkeeping;
# qalora_group_size only matters with use_qalora=True).
NEWER_PEFT_DEFAULTS = {"qalora_group_size": 16}


def check_versions() -> dict[str, str]:
    found = {"trl": trl.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
             "torch": torch.__version__, "python": platform.python_version()}
    wrong = {name: found[name] for name, version in EXPECTED_VERSIONS.items() if found[name] != version}
    if wrong:
        raise RuntimeError(f"the TRL venv has {wrong}, expected {EXPECTED_VERSIONS}; delete the venv and rerun")
    return found


def adapter_for_peft_0_13(name: str) -> Path:
    """A copy of an adapter dir whose config keeps only the LoraConfig fields peft 0.13 knows.

    The adapters are written by peft 0.21, whose config has keys (``lora_bias``, ``target_parameters``,
    ...) that peft 0.13's ``LoraConfig(**config)`` rejects. The weights file is the same format.
    """
    source, target = WORKDIR / name, WORKDIR / "trl_0_11_4" / name
    target.mkdir(parents=True, exist_ok=True)
    known = set(LoraConfig.__dataclass_fields__)
    config = json.loads((source / "adapter_config.json").read_text())
    dropped = sorted(set(config) - known)
    unsupported = {key: config[key] for key in dropped if not _is_inert(key, config[key])}
    if unsupported:
        raise RuntimeError(f"{source}: settings peft 0.13 cannot express: {unsupported}")
    (target / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items() if k in known}, indent=1))
    shutil.copyfile(source / "adapter_model.safetensors", target / "adapter_model.safetensors")
    return target


def _is_inert(key: str, value) -> bool:
    if key == "peft_version":
        return True
    if key in NEWER_PEFT_DEFAULTS:
        return value == NEWER_PEFT_DEFAULTS[key]
    return value in (None, False, {}, [])


def load_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(WORKDIR / "tokenizer")
    if tokenizer.pad_token_id is None or tokenizer.padding_side != "left":
        raise RuntimeError(f"{WORKDIR / 'tokenizer'}: expected a pad token and left padding")
    return tokenizer


def build_model() -> AutoModelForCausalLMWithValueHead:
    base = AutoModelForCausalLM.from_pretrained(WORKDIR / "base", torch_dtype=torch.float32)
    policy = PeftModel.from_pretrained(base, adapter_for_peft_0_13("policy_adapter"), is_trainable=True)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        policy, reward_adapter=str(adapter_for_peft_0_13("reward_adapter"))
    )
    head = load_file(str(WORKDIR / "value_head.safetensors"))
    with torch.no_grad():
        model.v_head.summary.weight.copy_(head["weight"])
        model.v_head.summary.bias.copy_(head["bias"])
    return model


def build_trainer(spec: dict, tokenizer) -> PPOTrainer:
    model = build_model()
    config = PPOConfig(
        exp_name="trl_multiadapter_benchmark",
        seed=spec["seed"],
        log_with=None,
        batch_size=spec["batch_size"],
        mini_batch_size=spec["mini_batch_size"],
        gradient_accumulation_steps=1,
        ppo_epochs=spec["ppo_epochs"],
        learning_rate=spec["learning_rate"],
    )
    return PPOTrainer(config, model, ref_model=None, tokenizer=tokenizer)


def setup() -> dict:
    versions = check_versions()
    trainable = {}
    for name, spec in CONFIG["systems"].items():
        tokenizer = load_tokenizer()
        trainer = build_trainer(spec, tokenizer)
        SYSTEMS[name] = {"trainer": trainer, "tokenizer": tokenizer, "spec": spec}
        trainable[name] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"versions": versions, "trainable_parameters": trainable, "threads": torch.get_num_threads()}


def _system(name: str) -> dict:
    if name not in SYSTEMS:
        raise ValueError(f"this worker hosts {sorted(SYSTEMS)}, not {name!r}")
    return SYSTEMS[name]


def generation_kwargs(system: dict) -> dict:
    # The example's sampling settings; min_new_tokens pins every response to exactly response_length
    # tokens (it masks the stop tokens), so every system does the same amount of work.
    length = system["spec"]["response_length"]
    return {"top_k": 0, "top_p": 1.0, "do_sample": True, "max_new_tokens": length, "min_new_tokens": length,
            "pad_token_id": system["tokenizer"].pad_token_id}


def reward_scores(system: dict, queries: list[torch.Tensor], responses: list[torch.Tensor]) -> list[torch.Tensor]:
    """The example's reward call, on the same ids: ``compute_reward_score`` and the last position."""
    trainer, tokenizer = system["trainer"], system["tokenizer"]
    batch = tokenizer.pad({"input_ids": [torch.cat([q, r]) for q, r in zip(queries, responses)]},
                          padding=True, return_tensors="pt")
    model = trainer.accelerator.unwrap_model(trainer.model)
    raw = model.compute_reward_score(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return [raw[row, -1, 0] for row in range(len(queries))]  # left padding: the last position is real


def iteration(system: str, queries: list[list[int]]) -> dict:
    state = _system(system)
    trainer = state["trainer"]
    query_tensors = [torch.tensor(query, dtype=torch.long) for query in queries]
    start = time.perf_counter()
    responses = trainer.generate(query_tensors, return_prompt=False, batch_size=len(query_tensors),
                                 **generation_kwargs(state))
    generated = time.perf_counter()
    scores = reward_scores(state, query_tensors, responses)
    scored = time.perf_counter()
    stats = trainer.step(query_tensors, responses, scores)
    end = time.perf_counter()
    timings = {key: float(value) for key, value in stats.items() if key.startswith("time/")}
    return {
        **timings,
        "seconds": end - start,
        "generate_s": generated - start,
        "reward_s": scored - generated,
        "step_s": end - scored,
        "response_length_min": min(len(response) for response in responses),
    }


def parity(system: str, out_path: str) -> dict:
    """Logprobs, reference logprobs and values on the response tokens, and scores, for fixed ids,
    through the passes ``step()`` uses (``batched_forward_pass`` in mini-batches, adapters disabled
    for the reference) and the reward call of ``iteration``."""
    state = _system(system)
    trainer = state["trainer"]
    inputs = json.loads((WORKDIR / "parity.json").read_text())
    queries = [torch.tensor(q, dtype=torch.long) for q in inputs["queries"]]
    responses = [torch.tensor(r, dtype=torch.long) for r in inputs["responses"]]
    model_inputs = trainer.prepare_model_inputs(queries, responses)
    with torch.no_grad():
        logprobs, _, values, masks = trainer.batched_forward_pass(trainer.model, queries, responses, model_inputs)
        with trainer.optional_peft_ctx():
            ref_logprobs, _, _, _ = trainer.batched_forward_pass(trainer.model, queries, responses, model_inputs)
    scores = torch.stack(reward_scores(state, queries, responses))
    response_positions = masks.bool()  # (B, T-1): positions whose next token is a response token
    tensors = {
        "logprobs": _rows(logprobs, response_positions),
        "ref_logprobs": _rows(ref_logprobs, response_positions),
        "values": _rows(values, response_positions),
        "scores": scores.float(),
    }
    torch.save(tensors, out_path)
    return {name: list(tensor.shape) for name, tensor in tensors.items()}


def _rows(per_position: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, T-1) values at each row's response positions -> (B, R); every response has R tokens."""
    return torch.stack([row[mask] for row, mask in zip(per_position, positions)]).float()


if __name__ == "__main__":
    _protocol.serve({"setup": setup, "iteration": iteration, "parity": parity})
