"""Data sources are checked before any work: ``--dry_run`` and ``run`` stop in seconds, in one line naming
the recipe key, the file, what it is and the fix; nothing is written into the run folder.

Every bad source is a fixture in a real shape: a Git LFS pointer, a JSON array saved as ``.jsonl``, the
original ``dev-v1.1.json`` + ``dev-v2.0.json`` pair, hh-rlhf rows given as SQuAD, a folder without the
train split.
"""

from __future__ import annotations

import json
import time

import pytest

from trl_multiadapter import cli, recipe
from trl_multiadapter.pipeline import check_data_sources, run_pipeline
from trl_multiadapter.testing import write_tiny_hh_rlhf, write_tiny_squad

LOCAL = ["--set", "data.preference.source=hh_rlhf", "--set", "data.preference.options={}",
         "--set", "data.prompts.source=squad", "--set", "data.prompts.options={}"]


def lfs_pointer(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "ab" * 32 + "\nsize 13241\n")
    return path


@pytest.fixture
def good(tmp_path):
    return {"pairs": write_tiny_hh_rlhf(tmp_path / "good" / "pairs.jsonl", n=20, seed=1),
            "squad": write_tiny_squad(tmp_path / "good" / "squad.json", n=20, seed=2)}


def bad_sources(tmp_path, good) -> dict[str, tuple[list[str], str, list[str]]]:
    """name -> (overrides, expected key path, words the one line must hold)."""
    lfs_pointer(tmp_path / "hh" / "helpful-base" / "train.jsonl.gz")
    array = tmp_path / "flat.jsonl"
    array.write_text(json.dumps([{"id": "q", "context": "c", "question": "q?", "answers": {"text": [],
                                                                                        "answer_start": []}}] * 50))
    for name in ("dev-v1.1.json", "dev-v2.0.json", "train-v1.1.json"):
        write_tiny_squad(tmp_path / "squad" / name, n=5, seed=3)
    not_gzip = tmp_path / "plain" / "train.jsonl.gz"
    not_gzip.parent.mkdir()
    not_gzip.write_bytes(good["pairs"].read_bytes())
    only_test = tmp_path / "only-test"
    write_tiny_hh_rlhf(only_test / "test.jsonl", n=3)
    return {
        "lfs_pointer": (["data.preference.path=" + str(tmp_path / "hh"), "data.preference.data_dir=helpful-base"],
                        "data.preference.path", ["train.jsonl.gz", "Git LFS pointer", "git lfs pull"]),
        "json_array_as_jsonl": ([f"data.prompts.path={array}"], "data.prompts.path",
                                ["flat.jsonl", "JSON array, not JSON lines", "rename it to flat.json"]),
        "two_dev_files": ([f"data.prompts.path={tmp_path / 'squad'}"], "data.prompts.eval_split",
                          ["dev-v1.1.json, dev-v2.0.json", "eval_files"]),
        "data_dir_with_a_file": ([f"data.preference.path={good['pairs']}", "data.preference.data_dir=helpful-base"],
                                 "data.preference.data_dir", ["not to the file", "remove data_dir"]),
        "pairs_given_as_squad": ([f"data.prompts.path={good['pairs']}"], "data.prompts.path",
                                 ["first 5 rows have no SQuAD records", "keys chosen, rejected"]),
        "not_gzip": ([f"data.preference.path={not_gzip}"], "data.preference.path", ["not gzip-compressed"]),
        "no_train_split": ([f"data.preference.path={only_test}"], "data.preference.train_split",
                           ["no 'train' file", "it holds: test.jsonl"]),
        "missing_train_file": ([f"data.preference.path={only_test}", "data.preference.train_files=[train-a.jsonl]"],
                               "data.preference.train_files", ["train-a.jsonl", "no such file"]),
    }


def cli_args(tmp_path, good, overrides, *extra):
    base = [f"data.preference.path={good['pairs']}", "data.preference.data_dir=null", f"data.prompts.path={good['squad']}"]
    sets = [arg for override in [*base, *overrides] for arg in ("--set", override)]
    return ["run", "tiny_cpu", "--output_dir", str(tmp_path / "run"), *LOCAL, *sets, *extra]


