"""The PPO loop of TRL 0.11's gpt2-sentiment notebook, on trl_multiadapter.trl011.

The loop is the notebook's: build a dataset of short prompts with ``LengthSampler``, sample one response
per query with a random ``max_new_tokens``, score, ``step``, ``log_stats``, then compare the trained
policy with the reference and ``save_pretrained``. What differs from the notebook, and why:

1. the imports (``trl`` -> ``trl_multiadapter.trl011``), the only change a TRL 0.11 script needs;
2. the reward: the notebook scored with a sentiment ``pipeline`` from the hub; here a reward adapter on the
   policy's own base scores with ``compute_reward_score`` (a 1-label head, so column 0), which needs no
   second model and no network;
3. ``ref_model=None`` where the notebook built a second full model: the reference is the base with the
   policy adapter disabled (``PPOTrainer`` refuses a separate ``ref_model``), and the reference's
   responses come from ``generate_ref_response=True`` instead of ``ref_model.generate``;
4. ``from_pretrained(..., peft_config=LoraConfig(...))``: the policy is a LoRA adapter (the notebook
   trained every weight of gpt2);
5. the prompts are the synthetic ones below and ``batch_size``/``mini_batch_size`` are set small (the
   notebook kept TRL's default of 128), and ``save_pretrained`` does not push to the hub.

Offline smoke run on a tiny random Llama and an untrained reward adapter (seconds on a laptop CPU):

    python examples/trl_011_style_loop.py
    python examples/trl_011_style_loop.py --model_name meta-llama/Llama-3.2-1B --rm_adapter ./reward-adapter
"""

import argparse
import tempfile

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoTokenizer

# --- change 1: the imports ----------------------------------------------------------------------------
# from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
# from trl.core import LengthSampler
from trl_multiadapter.trl011 import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
from trl_multiadapter.trl011.core import LengthSampler

# -------------------------------------------------------------------------------------------------------

TOPICS = ("harbor", "kettle", "violin", "meadow", "lantern", "bicycle", "river", "garden")


def tiny_offline_assets(folder):
    """A tiny Llama + tokenizer and an untrained SEQ_CLS reward adapter (stand-ins for hub downloads)."""
    from peft import get_peft_model
    from transformers import LlamaForSequenceClassification

    from trl_multiadapter.testing import build_tiny_model, build_tiny_tokenizer, tiny_llama_config

    base = build_tiny_model("tiny")
    base.save_pretrained(f"{folder}/base")
    build_tiny_tokenizer().save_pretrained(f"{folder}/base")
    torch.manual_seed(0)
    reward = LlamaForSequenceClassification(tiny_llama_config("tiny"))
    reward.model.load_state_dict(base.model.state_dict())
    adapter = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                         init_lora_weights=False)
    get_peft_model(reward, adapter).save_pretrained(f"{folder}/reward")
    return f"{folder}/base", f"{folder}/reward"


def build_dataset(tokenizer, rows, input_min_text_length=2, input_max_text_length=8):
    texts = [f"Tell me something about the {TOPICS[i % len(TOPICS)]} number {i}." for i in range(rows)]
    input_size = LengthSampler(input_min_text_length, input_max_text_length)

    def tokenize(sample):
        sample["input_ids"] = tokenizer.encode(sample["review"])[: input_size()]
        sample["query"] = tokenizer.decode(sample["input_ids"])
        return sample

    dataset = Dataset.from_dict({"review": texts}).map(tokenize, batched=False)
    dataset.set_format(type="torch")
    return dataset


def collator(data):
    return {key: [d[key] for d in data] for key in data[0]}


def main(model_name, rm_adapter, steps=2, batch_size=8, output_dir=None):
    # change 4: a LoRA policy; change 2: the reward adapter on the same base
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        model_name, peft_config=LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM"), reward_adapter=rm_adapter)
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    tokenizer.pad_token = tokenizer.eos_token
    config = PPOConfig(model_name=model_name, learning_rate=1.41e-5, batch_size=batch_size,
                       mini_batch_size=batch_size, output_dir=output_dir)
    dataset = build_dataset(tokenizer, steps * batch_size)
    # change 3: ref_model=None
    ppo_trainer = PPOTrainer(config, model, None, tokenizer, dataset=dataset, data_collator=collator)

    gen_kwargs = {"min_length": -1, "top_k": 0.0, "top_p": 1.0, "do_sample": True,
                  "pad_token_id": tokenizer.eos_token_id}
    output_length_sampler = LengthSampler(4, 16)

    def reward_scores(batch, response_tensors):
        texts = [q + tokenizer.decode(r, skip_special_tokens=True) for q, r in zip(batch["query"], response_tensors)]
        inputs = tokenizer(texts, padding=True, return_tensors="pt").to(ppo_trainer.current_device)
        raw = ppo_trainer.model.compute_reward_score(**inputs)
        return [raw[i, -1, 0] for i in range(len(raw))]

    for epoch, batch in enumerate(ppo_trainer.dataloader):
        query_tensors = batch["input_ids"]
        response_tensors = []
        for query in query_tensors:
            gen_kwargs["max_new_tokens"] = output_length_sampler()
            query_response = ppo_trainer.generate(query, **gen_kwargs).squeeze()
            response_len = len(query_response) - len(query)
            response_tensors.append(query_response[-response_len:])
        batch["response"] = [tokenizer.decode(r.squeeze()) for r in response_tensors]
        rewards = reward_scores(batch, response_tensors)
        stats = ppo_trainer.step(query_tensors, response_tensors, rewards)
        ppo_trainer.log_stats(stats, batch, rewards)
        print(f"epoch {epoch}: ppo/mean_scores={stats['ppo/mean_scores']:.4f} objective/kl={stats['objective/kl']:.4f}")

    # the notebook's before/after comparison, with the reference's responses from the same call (change 3)
    batch = next(iter(ppo_trainer.dataloader))
    responses, ref_responses = ppo_trainer.generate(batch["input_ids"], return_prompt=False,
                                                    generate_ref_response=True, **{**gen_kwargs, "max_new_tokens": 8})
    after = torch.stack(reward_scores(batch, responses)).mean().item()
    before = torch.stack(reward_scores(batch, ref_responses)).mean().item()
    print(f"mean reward: reference {before:.4f}, trained policy {after:.4f}")
    if output_dir is not None:  # change 5: no push_to_hub
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    return ppo_trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name")
    parser.add_argument("--rm_adapter")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--output_dir")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        if options.model_name is None:
            options.model_name, options.rm_adapter = tiny_offline_assets(scratch)
        main(options.model_name, options.rm_adapter, options.steps, options.batch_size, options.output_dir)
