"""Critic-free advantage estimators (rloo, grpo, reinforce_pp) and the KL in the loss, through the trainer.

The trainer's numbers are checked against plain Python loops written here from the papers' formulas, fed
with the logprobs and reference logprobs the trainer's passes returned (recorded through the public
``trainer.passes`` seam) and the scores given to ``step()``; the KL-in-the-loss gradient against autograd of
a hand-written loss, read off an SGD step with learning rate 1.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from test_ppo_trainer import (
    StopAt,
    digest,
    make_config,
    policy_lora,
    policy_model,
    prompt_dataset,
    target_token_reward,
)

from trl_multiadapter import MultiAdapterModel, MultiAdapterPPOConfig, MultiAdapterPPOTrainer, recipe
from trl_multiadapter.batching import minibatch_orders
from trl_multiadapter.recipe import RecipeError

VALUE_KEYS = ("loss/value_avg", "val/clipfrac_avg")
BETA = 0.1


class RecordingPasses:
    """Wraps ``trainer.passes``: keeps the old and reference logprobs (B, R) and every training forward."""

    def __init__(self, passes):
        self.inner = passes
        self.logprobs = self.ref_logprobs = None
        self.forwards = []  # (minibatch, logprobs with graph)
        self.on_policy = None  # optional hook(minibatch, logprobs) inside the forward

    def old_logprobs_and_values(self, rollout, first_order, exact):
        rollout = self.inner.old_logprobs_and_values(rollout, first_order, exact)
        self.logprobs = rollout.logprobs.detach().clone()
        return rollout

    def reference(self, rollout, minibatch_order=None):
        ref_logprobs, ref_logits = self.inner.reference(rollout, minibatch_order)
        self.ref_logprobs = ref_logprobs.detach().clone()
        return ref_logprobs, ref_logits

    def policy(self, minibatch):
        logits, logprobs, values = self.inner.policy(minibatch)
        self.forwards.append((minibatch, logprobs))
        if self.on_policy is not None:
            self.on_policy(minibatch, logprobs)
        return logits, logprobs, values


def no_value_model(**kwargs) -> MultiAdapterModel:
    return policy_model(value_model="none", **kwargs)


def grouped_queries_and_responses(k: int, groups: int):
    """``groups`` prompts, each repeated k times consecutively; distinct responses (no stop token) of varied length."""
    generator = torch.Generator().manual_seed(3)
    queries, responses = [], []
    for group in range(groups):
        query = torch.randint(10, 900, (5 + group,), generator=generator)
        for sample in range(k):
            queries.append(query.clone())
            responses.append(torch.randint(10, 900, (3 + (group + 2 * sample) % 4,), generator=generator))
    return queries, responses


def row_of(minibatch, row: int, responses) -> int:
    """Index of the given response that row ``row`` of a (trimmed, shuffled) mini-batch holds."""
    ids = minibatch.response_ids[row][minibatch.response_mask[row].bool()].tolist()
    return next(index for index, response in enumerate(responses) if response.tolist() == ids)


def plain_returns(scores, logprobs, ref_logprobs, lengths, beta):
    """R_i = s_i - beta * sum_t (log pi - log pi_ref), the k1 KL in the reward, one Python loop per token."""
    returns = []
    for i, score in enumerate(scores):
        kl = sum(float(logprobs[i, t]) - float(ref_logprobs[i, t]) for t in range(lengths[i]))
        returns.append(score - beta * kl)
    return returns


def plain_rloo(returns, k):
    advantages = []
    for i, value in enumerate(returns):
        group = range(i // k * k, i // k * k + k)
        advantages.append(value - sum(returns[j] for j in group if j != i) / (k - 1))
    return advantages


def plain_grpo(returns, k, eps=1e-4):
    advantages = []
    for i, value in enumerate(returns):
        group = [returns[j] for j in range(i // k * k, i // k * k + k)]
        mean = sum(group) / k
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (k - 1))
        advantages.append((value - mean) / (std + eps))
    return advantages


# --------------------------------------------------------------------------- no value model anywhere


def test_rloo_trainer_has_no_value_model_and_leaves_base_and_reward_untouched(tmp_path, tiny_reward_adapter_dir,
                                                                             tiny_tokenizer):
    reward = tiny_reward_adapter_dir
    config = make_config(tmp_path / "run", advantage_estimator="rloo", batch_size=4, mini_batch_size=2,
                         num_generations=2, max_steps=2)
    trainer = MultiAdapterPPOTrainer(str(reward.base_model_dir), args=config, processing_class=tiny_tokenizer,
                                     train_dataset=prompt_dataset(), reward_adapter=reward.adapter_dir,
                                     peft_config=policy_lora())
    model = trainer.model
    assert config.value_model == "none" and model.value_model == "none" and model.value_head is None
    assert [name for name, _ in model.named_parameters() if "value" in name] == []
    frozen = [p for name, p in model.named_parameters() if ".policy." not in name]
    before = digest(frozen)
    trainer.train()

    policy_ids = {id(p) for name, p in model.named_parameters() if ".policy." in name}
    optimised = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in optimised} == policy_ids and len(optimised) == len(policy_ids)
    assert digest(frozen) == before  # base weights and reward adapter + score head, bit for bit
    logged = [entry for entry in trainer.state.log_history if "loss/policy_avg" in entry]
    assert len(logged) == 2 and not any(key in entry for entry in logged for key in VALUE_KEYS)

    trainer.save_model(tmp_path / "saved")
    assert not (tmp_path / "saved" / "value_head.safetensors").exists()
    assert json.loads((tmp_path / "saved" / "multiadapter.json").read_text())["value_model"] == "none"
    reloaded = MultiAdapterModel.from_pretrained(str(reward.base_model_dir), from_saved=tmp_path / "saved")
    assert reloaded.value_head is None and reloaded.value_model == "none"
    for (name, saved), (_, loaded) in zip(model.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(saved.detach(), loaded.detach()), name


def test_model_without_value_model_has_no_head_and_refuses_values():
    model = no_value_model()
    head_model = policy_model()
    assert model.value_head is None
    assert len(model.trainable_parameters()) == len(head_model.trainable_parameters()) - 2  # head weight + bias
    ids = torch.tensor([[7, 8, 9, 10]])
    logits, values = model.policy_forward(ids)
    assert values is None and logits.shape == (1, 4, model.config.vocab_size)
    with pytest.raises(ValueError, match="no value model"):
        model.critic_values(ids)


# --------------------------------------------------------------------------- advantages vs plain loops


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "reinforce_pp"])
def test_advantages_equal_a_plain_loop_over_scores_and_kl(tmp_path, tiny_tokenizer, estimator):
    """Random LoRA init: policy != reference, so the per-token KL reward is non-zero and enters R_i."""
    k, groups = 3, 2
    trainer = MultiAdapterPPOTrainer(
        no_value_model(random_init=True), processing_class=tiny_tokenizer,
        args=make_config(tmp_path, advantage_estimator=estimator, num_generations=k, batch_size=k * groups,
                         mini_batch_size=k, ppo_epochs=2, init_kl_coef=BETA, adap_kl_ctrl=False, learning_rate=1e-3,
                         kl_placement="reward"))
    recorder = trainer.passes = RecordingPasses(trainer.passes)
    queries, responses = grouped_queries_and_responses(k, groups)
    scores = [0.5, -1.0, 2.0, 1.5, 1.5, 1.5]
    stats = trainer.step(queries, responses, scores)

    lengths = [len(response) for response in responses]
    returns = plain_returns(scores, recorder.logprobs, recorder.ref_logprobs, lengths, BETA)
    assert abs(stats["objective/kl"]) > 1e-3  # the KL term is really there
    if estimator == "reinforce_pp":  # G_t = sum_{s>=t} r_s, whitened over every response token of the batch
        token_returns = {}
        for i in range(len(scores)):
            for t in range(lengths[i]):
                later = range(t, lengths[i])
                kl = sum(float(recorder.logprobs[i, s]) - float(recorder.ref_logprobs[i, s]) for s in later)
                token_returns[i, t] = scores[i] - BETA * kl
        values = list(token_returns.values())
        mean = sum(values) / len(values)
        var = sum((x - mean) ** 2 for x in values) / (len(values) - 1)
        expected = {key: (value - mean) / math.sqrt(var + 1e-8) for key, value in token_returns.items()}
    else:
        per_row = (plain_rloo if estimator == "rloo" else plain_grpo)(returns, k)
        expected = {(i, t): per_row[i] for i in range(len(scores)) for t in range(lengths[i])}

    assert len(recorder.forwards) == 2 * groups  # ppo_epochs x mini-batches of one prompt group each
    for minibatch, _ in recorder.forwards:
        assert all(torch.equal(minibatch.query_ids[0], row) for row in minibatch.query_ids)  # one whole group
        assert minibatch.old_values is None and minibatch.returns is None
        for row in range(minibatch.batch_size):
            index = row_of(minibatch, row, responses)
            got = minibatch.advantages[row, : lengths[index]].tolist()
            want = [expected[index, t] for t in range(lengths[index])]
            assert got == pytest.approx(want, abs=1e-5), (estimator, index)
            assert torch.all(minibatch.advantages[row, lengths[index]:] == 0)
    assert not any(key in stats for key in VALUE_KEYS)


def test_rloo_with_equal_scores_and_no_kl_gives_zero_advantages(tmp_path, tiny_tokenizer):
    """Policy = reference at init (exact old logprobs), equal scores in a group: every advantage is exactly 0."""
    trainer = MultiAdapterPPOTrainer(
        no_value_model(), processing_class=tiny_tokenizer,
        args=make_config(tmp_path, advantage_estimator="rloo", num_generations=2, batch_size=4, mini_batch_size=4,
                         ppo_epochs=1))
    recorder = trainer.passes = RecordingPasses(trainer.passes)
    queries, responses = grouped_queries_and_responses(2, 2)
    stats = trainer.step(queries, responses, [1.0, 1.0, 3.0, 2.0])
    (minibatch, _), = recorder.forwards
    by_row = {row_of(minibatch, row, responses): minibatch.advantages[row].max().item() for row in range(4)}
    assert stats["objective/kl"] == 0.0
    assert by_row[0] == 0.0 and by_row[1] == 0.0 and by_row[2] == 1.0  # k = 2: (s1 - s2, s2 - s1)
    # ratio 1 on the first forward: the loss is -mean_t A_t over every response token of the mini-batch
    expected_loss = (-len(responses[2]) + len(responses[3])) / sum(map(len, responses))
    assert stats["loss/policy_avg"] == pytest.approx(expected_loss, abs=1e-6)


# --------------------------------------------------------------------------- KL in the loss


def test_kl_in_loss_leaves_rewards_without_kl_and_adds_beta_k3_to_the_loss(tmp_path, tiny_tokenizer):
    """One mini-batch, one epoch, SGD with lr 1: the update is minus the gradient of the hand-written loss
    -mean_t(A_t * ratio_t) + beta * mean_t(pi_ref/pi - log(pi_ref/pi) - 1)."""
    model = no_value_model(random_init=True)
    trainable = model.trainable_parameters()
    optimizer = torch.optim.SGD(trainable, lr=1.0)
    trainer = MultiAdapterPPOTrainer(
        model, processing_class=tiny_tokenizer, optimizers=(optimizer, None),
        args=make_config(tmp_path, advantage_estimator="rloo", kl_placement="loss", num_generations=2, batch_size=2,
                         mini_batch_size=2, ppo_epochs=1, init_kl_coef=BETA, adap_kl_ctrl=False, max_grad_norm=0.0))
    recorder = trainer.passes = RecordingPasses(trainer.passes)
    queries, responses = grouped_queries_and_responses(2, 1)
    scores = [2.0, -0.5]
    lengths = [len(response) for response in responses]
    expected = {}

    def hand_loss(minibatch, logprobs):
        rows = [row_of(minibatch, row, responses) for row in range(2)]
        advantages = {0: scores[0] - scores[1], 1: scores[1] - scores[0]}  # RLOO, k = 2, no KL in the reward
        policy_terms, kl_terms = [], []
        for row, index in enumerate(rows):
            for t in range(lengths[index]):
                log_ratio = logprobs[row, t] - recorder.logprobs[index, t]
                ratio = torch.exp(log_ratio)
                clipped = torch.clamp(ratio, 0.8, 1.2)
                policy_terms.append(torch.maximum(-advantages[index] * ratio, -advantages[index] * clipped))
                ref_log_ratio = recorder.ref_logprobs[index, t] - logprobs[row, t]
                kl_terms.append(torch.exp(ref_log_ratio) - ref_log_ratio - 1)
                assert minibatch.advantages[row, t].item() == pytest.approx(advantages[index], abs=1e-6)
        policy = torch.stack(policy_terms).mean()
        kl = BETA * torch.stack(kl_terms).mean()
        expected["policy"], expected["kl"] = policy.item(), kl.item()
        expected["grads"] = torch.autograd.grad(policy + kl, trainable, retain_graph=True, allow_unused=True)

    recorder.on_policy = hand_loss
    before = [p.detach().clone() for p in trainable]
    stats = trainer.step(queries, responses, scores)

    assert stats["objective/non_score_reward"] == 0.0 and abs(stats["objective/kl"]) > 1e-3  # k1 of given responses: any sign
    assert stats["objective/rlhf_reward"] == pytest.approx(sum(scores) / 2)
    assert stats["loss/policy_avg"] == pytest.approx(expected["policy"], abs=1e-6)
    assert stats["loss/kl_avg"] == pytest.approx(expected["kl"], rel=1e-5) and expected["kl"] > 0
    moved = 0
    for parameter, start, grad in zip(trainable, before, expected["grads"]):
        want = start - (grad if grad is not None else 0)
        torch.testing.assert_close(parameter.detach(), want, atol=1e-6, rtol=1e-5)
        moved += int(grad is not None and grad.abs().max() > 0)
    assert moved > 0


# --------------------------------------------------------------------------- sampling, orders, resume


def test_train_samples_each_prompt_k_times_in_consecutive_rows(tmp_path, tiny_tokenizer):
    trainer = MultiAdapterPPOTrainer(
        no_value_model(), processing_class=tiny_tokenizer, train_dataset=prompt_dataset(16),
        reward_funcs=[target_token_reward],
        args=make_config(tmp_path, advantage_estimator="grpo", batch_size=8, mini_batch_size=4, max_steps=2))
    assert trainer.args.num_generations == 4  # the rloo/grpo default
    recorder = trainer.passes = RecordingPasses(trainer.passes)
    seen = []
    original = trainer.passes.old_logprobs_and_values

    def capture(rollout, first_order, exact):
        seen.append(rollout.query_ids.clone())
        return original(rollout, first_order, exact)

    recorder.old_logprobs_and_values = capture
    trainer.train()
    assert trainer._prompt_order.batches_per_epoch == 16 // 2  # batch_size / k distinct prompts per iteration
    distinct = set()
    for query_ids in seen:
        groups = query_ids.reshape(2, 4, -1)
        assert all(torch.equal(group[0], row) for group in groups for row in group)
        assert not torch.equal(groups[0, 0], groups[1, 0])
        distinct.update(tuple(group[0].tolist()) for group in groups)
    assert len(distinct) == 4


def test_group_orders_permute_whole_groups():
    torch.manual_seed(0)
    orders = minibatch_orders(12, 5, "cpu", group_size=3)
    assert orders.shape == (5, 12)
    for order in orders:
        assert sorted(order.tolist()) == list(range(12))
        for start in range(0, 12, 3):
            group = order[start : start + 3].tolist()
            assert group[0] % 3 == 0 and group == [group[0], group[0] + 1, group[0] + 2]
    assert len({tuple(order.tolist()) for order in orders}) > 1


def test_resume_without_value_head_continues_exactly(tmp_path, tiny_tokenizer):
    def run(output_dir, stop_at=None, resume=None):
        trainer = MultiAdapterPPOTrainer(
            no_value_model(), processing_class=tiny_tokenizer, train_dataset=prompt_dataset(),
            reward_funcs=[target_token_reward],
            args=make_config(output_dir, advantage_estimator="rloo", num_generations=2, max_steps=3, save_steps=1,
                             save_strategy="steps"))
        if stop_at is not None:
            trainer.add_callback(StopAt(stop_at))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "straight")
    run(tmp_path / "stopped", stop_at=1)
    checkpoint = tmp_path / "stopped" / "checkpoint-1"
    assert not (checkpoint / "adapters" / "value_head.safetensors").exists()
    resumed = run(tmp_path / "stopped", resume=True)
    assert resumed.state.global_step == 3
    for a, b in zip(straight.model.trainable_parameters(), resumed.model.trainable_parameters()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- config and recipe


def test_config_defaults_follow_the_estimator():
    gae = MultiAdapterPPOConfig(output_dir="unused")
    assert (gae.advantage_estimator, gae.num_generations, gae.value_model, gae.kl_placement) == ("gae", 1, None, "reward")
    rloo = MultiAdapterPPOConfig(output_dir="unused", advantage_estimator="rloo", mini_batch_size=4)
    assert (rloo.num_generations, rloo.value_model, rloo.prompts_per_batch, rloo.kl_placement) == (4, "none", 2, "reward")
    grpo = MultiAdapterPPOConfig(output_dir="unused", advantage_estimator="grpo", mini_batch_size=4)
    assert (grpo.num_generations, grpo.value_model, grpo.kl_placement) == (4, "none", "loss")
    assert MultiAdapterPPOConfig(output_dir="unused", advantage_estimator="reinforce_pp").num_generations == 1


@pytest.mark.parametrize("overrides, names", [
    (dict(advantage_estimator="rloo", num_generations=1), "`num_generations` = 1"),
    (dict(advantage_estimator="grpo", num_generations=3, batch_size=8, mini_batch_size=3), "`batch_size` (8)"),
    (dict(advantage_estimator="grpo", num_generations=4, batch_size=24, mini_batch_size=6), "`mini_batch_size` (6)"),
    (dict(advantage_estimator="rloo", num_generations=2, mini_batch_size=2, value_model="head"), "`value_model` = 'head'"),
    (dict(value_model="none"), "`value_model` = 'none'"),
    (dict(advantage_estimator="ppo"), "'gae', 'rloo', 'grpo', 'reinforce_pp'"),
    (dict(kl_placement="both"), "`kl_placement`"),
])
def test_config_rejects_bad_estimator_settings(overrides, names):
    with pytest.raises(ValueError) as caught:
        MultiAdapterPPOConfig(output_dir="unused", **overrides)
    assert names in str(caught.value)


def test_recipe_override_selects_a_critic_free_estimator():
    loaded = recipe.load("tiny_cpu", ["ppo.advantage_estimator=rloo"], output_dir="unused")
    config = recipe.build_ppo_config(loaded.ppo, output_dir="unused", use_cpu=True)
    assert (config.advantage_estimator, config.num_generations, config.value_model) == ("rloo", 4, "none")
    assert config.prompts_per_batch == config.batch_size // 4
    # hh_squad's mini-batch of 1 divides k = 4: a group spans four mini-batches of one optimizer step
    hh = recipe.load("hh_squad", ["ppo.advantage_estimator=grpo"], output_dir="unused")
    assert recipe.build_ppo_config(hh.ppo, output_dir="unused", use_cpu=True).num_generations == 4
    for override, key in (("ppo.num_generations=3", "ppo.batch_size"), ("ppo.num_generations=1", "ppo.num_generations"),
                          ("ppo.kl_placement=nowhere", "ppo.kl_placement")):
        with pytest.raises(RecipeError) as caught:
            recipe.load("tiny_cpu", ["ppo.advantage_estimator=rloo", override], output_dir="unused")
        assert caught.value.key_path == key, str(caught.value)


def test_step_refuses_rows_that_are_not_prompt_groups(tmp_path, tiny_tokenizer):
    trainer = MultiAdapterPPOTrainer(
        no_value_model(), processing_class=tiny_tokenizer,
        args=make_config(tmp_path, advantage_estimator="rloo", num_generations=2, batch_size=4, mini_batch_size=2))
    queries, responses = grouped_queries_and_responses(2, 2)
    queries[1] = queries[2]
    with pytest.raises(ValueError, match=r"rows 0\.\.1 .*query 1 differs"):
        trainer.step(queries, responses, [0.0] * 4)


def test_a_head_model_is_refused_by_a_critic_free_trainer(tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match="value_model"):
        MultiAdapterPPOTrainer(policy_model(), processing_class=tiny_tokenizer,
                               args=make_config(tmp_path, advantage_estimator="rloo", num_generations=2))


def test_gae_default_is_unchanged(tmp_path, tiny_tokenizer):
    """gae keeps its value head, value loss and metrics; copy-safe config (deepcopy keeps the resolved fields)."""
    config = make_config(tmp_path)
    assert copy.deepcopy(config).num_generations == 1
    trainer = MultiAdapterPPOTrainer(policy_model(), args=config, processing_class=tiny_tokenizer)
    queries, responses = grouped_queries_and_responses(1, 4)
    stats = trainer.step(queries, responses, [1.0, 0.0, -1.0, 0.5])
    assert all(key in stats for key in VALUE_KEYS) and "loss/kl_avg" not in stats
    assert trainer.model.value_head is not None


# --------------------------------------------------------------------------- the pipeline, as a user runs it


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["rloo", "grpo"])
def test_tiny_cpu_pipeline_with_only_the_estimator_override_learns_without_a_value_model(tmp_path, estimator):
    """``trl-multiadapter run tiny_cpu --set ppo.advantage_estimator=rloo`` (or grpo; ~1 min on 2 cores): no
    value head anywhere, and the aligned policy follows the data's planted rule at least 20 points more often
    than the base without its answers collapsing (median length at least half of the base's)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MPLBACKEND": "Agg"}
    env.pop("TRL_MULTIADAPTER_LAUNCHED", None)
    completed = subprocess.run([sys.executable, "-m", "trl_multiadapter", "run", "tiny_cpu", "--output_dir",
                                str(run_dir), "--set", f"ppo.advantage_estimator={estimator}"], capture_output=True, text=True,
                               env=env, cwd=Path(__file__).resolve().parents[1])
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert not (run_dir / "export" / "value_head.safetensors").exists()
    assert "value_head" not in (run_dir / "export" / "README.md").read_text()
    assert json.loads((run_dir / "ppo" / "final" / "multiadapter.json").read_text())["value_model"] == "none"
    config = json.loads((run_dir / "ppo" / "final" / "ppo_config.json").read_text())
    assert (config["advantage_estimator"], config["num_generations"]) == (estimator, 4)
    history = json.loads((run_dir / "ppo" / "log_history.json").read_text())
    assert history and not any(key in entry for entry in history for key in VALUE_KEYS)
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert metrics["aligned"]["ground_truth_rate"] >= metrics["base"]["ground_truth_rate"] + 0.2, metrics
    assert metrics["aligned"]["response_length_median"] >= metrics["base"]["response_length_median"] / 2, metrics
