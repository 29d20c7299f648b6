"""The pipeline on recipes/tiny_cpu.yaml: every stage end to end, skip-if-done reruns, PPO resume after a
kill, 2-process CPU data parallelism, a plugin stage installed through a real entry point, and the run
report's numbers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trl_multiadapter import cli

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_PLUGIN = REPO / "examples" / "plugin_example"
BUILTIN_STAGES = ("data", "reward", "ppo", "evaluate", "export")
# The e2e run writes every evaluated sample, so the test can recompute the aggregates from them.
E2E_OVERRIDES = ("evaluate.num_shown_samples=1000",)


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "MPLBACKEND": "Agg", **extra}
    env.pop("TRL_MULTIADAPTER_LAUNCHED", None)
    return env


def run_cli_subprocess(*argv: str, env: dict[str, str] | None = None, timeout: int = 600):
    return subprocess.run([sys.executable, "-m", "trl_multiadapter", *argv], capture_output=True, text=True,
                          env=env or cli_env(), timeout=timeout, cwd=REPO)


def override_args(overrides=E2E_OVERRIDES) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def copy_finished_stages(source: Path, target: Path, stages=("data", "reward")) -> Path:
    """A new run folder holding only the given finished stages of ``source`` (and its builtin base model)."""
    target.mkdir(parents=True)
    for name in ("base_model", *stages):
        shutil.copytree(source / name, target / name)
    return target


def read_json(path: Path):
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------- e2e


@pytest.mark.slow
def test_every_stage_writes_artifacts_that_reload(tiny_run):
    from datasets import load_from_disk

    from trl_multiadapter.model import MultiAdapterModel
    from trl_multiadapter.reward import check_score_head_saved

    for stage in BUILTIN_STAGES:
        marker = read_json(tiny_run / stage / "stage.json")
        assert marker["stage"] == stage
    data_report = read_json(tiny_run / "data" / "data_report.json")
    for name in ("preference_train", "preference_eval", "prompts_train", "prompts_eval"):
        dataset = load_from_disk(str(tiny_run / "data" / name))
        repeats = data_report[name]["held_out"]["removed_from_eval"] if name.endswith("_eval") else 0
        assert len(dataset) == data_report[name]["prepare"]["kept"] - repeats > 0
    assert check_score_head_saved(tiny_run / "reward")
    reward_metrics = read_json(tiny_run / "reward" / "reward_metrics.json")["metrics"]
    assert reward_metrics["eval_pairwise_accuracy"] > 0.8  # the planted preference is learnable
    model = MultiAdapterModel.from_pretrained(str(tiny_run / "base_model"), from_saved=str(tiny_run / "ppo" / "final"))
    assert set(model.roles) >= {"policy", "reward", "reference"}
    # export/ has the save_adapters layout too
    MultiAdapterModel.from_pretrained(str(tiny_run / "base_model"), from_saved=str(tiny_run / "export"))
    for png in ("training_curves.png", "reward_histogram.png"):
        content = (tiny_run / "evaluate" / png).read_bytes()
        assert content.startswith(b"\x89PNG\r\n\x1a\n") and len(content) > 5000
    history = read_json(tiny_run / "ppo" / "log_history.json")
    assert sum("objective/kl" in entry for entry in history) == read_json(tiny_run / "ppo" / "stage.json")[
        "result"]["metrics"]["iterations"]


@pytest.mark.slow
def test_aligned_policy_beats_the_base_on_held_out_prompts(tiny_run):
    metrics = read_json(tiny_run / "evaluate" / "metrics.json")
    assert set(metrics) >= {"base", "aligned", "win_rate", "num_prompts"}
    for policy in ("base", "aligned"):
        assert set(metrics[policy]) >= {"mean_reward", "kl_full", "response_length", "response_length_median",
                                        "response_length_p10", "response_length_p90", "stop_rate", "exact_match",
                                        "f1"}
        assert "kl" not in metrics[policy]  # the full-vocabulary KL is named for what it is
    assert metrics["aligned"]["mean_reward"] > metrics["base"]["mean_reward"]
    assert metrics["base"]["kl_full"] == 0.0 and metrics["aligned"]["kl_full"] > 0.0
    # Recompute the aggregates from the per-prompt samples (all of them were written).
    samples = [json.loads(line) for line in (tiny_run / "evaluate" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == metrics["num_prompts"]
    for policy in ("base", "aligned"):
        mean = sum(sample[f"{policy}_reward"] for sample in samples) / len(samples)
        assert mean == pytest.approx(metrics[policy]["mean_reward"], rel=1e-6)
    wins = sum(1.0 if s["aligned_reward"] > s["base_reward"] else 0.5 if s["aligned_reward"] == s["base_reward"]
               else 0.0 for s in samples)
    assert wins / len(samples) == pytest.approx(metrics["win_rate"])
    # The planted rule's ground truth, recounted from the texts with the definition written out here:
    # lower-cased [a-z]+ words of the response (cut at its stop token) hold a helpful and no dismissive word.
    import re
    import statistics

    from trl_multiadapter.testing.words import DISMISSIVE_WORDS, HELPFUL_WORDS

    rate, median_length = {}, {}
    for policy in ("base", "aligned"):
        words = [re.findall("[a-z]+", sample[f"{policy}_response"].lower()) for sample in samples]
        follows = [bool(set(w) & set(HELPFUL_WORDS)) and not set(w) & set(DISMISSIVE_WORDS) for w in words]
        rate[policy] = sum(follows) / len(samples)
        assert metrics[policy]["ground_truth_rate"] == pytest.approx(rate[policy])
        helpful = sum(word in HELPFUL_WORDS for w in words for word in w)
        assert metrics[policy]["helpful_words"] == pytest.approx(helpful / len(samples))
        lengths = [len(sample[f"{policy}_response_ids"]) for sample in samples]
        median_length[policy] = statistics.median(lengths)
        assert metrics[policy]["response_length_median"] == pytest.approx(median_length[policy])
    # Real learning, measured without the reward model: the planted rule is followed at least 20 points more
    # often than by the base (128 samples carry ~6 points of noise), and the answers did not collapse.
    assert rate["aligned"] >= rate["base"] + 0.20, rate
    assert median_length["aligned"] >= median_length["base"] / 2, median_length
    report = (tiny_run / "report.md").read_text()
    headline = report[report.index("## Base vs aligned policy"):report.index("## Time and cost")]
    assert headline.index("`ground_truth_rate`") < headline.index("`mean_reward`")
    assert f"## Sample generations ({len(samples)} held-out prompts)" in report
    assert "![training curves](evaluate/training_curves.png)" in report
    # SQuAD scores: every prompt is scored or counted as skipped (with the reason in the key name).
    from trl_multiadapter.data import squad_scores

    assert metrics["squad"]["scored"] + metrics["squad"]["skipped_unanswerable"] == metrics["num_prompts"]
    for policy in ("base", "aligned"):
        again = squad_scores([s[f"{policy}_response"] for s in samples], [s["answers"] for s in samples])
        assert again["version"] == metrics["squad"]["version"] and again["scored"] == metrics["squad"]["scored"]
        assert again["exact_match"] == pytest.approx(metrics[policy]["exact_match"])


@pytest.mark.slow
def test_exported_policy_loads_with_plain_peft_and_generates(tiny_run):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from trl_multiadapter.testing import build_tiny_tokenizer

    policy_dir = tiny_run / "export" / "policy"
    config = read_json(policy_dir / "adapter_config.json")
    assert Path(config["base_model_name_or_path"]) == (tiny_run / "base_model").resolve()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_run / "base_model"))
    model = PeftModel.from_pretrained(base, str(policy_dir)).eval()
    # The exported weights are the PPO stage's final policy adapter, unchanged.
    exported = load_file(str(policy_dir / "adapter_model.safetensors"))
    trained = load_file(str(tiny_run / "ppo" / "final" / "policy" / "adapter_model.safetensors"))
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[key], trained[key]) for key in exported)
    tokenizer = build_tiny_tokenizer()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Who went to the bakery?"}],
                                        add_generation_prompt=True, tokenize=True, return_dict=False)
    output = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=5, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] > len(ids)
    card = (tiny_run / "export" / "README.md").read_text()  # one real card at the top of the export ...
    assert (policy_dir / "README.md").read_text() == card  # ... and in the folder the hub push uploads
    for heading in ("## Data", "## Hyperparameters", "## Metrics", "## Intended use", "LORA_ADAPTERS",
                    "--lora-modules", "built-in tiny model `builtin:tiny`", "kl_full"):
        assert heading in card
    assert "[More Information Needed]" not in card and str(tiny_run.parent) not in card
    assert (tiny_run / "export" / "value_head.safetensors").is_file()
    assert (tiny_run / "export" / "reward" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_report_numbers_follow_from_the_stage_results(tiny_run):
    report = read_json(tiny_run / "report.json")
    assert list(report["stages"]) == list(BUILTIN_STAGES)
    for name, entry in report["stages"].items():
        result = read_json(tiny_run / name / "stage.json")["result"]
        assert entry["wall_time_s"] == result["wall_time_s"] > 0
        if result["samples"]:
            assert entry["samples_per_s"] == pytest.approx(result["samples"] / result["wall_time_s"])
        if result["tokens"]:
            assert entry["tokens_per_s"] == pytest.approx(result["tokens"] / result["wall_time_s"])
        assert entry["usd_per_sample"] is None  # tiny_cpu has no instance price
    ppo = read_json(tiny_run / "ppo" / "stage.json")["result"]
    assert ppo["samples"] == ppo["metrics"]["iterations"] * 16  # batch_size 16, one process
    assert "| ppo | ran |" in (tiny_run / "report.md").read_text()


def test_report_costs_from_the_instance_price():
    from trl_multiadapter.report import stage_costs

    costs = stage_costs(wall_time_s=1800.0, samples=450, tokens=90_000, price_per_hour=7.09)
    assert costs["usd"] == pytest.approx(3.545)
    assert costs["usd_per_sample"] == pytest.approx(3.545 / 450)
    assert costs["usd_per_1k_tokens"] == pytest.approx(3.545 / 90)
    assert costs["samples_per_s"] == pytest.approx(0.25)


@pytest.mark.slow
def test_rerun_of_a_finished_run_only_checks_and_skips(tiny_run, capsys):
    before = {path: path.stat().st_mtime_ns for path in tiny_run.rglob("*") if path.is_file()
              and path.name not in ("report.json", "report.md", "recipe.yaml")}
    assert cli.main(["run", "tiny_cpu", "--output_dir", str(tiny_run), *override_args()]) == 0
    out = capsys.readouterr().out
    assert all(f"[{stage}] skipped" in out for stage in BUILTIN_STAGES)
    assert "running" not in out
    after = {path: path.stat().st_mtime_ns for path in before}
    assert after == before
    report = read_json(tiny_run / "report.json")
    assert {entry["status"] for entry in report["stages"].values()} == {"skipped"}


@pytest.mark.slow
def test_changed_recipe_does_not_reuse_a_finished_stage(tiny_run, capsys):
    code = cli.main(["ppo", "tiny_cpu", "--output_dir", str(tiny_run), *override_args(),
                     "--set", "reward.learning_rate=0.5"])
    err = capsys.readouterr().err
    assert code == 2
    assert "holds a finished 'reward' stage of a different recipe" in err


# ------------------------------------------------------------------------------------ resume after kill


def _checkpoints(ppo_dir: Path) -> list[Path]:
    return sorted(ppo_dir.glob("checkpoint-*")) if ppo_dir.is_dir() else []


@pytest.mark.slow
def test_killed_ppo_stage_resumes_and_matches_an_uninterrupted_run(tiny_run, tmp_path):
    import torch
    from safetensors.torch import load_file

    run_dir = copy_finished_stages(tiny_run, tmp_path / "run")
    argv = ["ppo", "tiny_cpu", "--output_dir", str(run_dir), *override_args()]
    process = subprocess.Popen([sys.executable, "-m", "trl_multiadapter", *argv], env=cli_env(), cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    try:
        while not _checkpoints(run_dir / "ppo"):
            assert process.poll() is None, f"the PPO run ended before its first checkpoint: {process.stderr.read()}"
            assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (run_dir / "ppo" / "stage.json").exists()
    first_checkpoint = _checkpoints(run_dir / "ppo")[0].name

    rerun = run_cli_subprocess(*argv)
    assert rerun.returncode == 0, rerun.stderr
    assert "[data] skipped" in rerun.stdout and "[reward] skipped" in rerun.stdout
    assert f"[ppo] resuming from {run_dir / 'ppo'}" in rerun.stdout  # the console says which checkpoint
    result = read_json(run_dir / "ppo" / "stage.json")["result"]
    metrics = result["metrics"]
    assert Path(metrics["resumed_from"]).name.startswith("checkpoint-")
    resumed_at = int(Path(metrics["resumed_from"]).name.split("-")[1])
    assert resumed_at >= int(first_checkpoint.split("-")[1])
    # Throughput counts what the resumed process did, not the iterations before its checkpoint.
    batch_size = read_json(tiny_run / "ppo" / "final" / "ppo_config.json")["batch_size"]
    assert metrics["iterations_this_run"] == metrics["iterations"] - resumed_at
    assert result["samples"] == (metrics["iterations"] - resumed_at) * batch_size
    for relative in ("policy/adapter_model.safetensors", "value_head.safetensors"):
        resumed = load_file(str(run_dir / "ppo" / "final" / relative))
        uninterrupted = load_file(str(tiny_run / "ppo" / "final" / relative))
        assert resumed.keys() == uninterrupted.keys()
        for key in resumed:
            torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------- cpu_ddp


@pytest.mark.slow
@pytest.mark.distributed
def test_cpu_ddp_runs_the_ppo_stage_with_two_processes(tiny_run, tmp_path):
    import torch

    run_dir = copy_finished_stages(tiny_run, tmp_path / "run")
    result = run_cli_subprocess("ppo", "tiny_cpu", "--output_dir", str(run_dir), "--accelerate_config", "cpu_ddp",
                                "--set", "ppo.max_steps=2", "--set", "ppo.save_steps=2",
                                env=cli_env(OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-4000:]
    stage = read_json(run_dir / "ppo" / "stage.json")["result"]
    assert stage["metrics"]["iterations"] == 2
    assert stage["samples"] == 2 * 16 * 2  # iterations x batch_size per process x 2 processes
    checkpoint = run_dir / "ppo" / "checkpoint-2"
    assert sorted(path.name for path in checkpoint.glob("rng_state_*.pth")) == ["rng_state_0.pth",
                                                                                 "rng_state_1.pth"]
    assert torch.load(checkpoint / "ppo_state.pt", weights_only=False)["num_processes"] == 2


# -------------------------------------------------------------------------------------------- plugins


def install_example_plugin(site: Path) -> dict[str, str]:
    """A dist-info with the example package's real entry point, importable through PYTHONPATH."""
    site.mkdir()
    info = site / "trl_multiadapter_example_plugin-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: trl-multiadapter-example-plugin\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(
        "[trl_multiadapter.plugins]\nexample = trl_multiadapter_example.plugin:register\n")
    python_path = os.pathsep.join([str(site), str(EXAMPLE_PLUGIN), os.environ.get("PYTHONPATH", "")])
    return cli_env(PYTHONPATH=python_path.rstrip(os.pathsep))


