"""The same PPO iteration with four separate model copies: the memory baseline of DESIGN.md section 6.

Policy, reference, reward and value each get their own copy of the base weights, the way PPO is run
without shared adapters (TRL's later PPO trainer, OpenRLHF): policy = base + policy LoRA (trained);
reference = a frozen base copy; reward = a sequence-classification copy with the reward LoRA and its
score head (frozen); value = a base trunk + a critic LoRA + the value head (trained). Everything a
multi-adapter iteration does is done here too, with the same settings and the project's PPO math:
KV-cache sampling, old logprobs, reference logprobs, values, scores, per-token KL rewards, GAE,
advantage whitening, then ``ppo_epochs`` passes of clipped policy + value losses over mini-batches
with gradient clipping and Adam. Nothing is tuned for speed; it is the straightforward version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from _protocol import materialise_parameters
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel, PreTrainedTokenizerFast

from trl_multiadapter import ppo_math
from trl_multiadapter.kl_control import AdaptiveKLController
from trl_multiadapter.model import position_ids_from_mask


@dataclass(frozen=True)
class PPOSettings:
    batch_size: int
    mini_batch_size: int
    response_length: int
    ppo_epochs: int = 4
    learning_rate: float = 1e-5
    init_kl_coef: float = 0.2
    target: float = 6.0
    horizon: float = 10000.0
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    max_grad_norm: float = 1.0


class SeparateCopiesPPO:
    """Four model objects, one per role, each holding its own copy of the base weights."""

    def __init__(self, workdir: Path, settings: PPOSettings):
        workdir = Path(workdir)
        self.settings = settings
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(workdir / "tokenizer")
        base_dir = workdir / "base"
        self.policy = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), workdir / "policy_adapter",
                                                is_trainable=True)
        self.reference = LlamaForCausalLM.from_pretrained(base_dir)
        self.reward = PeftModel.from_pretrained(
            LlamaForSequenceClassification.from_pretrained(base_dir, num_labels=1), workdir / "reward_adapter"
        )
        adapter = json.loads((workdir / "policy_adapter" / "adapter_config.json").read_text())
        critic = LoraConfig(r=adapter["r"], lora_alpha=adapter["lora_alpha"], lora_dropout=adapter["lora_dropout"],
                            target_modules=adapter["target_modules"])
        self.value_trunk = get_peft_model(LlamaModel.from_pretrained(base_dir), critic)
        self.value_head = torch.nn.Linear(self.reference.config.hidden_size, 1)
        self.value_head.load_state_dict(load_file(str(workdir / "value_head.safetensors")))
        for model in (self.policy, self.reference, self.reward, self.value_trunk, self.value_head):
            materialise_parameters(model)
            model.eval()  # dropout off in every pass, as in the multi-adapter trainer
        for frozen in (self.reference, self.reward):
            frozen.requires_grad_(False)
        self.trainable = [p for m in (self.policy, self.value_trunk, self.value_head) for p in m.parameters()
                          if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.trainable, lr=settings.learning_rate)
        self.kl_controller = AdaptiveKLController(settings.init_kl_coef, settings.target, settings.horizon)

    # ------------------------------------------------------------------------------------------- passes

    def _policy_logprobs(self, model, sequences, mask, prompt_length: int) -> torch.Tensor:
        response_length = sequences.shape[1] - prompt_length
        logits = model(input_ids=sequences, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                       logits_to_keep=response_length + 1).logits[:, :-1]  # (B, R, V)
        return ppo_math.logprobs_from_logits(logits, sequences[:, prompt_length:])

    def _values(self, sequences, mask, prompt_length: int) -> torch.Tensor:
        hidden = self.value_trunk(input_ids=sequences, attention_mask=mask,
                                  position_ids=position_ids_from_mask(mask)).last_hidden_state
        return self.value_head(hidden[:, prompt_length - 1 : -1]).squeeze(-1)  # (B, R): V(s_j)

    def _scores(self, sequences, mask) -> torch.Tensor:
        logits = self.reward(input_ids=sequences, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        return logits[:, 0].float()  # (B,): the head reads the last non-pad token

    # ------------------------------------------------------------------------------------------- PPO

    def sample(self, queries: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        batch = self.tokenizer.pad({"input_ids": queries}, padding=True, return_tensors="pt")
        length = self.settings.response_length
        with torch.inference_mode():
            sequences = self.policy.generate(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=True, top_k=0,
                top_p=1.0, max_new_tokens=length, min_new_tokens=length, pad_token_id=self.tokenizer.pad_token_id,
            )
        mask = torch.cat([batch["attention_mask"], torch.ones_like(sequences[:, batch["input_ids"].shape[1]:])], 1)
        return sequences.clone(), mask, batch["input_ids"].shape[1]

    def iteration(self, queries: list[list[int]]) -> dict:
        s = self.settings
        sequences, mask, prompt_length = self.sample(queries)
        response_mask = torch.ones_like(sequences[:, prompt_length:])
        with torch.inference_mode():
            old_logprobs = self._policy_logprobs(self.policy, sequences, mask, prompt_length)
            ref_logprobs = self._policy_logprobs(self.reference, sequences, mask, prompt_length)
            old_values = self._values(sequences, mask, prompt_length)
            scores = self._scores(sequences, mask)
            kl = ppo_math.kl_penalty(old_logprobs, ref_logprobs, "k1")
            rewards, _ = ppo_math.per_token_rewards(scores, kl, self.kl_controller.value, response_mask)
            advantages, returns = ppo_math.compute_gae(rewards, old_values, response_mask, s.gamma, s.lam)
            advantages = ppo_math.masked_whiten(advantages, response_mask)
        tensors = [t.clone() for t in (sequences, mask, response_mask, old_logprobs, old_values, advantages, returns)]
        for _ in range(s.ppo_epochs):
            for rows in torch.randperm(s.batch_size).split(s.mini_batch_size):
                self._optimise(*(t[rows] for t in tensors), prompt_length)
        self.kl_controller.update(float(kl.sum(1).mean()), s.batch_size)
        return {"mean_score": float(scores.mean())}

    def _optimise(self, sequences, mask, response_mask, old_logprobs, old_values, advantages, returns, prompt_length):
        s = self.settings
        logprobs = self._policy_logprobs(self.policy, sequences, mask, prompt_length)
        values = self._values(sequences, mask, prompt_length)
        pg_loss, _, _ = ppo_math.policy_loss(logprobs, old_logprobs, advantages, response_mask, s.cliprange)
        vf_loss, _ = ppo_math.value_loss(values, old_values, returns, response_mask, s.cliprange_value)
        (pg_loss + s.vf_coef * vf_loss).backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, s.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def plain_reference_outputs(workdir: Path, queries: list[list[int]], responses: list[list[int]]) -> dict:
    """Parity reference: plain transformers + peft models, one unpadded row at a time.

    Independent of both trainers: no padding, no position-id handling, no role switching, logprobs
    straight from ``log_softmax``. Returns (B, R) logprobs, ref_logprobs, values and (B,) scores.
    """
    workdir = Path(workdir)
    base_dir = workdir / "base"
    reference = LlamaForCausalLM.from_pretrained(base_dir).eval()
    policy = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), workdir / "policy_adapter").eval()
    reward = PeftModel.from_pretrained(
        LlamaForSequenceClassification.from_pretrained(base_dir, num_labels=1), workdir / "reward_adapter"
    ).eval()
    value_head = torch.nn.Linear(reference.config.hidden_size, 1)
    value_head.load_state_dict(load_file(str(workdir / "value_head.safetensors")))
    rows = {"logprobs": [], "ref_logprobs": [], "values": [], "scores": []}
    with torch.no_grad():
        for query, response in zip(queries, responses):
            ids = torch.tensor([query + response])
            predicting = slice(len(query) - 1, ids.shape[1] - 1)  # positions whose next token is a response token
            labels = ids[0, len(query):].unsqueeze(-1)
            policy_out = policy(input_ids=ids, output_hidden_states=True)
            reference_logits = reference(input_ids=ids).logits
            rows["logprobs"].append(policy_out.logits[0, predicting].log_softmax(-1).gather(-1, labels).squeeze(-1))
            rows["ref_logprobs"].append(reference_logits[0, predicting].log_softmax(-1).gather(-1, labels).squeeze(-1))
            rows["values"].append(value_head(policy_out.hidden_states[-1][0, predicting]).squeeze(-1))
            rows["scores"].append(reward(input_ids=ids).logits[0, 0])
    return {name: torch.stack(values).float() for name, values in rows.items()}
