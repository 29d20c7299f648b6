"""Multi-adapter PPO in the style of TRL 0.11's ``ppo_multi_adapter.py``: only the imports changed.

The loop below is the one TRL 0.11 scripts used (dataloader -> generate -> compute_reward_score ->
step -> log_stats). With ``--model_name``/``--rm_adapter`` unset it runs offline on a tiny random
Llama and a random reward adapter built on the spot (a smoke run, ~10 s on a laptop CPU):

    python examples/trl_011_style_loop.py --steps 2
    python examples/trl_011_style_loop.py --model_name meta-llama/Llama-3.2-1B-Instruct --rm_adapter ./reward

See docs/migrating_from_trl_0_11.md for what changed behind these names.
"""

import argparse
import tempfile

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoTokenizer

# --- the only change from a TRL 0.11 script: these imports -------------------------------------------
# from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
from trl_multiadapter.trl011 import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

# -----------------------------------------------------------------------------------------------------


def tiny_offline_assets(folder):
    """A tiny Llama + tokenizer and a random SEQ_CLS reward adapter (stand-ins for hub downloads)."""
    from peft import get_peft_model
    from transformers import LlamaForSequenceClassification

    from trl_multiadapter.testing import build_tiny_model, build_tiny_tokenizer, tiny_llama_config

    base = build_tiny_model("tiny")
    base.save_pretrained(f"{folder}/base")
    build_tiny_tokenizer().save_pretrained(f"{folder}/base")
    torch.manual_seed(0)
    reward = LlamaForSequenceClassification(tiny_llama_config("tiny"))
    reward.model.load_state_dict(base.model.state_dict())
    lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(reward, lora).save_pretrained(f"{folder}/reward")
    return f"{folder}/base", f"{folder}/reward"


def main(model_name, rm_adapter, steps):
    lora_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_name, peft_config=lora_config, reward_adapter=rm_adapter)
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    tokenizer.pad_token = tokenizer.eos_token

    def tokenize(example):
        example["input_ids"] = tokenizer.encode(example["chosen"])[:24]
        example["query"] = tokenizer.decode(example["input_ids"])
        return example

    texts = [f"Human: tell me about the harbor number {i}. Assistant:" for i in range(8 * steps)]
    dataset = Dataset.from_dict({"chosen": texts}).map(tokenize)
    dataset.set_format("torch")

    def collator(data):
        return {key: [d[key] for d in data] for key in data[0]}

    config = PPOConfig(model_name=model_name, learning_rate=1e-5, batch_size=8, mini_batch_size=2,
                       gradient_accumulation_steps=2, optimize_cuda_cache=True, seed=0, log_with=None)
    ppo_trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tokenizer, dataset=dataset,
                             data_collator=collator)
    generation_kwargs = {"top_k": 0.0, "top_p": 0.9, "do_sample": True, "pad_token_id": tokenizer.pad_token_id,
                         "max_new_tokens": 16}

    for _epoch, batch in enumerate(ppo_trainer.dataloader):
        question_tensors = batch["input_ids"]
        response_tensors = ppo_trainer.generate(question_tensors, return_prompt=False, **generation_kwargs)
        batch["response"] = tokenizer.batch_decode(response_tensors, skip_special_tokens=True)

        # Compute reward score
        texts = [q + r for q, r in zip(batch["query"], batch["response"])]
        inputs = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(ppo_trainer.accelerator.device)
        raw_rewards = ppo_trainer.accelerator.unwrap_model(ppo_trainer.model).compute_reward_score(**inputs)
        rewards = [raw_rewards[i, -1, 0] for i in range(len(raw_rewards))]  # last token; 1-label head

        # Run PPO step
        stats = ppo_trainer.step(question_tensors, response_tensors, rewards)
        ppo_trainer.log_stats(stats, batch, rewards)
        print(f"step {_epoch + 1}: objective/scores={stats['objective/scores']:.4f} "
              f"objective/kl={stats['objective/kl']:.4f} loss/policy_avg={stats['loss/policy_avg']:.4f}")
    return ppo_trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name")
    parser.add_argument("--rm_adapter")
    parser.add_argument("--steps", type=int, default=2)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        if options.model_name is None:
            options.model_name, options.rm_adapter = tiny_offline_assets(scratch)
        main(options.model_name, options.rm_adapter, options.steps)
