"""MultiAdapterModel: every number is checked against an independent computation.

Independent references used here: plain transformers models without peft (the base), standalone
models with an adapter merged by peft (``merge_and_unload``) and per-row forwards without padding.
Sampling (greedy and sampled, every role) is tested in test_rollout.py: the model has no generate method.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from trl_multiadapter.model import (
    CRITIC_ADAPTER,
    POLICY_ADAPTER,
    POLICY_INIT_ADAPTER,
    REWARD_ADAPTER,
    MultiAdapterModel,
    last_non_pad_index,
    position_ids_from_mask,
)
from trl_multiadapter.testing import build_tiny_model, tiny_llama_config

VOCAB = 1024
PAD_ID = 5
EOS_ID = 4
# peft 0.21 calls transformers 5's deprecated is_gradient_checkpointing when the tests build adapters
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
HYPOTHESIS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# --------------------------------------------------------------------------- builders


def base_model() -> LlamaForCausalLM:
    return build_tiny_model("tiny", task="causal", seed=0)


def seq_cls_model(num_labels: int, seed: int) -> LlamaForSequenceClassification:
    """A seq-cls Llama whose backbone is exactly the tiny causal base (as RewardTrainer starts from)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(tiny_llama_config("tiny", num_labels=num_labels))
    model.model.load_state_dict(base_model().model.state_dict())
    return model.eval()


