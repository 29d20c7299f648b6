"""Shared-prompt passes (``shared_prompt``): each distinct prompt computed once, k responses on top.

Every check compares against the unshared computation the project already had (``group_size=1``:
``policy_forward`` / ``reference_logits`` / ``score`` / ``critic_values`` on whole sequences), on
left-padded prompts of different lengths and right-padded responses that stop early.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from peft import LoraConfig

from trl_multiadapter import ppo_math, shared_prompt
from trl_multiadapter.batching import RolePasses, minibatch_orders, padded_batch
from trl_multiadapter.model import MultiAdapterModel
from trl_multiadapter.rollout import Rollout, SamplingSettings, left_pad, right_pad, sample_rollout
from trl_multiadapter.scoring import RewardAdapterScores
from trl_multiadapter.testing import build_tiny_model
from trl_multiadapter.testing.tokenizer import EOS_TOKEN_ID, EOT_TOKEN_ID, PAD_TOKEN_ID

K = 3
TOLERANCE = 1e-5
PROMPT_LENGTHS = (4, 9, 13)
# per row of the 3 x K batch: response length; rows marked * end with a stop token
RESPONSE_LENGTHS = (6, 2, 9, 1, 9, 4, 7, 7, 3)
STOPPED_ROWS = {0, 1, 3, 5, 8}


def _lora(**overrides):
    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    return LoraConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def reward_model(tiny_reward_adapter_dir):
    torch.manual_seed(3)
    return MultiAdapterModel.from_pretrained(str(tiny_reward_adapter_dir.base_model_dir), policy_config=_lora(),
                                             reward_adapter=str(tiny_reward_adapter_dir.adapter_dir))


def _model(**kwargs):
    torch.manual_seed(3)  # LoRA weights non-zero (init_lora_weights=False), so policy != reference
    return MultiAdapterModel.from_pretrained(build_tiny_model("tiny", seed=0), policy_config=_lora(), **kwargs)


@pytest.fixture(scope="module")
def model():
    return _model()


def _rollout(seed: int = 0) -> Rollout:
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(6, 1000, (length,), generator=generator) for length in PROMPT_LENGTHS]
    query_ids, query_mask = left_pad([prompt for prompt in prompts for _ in range(K)], PAD_TOKEN_ID)
    responses = []
    for row, length in enumerate(RESPONSE_LENGTHS):
        response = torch.randint(6, 1000, (length,), generator=generator)
        if row in STOPPED_ROWS:
            response[-1] = EOS_TOKEN_ID
        responses.append(response)
    response_ids, response_mask = right_pad(responses, PAD_TOKEN_ID)
    stopped = torch.tensor([row in STOPPED_ROWS for row in range(len(responses))])
    return Rollout(query_ids, query_mask, response_ids, response_mask, stopped)


def _close(actual, expected, mask=None):
    if mask is not None:
        inside = mask.bool().view(*mask.shape, *([1] * (actual.dim() - mask.dim())))
        actual, expected = actual * inside, expected * inside
    difference = (actual - expected).abs().max().item()
    assert difference <= TOLERANCE, f"max difference {difference:.3g} > {TOLERANCE}"


@pytest.fixture(autouse=True)
def fresh_fallback_log(monkeypatch):
    monkeypatch.setattr(shared_prompt, "_logged_reasons", set())


def _passes(model, group_size, mini_batch_size=2 * K):
    return RolePasses(model, temperature=0.7, mini_batch_size=mini_batch_size, keep_logits=True,
                      autocast=_no_autocast, group_size=group_size)


def _no_autocast():
    return contextlib.nullcontext()


def _batch(rollout):
    return padded_batch(rollout).trimmed()


# ---------------------------------------------------------------------------------------------------- grouping


def test_groups_follow_identical_prompts_in_any_order():
    ids = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 5, 6], [0, 5, 6], [7, 8, 9], [0, 0, 6]])
    mask = (ids != 0).long()
    groups = shared_prompt.prompt_groups(ids, mask)
    assert groups.num_prompts == 3
    # rows with the same prompt map to one representative holding exactly that prompt
    for row in range(ids.shape[0]):
        representative = groups.representatives[groups.inverse[row]]
        assert torch.equal(ids[representative], ids[row]) and int(representative) <= row
    assert groups.inverse[0] == groups.inverse[2] == groups.inverse[3] != groups.inverse[1]


def test_same_ids_with_a_different_mask_are_different_prompts():
    ids = torch.tensor([[3, 5, 6], [3, 5, 6]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    assert shared_prompt.prompt_groups(ids, mask).num_prompts == 2


def test_minibatch_orders_keep_whole_groups_and_group_size_one_is_unchanged():
    torch.manual_seed(5)
    orders = minibatch_orders(12, 3, "cpu", group_size=4)
    for order in orders:
        assert sorted(order.tolist()) == list(range(12))
        for start in range(0, 12, 4):
            chunk = order[start:start + 4]
            assert torch.equal(chunk, torch.arange(4) + chunk[0]) and int(chunk[0]) % 4 == 0
    torch.manual_seed(5)
    plain = minibatch_orders(12, 2, "cpu")
    torch.manual_seed(5)
    assert torch.equal(plain, torch.stack([torch.randperm(12), torch.randperm(12)]))
    with pytest.raises(ValueError, match="whole groups"):
        minibatch_orders(10, 1, "cpu", group_size=4)


# ---------------------------------------------------------------------------------------------------- passes


def test_policy_pass_without_grad_matches_unshared(model):
    batch = _batch(_rollout())
    with torch.no_grad():
        logits, logprobs, values = _passes(model, 1).policy(batch)
        shared_logits, shared_logprobs, shared_values = _passes(model, K).policy(batch)
    _close(shared_logits, logits, batch.response_mask)
    _close(shared_logprobs, logprobs, batch.response_mask)
    _close(shared_values, values, batch.response_mask)
    # and the sharing really ran: the shared path computes 3 prompts, not 9 rows
    assert shared_prompt.sharing_groups(model, batch.query_ids, batch.query_mask, K).num_prompts == 3


def _loss_and_grads(model, passes, batch, advantages, returns, old_logprobs, old_values):
    for parameter in model.trainable_parameters():
        parameter.grad = None
    _, logprobs, values = passes.policy(batch)
    mask = batch.response_mask
    policy_loss, _, _ = ppo_math.policy_loss(logprobs, old_logprobs, advantages, mask, 0.2)
    value_loss, _ = ppo_math.value_loss(values, old_values, returns, mask, 0.2)
    loss = policy_loss + 0.1 * value_loss
    loss.backward()
    grads = [parameter.grad.clone() for parameter in model.trainable_parameters()]
    return loss.detach(), grads


def test_training_loss_and_gradients_match_unshared(model):
    batch = _batch(_rollout(1))
    generator = torch.Generator().manual_seed(2)
    shape = batch.response_ids.shape
    advantages, returns = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    with torch.no_grad():
        _, old_logprobs, old_values = _passes(model, 1).policy(batch)
    old_logprobs = old_logprobs + 0.05 * torch.randn(shape, generator=generator)  # ratios != 1: clipping active
    loss, grads = _loss_and_grads(model, _passes(model, 1), batch, advantages, returns, old_logprobs, old_values)
    shared_loss, shared_grads = _loss_and_grads(model, _passes(model, K), batch, advantages, returns, old_logprobs,
                                                old_values)
    _close(shared_loss, loss)
    names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert len(grads) == len(names) and any("lora_A" in name for name in names)
    for name, grad, shared_grad in zip(names, grads, shared_grads):
        assert grad.abs().max() > 0, f"{name} got no gradient"
        difference = (shared_grad - grad).abs().max().item()
        assert difference <= TOLERANCE * max(1.0, grad.abs().max().item()), f"{name}: gradient differs by {difference}"


def test_old_logprobs_values_and_reference_match_unshared(model):
    rollout = _rollout(2)
    torch.manual_seed(0)
    order = minibatch_orders(rollout.batch_size, 1, "cpu", group_size=K)[0]
    plain, shared = _passes(model, 1), _passes(model, K)
    expected = plain.old_logprobs_and_values(_rollout(2), order, exact=True)
    actual = shared.old_logprobs_and_values(_rollout(2), order, exact=True)
    mask = rollout.response_mask
    _close(actual.logprobs, expected.logprobs, mask)
    _close(actual.values, expected.values, mask)
    _close(actual.logits, expected.logits, mask)
    for minibatch_order in (None, order):
        ref_logprobs, ref_logits = plain.reference(rollout, minibatch_order)
        shared_ref_logprobs, shared_ref_logits = shared.reference(rollout, minibatch_order)
        _close(shared_ref_logprobs, ref_logprobs, mask)
        _close(shared_ref_logits, ref_logits, mask)
    # policy != reference, so this is not the same number twice
    assert (expected.logprobs - ref_logprobs).abs().max() > 1e-3


def test_critic_values_match_unshared():
    critic_model = _model(value_model="critic")
    rollout = _rollout(3)
    expected = _passes(critic_model, 1).old_logprobs_and_values(_rollout(3), None, exact=False).values
    actual = _passes(critic_model, K).old_logprobs_and_values(_rollout(3), None, exact=False).values
    _close(actual, expected, rollout.response_mask)
    assert expected.abs().max() > 0


def test_reward_scores_match_unshared_with_the_end_of_turn_replacement(reward_model):
    rollout = _rollout(4)
    plain = RewardAdapterScores(reward_model, PAD_TOKEN_ID, stop_ids=(EOS_TOKEN_ID,), end_ids=(EOT_TOKEN_ID,))
    shared = RewardAdapterScores(reward_model, PAD_TOKEN_ID, stop_ids=(EOS_TOKEN_ID,), end_ids=(EOT_TOKEN_ID,),
                                 group_size=K)
    expected, actual = plain(rollout, {}), shared(rollout, {})
    _close(actual, expected)
    # an independent reading: MultiAdapterModel.score on each sequence alone, without padding
    row = 3  # a stopped one-token response: scored as <eot> after the prompt
    prompt = rollout.query_ids[row][rollout.query_mask[row].bool()]
    alone = reward_model.score(torch.cat([prompt, torch.tensor([EOT_TOKEN_ID])])[None])
    assert abs(actual[row].item() - alone.item()) <= TOLERANCE
    assert expected.std() > 0


# ---------------------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("do_sample", [True, False])
def test_shared_sampling_draws_the_tokens_of_unshared_sampling(model, do_sample):
    rollout = _rollout(5)
    settings = SamplingSettings(max_new_tokens=8, temperature=0.9, top_k=50, stop_token_ids=(EOS_TOKEN_ID, 7, 11),
                                pad_token_id=PAD_TOKEN_ID, do_sample=do_sample)
    torch.manual_seed(11)
    expected = sample_rollout(model, rollout.query_ids, rollout.query_mask, settings)
    torch.manual_seed(11)
    shared_settings = SamplingSettings(**{**vars(settings), "group_size": K})
    actual = sample_rollout(model, rollout.query_ids, rollout.query_mask, shared_settings)
    assert torch.equal(actual.response_ids, expected.response_ids)
    assert torch.equal(actual.response_mask, expected.response_mask)
    _close(actual.logprobs, expected.logprobs)
    _close(actual.values, expected.values)
    if do_sample:  # the k samples of a prompt differ: they are draws, not copies
        assert not torch.equal(actual.response_ids[0], actual.response_ids[1])
    # the sampled tokens' logprobs are those of a plain forward of prompt + response
    batch = _batch(actual)
    with torch.no_grad():
        _, forward_logprobs, _ = RolePasses(model, 0.9, 9, False, _no_autocast).policy(batch)
    _close(actual.logprobs[:, : forward_logprobs.shape[1]], forward_logprobs, batch.response_mask)


# ---------------------------------------------------------------------------------------------------- fallback


def test_gradient_checkpointing_falls_back_with_one_log_line(caplog):
    checkpointed = _model(gradient_checkpointing=True)
    checkpointed.train(True)
    batch = _batch(_rollout(6))
    with torch.no_grad():
        expected = _passes(checkpointed, 1).policy(batch)[1]
    with caplog.at_level(logging.WARNING, logger="trl_multiadapter.shared_prompt"):
        for _ in range(2):
            logprobs = _passes(checkpointed, K).policy(batch)[1]
            logprobs.sum().backward()
    lines = [record.getMessage() for record in caplog.records if record.name == "trl_multiadapter.shared_prompt"]
    assert len(lines) == 1 and "gradient checkpointing" in lines[0], lines
    _close(logprobs.detach(), expected, batch.response_mask)
    # without gradients a checkpointed layer in training mode keeps its cache: the no-grad passes still share
    with torch.no_grad():
        assert shared_prompt.sharing_groups(checkpointed, batch.query_ids, batch.query_mask, K) is not None
        _close(_passes(checkpointed, K).policy(batch)[1], expected, batch.response_mask)


def test_rows_without_a_shared_prompt_run_unshared_without_a_line(model, caplog):
    rollout = _rollout(7)
    distinct = rollout.select(torch.tensor([0, 3, 6]))  # one row per prompt: nothing to share (evaluation)
    with caplog.at_level(logging.WARNING, logger="trl_multiadapter.shared_prompt"):
        assert shared_prompt.sharing_groups(model, distinct.query_ids, distinct.query_mask, K) is None
        assert shared_prompt.sharing_groups(model, rollout.query_ids, rollout.query_mask, 1) is None
        assert shared_prompt.sharing_groups(model, rollout.query_ids, rollout.query_mask, K) is not None
    assert not [record for record in caplog.records if record.name == "trl_multiadapter.shared_prompt"]


def test_an_attention_implementation_without_support_falls_back(model, monkeypatch, caplog):
    attention = model.peft_model.get_base_model().config._attn_implementation
    monkeypatch.setattr(shared_prompt, "SHAREABLE_ATTENTION", ("a_checked_one",))
    rollout = _rollout(8)
    with caplog.at_level(logging.WARNING, logger="trl_multiadapter.shared_prompt"):
        assert shared_prompt.sharing_groups(model, rollout.query_ids, rollout.query_mask, K) is None
    assert any(repr(attention) in record.getMessage() for record in caplog.records)


# ---------------------------------------------------------------------------------------------------- trainer


def test_a_trainer_with_k_samples_per_prompt_shares_and_matches_unshared(tmp_path, tiny_tokenizer, monkeypatch):
    """A trainer with num_generations=2 computes each prompt once in sampling, the reference pass and every
    epoch's forward, and its whole PPO step (GAE, 2 epochs of clipped losses and Adam steps) gives the
    metrics and weights of the same step with sharing switched off."""
    from trl_multiadapter import MultiAdapterPPOConfig, MultiAdapterPPOTrainer

    def target_token_reward(completion_ids, **kwargs):
        return [float(sum(token in (40, 41, 42) for token in ids)) for ids in completion_ids]

    prompts = [torch.tensor(tiny_tokenizer(text)["input_ids"]) for text in ("Tell me a story.", "Hi")]
    queries = [prompt for prompt in prompts for _ in range(2)]
    prefill, sharing_groups, prefills = shared_prompt.prefill, shared_prompt.sharing_groups, []
    monkeypatch.setattr(shared_prompt, "prefill", lambda *args: prefills.append(args[3].num_prompts) or prefill(*args))
    results = []
    for share in (False, True):
        monkeypatch.setattr(shared_prompt, "sharing_groups",
                            sharing_groups if share else lambda *args, **kwargs: None)
        config = MultiAdapterPPOConfig(output_dir=str(tmp_path / str(share)), batch_size=4, mini_batch_size=4,
                                       num_generations=2, ppo_epochs=2, learning_rate=1e-3, max_new_tokens=6,
                                       save_strategy="no", seed=0, disable_tqdm=True, report_to="none")
        trainer = MultiAdapterPPOTrainer(model=_model(), args=config, processing_class=tiny_tokenizer,
                                         reward_funcs=[target_token_reward])
        torch.manual_seed(0)
        stats = trainer.step(queries)
        weights = [parameter.detach().clone() for parameter in trainer.model.trainable_parameters()]
        results.append((stats, weights))
    # the shared step prefilled 2 prompts, not 4 rows, in sampling, the reference pass and each epoch's forward
    assert len(prefills) >= 4 and set(prefills) == {2}, prefills
    (stats, weights), (shared_stats, shared_weights) = results
    compared = [key for key in stats if not key.startswith("time/") and key != "eps"]
    assert {"loss/policy_avg", "loss/value_avg", "objective/kl", "policy/approxkl_avg"} <= set(compared)
    for key in compared:
        assert abs(shared_stats[key] - stats[key]) <= TOLERANCE * max(1.0, abs(stats[key])), key
    for weight, shared_weight in zip(weights, shared_weights):
        _close(shared_weight, weight)
