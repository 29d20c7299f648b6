"""The pipeline's data stage on real source layouts: held-out splits that are held out (for every source
form), drop counts, the drop limit, and the recipe keys of the data section.

Fixtures are synthetic files in the real layouts (``trl_multiadapter.testing``); disjointness is checked
with this file's own hashing of the saved rows.
"""

from __future__ import annotations

import gzip
import json

import pytest

from trl_multiadapter import cli, recipe
from trl_multiadapter.pipeline import run_pipeline
from trl_multiadapter.testing import write_tiny_hh_rlhf, write_tiny_squad


def run_data_stage(tmp_path, *overrides: str):
    loaded = recipe.load("tiny_cpu", [
        f"output_dir={tmp_path / 'run'}", "stages=[data]",
        "data.preference.source=hh_rlhf", "data.preference.data_dir=null", "data.preference.options={}",
        "data.prompts.source=squad", "data.prompts.options={}", "data.prompts.max_eval_samples=null",
        *overrides,
    ])
    outcome = run_pipeline(loaded)
    return tmp_path / "run" / "data", outcome.outcomes[0].result


def saved(data_dir, name):
    from datasets import load_from_disk

    return load_from_disk(str(data_dir / name))


def content(dataset, columns) -> list[str]:
    return [json.dumps([row[column] for column in columns], sort_keys=True) for row in dataset]


def assert_held_out(data_dir, kind, columns):
    train, held = saved(data_dir, f"{kind}_train"), saved(data_dir, f"{kind}_eval")
    assert len(train) > 0 and len(held) > 0
    assert not set(content(train, columns)) & set(content(held, columns)), f"{kind}: eval rows also in train"
    return train, held


def jsonl_lines(path) -> list[str]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as handle:
        return handle.read().splitlines()


PAIR = ("prompt", "chosen", "rejected")


@pytest.fixture
def sources(tmp_path):
    """Every local form of both data sets: one file, a folder holding one split, a folder of splits whose
    eval split repeats some train rows (as real train/test splits do)."""
    root = tmp_path / "sources"
    forms = {}
    pairs = write_tiny_hh_rlhf(root / "pairs.jsonl", n=60, seed=3)
    squad = write_tiny_squad(root / "squad.json", n=40, seed=4)
    forms["single_file"] = (pairs, None, squad, None)
    write_tiny_hh_rlhf(root / "hh" / "helpful-base" / "train.jsonl.gz", n=60, seed=3)
    write_tiny_squad(root / "squad-one" / "train-v1.1.json", n=40, seed=4)
    forms["one_split_folder"] = (root / "hh", "helpful-base", root / "squad-one", None)
    clone = root / "clone" / "helpful-base"
    write_tiny_hh_rlhf(clone / "train.jsonl", n=60, seed=3)
    test_lines = jsonl_lines(write_tiny_hh_rlhf(root / "tmp-test.jsonl", n=20, seed=5))
    (clone / "test.jsonl").write_text("\n".join(test_lines + jsonl_lines(clone / "train.jsonl")[:3]) + "\n")
    folder = root / "squad-two"
    write_tiny_squad(folder / "train-v1.1.json", n=40, seed=4)
    dev = json.loads(write_tiny_squad(root / "tmp-dev.json", n=20, seed=6).read_text())
    dev["data"].append(json.loads((folder / "train-v1.1.json").read_text())["data"][0])  # an article of train
    (folder / "dev-v1.1.json").write_text(json.dumps(dev))
    forms["folder_of_splits"] = (root / "clone", "helpful-base", folder, None)
    return forms


