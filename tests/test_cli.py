"""The command line: help, env report, dispatch and one-line errors with the documented exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from importlib import metadata

import pytest

from trl_multiadapter import cli
from trl_multiadapter.env_info import NOT_INSTALLED, REPORTED_PACKAGES


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python -m trl_multiadapter`` in a fresh process, from outside the source tree."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "trl_multiadapter", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tempfile.gettempdir(),
    )


def expected_version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return NOT_INSTALLED


@pytest.fixture(scope="module")
def env_json() -> dict:
    result = run_cli("env", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_help_lists_every_subcommand_and_exits_zero():
    result = run_cli("--help")
    assert result.returncode == 0
    assert result.stdout.startswith(f"usage: {cli.PROG}")
    for subcommand in cli.SUBCOMMANDS:
        assert subcommand.name in result.stdout
    assert "Traceback" not in result.stderr


def test_help_does_not_import_torch():
    code = (
        "import sys, contextlib, io\n"
        "from trl_multiadapter.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(['--help'])\n"
        "    except SystemExit: pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_env_json_reports_installed_versions(env_json):
    assert list(env_json["packages"]) == list(REPORTED_PACKAGES)
    for distribution in REPORTED_PACKAGES:
        assert env_json["packages"][distribution] == expected_version(distribution), distribution
    assert env_json["python"].split()[0] == ".".join(map(str, sys.version_info[:3]))


def test_env_json_reports_devices(env_json):
    import torch

    expected_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert env_json["cpu_cores"] == expected_cores
    assert len(env_json["cuda_devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    for device in env_json["cuda_devices"]:
        properties = torch.cuda.get_device_properties(device["index"])
        assert device["name"] == properties.name
        assert device["total_memory_gib"] == pytest.approx(properties.total_memory / 2**30, abs=0.06)
    has_bnb = expected_version("bitsandbytes") != NOT_INSTALLED
    four_bit_possible = has_bnb and bool(env_json["cuda_devices"])
    assert env_json["four_bit"].startswith("yes" if four_bit_possible else "no")


def test_env_text_prints_each_version_on_its_own_line():
    result = run_cli("env")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line.split(None, 1)[1] for line in result.stdout.splitlines() if line.strip()}
    for distribution in REPORTED_PACKAGES:
        assert lines[distribution] == expected_version(distribution)
    assert {"python", "cpu", "cuda", "bf16", "4-bit"} <= set(lines)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("no-such-command",), "invalid choice: 'no-such-command'"),
        (("env", "--no-such-flag"), "unrecognized arguments: --no-such-flag"),
        (("--no-such-flag",), "--no-such-flag"),
    ],
)
def test_usage_errors_exit_2_with_one_line_and_no_traceback(args, expected):
    result = run_cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n")
    assert expected in result.stderr
    assert result.stdout == ""


def test_no_subcommand_prints_help_and_exits_2(capsys):
    assert cli.main([]) == cli.EXIT_USAGE
    assert "commands:" in capsys.readouterr().err


def test_console_script_targets_main():
    scripts = metadata.entry_points(group="console_scripts")
    (script,) = [ep for ep in scripts if ep.name == cli.PROG]
    assert script.value == "trl_multiadapter.cli:main"


def _subcommand(name, run, add_arguments=lambda parser: parser.add_argument("--value", type=int)):
    return cli.Subcommand(name, f"{name} help", add_arguments, run)


def test_dispatch_passes_parsed_arguments_and_returns_the_exit_code():
    seen = {}

    def run(args):
        seen["value"] = args.value
        return 7

    commands = (*cli.SUBCOMMANDS, _subcommand("demo", run))
    assert cli.main(["demo", "--value", "41"], subcommands=commands) == 7
    assert seen == {"value": 41}


def test_bad_flag_value_is_a_usage_error(capsys):
    commands = (_subcommand("demo", lambda args: 0),)
    assert cli.main(["demo", "--value", "forty"], subcommands=commands) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "invalid int value: 'forty'" in err and err.count("\n") == 1


@pytest.mark.parametrize("error", [ValueError("ppo.mini_batch_size must divide batch_size"), FileNotFoundError("x.yaml")])
def test_user_errors_are_one_line_with_exit_1(capsys, error):
    def run(args):
        raise error

    assert cli.main(["demo"], subcommands=(_subcommand("demo", run),)) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err == f"{cli.PROG} demo: error: {error}\n"


def test_traceback_flag_reraises_user_errors():
    def run(args):
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        cli.main(["--traceback", "demo"], subcommands=(_subcommand("demo", run),))


def test_programming_errors_are_not_hidden():
    def run(args):
        raise ZeroDivisionError("bug")

    with pytest.raises(ZeroDivisionError):
        cli.main(["demo"], subcommands=(_subcommand("demo", run),))


# --------------------------------------------------------------------------- generate: bad adapters


def our_stderr_lines(stderr: str) -> list[str]:
    # bitsandbytes looks up its CPU kernels on the hub when peft imports it and, offline, prints two
    # lines naming "kernels-community"; they are the environment's, not this command's.
    return [line for line in stderr.splitlines() if "kernels-community" not in line]


def write_adapter(path, task: str, hidden_size: int = 64):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from trl_multiadapter.testing import tiny_llama_config

    config = tiny_llama_config("tiny")
    config.hidden_size, config.intermediate_size = hidden_size, 2 * hidden_size
    torch.manual_seed(0)
    model = (LlamaForCausalLM if task == "CAUSAL_LM" else LlamaForSequenceClassification)(config)
    get_peft_model(model, LoraConfig(task_type=task, r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(path)
    return str(path)


def test_generate_with_an_adapter_of_another_model_size_is_one_line_with_the_fix(tmp_path):
    adapter = write_adapter(tmp_path / "wide", "CAUSAL_LM", hidden_size=96)  # the tiny base has 64
    result = run_cli("generate", "--base", "builtin:tiny", "--adapter", adapter, "--prompt", "Hello")
    assert result.returncode == cli.EXIT_USER_ERROR
    assert "Traceback" not in result.stderr and result.stdout == ""
    (line,) = our_stderr_lines(result.stderr)
    assert line.startswith(f"{cli.PROG} generate: error: --adapter {adapter} does not fit --base builtin:tiny")
    assert "[4, 96]" in line and "[4, 64]" in line and "pass as --base the model the adapter was trained on" in line


def test_generate_refuses_a_reward_adapter_in_one_line(tmp_path):
    adapter = write_adapter(tmp_path / "reward", "SEQ_CLS")
    result = run_cli("generate", "--base", "builtin:tiny", "--adapter", adapter, "--prompt", "Hello")
    assert result.returncode == cli.EXIT_USER_ERROR
    assert "Traceback" not in result.stderr and result.stdout == ""
    (line,) = our_stderr_lines(result.stderr)
    assert line == (f"{cli.PROG} generate: error: --adapter {adapter} is a reward adapter (task_type SEQ_CLS): it "
                    "scores answers and cannot generate; pass the policy adapter (task_type CAUSAL_LM), e.g. "
                    "RUN/export/policy")
