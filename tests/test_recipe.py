"""Recipes: YAML -> typed sections, validation with key paths and fixes, overrides, bundled recipes,
accelerate configs, and the --dry_run plan (memory estimate checked against real parameter counts)."""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from trl_multiadapter import cli, launch, plan, recipe
from trl_multiadapter.recipe import RecipeError

REPO = Path(__file__).resolve().parents[1]
PACKAGE_RECIPES = REPO / "trl_multiadapter" / "recipes"
USER_RECIPES = REPO / "recipes"


@pytest.fixture(scope="module")
def tiny_data():
    return yaml.safe_load((PACKAGE_RECIPES / "tiny_cpu.yaml").read_text())


@pytest.fixture(scope="module")
def hh_squad():
    return recipe.load("hh_squad")


def load_error(data, overrides=()) -> RecipeError:
    with pytest.raises(RecipeError) as caught:
        recipe.load(data=copy.deepcopy(data), overrides=list(overrides))
    return caught.value


# ------------------------------------------------------------------------------------ bundled recipes


def test_user_recipes_are_identical_to_the_packaged_ones():
    packaged = sorted(path.name for path in PACKAGE_RECIPES.glob("*.yaml"))
    user = sorted(path.name for path in USER_RECIPES.glob("*.yaml"))
    assert packaged == user == ["hh_squad.yaml", "tiny_cpu.yaml"]
    for name in packaged:
        assert (PACKAGE_RECIPES / name).read_bytes() == (USER_RECIPES / name).read_bytes(), (
            f"recipes/{name} and trl_multiadapter/recipes/{name} differ: copy one onto the other"
        )


def test_package_data_ships_recipes_and_accelerate_configs():
    import tomllib

    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert {"recipes/*.yaml", "accelerate_configs/*.yaml"} <= set(package_data["trl_multiadapter"])


def test_hh_squad_carries_the_seed_recipe(hh_squad):
    r = hh_squad
    assert r.model.name_or_path == "meta-llama/Llama-3.1-8B-Instruct"
    q = r.quantization
    assert (q.load_in_4bit, q.bnb_4bit_quant_type) == (True, "nf4")
    assert (r.data.preference.source, r.data.preference.path, r.data.preference.data_dir) == (
        "hh_rlhf", "Anthropic/hh-rlhf", "helpful-base")
    assert (r.data.prompts.source, r.data.prompts.path) == ("squad", "rajpurkar/squad")
    rw = r.reward
    assert (rw.lora_r, rw.lora_alpha, rw.lora_dropout, rw.learning_rate, rw.max_length) == (8, 32, 0.1, 2e-4, 512)
    p = r.ppo
    assert (p.lora_r, p.lora_alpha, p.lora_dropout, p.learning_rate) == (16, 32, 0.05, 1e-5)
    assert (p.batch_size, p.mini_batch_size, p.gradient_accumulation_steps) == (4, 1, 4)
    assert (p.top_p, p.top_k, p.max_new_tokens) == (0.9, 0, 32)
    i = r.instance
    assert (i.name, i.num_gpus, i.price_per_hour) == ("ml.g5.12xlarge", 4, 7.09)
    # derived, never set twice: the reward stage loads the base in model.dtype
    assert recipe.build_reward_config(r.reward, r.model).dtype == r.model.dtype == "bfloat16"


def test_bundled_recipe_by_name_and_close_match():
    assert recipe.resolve_recipe_path("tiny_cpu") == recipe.resolve_recipe_path("tiny_cpu.yaml")
    with pytest.raises(RecipeError, match="Did you mean 'hh_squad'"):
        recipe.resolve_recipe_path("hh_sqad")


def test_ppo_section_fields_come_from_the_config_class(hh_squad):
    from trl_multiadapter.ppo_config import MultiAdapterPPOConfig

    config_fields = {f.name for f in dataclasses.fields(MultiAdapterPPOConfig) if f.init}
    section_fields = {f.name for f in dataclasses.fields(hh_squad.ppo)}
    assert section_fields == (config_fields - set(recipe.PPO_DERIVED_FIELDS)) | set(recipe.PPO_LORA_FIELDS)
    config = recipe.build_ppo_config(hh_squad.ppo, "out", use_cpu=True)
    assert (config.batch_size, config.learning_rate, config.top_p) == (4, 1e-5, 0.9)