@pytest.mark.parametrize("form", ["single_file", "one_split_folder", "folder_of_splits"])
def test_every_source_form_gives_eval_rows_that_train_does_not_have(tmp_path, sources, form):
    pairs, data_dir, squad, _ = sources[form]
    out, result = run_data_stage(tmp_path, f"data.preference.path={pairs}",
                                 f"data.preference.data_dir={data_dir or 'null'}", f"data.prompts.path={squad}")
    report = json.loads((out / "data_report.json").read_text())
    _, pairs_eval = assert_held_out(out, "preference", PAIR)
    prompts_train, prompts_eval = assert_held_out(out, "prompts", ("prompt",))
    held = {kind: report[f"{kind}_eval"]["held_out"] for kind in ("preference", "prompts")}
    if form == "folder_of_splits":
        assert held["preference"]["method"] == held["prompts"]["method"] == "eval_split"
        assert held["preference"]["removed_from_eval"] == 3  # the three train rows repeated in test.jsonl
        article = json.loads((squad / "train-v1.1.json").read_text())["data"][0]
        repeated = sum(len(paragraph["qas"]) for paragraph in article["paragraphs"])
        assert held["prompts"]["removed_from_eval"] == repeated
        assert len(pairs_eval) == 20 and len(prompts_eval) == 20
        assert result.metrics["preference_eval_dropped"] == 3
    else:
        assert held["preference"]["method"] == held["prompts"]["method"] == "carved"
        assert held["preference"]["eval_fraction"] == 0.05 and held["preference"]["seed"] == 0
        assert "one split" in held["prompts"]["reason"] or "has no 'validation' split" in held["prompts"]["reason"]
        # The carve keeps whole paragraphs together: no eval context is a train context.
        assert not set(prompts_train["context"]) & set(prompts_eval["context"])
        assert held["preference"]["train_rows"] + held["preference"]["eval_rows"] == 60
        assert result.metrics["prompts_eval_held_out"] == "carved"
    assert report["preference_eval"]["held_out"] == report["preference_train"]["held_out"]


def test_eval_split_null_carves_even_when_the_source_has_one(tmp_path, sources):
    pairs, data_dir, squad, _ = sources["folder_of_splits"]
    out, _ = run_data_stage(tmp_path, f"data.preference.path={pairs}", f"data.preference.data_dir={data_dir}",
                            "data.preference.eval_split=null", "data.preference.eval_fraction=0.2",
                            f"data.prompts.path={squad}", "data.prompts.eval_split=null")
    report = json.loads((out / "data_report.json").read_text())
    assert report["preference_eval"]["held_out"]["method"] == "carved"
    assert report["preference_eval"]["held_out"]["reason"] == "eval_split is null"
    _, pairs_eval = assert_held_out(out, "preference", PAIR)
    assert len(pairs_eval) >= 12  # 20% of the 60 train rows; test.jsonl is not read
    assert report["preference_eval"]["load"] is None


def test_hub_id_splits_are_read_and_repeats_removed(tmp_path, monkeypatch):
    import datasets

    train_rows = [json.loads(line) for line in jsonl_lines(write_tiny_hh_rlhf(tmp_path / "a.jsonl", n=30, seed=1))]
    test_rows = [json.loads(line) for line in jsonl_lines(write_tiny_hh_rlhf(tmp_path / "b.jsonl", n=10, seed=2))]
    by_split = {"train": train_rows, "test": test_rows + train_rows[:2]}
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda path, data_dir=None, split=None: datasets.Dataset.from_list(by_split[split]))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "datasets--Anthropic--hh-rlhf").mkdir(parents=True)  # what an offline cache holds
    squad = write_tiny_squad(tmp_path / "squad.json", n=30, seed=4)
    out, _ = run_data_stage(tmp_path, "data.preference.path=Anthropic/hh-rlhf", "data.preference.data_dir=helpful-base",
                            f"data.prompts.path={squad}")
    report = json.loads((out / "data_report.json").read_text())
    assert report["preference_eval"]["held_out"]["method"] == "eval_split"
    assert report["preference_eval"]["held_out"]["removed_from_eval"] == 2
    _, pairs_eval = assert_held_out(out, "preference", PAIR)
    assert len(pairs_eval) == 10