@pytest.mark.slow
def test_plugin_stage_from_an_entry_point_runs_after_the_builtin_stages(tiny_run, tmp_path):
    run_dir = copy_finished_stages(tiny_run, tmp_path / "run", stages=BUILTIN_STAGES)
    env = install_example_plugin(tmp_path / "site")
    result = run_cli_subprocess(
        "run", "tiny_cpu", "--output_dir", str(run_dir), *override_args(),
        "--set", "stages=[data, reward, ppo, evaluate, export, keyword_report]",
        "--set", "stage_options={keyword_report: {keywords: [gladly, certainly, thanks]}}", env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert all(f"[{stage}] skipped" in result.stdout for stage in BUILTIN_STAGES)
    assert "[keyword_report] done" in result.stdout
    report = read_json(run_dir / "keyword_report" / "keyword_report.json")
    samples = [json.loads(line) for line in (run_dir / "evaluate" / "samples.jsonl").read_text().splitlines()]
    keywords = {"gladly", "certainly", "thanks"}
    for policy in ("base", "aligned"):
        counts = [sum(word.strip(".,!?;:").lower() in keywords for word in s[f"{policy}_response"].split())
                  for s in samples]
        assert report[policy] == pytest.approx(sum(counts) / len(samples))
    assert read_json(run_dir / "report.json")["stages"]["keyword_report"]["samples"] == len(samples)


def test_unknown_plugin_stage_is_a_recipe_error(capsys):
    code = cli.main(["run", "tiny_cpu", "--dry_run", "--set", "stages=[data, keyword_reprot]"])
    assert code == 2 and "stages[1]: unknown stage 'keyword_reprot'" in capsys.readouterr().err


def test_example_plugin_reward_function_and_data_source(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE_PLUGIN))
    from trl_multiadapter_example import plugin

    from trl_multiadapter.registry import Registries

    registries = Registries(builtin_modules={"data_sources": (), "reward_functions": (), "stages": ()})
    plugin.register(registries)
    reward = registries.reward_functions.get("keyword_reward")
    assert reward(["Gladly, sure!", "no", [{"role": "assistant", "content": "thanks thanks"}]]) == [2.0, 0.0, 2.0]
    lines = tmp_path / "prompts.txt"
    lines.write_text("Where is the river?\n\nWho baked the bread?\n")
    dataset = registries.data_sources.get("prompt_lines")(str(lines), system_prompt="Be brief.")
    assert dataset["prompt"][1] == [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Who baked the bread?"}]


# -------------------------------------------------------------------------------- generate, data, report


@pytest.mark.slow
def test_generate_command_matches_plain_peft_greedy_decoding(tiny_run, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trl_multiadapter.testing import build_tiny_tokenizer

    base_dir, adapter_dir = tiny_run / "base_model", tiny_run / "export" / "policy"
    question = "Who went to the bakery to choose a heavy violin?"
    code = cli.main(["generate", "--base", str(base_dir), "--adapter", str(adapter_dir), "--prompt", question,
                     "--greedy", "--max_new_tokens", "6"])
    assert code == 0
    out = capsys.readouterr().out
    tokenizer = build_tiny_tokenizer()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(adapter_dir)).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    output = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(output[0, len(ids):], skip_special_tokens=True).strip()
    assert out == f">>> {question}\n{expected}\n\n"


def test_report_shows_the_seed_article_beside_ours_on_the_same_instance(tmp_path):
    from trl_multiadapter import recipe
    from trl_multiadapter.pipeline import StageOutcome, StageResult
    from trl_multiadapter.report import build_report, format_markdown

    loaded = recipe.load("hh_squad", [f"output_dir={tmp_path}"])
    outcome = StageOutcome("ppo", "ran", StageResult(samples=1000, tokens=400_000, wall_time_s=3600.0))
    report = build_report(loaded, [outcome])
    ppo = report["stages"]["ppo"]
    assert ppo["usd_per_sample"] == pytest.approx(7.09 / 1000)
    assert ppo["usd_per_1k_tokens"] == pytest.approx(7.09 / 400)
    assert report["reference"]["stages"]["ppo"]["usd_per_sample"] == 0.0079
    markdown = format_markdown(report)
    assert "Beside the seed article" in markdown and "~$0.0079 / sample" in markdown
    other = recipe.load("hh_squad", [f"output_dir={tmp_path}", "instance.name=ml.p4d.24xlarge"])
    assert "reference" not in build_report(other, [outcome])


@pytest.mark.slow
def test_ppo_command_takes_a_flat_trl_style_config(tiny_run, tmp_path, capsys):
    import yaml
    from datasets import load_from_disk

    prompts = load_from_disk(str(tiny_run / "data" / "prompts_train")).select(range(8))
    prompts_file = tmp_path / "prompts.jsonl"
    prompts.select_columns(["prompt"]).to_json(str(prompts_file))
    config = tmp_path / "ppo.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": str(tiny_run / "base_model"), "reward_adapter": str(tiny_run / "reward"),
        "dataset_name": str(prompts_file), "output_dir": str(tmp_path / "ignored"), "learning_rate": 0.002,
        "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1, "max_new_tokens": 4, "max_steps": 2,
        "save_strategy": "no", "report_to": "none", "lora_r": 4,
    }))
    assert cli.main(["ppo", "--config", str(config), "--output_dir", str(tmp_path / "out")]) == 0
    final = tmp_path / "out" / "final"
    saved = json.loads((final / "ppo_config.json").read_text())
    assert (saved["learning_rate"], saved["batch_size"], saved["max_steps"]) == (0.002, 4, 2)
    assert read_json(final / "policy" / "adapter_config.json")["r"] == 4
    assert not (tmp_path / "ignored").exists()  # --output_dir wins over the file, as in TRL