def perturb_(module: torch.nn.Module, names: tuple[str, ...], std: float, seed: int) -> None:
    """Give LoRA B (zero at init) and heads non-trivial values so adapters change the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if any(part in name for part in names):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def write_reward_adapter(path, num_labels: int, seed: int):
    """A PEFT SEQ_CLS adapter with its score head, in the on-disk format trl.RewardTrainer writes."""
    model = seq_cls_model(num_labels, seed)
    config = LoraConfig(task_type="SEQ_CLS", target_modules="all-linear", r=4, lora_alpha=8, lora_dropout=0.3)
    peft_model = get_peft_model(model, config)
    perturb_(peft_model, ("lora_B",), 0.1, seed)
    perturb_(peft_model, ("modules_to_save",), 0.05, seed + 1)
    peft_model.save_pretrained(path)
    return path


def write_policy_adapter(path, seed: int):
    config = LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", r=4, lora_alpha=8, lora_dropout=0.3)
    peft_model = get_peft_model(base_model(), config)
    perturb_(peft_model, ("lora_B",), 0.1, seed)
    peft_model.save_pretrained(path)
    return path


def merged_reward_model(adapter_dir, num_labels: int) -> LlamaForSequenceClassification:
    """Standalone seq-cls model with the reward adapter merged in (independent of MultiAdapterModel)."""
    model = seq_cls_model(num_labels, seed=1234)  # its own random head is replaced by the adapter's
    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload().eval()


def merged_causal_model(adapter_dir) -> LlamaForCausalLM:
    return PeftModel.from_pretrained(base_model(), str(adapter_dir)).merge_and_unload().eval()


def fresh_policy_config(dropout: float = 0.3) -> LoraConfig:
    return LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", r=4, lora_alpha=8, lora_dropout=dropout)


# --------------------------------------------------------------------------- batches


def pad_rows(rows: list[list[int]], side: str, extra: int = 0, pad_id: int = PAD_ID):
    """Pad rows to a common length (+ ``extra``) on ``side``; returns (input_ids, attention_mask)."""
    length = max(len(row) for row in rows) + extra
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    return ids, mask


def real_positions(mask_row: torch.Tensor) -> torch.Tensor:
    return mask_row.nonzero().squeeze(-1)


def random_rows(seed: int, lengths: list[int]) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]


token_rows = st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=10), min_size=1, max_size=4)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "reward": write_reward_adapter(root / "reward", num_labels=1, seed=11),
        "reward2": write_reward_adapter(root / "reward2", num_labels=2, seed=12),
        "policy": write_policy_adapter(root / "policy", seed=13),
    }


@pytest.fixture(scope="module")
def shared_model(adapter_dirs):
    """A read-only MultiAdapterModel with a fresh policy (LoRA dropout 0.3) and the 1-label reward adapter."""
    torch.manual_seed(0)
    return MultiAdapterModel.from_pretrained(
        base_model(), policy_config=fresh_policy_config(), reward_adapter=adapter_dirs["reward"]
    )


@pytest.fixture(scope="module")
def standalone_reward(adapter_dirs):
    return merged_reward_model(adapter_dirs["reward"], num_labels=1)


def standalone_scores(model: LlamaForSequenceClassification, rows: list[list[int]]) -> torch.Tensor:
    """Each row alone, unpadded: the head's output at the row's final token, read by hand. (B, num_labels)"""
    scores = []
    with torch.no_grad():
        for row in rows:
            hidden = model.model(input_ids=torch.tensor([row])).last_hidden_state
            scores.append(model.score(hidden)[0, -1])
    return torch.stack(scores)


# --------------------------------------------------------------------------- helpers


def test_position_ids_and_last_index_match_a_loop():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 0]])
    expected_positions, expected_last = [], []
    for row in mask.tolist():
        count, positions = 0, []
        for value in row:
            positions.append(count if value else 0)
            count += value
        expected_positions.append(positions)
        expected_last.append(max(i for i, value in enumerate(row) if value))
    assert position_ids_from_mask(mask).tolist() == expected_positions
    assert last_non_pad_index(mask).tolist() == expected_last


def test_last_non_pad_index_rejects_empty_rows():
    with pytest.raises(ValueError, match="row 1 has no tokens"):
        last_non_pad_index(torch.tensor([[1, 1], [0, 0]]))


# --------------------------------------------------------------------------- reward scores


@pytest.mark.parametrize("side", ["left", "right", "none"])
def test_score_matches_standalone_merged_seq_cls_model(shared_model, standalone_reward, side):
    lengths = [7, 7, 7] if side == "none" else [3, 9, 6]
    rows = random_rows(seed=1, lengths=lengths)
    ids, mask = pad_rows(rows, "left" if side == "none" else side, pad_id=EOS_ID)  # pad id == eos id
    expected = standalone_scores(standalone_reward, rows)[:, 0]
    torch.testing.assert_close(shared_model.score(ids, mask), expected, atol=1e-5, rtol=0)


def test_legacy_two_label_head_reads_the_requested_column(adapter_dirs):
    rows = random_rows(seed=2, lengths=[4, 8])
    ids, mask = pad_rows(rows, "left")
    expected = standalone_scores(merged_reward_model(adapter_dirs["reward2"], num_labels=2), rows)
    for column in (0, 1):
        model = MultiAdapterModel.from_pretrained(
            base_model(), reward_adapter=adapter_dirs["reward2"], reward_label_index=column
        )
        torch.testing.assert_close(model.score(ids, mask), expected[:, column], atol=1e-5, rtol=0)


def test_two_label_head_without_index_is_refused(adapter_dirs):
    with pytest.raises(ValueError, match="2-label score head; pass reward_label_index"):
        MultiAdapterModel.from_pretrained(base_model(), reward_adapter=adapter_dirs["reward2"])
    with pytest.raises(ValueError, match="out of range"):
        MultiAdapterModel.from_pretrained(base_model(), reward_adapter=adapter_dirs["reward2"], reward_label_index=2)


def test_reward_adapter_without_score_weights_is_refused(adapter_dirs):
    # a causal-LM LoRA adapter has the right LoRA layout but no score head
    with pytest.raises(ValueError, match="has no score head weights"):
        MultiAdapterModel.from_pretrained(base_model(), reward_adapter=adapter_dirs["policy"])


def test_missing_reward_adapter_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="reward_adapter=.*nowhere"):
        MultiAdapterModel.from_pretrained(base_model(), reward_adapter=tmp_path / "nowhere")


@settings(HYPOTHESIS, max_examples=25)
@given(
    rows=token_rows,
    side=st.sampled_from(["left", "right"]),
    extra=st.integers(0, 3),
    pad_id=st.sampled_from([PAD_ID, EOS_ID, 0, 777]),
    order=st.randoms(use_true_random=False),
)
def test_scores_and_logprobs_ignore_padding_order_and_batch_mates(shared_model, rows, side, extra, pad_id, order):
    permutation = list(range(len(rows)))
    order.shuffle(permutation)
    ids, mask = pad_rows([rows[i] for i in permutation], side, extra, pad_id)
    scores = shared_model.score(ids, mask)
    logits, values = shared_model.policy_forward(ids, mask)
    logprobs = torch.log_softmax(logits, -1).detach()
    for batch_index, row_index in enumerate(permutation):
        single = torch.tensor([rows[row_index]])
        alone_logits, alone_values = shared_model.policy_forward(single)
        positions = real_positions(mask[batch_index])
        torch.testing.assert_close(scores[batch_index], shared_model.score(single)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(
            logprobs[batch_index, positions], torch.log_softmax(alone_logits, -1)[0].detach(), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(values[batch_index, positions], alone_values[0], atol=1e-5, rtol=0)
    assert torch.isfinite(logits).all() and torch.isfinite(values).all()  # also on pad positions


# --------------------------------------------------------------------------- reference and policy


def test_reference_logits_equal_the_plain_base_model(shared_model):
    plain = base_model()
    rows = random_rows(seed=3, lengths=[5, 9])
    for row in rows:
        ids = torch.tensor([row])
        with torch.no_grad():
            expected = plain(input_ids=ids).logits
        torch.testing.assert_close(shared_model.reference_logits(ids), expected, atol=1e-6, rtol=0)


def test_fresh_policy_logits_equal_reference_logits(shared_model):
    ids, mask = pad_rows(random_rows(seed=4, lengths=[4, 8, 6]), "left")
    logits, _ = shared_model.policy_forward(ids, mask)
    torch.testing.assert_close(logits.detach(), shared_model.reference_logits(ids, mask), atol=0, rtol=0)


def test_logits_to_keep_returns_the_last_positions(shared_model):
    ids, mask = pad_rows(random_rows(seed=5, lengths=[6, 9]), "left")
    full, values = shared_model.policy_forward(ids, mask)
    kept, kept_values = shared_model.policy_forward(ids, mask, logits_to_keep=3)
    torch.testing.assert_close(kept, full[:, -3:], atol=1e-6, rtol=0)
    torch.testing.assert_close(kept_values, values, atol=0, rtol=0)
    torch.testing.assert_close(shared_model.reference_logits(ids, mask, logits_to_keep=3), full[:, -3:].detach())
    assert full.dtype == torch.float32 and values.dtype == torch.float32


def test_policy_forward_has_dropout_off_and_equals_the_merged_adapter(adapter_dirs):
    """Starting from a trained-looking adapter with lora_dropout=0.3, in train mode, outputs are
    deterministic and equal base + adapter merged: dropout never runs."""
    model = MultiAdapterModel.from_pretrained(base_model(), policy_adapter=adapter_dirs["policy"]).train()
    ids = torch.tensor([random_rows(seed=6, lengths=[10])[0]])
    first, _ = model.policy_forward(ids)
    second, _ = model.policy_forward(ids)
    with torch.no_grad():
        expected = merged_causal_model(adapter_dirs["policy"])(input_ids=ids).logits
    assert torch.equal(first, second)
    torch.testing.assert_close(first.detach(), expected, atol=1e-5, rtol=0)


def test_reference_policy_init_stays_the_starting_adapter_through_training(adapter_dirs):
    model = MultiAdapterModel.from_pretrained(
        base_model(), policy_adapter=adapter_dirs["policy"], reference="policy_init"
    ).train()
    ids, mask = pad_rows(random_rows(seed=7, lengths=[5, 8]), "left")
    single = torch.tensor([random_rows(seed=8, lengths=[8])[0]])
    with torch.no_grad():
        expected = merged_causal_model(adapter_dirs["policy"])(input_ids=single).logits
    torch.testing.assert_close(model.reference_logits(single), expected, atol=1e-5, rtol=0)
    policy_before, _ = model.policy_forward(single)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        logits, values = model.policy_forward(ids, mask)
        (logits.logsumexp(-1).mean() + values.pow(2).mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
    policy_after, _ = model.policy_forward(single)
    assert (policy_after - policy_before).abs().max() > 1e-3  # the policy moved ...
    torch.testing.assert_close(model.reference_logits(single), expected, atol=1e-5, rtol=0)  # ... the reference not


def test_policy_init_needs_a_policy_adapter():
    with pytest.raises(ValueError, match="reference='policy_init'.*policy_adapter"):
        MultiAdapterModel.from_pretrained(base_model(), reference="policy_init")


# --------------------------------------------------------------------------- roles


def tuner_layers(model: MultiAdapterModel):
    """peft's LoRA layers of the shared base, found through peft's public layer class."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in model.peft_model.modules() if isinstance(module, BaseTunerLayer)]


