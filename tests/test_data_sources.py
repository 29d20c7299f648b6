"""trl_multiadapter.data.sources: files that are not what their name says, split names, file lists, hub ids.

Every fixture is written here or by ``trl_multiadapter.testing`` (synthetic text in the real layouts: a Git
LFS pointer where ``train.jsonl.gz`` should be, a JSON array saved as ``.jsonl``, the original SQuAD file
names ``dev-v1.1.json`` / ``dev-v2.0.json``, parquet shards).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import time

import pytest

from trl_multiadapter.data import (
    DUPLICATE_ID,
    DataSourceError,
    DataSourceNotFoundError,
    find_split,
    inspect_file,
    load_hh_rlhf,
    load_squad_prompts,
)
from trl_multiadapter.testing import write_tiny_hh_rlhf, write_tiny_squad


def write_lfs_pointer(path, size=16_001_234):
    """What `git clone` without git-lfs leaves in place of a tracked file (the spec's three lines)."""
    oid = hashlib.sha256(path.name.encode()).hexdigest()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n")
    return path


def one_line_error(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message, message
    return message


def hh_records(tmp_path, n=50, seed=0) -> list[dict]:
    source = write_tiny_hh_rlhf(tmp_path / "source" / "rows.jsonl", n=n, seed=seed)
    return [json.loads(line) for line in source.read_text().splitlines()]


# ------------------------------------------------------------------------------------------ file checks


def test_git_lfs_pointer_is_named_with_the_fix(tmp_path):
    clone = tmp_path / "hh-rlhf"
    pointer = write_lfs_pointer(clone / "helpful-base" / "train.jsonl.gz")
    assert pointer.stat().st_size < 200  # the real pointers are ~130 bytes
    with pytest.raises(DataSourceError) as caught:
        load_hh_rlhf(clone, data_dir="helpful-base")
    message = one_line_error(caught.value)
    assert message.startswith(str(pointer))
    assert "Git LFS pointer" in message and "git lfs pull" in message and "hub id" in message
    with pytest.raises(DataSourceError, match="Git LFS pointer"):
        inspect_file(pointer)


def test_plain_text_named_gz_and_truncated_gzip_name_the_file(tmp_path):
    plain = tmp_path / "train.jsonl.gz"
    plain.write_text(json.dumps(hh_records(tmp_path, n=2)[0]) + "\n")
    with pytest.raises(DataSourceError) as caught:
        load_hh_rlhf(plain)
    assert one_line_error(caught.value).startswith(f"{plain}: not gzip-compressed")

    whole = gzip.compress("".join(json.dumps(r) + "\n" for r in hh_records(tmp_path, n=400)).encode())
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataSourceError) as caught:
        load_hh_rlhf(truncated)
    assert one_line_error(caught.value).startswith(f"{truncated}: ")


def test_unreadable_json_and_parquet_files_name_the_file(tmp_path):
    broken_json = tmp_path / "pairs.json"
    broken_json.write_text('[{"chosen": "x", ')
    not_parquet = tmp_path / "pairs.parquet"
    not_parquet.write_text('{"chosen": "x"}\n')
    damaged_parquet = tmp_path / "damaged.parquet"
    damaged_parquet.write_bytes(b"PAR1" + b"\x00" * 64)
    not_utf8 = tmp_path / "latin.jsonl"
    not_utf8.write_bytes(b'{"chosen": "caf\xe9"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for path, problem in ((broken_json, "not valid JSON"), (not_parquet, "not a parquet file"),
                          (damaged_parquet, "unreadable parquet"), (not_utf8, "not UTF-8"),
                          (empty, "empty")):
        with pytest.raises(DataSourceError) as caught:
            load_hh_rlhf(path)
        message = one_line_error(caught.value)
        assert message.startswith(f"{path}: ") and problem in message, message


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_array_saved_as_jsonl_is_named_not_counted_as_bad_rows(tmp_path, suffix, indent):
    records = hh_records(tmp_path, n=50)
    text = json.dumps(records, indent=indent)
    path = tmp_path / f"train{suffix}"
    path.write_bytes(gzip.compress(text.encode()) if suffix.endswith(".gz") else text.encode())
    with pytest.raises(DataSourceError) as caught:
        load_hh_rlhf(path)
    message = one_line_error(caught.value)
    assert "holds a JSON array, not JSON lines" in message and "train.json" in message
    # The same records under the right name load: 50 pairs, not 602 "malformed rows".
    fixed = tmp_path / ("train.json.gz" if suffix.endswith(".gz") else "train.json")
    fixed.write_bytes(path.read_bytes())
    assert load_hh_rlhf(fixed).num_rows == 50


def test_a_pretty_printed_squad_document_saved_as_jsonl_is_named(tmp_path):
    nested = write_tiny_squad(tmp_path / "dev.json", n=6, seed=1)  # written with indent=1
    path = tmp_path / "dev.jsonl"
    path.write_text(nested.read_text())
    with pytest.raises(DataSourceError, match="one JSON document spread over several lines, not JSON lines"):
        load_squad_prompts(path)


def test_a_real_bad_line_is_still_a_counted_row(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in hh_records(tmp_path, n=5)) + "{not json\n")
    dataset, report = load_hh_rlhf(path, return_report=True)
    assert dataset.num_rows == 5 and report.dropped == {"malformed_row": 1}