def test_explicit_file_lists_choose_the_split_files(tmp_path):
    folder = tmp_path / "squad"
    write_tiny_squad(folder / "train-v1.1.json", n=30, seed=1)
    write_tiny_squad(folder / "train-v2.0.json", n=30, seed=2)
    write_tiny_squad(folder / "dev-v1.1.json", n=12, seed=3)
    write_tiny_squad(folder / "dev-v2.0.json", n=12, seed=3)
    pairs = write_tiny_hh_rlhf(tmp_path / "pairs.jsonl", n=40, seed=3)
    out, _ = run_data_stage(tmp_path, f"data.preference.path={pairs}", f"data.prompts.path={folder}",
                            "data.prompts.train_files=[train-v1.1.json]", "data.prompts.eval_files=[dev-v1.1.json]")
    report = json.loads((out / "data_report.json").read_text())
    assert report["prompts_eval"]["held_out"]["method"] == "eval_split"
    assert report["prompts_train"]["load"]["total"] == 30 and report["prompts_eval"]["load"]["total"] == 12


def test_data_stage_counts_malformed_rows_and_writes_the_encoded_splits(tmp_path):
    pairs = write_tiny_hh_rlhf(tmp_path / "pairs.jsonl", n=12, seed=3)
    with pairs.open("a") as handle:
        handle.write('{"chosen": 3, "rejected": "x"}\n')  # one malformed row among 13
    squad = write_tiny_squad(tmp_path / "squad.json", n=10, seed=4)
    out, result = run_data_stage(tmp_path, f"data.preference.path={pairs}", f"data.prompts.path={squad}",
                                 "data.prompts.eval_fraction=0.4", "data.prompts.max_eval_samples=3")
    report = json.loads((out / "data_report.json").read_text())
    train = report["preference_train"]
    assert (train["load"]["total"], train["load"]["kept"]) == (13, 12)
    assert train["load"]["dropped"] == {"non_string_field": 1} and train["load"]["examples"]["non_string_field"] == [12]
    assert len(saved(out, "preference_train")) == train["prepare"]["kept"]
    assert len(saved(out, "preference_train")) + len(saved(out, "preference_eval")) == 12
    prompts_eval = saved(out, "prompts_eval")
    assert len(prompts_eval) == 3 and "input_ids" in prompts_eval.column_names
    assert result.metrics["preference_train_dropped"] == 1 + train["prepare"]["total"] - train["prepare"]["kept"]
    assert report["prompts_train"]["load"]["step"].startswith("load_squad_prompts(")


def test_a_mostly_malformed_source_stops_the_stage_with_the_counts(tmp_path, capsys):
    pairs = write_tiny_hh_rlhf(tmp_path / "pairs.jsonl", n=4, seed=3)
    with pairs.open("a") as handle:
        handle.write("".join(f'{{"chosen": {i}}}\n' for i in range(996)) + "[1, 2]\n" * 1000)
    squad = write_tiny_squad(tmp_path / "squad.json", n=10, seed=4)
    args = ["run", "tiny_cpu", "--output_dir", str(tmp_path / "run"), "--set", "stages=[data]",
            "--set", "data.preference.source=hh_rlhf", "--set", f"data.preference.path={pairs}",
            "--set", "data.preference.data_dir=null", "--set", "data.preference.options={}",
            "--set", "data.prompts.source=squad", "--set", f"data.prompts.path={squad}",
            "--set", "data.prompts.options={}"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("trl-multiadapter run: error:")]
    assert len(errors) == 1 and "Traceback" not in err
    err = errors[0]
    assert "dropped 1996 of 2000 rows (99.8%), more than data.max_drop_fraction=0.5" in err
    assert "malformed_row 1000" in err and "non_string_field 996" in err
    assert not (tmp_path / "run" / "data" / "preference_train").exists()
    assert cli.main([*args, "--set", "data.max_drop_fraction=1.0"]) == 0  # the limit is the recipe's


def test_the_reward_stage_gets_its_held_out_pairs_from_the_data_stage():
    loaded = recipe.load("tiny_cpu")
    config = recipe.build_reward_config(loaded.reward, loaded.model, output_dir="unused", use_cpu=True)
    assert config.eval_fraction == 0.0  # never a second carve inside the reward stage
    with pytest.raises(recipe.RecipeError, match="set data.preference.eval_fraction"):
        recipe.load("tiny_cpu", ["reward.eval_fraction=0.1"])