def adapter_parameters(model: MultiAdapterModel, adapter: str):
    """The parameters peft stores under an adapter name (LoRA A/B weights and saved modules)."""
    return [parameter for name, parameter in model.peft_model.named_parameters()
            if f".{adapter}." in name or name.endswith(f".{adapter}")]


def layer_state(model: MultiAdapterModel):
    return [(layer.disable_adapters, tuple(layer.active_adapters)) for layer in tuner_layers(model)]


def full_state(model: MultiAdapterModel):
    return (
        model.active_role,
        layer_state(model),
        [parameter.requires_grad for parameter in model.parameters()],
        [module.training for module in model.modules()],
    )


def expected_layer_state(model: MultiAdapterModel, role: str):
    if role == "reference" and model.reference_mode == "base":
        return [(True, tuple(layer.active_adapters)) for layer in tuner_layers(model)]
    adapter = {
        "policy": POLICY_ADAPTER,
        "reward": REWARD_ADAPTER,
        "critic": CRITIC_ADAPTER,
        "reference": POLICY_INIT_ADAPTER,
    }[role]
    return [(False, (adapter,))] * len(tuner_layers(model))


class BodyError(Exception):
    pass


programs = st.recursive(
    st.one_of(
        st.tuples(st.just("train"), st.booleans()),
        st.tuples(st.just("grad"), st.integers(0, 10_000), st.booleans()),
        st.tuples(st.just("peft_set_adapter"), st.sampled_from([POLICY_ADAPTER, REWARD_ADAPTER, CRITIC_ADAPTER])),
        st.tuples(st.just("raise")),
    ),
    lambda children: st.tuples(
        st.just("role"), st.sampled_from(["policy", "reward", "critic", "reference"]), st.lists(children, max_size=3)
    ),
    max_leaves=8,
)