# ----------------------------------------------------------------------------------------- split names


@pytest.fixture
def original_squad_folder(tmp_path):
    """The original SQuAD file names: both versions' train and dev files in one folder."""
    folder = tmp_path / "squad"
    for version, seed in (("v1.1", 1), ("v2.0", 1)):  # same seed: shared ids, like the real dev files
        write_tiny_squad(folder / f"train-{version}.json", n=12, seed=seed + 10)
        write_tiny_squad(folder / f"dev-{version}.json", n=8, seed=seed)
    return folder


def test_a_split_name_matching_several_files_is_an_error_listing_them(original_squad_folder):
    for split in ("dev", "validation", "train"):
        with pytest.raises(DataSourceError) as caught:
            load_squad_prompts(original_squad_folder, split=split)
        message = one_line_error(caught.value)
        prefix = "dev" if split != "train" else "train"
        assert f"{prefix}-v1.1.json, {prefix}-v2.0.json" in message and "merged" in message
        assert caught.value.argument == "split"


def test_validation_finds_the_dev_file(original_squad_folder, tmp_path):
    folder = tmp_path / "v1"
    folder.mkdir()
    for name in ("train-v1.1.json", "dev-v1.1.json"):
        (folder / name).write_bytes((original_squad_folder / name).read_bytes())
    found = find_split(folder, None, "validation")
    assert found is not None and [path.name for path in found.files] == ["dev-v1.1.json"]
    assert not found.whole_file
    direct = load_squad_prompts(folder / "dev-v1.1.json").to_list()
    assert load_squad_prompts(folder, split="validation").to_list() == direct
    assert find_split(folder, None, "test") is None  # no such split: the caller decides (carve or error)
    with pytest.raises(DataSourceNotFoundError, match=r"no 'test' file .* it holds: dev-v1.1.json, train-v1.1.json"):
        load_squad_prompts(folder, split="test")


def test_an_explicit_file_list_is_one_split_and_repeated_ids_are_reported(original_squad_folder):
    files = [original_squad_folder / "dev-v1.1.json", original_squad_folder / "dev-v2.0.json"]
    dataset, report = load_squad_prompts(files, return_report=True)
    one = load_squad_prompts(files[0])
    assert dataset.num_rows == 2 * one.num_rows == report.kept
    assert report.flagged == {DUPLICATE_ID: one.num_rows}
    second = json.loads(files[1].read_text())["data"]
    second_paths = [f"dev-v2.0.json: row {a}.paragraphs[{p}].qas[{q}]" for a, article in enumerate(second)
                    for p, paragraph in enumerate(article["paragraphs"]) for q in range(len(paragraph["qas"]))]
    assert report.examples[DUPLICATE_ID] == second_paths[:5]
    assert f"flagged {DUPLICATE_ID} {one.num_rows}" in report.summary()
    assert find_split(files, None, "validation").whole_file
    with pytest.raises(DataSourceError, match="data_dir applies to hub ids and folders"):
        load_squad_prompts(files, data_dir="x")
    with pytest.raises(DataSourceNotFoundError, match="no such file"):
        load_squad_prompts([files[0], original_squad_folder / "dev-v3.json"])


def test_parquet_shards_of_one_split_are_read_in_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = hh_records(tmp_path, n=30)
    folder = tmp_path / "hub-clone" / "data"
    folder.mkdir(parents=True)
    for index, part in enumerate((records[:12], records[12:])):
        pq.write_table(pa.Table.from_pylist(part), folder / f"train-{index:05d}-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(records[:4]), folder / "test-00000-of-00001.parquet")
    lines = tmp_path / "all.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert load_hh_rlhf(tmp_path / "hub-clone", data_dir="data").to_list() == load_hh_rlhf(lines).to_list()
    assert load_hh_rlhf(tmp_path / "hub-clone", data_dir="data", split="test").num_rows == 4


def test_data_dir_with_a_file_path_is_an_error(tmp_path):
    path = write_tiny_hh_rlhf(tmp_path / "pairs.jsonl", n=3)
    with pytest.raises(DataSourceError) as caught:
        load_hh_rlhf(path, data_dir="helpful-base")
    assert caught.value.argument == "data_dir" and "not to the file" in one_line_error(caught.value)


# ----------------------------------------------------------------------------------------------- hub ids


def test_an_uncached_hub_id_offline_fails_fast_in_one_line(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)

    def must_not_be_called(*args, **kwargs):
        raise AssertionError("load_dataset was called for an id the check knows is unreachable")

    monkeypatch.setattr(datasets, "load_dataset", must_not_be_called)
    started = time.perf_counter()
    with pytest.raises(DataSourceError) as caught:
        load_hh_rlhf("Anthropic/hh-rlhf", data_dir="helpful-base")
    assert time.perf_counter() - started < 2.0
    message = one_line_error(caught.value)
    assert "'Anthropic/hh-rlhf'" in message and "HF_HUB_OFFLINE" in message and caught.value.hub
