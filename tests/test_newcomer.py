"""What a newcomer hit in the first hour, each reproduced through the CLI as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trl_multiadapter.launch import read_accelerate_config

REPO = Path(__file__).resolve().parents[1]


def cli(*argv: str, timeout: int = 120, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
                   **env}
    environment.pop("TRL_MULTIADAPTER_LAUNCHED", None)
    return subprocess.run([sys.executable, "-m", "trl_multiadapter", *argv], capture_output=True, text=True,
                          env=environment, timeout=timeout, cwd=REPO)


@pytest.mark.parametrize(("name", "asks_for_gpus"), [("g5_12xlarge", True), ("single_gpu", True),
                                                     ("multi_node_example", True), ("cpu_ddp", False)])
def test_gpu_requests_come_from_what_the_config_asks_for(name, asks_for_gpus):
    assert bool(read_accelerate_config(name).gpu_requests) == asks_for_gpus


def test_a_gpu_launch_config_on_a_cpu_machine_stops_in_one_line_before_launching(tmp_path):
    """Following the 4-bit error's advice on CPU used to launch 4 MULTI_GPU processes and end in ~450 lines."""
    result = cli("run", "hh_squad", "--set", "quantization.load_in_4bit=false", "--set", "model.dtype=float32",
                 "--output_dir", str(tmp_path / "run"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "g5_12xlarge" in lines[0] and "no CUDA device" in lines[0] and "--accelerate_config cpu_ddp" in lines[0]
    assert "[rank" not in result.stderr and not (tmp_path / "run").exists()


def test_traceback_is_accepted_after_the_subcommand(tmp_path):
    result = cli("run", "tiny_cpu", "--set", "ppo.no_such_key=1", "--traceback", "--output_dir", str(tmp_path))
    assert "unrecognized arguments" not in result.stderr
    assert "Traceback (most recent call last)" in result.stderr  # the flag took effect
    short = cli("run", "tiny_cpu", "--set", "ppo.no_such_key=1", "--output_dir", str(tmp_path))
    lines = short.stderr.strip().splitlines()
    assert short.returncode == 2 and len(lines) == 1


@pytest.mark.slow
def test_a_refused_rerun_writes_nothing(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    kept = {name: (run_dir / name).read_bytes() for name in ("recipe.yaml", "report.md", "report.json")}
    result = cli("run", "tiny_cpu", "--output_dir", str(run_dir), "--set", "ppo.learning_rate=1.0e-4",
                 "--set", "evaluate.num_shown_samples=1000")
    assert result.returncode == 2 and "different recipe" in result.stderr
    for name, content in kept.items():
        assert (run_dir / name).read_bytes() == content, f"{name} was rewritten by a refused run"


@pytest.mark.slow
def test_the_run_ends_with_a_base_vs_aligned_line_and_plain_progress(tiny_run):
    log = (tiny_run.parent / "run.log").read_text()
    assert "[ppo] iteration" in log and "ETA" in log  # no TTY: plain progress lines
    closing = [line for line in log.splitlines() if line.startswith("result: ")]
    assert closing and "ground truth" in closing[0] and "base" in closing[0] and "aligned" in closing[0]
    report = json.loads((tiny_run / "report.json").read_text())
    assert report["headline"]["rows"][0]["key"] == "ground_truth_rate"


def test_an_unreachable_hub_model_fails_fast_in_one_line_naming_it(tmp_path):
    import time

    started = time.monotonic()
    result = cli("run", "tiny_cpu", "--set", "model.name_or_path=no-such-org/no-such-model",
                 "--output_dir", str(tmp_path / "run"))
    assert result.returncode == 2
    ours = result.stderr.strip().splitlines()
    assert len(ours) == 1 and "no-such-org/no-such-model" in ours[0] and "HF_HUB_OFFLINE" in ours[0], result.stderr
    assert time.monotonic() - started < 30 and not (tmp_path / "run").exists()


def test_a_bad_row_error_names_the_recipe_key_that_skips_it(tmp_path):
    from trl_multiadapter.data import load_hh_rlhf, load_squad_prompts

    bad_pairs = tmp_path / "train.jsonl"
    bad_pairs.write_text(json.dumps({"chosen": "no speaker markers at all", "rejected": "none here either"}) + "\n")
    with pytest.raises(ValueError, match=r"data\.preference\.on_malformed: skip"):
        load_hh_rlhf(bad_pairs, on_bad_row="error")
    bad_squad = tmp_path / "squad.json"
    bad_squad.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [{
        "context": "Ada fixed the kettle.", "qas": [{"id": "q1", "question": "Who?",
                                                      "answers": [{"text": "Ada", "answer_start": None}]}]}]}]}))
    with pytest.raises(ValueError, match=r"data\.prompts\.on_malformed: skip"):
        load_squad_prompts(bad_squad, on_bad_row="error")


def test_plain_progress_prints_at_least_every_tenth_and_the_end():
    import io

    from trl_multiadapter.progress import plain_progress

    stream = io.StringIO()
    report = plain_progress("evaluate prompts", stream)
    for done in range(8, 129, 8):  # 16 batches of 8 prompts
        report(done, 128)
    lines = stream.getvalue().splitlines()
    counts = [int(line.split("] ")[1].split("/")[0]) for line in lines]
    assert counts[-1] == 128 and all(b - a <= 128 // 10 + 8 for a, b in zip([0, *counts], counts))
    assert all(line.startswith("[evaluate prompts] ") and "ETA" in line for line in lines)


def test_a_flat_ppo_config_with_a_gpu_launch_config_stops_in_one_line_too(tmp_path):
    flat = tmp_path / "ppo.yaml"
    flat.write_text(f"model_name_or_path: builtin:tiny\ndataset_name: {tmp_path / 'prompts.jsonl'}\n"
                    f"output_dir: {tmp_path / 'out'}\n")
    result = cli("ppo", "--config", str(flat), "--accelerate_config", "g5_12xlarge")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "--accelerate_config: accelerate config 'g5_12xlarge' asks for GPUs" in lines[0]
    assert not (tmp_path / "out").exists()