def run_program(model: MultiAdapterModel, step) -> None:
    kind = step[0]
    if kind == "train":
        model.train(step[1])
    elif kind == "grad":
        heads = [model.value_head, *([model.reward_head] if model.reward_head is not None else [])]
        parameters = [parameter for adapter in model.peft_model.peft_config for parameter in adapter_parameters(model, adapter)]
        parameters += [parameter for head in heads for parameter in head.parameters()]
        parameters[step[1] % len(parameters)].requires_grad_(step[2])
    elif kind == "peft_set_adapter":
        model.peft_model.set_adapter(step[1])  # misuse: rewrites flags and requires_grad behind our back
    elif kind == "raise":
        raise BodyError
    else:
        _, role, body = step
        before = full_state(model)
        with contextlib.suppress(BodyError), model.role(role):
            assert model.active_role == role
            assert layer_state(model) == expected_layer_state(model, role)
            for child in body:
                run_program(model, child)
        assert full_state(model) == before


@pytest.fixture(scope="module")
def critic_model(adapter_dirs):
    torch.manual_seed(0)
    return MultiAdapterModel.from_pretrained(
        base_model(), reward_adapter=adapter_dirs["reward"], value_model="critic", critic_init="reward"
    )


@settings(HYPOTHESIS, max_examples=50)
@given(program=st.lists(programs, min_size=1, max_size=4), start_training=st.booleans())
def test_any_sequence_of_role_switches_restores_the_state(critic_model, program, start_training):
    critic_model.train(start_training)
    original = full_state(critic_model)
    for step in program:
        if step[0] == "role":
            run_program(critic_model, step)
    assert full_state(critic_model) == original


