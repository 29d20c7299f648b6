"""The export stage's model card and adapter copy, and ``generate_from_adapter`` (behind ``generate``).

Independent references: a plain peft model decoded greedily by a loop written here, and the recipe's
own values for what the card must name.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft import PeftModel

from trl_multiadapter.export import (
    MODEL_CARD,
    base_model_name,
    check_policy_adapter,
    copy_saved_adapters,
    generate_from_adapter,
    model_card,
)
from trl_multiadapter.recipe import load
from trl_multiadapter.testing import build_tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

METRICS = {
    "base": {"ground_truth_rate": 0.25, "helpful_words": 0.3, "dismissive_words": 0.4, "mean_reward": 0.5,
             "kl_full": 0.0, "response_length": 8.0, "stop_rate": 0.0},
    "aligned": {"ground_truth_rate": 0.75, "helpful_words": 1.2, "dismissive_words": 0.1, "mean_reward": 1.5,
                "kl_full": 3.25, "response_length": 6.0, "stop_rate": 1.0},
    "win_rate": 0.9, "num_prompts": 64,
}


# --------------------------------------------------------------------------- model card


def test_card_of_a_builtin_base_says_so_and_holds_no_local_path(tmp_path):
    recipe = load("tiny_cpu", output_dir=str(tmp_path / "run"))
    card = model_card(recipe, METRICS, {"eval_pairwise_accuracy": 0.97})
    metadata = card.split("---")[1]
    assert "base_model" not in metadata  # the hub validates base_model as a hub id: none here
    assert "built-in tiny model `builtin:tiny`" in card
    assert str(tmp_path) not in card and not re.search(r"(^|[\s`\"'(])/(tmp|home|work|root)/", card)
    assert 'builtin_model("builtin:tiny", seed=0)' in card
    assert "[More Information Needed]" not in card


def test_card_of_a_hub_base_names_the_hub_id_in_its_metadata():
    recipe = load("tiny_cpu", ["model.name_or_path=meta-llama/Llama-3.1-8B-Instruct"])
    card = model_card(recipe, None, {})
    assert card.split("---")[1].strip().splitlines()[0] == "base_model: meta-llama/Llama-3.1-8B-Instruct"
    assert "no evaluation was run" in card
    # TGI takes its options before the image name, the model id after it
    tgi = card[card.index("docker run"):card.index("vllm serve")]
    assert tgi.index("-e LORA_ADAPTERS=") < tgi.index("text-generation-inference") < tgi.index("--model-id")


def test_card_metrics_show_ground_truth_first_and_the_full_kl(tmp_path):
    card = model_card(load("tiny_cpu"), METRICS, {})
    rows = [line for line in card.splitlines() if line.startswith("| ") and "`" in line]
    keys = [re.search(r"\(`(\w+)`\)", row).group(1) for row in rows]
    assert keys[0] == "ground_truth_rate" and "kl_full" in keys and "kl" not in keys
    kl_row = rows[keys.index("kl_full")]
    assert kl_row.endswith("| 0.0000 | 3.2500 |")
    assert "0.9000 (64 prompts)" in card


def test_local_base_is_named_by_its_folder_only(tmp_path):
    folder = tmp_path / "my-llama"
    folder.mkdir()
    recipe = load("tiny_cpu", [f"model.name_or_path={folder}"])
    name = base_model_name(recipe.model)
    assert name.hub_id is None and str(tmp_path) not in name.description + name.load + name.cli + name.folder
    assert "my-llama" in name.description


def test_copied_adapters_drop_peft_template_and_point_at_the_base(tmp_path, write_random_policy_adapter):
    source = tmp_path / "final"
    write_random_policy_adapter(source / "policy")
    (source / "README.md").write_text("# Model Card for Model ID\n[More Information Needed]\n")
    (source / "tokenizer.json").write_text("{}")
    copy_saved_adapters(source, tmp_path / "export", "meta-llama/Llama-3.1-8B-Instruct")
    assert not (tmp_path / "export" / MODEL_CARD).exists() and not (tmp_path / "export" / "tokenizer.json").exists()
    config = json.loads((tmp_path / "export" / "policy" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "meta-llama/Llama-3.1-8B-Instruct"


# --------------------------------------------------------------------------- generate


def test_reward_and_saved_model_folders_are_refused_with_the_fix(tmp_path, write_random_policy_adapter):
    reward = tmp_path / "reward"
    reward.mkdir()
    (reward / "adapter_config.json").write_text(json.dumps({"task_type": "SEQ_CLS"}))
    with pytest.raises(ValueError, match=r"reward adapter \(task_type SEQ_CLS\).*pass the policy adapter"):
        check_policy_adapter(reward)
    saved = tmp_path / "export"
    write_random_policy_adapter(saved / "policy")
    with pytest.raises(FileNotFoundError, match=re.escape(f"pass {saved / 'policy'}")):
        check_policy_adapter(saved)
    assert check_policy_adapter(saved / "policy") == saved / "policy"


def test_greedy_generate_equals_argmax_decoding_of_plain_peft(tmp_path, tiny_tokenizer, write_random_policy_adapter):
    adapter = write_random_policy_adapter(tmp_path / "policy", seed=4)
    questions = ["Who went to the bakery?", "What did Mira paint?"]
    answers = generate_from_adapter("builtin:tiny", str(adapter), questions, max_new_tokens=6, do_sample=False,
                                    temperature=0.3)
    reference = PeftModel.from_pretrained(build_tiny_model("tiny"), str(adapter)).eval()
    stops = {tiny_tokenizer.convert_tokens_to_ids(token) for token in ("<|eot_id|>", "<|end_of_text|>")}
    for (question, answer), expected_question in zip(answers, questions):
        ids = tiny_tokenizer.apply_chat_template([{"role": "user", "content": expected_question}],
                                                 add_generation_prompt=True, tokenize=True, return_dict=False)
        tokens = list(ids)
        with torch.no_grad():
            for _ in range(6):
                token = int(reference(input_ids=torch.tensor([tokens])).logits[0, -1].argmax())
                if token in stops:
                    break
                tokens.append(token)
        assert question == expected_question
        assert answer == tiny_tokenizer.decode(tokens[len(ids):], skip_special_tokens=True).strip()


def test_without_an_adapter_the_base_answers(tiny_tokenizer):
    sampled = generate_from_adapter("builtin:tiny", None, ["Hello there"], max_new_tokens=5, seed=3)
    again = generate_from_adapter("builtin:tiny", None, ["Hello there"], max_new_tokens=5, seed=3)
    assert sampled == again  # seeded per prompt
    greedy = generate_from_adapter("builtin:tiny", None, ["Hello there"], max_new_tokens=5, do_sample=False)
    base = build_tiny_model("tiny")
    ids = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    tokens = list(ids)
    with torch.no_grad():
        for _ in range(5):
            tokens.append(int(base(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
    stops = {tiny_tokenizer.convert_tokens_to_ids(token) for token in ("<|eot_id|>", "<|end_of_text|>")}
    response = tokens[len(ids):]
    cut = next((index for index, token in enumerate(response) if token in stops), len(response))
    assert greedy[0][1] == tiny_tokenizer.decode(response[:cut], skip_special_tokens=True).strip()


def test_card_says_how_the_held_out_prompts_were_made():
    carved = "5% of the train rows carved by content hash (seed 0): the source has no eval split"
    card = model_card(load("tiny_cpu"), METRICS, {}, prompts_held_out=carved)
    assert f"held-out evaluation on {carved}" in card
    assert "held-out evaluation on `validation`" in model_card(load("tiny_cpu"), METRICS, {})
