"""trl_multiadapter.data.splits: the seeded held-out carve, overlap removal, and when a source needs a carve.

Disjointness is checked with this file's own hashing of the rows; sizes against hand-counted groups.
"""

from __future__ import annotations

import json
import random

import pytest
from datasets import Dataset

from trl_multiadapter.data import (
    CARVED,
    EVAL_SPLIT,
    carve_held_out,
    carve_reason,
    drop_train_overlap,
    load_hh_rlhf,
    load_squad_prompts,
)
from trl_multiadapter.testing import write_tiny_hh_rlhf, write_tiny_squad


def row_set(dataset, columns) -> set[str]:
    """The test's own content identity: the columns' values as sorted-key JSON."""
    return {json.dumps([row[c] for c in columns], sort_keys=True) for row in dataset}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = write_tiny_hh_rlhf(tmp_path_factory.mktemp("pairs") / "train.jsonl", n=200, seed=7)
    dataset = load_hh_rlhf(path)
    # Repeat some conversations (real data has them): 20 rows share the prompts of rows 0..9.
    repeats = [{**dataset[i % 10], "chosen": [{"role": "assistant", "content": f"Again {i}."}]} for i in range(20)]
    return Dataset.from_list(dataset.to_list() + repeats, features=dataset.features)


def test_carve_is_disjoint_sized_and_keeps_groups_together(pairs):
    train, held, report = carve_held_out(pairs, 0.1, seed=3, key_columns=["prompt"], reason="one file")
    assert len(train) + len(held) == len(pairs) == 220
    assert 22 <= len(held) < 22 + 3  # ceil(10% of 220) rows; the last group taken may bring up to 2 more
    assert not row_set(train, ["prompt"]) & row_set(held, ["prompt"])  # no conversation on both sides
    assert (report.method, report.reason, report.train_rows, report.eval_rows) == (CARVED, "one file", len(train), len(held))
    assert report.groups == len(row_set(pairs, ["prompt"]))
    # Order is kept on both sides.
    ids = {json.dumps(row, sort_keys=True): index for index, row in enumerate(pairs)}
    for side in (train, held):
        positions = [ids[json.dumps(row, sort_keys=True)] for row in side]
        assert positions == sorted(positions)


def test_carve_depends_on_content_and_seed_only(pairs):
    _, held, _ = carve_held_out(pairs, 0.1, seed=3, key_columns=["prompt"], reason="r")
    order = list(range(len(pairs)))
    random.Random(0).shuffle(order)
    _, held_shuffled, _ = carve_held_out(pairs.select(order), 0.1, seed=3, key_columns=["prompt"], reason="r")
    assert row_set(held, ["prompt", "chosen", "rejected"]) == row_set(held_shuffled, ["prompt", "chosen", "rejected"])
    _, other_seed, _ = carve_held_out(pairs, 0.1, seed=4, key_columns=["prompt"], reason="r")
    assert row_set(other_seed, ["prompt"]) != row_set(held, ["prompt"])


def test_carve_refuses_what_cannot_be_split():
    same = Dataset.from_list([{"prompt": "p", "x": i} for i in range(5)])
    with pytest.raises(ValueError, match="5 rows with 1 distinct prompt"):
        carve_held_out(same, 0.5, 0, ["prompt"], "r")
    two = Dataset.from_list([{"prompt": "a"}, {"prompt": "b"}])
    train, held, _ = carve_held_out(two, 0.99, 0, ["prompt"], "r")
    assert (len(train), len(held)) == (1, 1)  # train never empty
    for fraction in (0, 1, -0.1):
        with pytest.raises(ValueError, match="above 0 and below 1"):
            carve_held_out(two, fraction, 0, ["prompt"], "r")


def test_overlap_with_train_is_removed_from_eval_and_counted(pairs):
    train = pairs.select(range(100))
    evaluation = pairs.select([*range(95, 130)])  # rows 95..99 are train rows too
    kept, report = drop_train_overlap(train, evaluation, ["prompt", "chosen", "rejected"])
    assert (report.method, report.removed_from_eval, report.removed_examples) == (EVAL_SPLIT, 5, [0, 1, 2, 3, 4])
    assert len(kept) == 30 and not row_set(kept, ["prompt", "chosen", "rejected"]) & row_set(
        train, ["prompt", "chosen", "rejected"])


def test_carve_reason_for_each_source_form(tmp_path):
    single = write_tiny_squad(tmp_path / "squad.json", n=5)
    assert "is one split" in carve_reason(single, None, "validation")
    one_split_folder = tmp_path / "clone" / "helpful-base"
    write_tiny_hh_rlhf(one_split_folder / "train.jsonl.gz", n=5)
    assert carve_reason(tmp_path / "clone", "helpful-base", "test").endswith("has no 'test' split")
    write_tiny_hh_rlhf(one_split_folder / "test.jsonl.gz", n=5)
    assert carve_reason(tmp_path / "clone", "helpful-base", "test") is None
    assert carve_reason(tmp_path / "clone", "helpful-base", None) == "eval_split is null"
    assert carve_reason("Anthropic/hh-rlhf", "helpful-base", "test") is None  # the hub's own split
    assert carve_reason(single, None, "validation", reads_split_files=False) is None  # a plugin's own rules
    assert carve_reason([single], None, "validation").startswith(str(single))


def test_squad_folder_without_dev_is_carved_by_context(tmp_path):
    write_tiny_squad(tmp_path / "squad" / "train-v1.1.json", n=60, seed=2)
    assert carve_reason(tmp_path / "squad", None, "validation").endswith("has no 'validation' split")
    prompts = load_squad_prompts(tmp_path / "squad", split="train")
    train, held, _ = carve_held_out(prompts, 0.2, seed=0, key_columns=["context"], reason="r")
    assert not row_set(train, ["context"]) & row_set(held, ["context"])
    assert len(held) >= 12