def test_roles_switch_the_adapters_numerically(shared_model, adapter_dirs):
    """Inside role('reward') the causal LM computes base + reward LoRA; inside 'reference' the base."""
    ids = torch.tensor([random_rows(seed=10, lengths=[6])[0]])
    causal_lm = shared_model.peft_model.get_base_model()
    merged = PeftModel.from_pretrained(base_model(), str(adapter_dirs["reward"])).merge_and_unload()
    with torch.no_grad():
        with shared_model.role("reward"):
            reward_logits = causal_lm(input_ids=ids).logits
        with shared_model.role("reference"):
            reference_logits = causal_lm(input_ids=ids).logits
        torch.testing.assert_close(reward_logits, merged(input_ids=ids).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(reference_logits, base_model()(input_ids=ids).logits, atol=1e-6, rtol=0)


def test_unknown_or_unavailable_roles_are_refused(shared_model):
    with pytest.raises(ValueError, match="unknown role 'value'"):
        shared_model.role("value").__enter__()
    with pytest.raises(ValueError, match="value_model='critic'"):
        shared_model.role("critic").__enter__()
    assert shared_model.active_role == "policy"


# --------------------------------------------------------------------------- training isolation


def snapshot(model: MultiAdapterModel) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("value_model", ["head", "critic"])
def test_optimizer_steps_change_only_trainable_parameters(adapter_dirs, value_model):
    torch.manual_seed(0)
    model = MultiAdapterModel.from_pretrained(
        base_model(), policy_config=fresh_policy_config(), reward_adapter=adapter_dirs["reward"], value_model=value_model
    ).train()
    trainable_ids = {id(parameter) for parameter in model.trainable_parameters()}
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    trainable_names = {names[i] for i in trainable_ids}
    expected_adapters = {POLICY_ADAPTER} | ({CRITIC_ADAPTER} if value_model == "critic" else set())
    assert all(
        name.startswith("value_head.") or any(f".{adapter}." in name for adapter in expected_adapters)
        for name in trainable_names
    )
    before = snapshot(model)
    ids, mask = pad_rows(random_rows(seed=11, lengths=[5, 9, 7]), "left")
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        model.score(ids, mask)  # interleave other roles as PPO does
        model.reference_logits(ids, mask)
        logits, values = model.policy_forward(ids, mask)
        (logits.logsumexp(-1).mean() + values.pow(2).mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = snapshot(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == trainable_names


# --------------------------------------------------------------------------- memory


def storage_pointers(module: torch.nn.Module) -> set[int]:
    tensors = [*module.parameters(), *module.buffers()]
    return {tensor.untyped_storage().data_ptr() for tensor in tensors}


def storage_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for tensor in [*module.parameters(), *module.buffers()]:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def lora_parameter_count(config_r: int, base: LlamaForCausalLM) -> int:
    """r * (in + out) for every Linear of the decoder layers (what 'all-linear' targets)."""
    linears = [m for m in base.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    return sum(config_r * (m.in_features + m.out_features) for m in linears)


def test_one_copy_of_the_base_and_adapters_add_only_their_own_parameters(adapter_dirs):
    base = base_model()
    base_pointers = storage_pointers(base)
    base_bytes = storage_bytes(base)
    lora_count = lora_parameter_count(4, base_model())
    hidden = base.config.hidden_size
    model = MultiAdapterModel.from_pretrained(
        base,
        policy_adapter=adapter_dirs["policy"],
        reward_adapter=adapter_dirs["reward"],
        reference="policy_init",
        value_model="critic",
        critic_init="reward",
    )
    assert base_pointers <= storage_pointers(model)  # the base weights are shared, not copied
    adapters = (POLICY_ADAPTER, REWARD_ADAPTER, CRITIC_ADAPTER, POLICY_INIT_ADAPTER)
    head_count = hidden * 1 + (hidden + 1)  # reward score (1 label, no bias) + critic value head
    expected_bytes = base_bytes + 4 * (len(adapters) * lora_count + head_count)
    assert storage_bytes(model) == expected_bytes
    for adapter in adapters:
        assert sum(p.numel() for p in adapter_parameters(model, adapter)) == lora_count


# --------------------------------------------------------------------------- critic


def test_critic_initialised_from_reward_scores_like_the_reward(critic_model):
    rows = random_rows(seed=12, lengths=[4, 9, 6])
    ids, mask = pad_rows(rows, "left")
    values = critic_model.critic_values(ids, mask)
    last = last_non_pad_index(mask)
    torch.testing.assert_close(values[torch.arange(3), last].detach(), critic_model.score(ids, mask), atol=1e-5, rtol=0)
    _, policy_values = critic_model.policy_forward(ids, mask)
    torch.testing.assert_close(policy_values, values, atol=0, rtol=0)


def test_value_head_values_match_a_hand_computation(shared_model):
    ids = torch.tensor([random_rows(seed=13, lengths=[6])[0]])
    _, values = shared_model.policy_forward(ids)
    with torch.no_grad():
        hidden = base_model().model(input_ids=ids).last_hidden_state  # fresh policy LoRA == base
        expected = hidden @ shared_model.value_head.weight[0] + shared_model.value_head.bias[0]
    torch.testing.assert_close(values.detach(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared_model.critic_values(ids), values)


# --------------------------------------------------------------------------- save / load


def every_role_output(model: MultiAdapterModel, ids, mask) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        logits, values = model.policy_forward(ids, mask)
        outputs = {"logits": logits, "values": values, "reference": model.reference_logits(ids, mask)}
        if model.reward_head is not None:
            outputs["score"] = model.score(ids, mask)
        return outputs


@pytest.mark.parametrize(
    "kwargs",
    [
        {"reference": "base", "value_model": "head"},
        {"reference": "policy_init", "value_model": "critic", "critic_init": "reward"},
    ],
    ids=["base-head", "policy_init-critic"],
)
def test_save_adapters_round_trip_gives_identical_outputs(adapter_dirs, tmp_path, kwargs):
    torch.manual_seed(0)
    model = MultiAdapterModel.from_pretrained(
        base_model(), policy_adapter=adapter_dirs["policy"], reward_adapter=adapter_dirs["reward"], **kwargs
    )
    ids, mask = pad_rows(random_rows(seed=14, lengths=[5, 8]), "left")
    logits, values = model.policy_forward(ids, mask)  # one step so every trainable tensor differs from its file
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    (logits.logsumexp(-1).mean() + values.pow(2).mean()).backward()
    optimizer.step()
    model.save_adapters(tmp_path)
    restored = MultiAdapterModel.from_pretrained(base_model(), from_saved=tmp_path)
    expected, actual = every_role_output(model, ids, mask), every_role_output(restored, ids, mask)
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=0, rtol=0, msg=key)
    assert (restored.value_model, restored.reference_mode) == (model.value_model, model.reference_mode)
    assert [p.shape for p in restored.trainable_parameters()] == [p.shape for p in model.trainable_parameters()]
    roles = json.loads((tmp_path / "multiadapter.json").read_text())
    assert roles["value_model"] == kwargs["value_model"]


def test_saved_policy_and_reward_are_standard_peft_adapters(shared_model, tmp_path):
    shared_model.save_adapters(tmp_path)
    rows = random_rows(seed=15, lengths=[5, 7])
    ids, mask = pad_rows(rows, "right")
    policy = PeftModel.from_pretrained(base_model(), str(tmp_path / "policy")).eval()
    with torch.no_grad():
        expected_logits = policy(input_ids=ids[:1, :5]).logits
    logits, _ = shared_model.policy_forward(ids[:1, :5])
    torch.testing.assert_close(logits.detach(), expected_logits, atol=1e-6, rtol=0)
    reward = merged_reward_model(tmp_path / "reward", num_labels=1)
    torch.testing.assert_close(shared_model.score(ids, mask), standalone_scores(reward, rows)[:, 0], atol=1e-5, rtol=0)


def test_from_saved_refuses_adapter_arguments(shared_model, tmp_path, adapter_dirs):
    shared_model.save_adapters(tmp_path)
    with pytest.raises(ValueError, match="from_saved restores every adapter.*reward_adapter"):
        MultiAdapterModel.from_pretrained(base_model(), from_saved=tmp_path, reward_adapter=adapter_dirs["reward"])
    with pytest.raises(FileNotFoundError, match="multiadapter.json"):
        MultiAdapterModel.from_pretrained(base_model(), from_saved=tmp_path / "policy")


# --------------------------------------------------------------------------- loading and dtypes


def test_loading_from_a_directory_defaults_to_float32_and_accepts_bf16(tiny_model_dir):
    model = MultiAdapterModel.from_pretrained(str(tiny_model_dir))
    assert model.dtype == torch.float32
    ids = torch.tensor([random_rows(seed=16, lengths=[6])[0]])
    with torch.no_grad():
        expected = base_model()(input_ids=ids).logits
    torch.testing.assert_close(model.reference_logits(ids), expected, atol=1e-6, rtol=0)
    bf16 = MultiAdapterModel.from_pretrained(str(tiny_model_dir), dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    logits, values = bf16.policy_forward(ids)
    assert logits.dtype == torch.float32 and values.dtype == torch.float32  # logits/values always float32
    assert {p.dtype for p in bf16.trainable_parameters()} == {torch.float32}  # LoRA + head train in float32
    torch.testing.assert_close(logits.detach(), expected, atol=0.1, rtol=0.05)


def test_built_model_keeps_its_weights_with_dtype_auto_and_casts_with_a_name():
    base = base_model()
    pointer = base.lm_head.weight.data_ptr()
    model = MultiAdapterModel.from_pretrained(base, dtype="auto", device_map="cpu")
    assert model.dtype == torch.float32 and model.peft_model.get_base_model().lm_head.weight.data_ptr() == pointer
    assert MultiAdapterModel.from_pretrained(base_model(), dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype='float33' is not a torch dtype"):
        MultiAdapterModel.from_pretrained(base_model(), dtype="float33")


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="value_model='value' is not valid"):
        MultiAdapterModel.from_pretrained(base_model(), value_model="value")
    with pytest.raises(ValueError, match="not both"):
        MultiAdapterModel.from_pretrained(base_model(), policy_config=fresh_policy_config(), policy_adapter="x")
    with pytest.raises(ValueError, match="critic_init='reward' needs reward_adapter"):
        MultiAdapterModel.from_pretrained(base_model(), value_model="critic", critic_init="reward")
    with pytest.raises(ValueError, match="needs a causal LM"):
        MultiAdapterModel.from_pretrained(seq_cls_model(1, seed=0))
    with pytest.raises(ValueError, match="attention_mask shape"):
        MultiAdapterModel.from_pretrained(base_model()).policy_forward(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4))


def test_gradient_checkpointing_gives_the_same_gradients(adapter_dirs):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = MultiAdapterModel.from_pretrained(
            base_model(), policy_adapter=adapter_dirs["policy"], gradient_checkpointing=checkpointing
        ).train()
        ids, mask = pad_rows(random_rows(seed=17, lengths=[5, 8]), "left")
        logits, values = model.policy_forward(ids, mask)
        (logits.logsumexp(-1).mean() + values.pow(2).mean()).backward()
        grads.append([p.grad.clone() for p in model.trainable_parameters()])
        if checkpointing:
            checkpointed = [m for m in model.peft_model.modules() if getattr(m, "gradient_checkpointing", False) is True]
            assert checkpointed and all(layer.training for layer in checkpointed)
            assert not any(m.training for m in model.peft_model.modules() if isinstance(m, torch.nn.Dropout))
    for without, with_checkpointing in zip(*grads):
        torch.testing.assert_close(with_checkpointing, without, atol=1e-6, rtol=1e-5)


def test_test_adapters_change_outputs_materially(shared_model, adapter_dirs):
    """Guard for the comparisons above: the test adapters are far from no-ops."""
    ids = torch.tensor([random_rows(seed=18, lengths=[8])[0]])
    with torch.no_grad():
        base_logits = base_model()(input_ids=ids).logits
        policy_logits = merged_causal_model(adapter_dirs["policy"])(input_ids=ids).logits
        reward_logits = PeftModel.from_pretrained(base_model(), str(adapter_dirs["reward"])).merge_and_unload()(
            input_ids=ids
        ).logits
    assert (policy_logits - base_logits).abs().max() > 0.05
    assert (reward_logits - base_logits).abs().max() > 0.05
    rows_ids, rows_mask = pad_rows(random_rows(seed=19, lengths=[3, 9, 6, 7, 8]), "left")
    assert shared_model.score(rows_ids, rows_mask).abs().max() > 0.1