def test_reward_section_fields_come_from_the_config_class(hh_squad):
    from trl import RewardConfig

    from trl_multiadapter.reward import RewardAdapterConfig

    config_fields = {f.name for f in dataclasses.fields(RewardAdapterConfig) if f.init}
    section_fields = {f.name for f in dataclasses.fields(hh_squad.reward)}
    assert section_fields == config_fields - set(recipe.REWARD_DERIVED_FIELDS)
    assert {f.name for f in dataclasses.fields(RewardConfig)} - set(recipe.REWARD_DERIVED_FIELDS) <= section_fields
    assert {"optim", "warmup_steps", "eval_strategy", "lora_target_modules"} <= section_fields


def test_training_arguments_are_reachable_from_the_reward_section(tiny_data):
    loaded = recipe.load(data=copy.deepcopy(tiny_data), overrides=[
        "reward.optim=adafactor", "reward.warmup_steps=0.1", "reward.eval_strategy=epoch",
        "reward.lr_scheduler_type=cosine", "reward.lora_target_modules=[q_proj, v_proj]"])
    config = recipe.build_reward_config(loaded.reward, loaded.model)
    assert (config.optim, config.warmup_steps, config.eval_strategy, config.lr_scheduler_type) == (
        "adafactor", 0.1, "epoch", "cosine")
    assert config.lora_config().target_modules == {"q_proj", "v_proj"}
    assert config.use_cpu  # this machine has no CUDA: the device decision, not the recipe


def test_reward_config_checks_become_recipe_errors(tiny_data):
    error = load_error(tiny_data, ["reward.eval_fraction=1.5"])
    assert error.key_path == "reward.eval_fraction"
    error = load_error(tiny_data, ["reward.fp16=true", "reward.bf16=true"])  # TrainingArguments' own check
    assert error.key_path.startswith("reward") and "fp16 and bf16" in error.problem


# -------------------------------------------------------------------------------------------- errors


def test_unknown_key_names_the_path_and_suggests(tiny_data):
    data = copy.deepcopy(tiny_data)
    data["ppo"]["learnig_rate"] = 1e-5
    error = load_error(data)
    assert error.key_path == "ppo.learnig_rate"
    assert "Did you mean 'learning_rate'?" in str(error)
    assert "rename it to 'learning_rate'" in error.fix


def test_unknown_nested_and_top_level_keys(tiny_data):
    data = copy.deepcopy(tiny_data)
    data["data"]["prompts"]["max_promt_length"] = 3
    assert load_error(data).key_path == "data.prompts.max_promt_length"
    data = copy.deepcopy(tiny_data)
    data["evaluation"] = {}
    error = load_error(data)
    assert error.key_path == "evaluation" and "'evaluate'" in str(error)


@pytest.mark.parametrize(
    ("override", "key_path", "expected"),
    [
        ("ppo.batch_size=four", "ppo.batch_size", "must be an integer, got string 'four'"),
        ("ppo.batch_size=true", "ppo.batch_size", "must be an integer, got boolean True"),
        ("model.dtype=float64", "model.dtype", "'float64' is not allowed"),
        ("quantization.load_in_4bit=yes please", "quantization.load_in_4bit", "must be a boolean"),
        ("data.preference.options=[1, 2]", "data.preference.options", "must be a mapping"),
        ("stages=data", "stages", "must be a list of a string"),
        ("ppo.reward_weights=[1.0, x]", "ppo.reward_weights[1]", "must be a number"),
        ("instance.price_per_hour=cheap", "instance.price_per_hour", "must be a number or null"),
    ],
)
def test_wrong_types_name_the_key(tiny_data, override, key_path, expected):
    error = load_error(tiny_data, [override])
    assert error.key_path == key_path
    assert expected in str(error)


def test_float_written_without_a_dot_is_accepted(tiny_data):
    # PyYAML reads 2e-5 as a string; a float field accepts it.
    loaded = recipe.load(data=copy.deepcopy(tiny_data), overrides=["ppo.learning_rate=2e-5"])
    assert loaded.ppo.learning_rate == 2e-5