@pytest.mark.slow
def test_bundled_recipes_run_by_name_from_a_plain_wheel_install(tmp_path):
    """Build the wheel, install it (not editable) into a folder, and dry-run both recipes by name from outside
    the source tree: recipes and accelerate configs must ship as package data."""
    source = tmp_path / "src"
    subprocess.run([sys.executable, str(REPO / "ci" / "copy_source.py"), str(REPO), str(source)], check=True,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("trl_multiadapter-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True)
    code = ("import sys, trl_multiadapter\n"
            "assert trl_multiadapter.__file__.startswith(sys.argv[1]), trl_multiadapter.__file__\n"
            "from trl_multiadapter.cli import main\n"
            "sys.exit(main(['run', sys.argv[2], '--dry_run']))\n")
    env = cli_env(PYTHONPATH=str(tmp_path / "site"))
    for name, processes in (("hh_squad", 4), ("tiny_cpu", 1)):
        result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site"), name], capture_output=True,
                                text=True, env=env, cwd=tmp_path, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"Recipe: {tmp_path / 'site' / 'trl_multiadapter' / 'recipes' / name}.yaml" in result.stdout
        assert f"Processes: {processes}" in result.stdout


@pytest.mark.slow
def test_merged_export_equals_base_plus_adapter(tiny_run, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trl_multiadapter.export import merge_policy
    from trl_multiadapter.testing import build_tiny_tokenizer

    base_dir, policy_dir = tiny_run / "base_model", tiny_run / "export" / "policy"
    merge_policy(str(base_dir), policy_dir, tmp_path / "merged", "float32", build_tiny_tokenizer())
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(policy_dir))
    input_ids = torch.tensor([[0, 2, 17, 44, 3, 99, 230, 511, 4]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids).logits, with_adapter.eval()(input_ids).logits,
                                   rtol=1e-4, atol=1e-5)


def test_hub_push_without_network_fails_before_any_stage(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out_dir = tmp_path / "run"
    code = cli.main(["run", "tiny_cpu", "--output_dir", str(out_dir), "--set", "export.push_to_hub=true",
                     "--set", "export.hub_model_id=someone/tiny-policy"])
    err = capsys.readouterr().err
    assert code == 2 and "export.push_to_hub: the Hugging Face Hub is switched off here" in err
    assert not out_dir.exists()
