"""Multi-adapter PPO written as a TRL 0.11 script: one base model, a LoRA policy, a LoRA reward adapter.

This is the job of TRL 0.11.4's ``examples/scripts/ppo_multi_adapter.py`` (hh-rlhf prompts, a 4-bit base,
rewards from the reward adapter's ``compute_reward_score``) written against the TRL 0.11 API, so the only
lines that would differ under TRL 0.11 are the two imports marked below. It also uses the rest of that
API: ``HfArgumentParser`` over ``PPOConfig`` (as TRL's ``ppo.py``), ``LengthSampler`` for query and response
lengths, reference responses (``generate_ref_response=True``), a greedy evaluation (``do_sample=False``) and
``save_pretrained``.

    # a CUDA machine (4-bit NF4 base, as TRL's script):
    python examples/trl_011_ppo_multi_adapter.py --model_name meta-llama/Llama-3.2-1B \\
        --rm_adapter ./reward-adapter --batch_size 8 --mini_batch_size 2 --gradient_accumulation_steps 2
    # CPU (4-bit training needs CUDA): add --quantization none

``--reward_label`` is the reward head's column: 1 for a TRL-0.11-era 2-label adapter (TRL's script
hard-codes ``raw_rewards[i, -1, 1]``), 0 for a 1-label adapter such as ``trl-multiadapter reward`` trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoTokenizer, BitsAndBytesConfig, HfArgumentParser

# --- the two lines that differ from a TRL 0.11 script -------------------------------------------------
# from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
# from trl.core import LengthSampler
from trl_multiadapter.trl011 import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
from trl_multiadapter.trl011.core import LengthSampler

# -------------------------------------------------------------------------------------------------------

REPORTED_STATS = ("ppo/mean_scores", "objective/kl", "ppo/loss/total", "ppo/policy/approxkl", "env/ref_reward")


@dataclass
class ScriptArguments:
    dataset_name: str = field(default="Anthropic/hh-rlhf", metadata={"help": "hh-rlhf id or a local folder"})
    dataset_split: str = field(default="train[:1%]", metadata={"help": "split of the prompts"})
    rm_adapter: str = field(default="trl-lib/llama-7b-hh-rm-adapter", metadata={"help": "reward adapter folder"})
    reward_label: int = field(default=1, metadata={"help": "reward head column: 1 (2-label head) or 0 (1-label)"})
    quantization: str = field(default="4bit", metadata={"help": "4bit (NF4, CUDA), 8bit or none"})
    max_new_tokens: int = field(default=32, metadata={"help": "longest sampled response"})
    query_min_length: int = field(default=6, metadata={"help": "shortest prompt, in tokens"})
    query_max_length: int = field(default=12, metadata={"help": "prompt length bound (excluded)"})


def build_model(script_args: ScriptArguments, ppo_config: PPOConfig):
    lora_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
    kwargs = {}
    if script_args.quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
    elif script_args.quantization == "8bit":
        kwargs["load_in_8bit"] = True
    if torch.cuda.is_available():
        from accelerate import PartialState

        kwargs["device_map"] = {"": PartialState().local_process_index}
    # --model_name is PPOConfig's field (as in TRL's ppo.py); TRL's script had its own, default huggyllama/llama-7b
    model = AutoModelForCausalLMWithValueHead.from_pretrained(ppo_config.model_name, peft_config=lora_config,
                                                              reward_adapter=script_args.rm_adapter, **kwargs)
    if ppo_config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.pretrained_model.print_trainable_parameters()
    return model


def build_dataset(script_args: ScriptArguments, tokenizer, num_proc):
    dataset = load_dataset(script_args.dataset_name, split=script_args.dataset_split)
    query_length = LengthSampler(script_args.query_min_length, script_args.query_max_length)

    def tokenize(example):
        example["input_ids"] = tokenizer.encode(example["chosen"])[: query_length()]
        example["query"] = tokenizer.decode(example["input_ids"])
        return example

    dataset = dataset.map(tokenize, batched=False, num_proc=num_proc)
    dataset.set_format("torch")
    return dataset


def collator(data):
    return {key: [row[key] for row in data] for key in data[0]}


def rewards_of(ppo_trainer, tokenizer, queries_text, responses, label):
    """The reward head's column ``label`` at the last token of query + response (as TRL's script)."""
    texts = [query + response for query, response in zip(queries_text, tokenizer.batch_decode(
        responses, skip_special_tokens=True))]
    inputs = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(ppo_trainer.current_device)
    raw_rewards = ppo_trainer.accelerator.unwrap_model(ppo_trainer.model).compute_reward_score(**inputs)
    return [raw_rewards[i, -1, label] for i in range(len(raw_rewards))]


def main(argv=None):
    parser = HfArgumentParser((ScriptArguments, PPOConfig))
    script_args, ppo_config = parser.parse_args_into_dataclasses(args=argv)
    model = build_model(script_args, ppo_config)
    tokenizer = AutoTokenizer.from_pretrained(ppo_config.model_name)
    tokenizer.pad_token = tokenizer.eos_token
    dataset = build_dataset(script_args, tokenizer, ppo_config.dataset_num_proc)

    ppo_trainer = PPOTrainer(ppo_config, model, ref_model=None, tokenizer=tokenizer, dataset=dataset,
                             data_collator=collator)
    print(f"{len(ppo_trainer.dataloader)} PPO steps of {ppo_config.batch_size} prompts")
    generation_kwargs = {"top_k": 0.0, "top_p": 0.9, "do_sample": True, "pad_token_id": tokenizer.pad_token_id}
    response_length = LengthSampler(max(1, script_args.max_new_tokens // 2), script_args.max_new_tokens + 1)

    history = []
    for step, batch in enumerate(ppo_trainer.dataloader):
        query_tensors = batch["input_ids"]
        response_tensors, ref_response_tensors = ppo_trainer.generate(
            query_tensors, return_prompt=False, length_sampler=response_length, batch_size=4,
            generate_ref_response=True, **generation_kwargs)
        batch["response"] = tokenizer.batch_decode(response_tensors, skip_special_tokens=True)
        rewards = rewards_of(ppo_trainer, tokenizer, batch["query"], response_tensors, script_args.reward_label)
        ref_rewards = rewards_of(ppo_trainer, tokenizer, batch["query"], ref_response_tensors,
                                 script_args.reward_label)

        stats = ppo_trainer.step(query_tensors, response_tensors, rewards)
        stats["env/ref_reward"] = torch.stack(ref_rewards).mean().item()
        ppo_trainer.log_stats(stats, batch, rewards, columns_to_log=["query", "response"])
        history.append(stats)
        print(f"step {step + 1}: " + ", ".join(f"{key}={stats[key]:.4f}" for key in REPORTED_STATS))

    # greedy answers of the trained policy and of the reference (the base with adapters disabled)
    greedy, ref_greedy = ppo_trainer.generate(query_tensors, return_prompt=False, generate_ref_response=True,
                                              do_sample=False, max_new_tokens=script_args.max_new_tokens)
    policy_score = torch.stack(rewards_of(ppo_trainer, tokenizer, batch["query"], greedy, script_args.reward_label))
    ref_score = torch.stack(rewards_of(ppo_trainer, tokenizer, batch["query"], ref_greedy, script_args.reward_label))
    print(f"greedy reward: policy {policy_score.mean():.4f}, reference {ref_score.mean():.4f}")

    output_dir = ppo_config.output_dir or "ppo-multi-adapter"
    ppo_trainer.save_pretrained(output_dir)
    print(f"saved to {output_dir}: reload with AutoModelForCausalLMWithValueHead.from_pretrained({output_dir!r})")
    return ppo_trainer, history


if __name__ == "__main__":
    main()