@pytest.mark.parametrize("name", ["lfs_pointer", "json_array_as_jsonl", "two_dev_files", "data_dir_with_a_file",
                                  "pairs_given_as_squad", "not_gzip", "no_train_split", "missing_train_file"])
@pytest.mark.parametrize("mode", ["--dry_run", "run"])
def test_a_bad_source_stops_run_and_dry_run_in_one_line_before_any_work(tmp_path, good, capsys, name, mode):
    overrides, key, words = bad_sources(tmp_path, good)[name]
    started = time.perf_counter()
    code = cli.main(cli_args(tmp_path, good, overrides, *(["--dry_run"] if mode == "--dry_run" else [])))
    seconds = time.perf_counter() - started
    out, err = capsys.readouterr()
    assert code == 2, err
    assert seconds < 10  # the checks read a few KiB; most of this is loading the recipe
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"trl-multiadapter run: error: {key}: ")
    for word in words:
        assert word in lines[0], lines[0]
    assert "Fix: " in lines[0]
    assert not (tmp_path / "run").exists()  # nothing written: no recipe.yaml, no base model


def test_a_good_local_recipe_dry_runs_with_notes_on_carved_splits(tmp_path, good, capsys):
    assert cli.main(cli_args(tmp_path, good, [], "--dry_run")) == 0
    out = capsys.readouterr().out
    assert f"Data source: data.preference eval: {good['pairs']} is one split: the data stage holds out train rows" in out
    assert f"Data source: data.prompts eval: {good['squad']} is one split" in out
    assert out.rstrip().endswith("Dry run: the recipe is valid; nothing was run.")


def test_the_data_stage_checks_before_writing_the_base_model(tmp_path, good):
    pointer = lfs_pointer(tmp_path / "clone" / "train.jsonl.gz")
    loaded = recipe.load("tiny_cpu", [f"output_dir={tmp_path / 'run'}", "stages=[data]",
                                      "data.preference.source=hh_rlhf", f"data.preference.path={pointer.parent}",
                                      "data.preference.data_dir=null", "data.preference.options={}"])
    with pytest.raises(recipe.RecipeError, match="data.preference.path: .*Git LFS pointer"):
        run_pipeline(loaded)
    assert not (tmp_path / "run" / "base_model").exists()
    assert not any((tmp_path / "run" / "data").iterdir())  # the runner made the folder; the stage wrote nothing


def test_an_unreachable_hub_id_stops_run_fast_but_only_notes_in_a_dry_run(tmp_path, good, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    hub = ["data.preference.path=Anthropic/hh-rlhf", "data.preference.data_dir=helpful-base"]
    started = time.perf_counter()
    assert cli.main(cli_args(tmp_path, good, hub)) == 2
    assert time.perf_counter() - started < 10
    err = capsys.readouterr().err.strip()
    assert err.startswith("trl-multiadapter run: error: data.preference.path: hub dataset 'Anthropic/hh-rlhf': "
                          "HF_HUB_OFFLINE is set") and "\n" not in err
    assert not (tmp_path / "run").exists()
    assert cli.main(cli_args(tmp_path, good, hub, "--dry_run")) == 0
    out = capsys.readouterr().out
    assert out.count("hub dataset 'Anthropic/hh-rlhf'") == 1 and "a run stops here" in out


def test_finished_data_stage_is_not_checked_again(tmp_path, good):
    loaded = recipe.load("tiny_cpu", [f"output_dir={tmp_path / 'run'}", "data.preference.source=hh_rlhf",
                                      f"data.preference.path={good['pairs']}", "data.preference.data_dir=null",
                                      "data.preference.options={}"])
    from trl_multiadapter.pipeline import data_stage_pending

    assert data_stage_pending(loaded)
    (tmp_path / "run" / "data").mkdir(parents=True)
    (tmp_path / "run" / "data" / "stage.json").write_text("{}")
    assert not data_stage_pending(loaded)
    assert check_data_sources(loaded) == [
        f"data.preference eval: {good['pairs']} is one split: the data stage holds out train rows"]