def test_overrides_parse_values_as_yaml(tiny_data):
    loaded = recipe.load(
        data=copy.deepcopy(tiny_data),
        overrides=["ppo.lora_target_modules=[q_proj, v_proj]", "evaluate.max_new_tokens=null",
                   "data.prompts.options.train_size=7", "output_dir=/tmp/x"],
    )
    assert loaded.ppo.lora_target_modules == ["q_proj", "v_proj"]
    assert loaded.evaluate.max_new_tokens is None
    assert loaded.data.prompts.options["train_size"] == 7
    assert loaded.output_dir == "/tmp/x"


def test_errors_from_an_override_blame_the_override_not_the_file(tmp_path):
    """The CLI in a subprocess: a --set typo in a bundled recipe names the --set flag, never the YAML file."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "trl_multiadapter", "run", "tiny_cpu", "--dry_run", "--set", "reward.lora_rank=4"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert completed.returncode == 2, completed.stderr[-2000:]
    line = completed.stderr.strip().splitlines()[-1]
    assert "--set reward.lora_rank=4: reward.lora_rank: unknown key 'lora_rank'. Did you mean 'lora_r'?" in line
    assert "tiny_cpu.yaml" not in line and "Traceback" not in completed.stderr
    # a problem in the file itself still names the file
    bad = tmp_path / "bad.yaml"
    bad.write_text((PACKAGE_RECIPES / "tiny_cpu.yaml").read_text().replace("  lora_r: 8\n", "  lora_rank: 8\n"))
    with pytest.raises(RecipeError) as caught:
        recipe.load(str(bad), ["ppo.learning_rate=2e-5"])
    assert caught.value.source == str(bad) and caught.value.key_path == "reward.lora_rank"


def test_override_errors(tiny_data):
    assert load_error(tiny_data, ["ppo.learning_rate"]).key_path == "--set"
    error = load_error(tiny_data, ["output_dir.inner=3"])
    assert error.key_path == "output_dir" and "cannot set a key inside it" in str(error)
    assert "Did you mean 'max_new_tokens'" in str(load_error(tiny_data, ["ppo.max_new_token=3"]))


def test_missing_required_key(tiny_data):
    data = copy.deepcopy(tiny_data)
    del data["model"]["name_or_path"]
    error = load_error(data)
    assert error.key_path == "model.name_or_path" and "required" in str(error)


def test_missing_local_file(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    error = load_error(tiny_data, ["data.preference.path=./pairs.jsonl"])
    assert error.key_path == "data.preference.path"
    assert "'./pairs.jsonl' does not exist" in str(error)
    (tmp_path / "pairs.jsonl").write_text("{}\n")
    assert recipe.load(data=copy.deepcopy(tiny_data), overrides=["data.preference.path=./pairs.jsonl"])


def test_unknown_registry_names(tiny_data):
    error = load_error(tiny_data, ["data.prompts.source=sqad"])
    assert error.key_path == "data.prompts.source" and "Did you mean 'squad'" in str(error)
    error = load_error(tiny_data, ["stages=[data, reward, ppo, evalute]"])
    assert error.key_path == "stages[3]" and "Did you mean 'evaluate'" in str(error)
    error = load_error(tiny_data, ["stages=[reward, data]"])
    assert error.key_path == "stages" and "order" in str(error)


def test_config_class_checks_become_recipe_errors(tiny_data):
    error = load_error(tiny_data, ["ppo.kl_estimator=k7"])
    assert error.key_path == "ppo.kl_estimator"
    error = load_error(tiny_data, ["reward.lora_r=0"])
    assert error.key_path == "reward.lora_r"


def test_derived_keys_point_to_their_source(tiny_data):
    error = load_error(tiny_data, ["ppo.output_dir=x"])
    assert error.key_path == "ppo.output_dir" and "output_dir (top level" in error.fix
    error = load_error(tiny_data, ["reward.dtype=bfloat16"])
    assert "model.dtype" in error.fix
    for key, source in (("use_cpu", "CUDA"), ("output_dir", "top level"), ("trust_remote_code", "model."),
                        ("model_init_kwargs", "model.dtype")):
        error = load_error(tiny_data, [f"reward.{key}=true"])
        assert error.key_path == f"reward.{key}" and source in error.fix


def test_push_to_hub_needs_a_repository(tiny_data):
    error = load_error(tiny_data, ["export.push_to_hub=true"])
    assert error.key_path == "export.hub_model_id"


# ------------------------------------------------------------------------------------ batch arithmetic


def test_batch_arithmetic_error_names_the_fix(tiny_data):
    error = load_error(tiny_data, ["ppo.batch_size=6", "ppo.mini_batch_size=1", "ppo.gradient_accumulation_steps=4"])
    assert error.key_path == "ppo.batch_size"
    assert "1 x 4 = 4" in str(error) and "set ppo.batch_size to 4 or 8" in error.fix


@given(st.integers(1, 64), st.integers(1, 8), st.integers(1, 8))
def test_batch_arithmetic_accepts_exactly_the_multiples(batch_size, mini_batch_size, accumulation):
    # Independent statement of TRL 0.11's rule: some whole number of optimizer steps covers the batch.
    feasible = any(k * mini_batch_size * accumulation == batch_size for k in range(1, batch_size + 1))
    try:
        recipe.check_batch_arithmetic(batch_size, mini_batch_size, accumulation)
        accepted = True
    except RecipeError as error:
        accepted = False
        assert error.key_path == "ppo.batch_size"
    assert accepted == feasible


# --------------------------------------------------------------------------------- runtime-only checks


def test_4bit_without_cuda_fails_at_run_start_only(hh_squad, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RecipeError) as caught:
        recipe.check_runtime(hh_squad)
    assert caught.value.key_path == "quantization.load_in_4bit"
    assert "needs a CUDA GPU" in str(caught.value)


def test_hub_push_offline_fails_before_training(tiny_data, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded = recipe.load(data=copy.deepcopy(tiny_data),
                         overrides=["export.push_to_hub=true", "export.hub_model_id=me/tiny"])
    with pytest.raises(RecipeError) as caught:
        recipe.check_runtime(loaded)
    assert caught.value.key_path == "export.push_to_hub" and "HF_HUB_OFFLINE" in str(caught.value)


# --------------------------------------------------------------------------------------------- the CLI


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_validation_error_exit_code_2_without_traceback(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "tiny_cpu", "--set", "ppo.learnig_rate=1", "--output_dir", str(tmp_path / "r"))
    assert code == 2
    assert "ppo.learnig_rate: unknown key 'learnig_rate'. Did you mean 'learning_rate'?" in err
    assert "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing ran


def test_cli_batch_arithmetic_exit_code_2(capsys):
    code, _, err = run_cli(capsys, "ppo", "tiny_cpu", "--set", "ppo.batch_size=10", "--dry_run")
    assert code == 2 and "ppo.batch_size: 10 is not a multiple" in err


def test_cli_4bit_on_a_cpu_machine_exit_code_2(capsys, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, "run", "--config", "hh_squad", "--output_dir", str(out_dir))
    assert code == 2 and "quantization.load_in_4bit" in err and "Traceback" not in err
    assert not out_dir.exists()


def test_dry_run_hh_squad_offline_plans_the_instance(capsys, monkeypatch):
    import torch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU laptop
    code, out, err = run_cli(capsys, "run", "hh_squad", "--dry_run")
    assert code == 0, err
    assert "Processes: 4" in out
    assert "Estimated peak memory per GPU" in out and "fits in 24 GiB per GPU" in out
    assert "num_processes: 4" in out and "$7.09/h" in out


# ----------------------------------------------------------------------------------- accelerate configs


@pytest.mark.parametrize(("name", "processes", "machines"),
                         [("g5_12xlarge", 4, 1), ("single_gpu", 1, 1), ("multi_node_example", 8, 2), ("cpu_ddp", 2, 1)])
def test_bundled_accelerate_configs(name, processes, machines):
    config = launch.read_accelerate_config(name)
    assert (config.num_processes, config.num_machines) == (processes, machines)
    assert config.path.parent.name == "accelerate_configs"
    # accelerate itself accepts the file
    from accelerate.commands.config.config_args import load_config_from_file

    assert load_config_from_file(str(config.path)).num_processes == processes


def test_accelerate_config_by_path_and_unknown_name(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("distributed_type: MULTI_GPU\nnum_processes: 3\n")
    assert launch.read_accelerate_config(str(path)).num_processes == 3
    with pytest.raises(launch.AccelerateConfigError, match="Did you mean 'cpu_ddp'"):
        launch.resolve_accelerate_config("cpu_dp")


def test_launch_command_runs_the_cli_module():
    config = launch.read_accelerate_config("cpu_ddp")
    command = launch.launch_command(config, ["ppo", "tiny_cpu"])
    assert command[1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
    assert command[-3:] == ["trl_multiadapter", "ppo", "tiny_cpu"] and "--module" in command
    assert launch.without_flag(["a", "--accelerate_config", "x", "b", "--accelerate_config=y"],
                               "--accelerate_config") == ["a", "b"]


# ------------------------------------------------------------------------------------ memory estimate


def test_llama_3_1_8b_parameter_count():
    # Meta's published count for Llama-3.1-8B: 8,030,261,248 parameters.
    assert plan.KNOWN_MODEL_DIMS["meta-llama/Llama-3.1-8B-Instruct"].total_params == 8_030_261_248


def test_dims_match_the_real_tiny_model_and_peft(tiny_data):
    from peft import LoraConfig, get_peft_model

    from trl_multiadapter.testing import build_tiny_model

    loaded = recipe.load(data=copy.deepcopy(tiny_data))
    dims = plan.model_dims(loaded)
    model = build_tiny_model("tiny")
    assert dims.total_params == sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert dims.lora_params(8, "all-linear") == trainable
    peft_model = get_peft_model(build_tiny_model("tiny"), LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    assert dims.lora_params(4, ["q_proj", "down_proj"]) == sum(
        p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_memory_estimate_follows_the_documented_formula(hh_squad):
    dims = plan.KNOWN_MODEL_DIMS["meta-llama/Llama-3.1-8B-Instruct"]
    estimate = plan.estimate_memory(hh_squad, dims).parts
    h, layers, vocab = 4096, 32, 128256
    linear = layers * (2 * h * h + 2 * h * 1024 + 3 * h * 14336)
    nf4_bits = 4 + 8 / 64 + 32 / (64 * 256)
    # embeddings, LM head and norms stay unquantized and are upcast to float32 for k-bit training (4 bytes)
    assert estimate["base weights"] == int(linear * nf4_bits / 8 + (2 * vocab * h + (2 * layers + 1) * h) * 4)
    per_layer_lora_16 = 16 * ((h + h) * 2 + (h + 1024) * 2 + (h + 14336) * 3)
    assert estimate["policy LoRA + value head (+ grads, Adam)"] == (layers * per_layer_lora_16 + h + 1) * 16
    tokens = 1 * (512 + 32)
    assert estimate["activations (training mini-batch)"] == int(h * tokens * 2 * layers + 34 * tokens * h)
    assert estimate["KV cache (generation batch)"] == 4 * 544 * layers * 2 * 8 * 128 * 2
    assert estimate["runtime overhead"] == plan.GIB


def test_cost_projection_uses_the_seed_article_on_the_same_instance(hh_squad):
    projection = plan.project_cost(hh_squad, num_processes=4)
    per_iteration = 4 * 4
    assert projection.ppo_samples == 87599 // per_iteration * per_iteration
    assert projection.reference_usd == pytest.approx(projection.ppo_samples * 0.0079)


def test_docs_key_reference_is_generated_from_the_help_texts():
    text = (REPO / "docs" / "recipes.md").read_text()
    block = text.split("<!-- reference:start -->\n")[1].split("<!-- reference:end -->")[0]
    assert block == recipe.reference_markdown(), (
        "docs/recipes.md is out of date: regenerate the block between the reference markers with "
        "trl_multiadapter.recipe.reference_markdown()"
    )


def test_reward_function_names_are_checked(tiny_data):
    from trl_multiadapter.registry import reward_functions

    error = load_error(tiny_data, ["stage_options={ppo: {reward_funcs: [no_such_reward]}}"])
    assert error.key_path == "stage_options.ppo.reward_funcs[0]" and "unknown reward function" in str(error)

    def length_reward(completions, **kwargs):
        return [float(len(text)) for text in completions]

    reward_functions.register("test_length_reward", length_reward)
    try:
        loaded = recipe.load(data=copy.deepcopy(tiny_data),
                             overrides=["stage_options={ppo: {reward_funcs: [test_length_reward]}}"])
        assert loaded.stage_options["ppo"]["reward_funcs"] == ["test_length_reward"]
    finally:
        reward_functions.unregister("test_length_reward")
