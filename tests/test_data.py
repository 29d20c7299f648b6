"""trl_multiadapter.data: hh-rlhf parsing and loading, SQuAD prompts, chat-template encoding, reports.

Expected values come from hand-written cases, from direct ``tokenizer.apply_chat_template`` calls made here,
and from second implementations written in this file.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_multiadapter import data
from trl_multiadapter.data import (
    DataReport,
    TranscriptError,
    load_hh_rlhf,
    load_squad_prompts,
    parse_hh_transcript,
    prepare_preference_pairs,
    prepare_prompts,
)
from trl_multiadapter.testing import write_tiny_hh_rlhf, write_tiny_squad

BOS_ID = 0


def user(content: str) -> dict:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def render(messages: list[dict]) -> str:
    """The test's own hh-rlhf renderer."""
    speaker = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{speaker[message['role']]}: {message['content']}" for message in messages)


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def template_ids(tokenizer, messages, add_generation_prompt=False) -> list[int]:
    return tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
    )


# ----------------------------------------------------------------------------------------------- parsing


TRICKY_TRANSCRIPTS = {
    "inline Human: is content": (
        "\n\nHuman: My note says Human: hello there. Is that odd?"
        "\n\nAssistant: Not at all, Human: is a label.",
        [user("My note says Human: hello there. Is that odd?"), assistant("Not at all, Human: is a label.")],
    ),
    "single newline before Human: is content": (
        "\n\nHuman: line one\nHuman: line two\n\nAssistant: ok\nAssistant: again",
        [user("line one\nHuman: line two"), assistant("ok\nAssistant: again")],
    ),
    "multi-paragraph turns": (
        "\n\nHuman: First paragraph.\n\nSecond paragraph?\n\nAssistant: Answer one.\n\n\nAnswer two.",
        [user("First paragraph.\n\nSecond paragraph?"), assistant("Answer one.\n\n\nAnswer two.")],
    ),
    "empty final answer": (
        "\n\nHuman: Hello?\n\nAssistant:",
        [user("Hello?"), assistant("")],
    ),
    "whitespace-only final answer": (
        "\n\nHuman: Hello?\n\nAssistant:   \n ",
        [user("Hello?"), assistant("")],
    ),
    "three exchanges, whitespace stripped": (
        "\n\nHuman:  a \n\nAssistant: b\t\n\nHuman: c\n\n\n\nAssistant: d\n\nHuman: e\n\nAssistant: f ",
        [user("a"), assistant("b"), user("c"), assistant("d"), user("e"), assistant("f")],
    ),
    "no blank line in front of the first turn": (
        "Human: hi\n\nAssistant: yo",
        [user("hi"), assistant("yo")],
    ),
}


@pytest.mark.parametrize("name", sorted(TRICKY_TRANSCRIPTS))
def test_tricky_transcripts_parse_to_the_expected_messages(name):
    text, expected = TRICKY_TRANSCRIPTS[name]
    assert parse_hh_transcript(text) == expected


def test_text_before_the_first_turn_is_an_error():
    with pytest.raises(TranscriptError) as caught:
        parse_hh_transcript("preamble\n\nHuman: hi\n\nAssistant: yo")
    assert caught.value.reason == data.TEXT_BEFORE_FIRST_TURN


def _without_markers(text: str) -> str:
    for marker in ("\n\nHuman:", "\n\nAssistant:"):
        while marker in text:
            text = text.replace(marker, marker[1:])
    return text


_FRAGMENTS = st.sampled_from(["Human:", "Assistant:", "\n", "\n\n", " ", "\t", "word", "Ünï", "?", ":"])
_CONTENT = st.lists(_FRAGMENTS, max_size=12).map(lambda parts: _without_markers("".join(parts)).strip())
_MESSAGES = st.lists(
    st.builds(
        lambda role, content: {"role": role, "content": content},
        st.sampled_from(["user", "assistant"]),
        _CONTENT,
    ),
    min_size=1,
    max_size=7,
)


@settings(max_examples=300, deadline=None)
@given(messages=_MESSAGES)
def test_rendered_messages_parse_back_to_themselves(messages):
    assert parse_hh_transcript(render(messages)) == messages


# --------------------------------------------------------------------------------------- hh-rlhf loading


GOOD_PROMPT = [user("How do I fold the map?"), assistant("Start at a corner."), user("And then?")]
GOOD_ROW = {
    "chosen": render([*GOOD_PROMPT, assistant("Gladly: fold it in half.")]),
    "rejected": render([*GOOD_PROMPT, assistant("Whatever.")]),
}

BAD_ROWS = {
    data.NON_STRING_FIELD: {"chosen": render([user("a"), assistant("b")]), "rejected": 7},
    data.TEXT_BEFORE_FIRST_TURN: {
        "chosen": "oops\n\nHuman: a\n\nAssistant: b",
        "rejected": render([user("a"), assistant("c")]),
    },
    data.ROLES_OUT_OF_ORDER: {  # opens with the assistant (consecutive turns of one role are merged)
        "chosen": render([assistant("a"), user("a2"), assistant("b")]),
        "rejected": render([assistant("a"), user("a2"), assistant("c")]),
    },
    data.NO_ASSISTANT_TURN: {"chosen": render([user("a")]), "rejected": render([user("a")])},
    data.PROMPTS_DIFFER: {
        "chosen": render([user("a"), assistant("b")]),
        "rejected": render([user("different"), assistant("c")]),
    },
    data.IDENTICAL_RESPONSES: {
        "chosen": render([user("a"), assistant("b")]),
        "rejected": render([user("a"), assistant("b")]),
    },
}


def test_good_row_becomes_trl_conversational_preference(tmp_path):
    empty_answer = {
        "chosen": render([user("Hi"), assistant("Hello, glad to help.")]),
        "rejected": "\n\nHuman: Hi\n\nAssistant:",
    }
    dataset = load_hh_rlhf(write_jsonl(tmp_path / "pairs.jsonl", [GOOD_ROW, empty_answer]))
    assert dataset.to_list() == [
        {
            "prompt": GOOD_PROMPT,
            "chosen": [assistant("Gladly: fold it in half.")],
            "rejected": [assistant("Whatever.")],
        },
        {"prompt": [user("Hi")], "chosen": [assistant("Hello, glad to help.")], "rejected": [assistant("")]},
    ]


def test_system_prompt_opens_every_preference_prompt(tmp_path):
    dataset = load_hh_rlhf(write_jsonl(tmp_path / "pairs.jsonl", [GOOD_ROW]), system_prompt="Be kind.")
    assert dataset[0]["prompt"] == [{"role": "system", "content": "Be kind."}, *GOOD_PROMPT]


def test_bad_rows_are_counted_by_reason_with_example_rows(tmp_path, caplog):
    records = [GOOD_ROW]
    expected_rows: dict[str, list[int]] = {}
    for reason, record in BAD_ROWS.items():
        for _ in range(2):
            expected_rows.setdefault(reason, []).append(len(records))
            records.append(record)
    records += [
        {"chosen": render([user("x"), assistant("y")])},
        [1, 2],
        GOOD_ROW,
    ]  # missing key, not an object
    expected_rows[data.NON_STRING_FIELD].append(len(records) - 3)
    expected_rows[data.MALFORMED_ROW] = [len(records) - 2]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records) + "{not json\n")
    expected_rows[data.MALFORMED_ROW].append(len(records))

    with caplog.at_level(logging.INFO, logger="trl_multiadapter.data"):
        dataset, report = load_hh_rlhf(str(path), return_report=True)

    assert dataset.num_rows == 2 == report.kept
    assert report.total == len(records) + 1
    assert report.dropped == {reason: len(rows) for reason, rows in expected_rows.items()}
    assert report.examples == expected_rows
    summaries = [record.getMessage() for record in caplog.records if record.name == "trl_multiadapter.data"]
    assert len(summaries) == 1
    assert (
        f"roles_out_of_order 2 (e.g. rows {', '.join(map(str, expected_rows[data.ROLES_OUT_OF_ORDER]))})"
        in summaries[0]
    )


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_on_bad_row_error_names_file_row_and_reason(tmp_path, reason):
    path = write_jsonl(tmp_path / "broken.jsonl", [GOOD_ROW, GOOD_ROW, BAD_ROWS[reason]])
    with pytest.raises(ValueError, match=rf"broken\.jsonl: row 2 \(line 3\): {reason}"):
        load_hh_rlhf(path, on_bad_row="error")


def test_on_bad_row_rejects_unknown_policy(tmp_path):
    with pytest.raises(ValueError, match="skip, error"):
        load_hh_rlhf(write_jsonl(tmp_path / "p.jsonl", [GOOD_ROW]), on_bad_row="ignore")


def test_only_bad_rows_is_an_error_with_the_summary(tmp_path):
    with pytest.raises(ValueError, match="no usable preference pairs.*identical_responses 1"):
        load_hh_rlhf(write_jsonl(tmp_path / "p.jsonl", [BAD_ROWS[data.IDENTICAL_RESPONSES]]))


# Real shapes: two Assistant turns in a row inside the shared conversation, at the end of the chosen text
# only, two Human turns in a row, and an empty Assistant turn followed by a non-empty one.
CONSECUTIVE_TURN_ROWS = [
    {
        "chosen": render([user("Is the kettle hot?"), assistant("Let me check."), assistant("Yes, careful."),
                          user("Thanks. Tea?"), assistant("Green tea, then.")]),
        "rejected": render([user("Is the kettle hot?"), assistant("Let me check."), assistant("Yes, careful."),
                            user("Thanks. Tea?"), assistant("No.")]),
    },
    {
        "chosen": render([user("Fold the map?"), assistant("Fold it in half."), assistant("Then in half again.")]),
        "rejected": render([user("Fold the map?"), assistant("Do it yourself.")]),
    },
    {
        "chosen": render([user("Hello."), user("Are you there?"), assistant("I am here.")]),
        "rejected": render([user("Hello."), user("Are you there?"), assistant("Go away.")]),
    },
    {
        "chosen": render([user("Name a river?"), assistant(""), assistant("The Nile.")]),
        "rejected": render([user("Name a river?"), assistant(""), assistant("Not telling.")]),
    },
]
MERGED_EXPECTED = [
    {
        "prompt": [user("Is the kettle hot?"), assistant("Let me check.\n\nYes, careful."), user("Thanks. Tea?")],
        "chosen": [assistant("Green tea, then.")],
        "rejected": [assistant("No.")],
    },
    {
        "prompt": [user("Fold the map?")],
        "chosen": [assistant("Fold it in half.\n\nThen in half again.")],
        "rejected": [assistant("Do it yourself.")],
    },
    {
        "prompt": [user("Hello.\n\nAre you there?")],
        "chosen": [assistant("I am here.")],
        "rejected": [assistant("Go away.")],
    },
    {
        "prompt": [user("Name a river?")],
        "chosen": [assistant("The Nile.")],
        "rejected": [assistant("Not telling.")],
    },
]


def test_consecutive_turns_of_one_role_are_merged_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD_ROW, *CONSECUTIVE_TURN_ROWS])
    dataset, report = load_hh_rlhf(path, return_report=True)
    expected_good = {"prompt": GOOD_PROMPT, "chosen": [assistant("Gladly: fold it in half.")],
                     "rejected": [assistant("Whatever.")]}
    assert dataset.to_list() == [expected_good, *MERGED_EXPECTED]
    assert (report.total, report.kept, report.dropped) == (5, 5, {})
    assert report.flagged == {data.MERGED_TURNS: 4} and report.examples[data.MERGED_TURNS] == [1, 2, 3, 4]
    assert "flagged merged_turns 4 (e.g. rows 1, 2, 3, 4)" in report.summary()


def test_merge_turns_false_drops_them_as_roles_out_of_order(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD_ROW, *CONSECUTIVE_TURN_ROWS])
    dataset, report = load_hh_rlhf(path, return_report=True, merge_turns=False)
    assert dataset.num_rows == 1 and report.dropped == {data.ROLES_OUT_OF_ORDER: 4} and report.flagged == {}


@settings(max_examples=200, deadline=None)
@given(messages=_MESSAGES)
def test_merging_matches_a_groupby_of_the_roles(messages):
    from itertools import groupby

    expected = [
        {"role": role, "content": "\n\n".join(m["content"] for m in run if m["content"])}
        for role, run in ((role, list(run)) for role, run in groupby(messages, key=lambda m: m["role"]))
    ]
    merged = data.merge_consecutive_turns(messages)
    assert merged == expected
    assert all(a["role"] != b["role"] for a, b in zip(merged, merged[1:]))


def _expected_preferences(path) -> list[dict]:
    """Second implementation: split the raw lines on the last assistant marker."""
    opener = gzip.open if str(path).endswith(".gz") else open
    expected = []
    with opener(path, "rt") as handle:
        for line in handle:
            row = json.loads(line)
            head, _, chosen = row["chosen"].rpartition("\n\nAssistant:")
            _, _, rejected = row["rejected"].rpartition("\n\nAssistant:")
            turns = re.split(r"\n\n(Human|Assistant): ", head)[1:]
            prompt = [
                {"role": "user" if speaker == "Human" else "assistant", "content": text.strip()}
                for speaker, text in zip(turns[::2], turns[1::2])
            ]
            expected.append(
                {
                    "prompt": prompt,
                    "chosen": [assistant(chosen.strip())],
                    "rejected": [assistant(rejected.strip())],
                }
            )
    return expected


@pytest.fixture(scope="module")
def synthetic_hh(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hh")
    return write_tiny_hh_rlhf(folder / "train.jsonl.gz", n=60, seed=1)


def test_synthetic_jsonl_gz_loads_to_the_expected_pairs(synthetic_hh):
    dataset, report = load_hh_rlhf(synthetic_hh, return_report=True)
    assert report.kept == report.total == 60 and report.dropped == {}
    assert dataset.to_list() == _expected_preferences(synthetic_hh)


def test_json_parquet_and_folder_sources_match_jsonl(synthetic_hh, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in gzip.open(synthetic_hh, "rt")]
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    folder = tmp_path / "clone" / "helpful-base"
    folder.mkdir(parents=True)
    (folder / "train.jsonl.gz").write_bytes(synthetic_hh.read_bytes())
    write_jsonl(folder / "test.jsonl", rows[:5])

    expected = load_hh_rlhf(synthetic_hh).to_list()
    assert load_hh_rlhf(tmp_path / "pairs.json").to_list() == expected
    assert load_hh_rlhf(tmp_path / "pairs.parquet").to_list() == expected
    assert load_hh_rlhf(tmp_path / "clone", data_dir="helpful-base").to_list() == expected
    assert load_hh_rlhf(tmp_path / "clone", data_dir="helpful-base", split="test").to_list() == expected[:5]


def pretend_cached(monkeypatch, tmp_path, *repo_ids):
    """An offline hub cache that holds ``repo_ids`` (empty folders: what trl_multiadapter.hub looks for)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    for repo_id in repo_ids:
        owner, name = repo_id.split("/")
        (tmp_path / "hub-cache" / f"datasets--{owner}--{name}").mkdir(parents=True)


def test_hub_id_goes_through_datasets_load_dataset(synthetic_hh, monkeypatch, tmp_path):
    import datasets

    pretend_cached(monkeypatch, tmp_path, "Anthropic/hh-rlhf")
    calls = []
    rows = [json.loads(line) for line in gzip.open(synthetic_hh, "rt")]

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dataset = load_hh_rlhf("Anthropic/hh-rlhf", data_dir="helpful-base", split="test")
    assert calls == [("Anthropic/hh-rlhf", {"data_dir": "helpful-base", "split": "test"})]
    assert dataset.to_list() == _expected_preferences(synthetic_hh)


def test_missing_local_file_is_not_mistaken_for_a_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="check the path"):
        load_hh_rlhf("data/pairs.jsonl")
    with pytest.raises(FileNotFoundError, match="no 'train' file"):
        load_hh_rlhf(tmp_path)


# --------------------------------------------------------------------------------------- over-long pairs


def _pair_length(tokenizer, prompt, chosen, rejected) -> int:
    return max(len(template_ids(tokenizer, prompt + chosen)), len(template_ids(tokenizer, prompt + rejected)))


def _expected_fit(tokenizer, row, max_length):
    """Second implementation: drop 0, 1, 2, ... leading exchanges (two messages each)."""
    for dropped in range(0, len(row["prompt"]) // 2 + 1):
        prompt = row["prompt"][2 * dropped :]
        if _pair_length(tokenizer, prompt, row["chosen"], row["rejected"]) <= max_length:
            return prompt
    return None


def test_overlong_pairs_lose_earliest_exchanges_or_are_dropped(tiny_tokenizer, synthetic_hh):
    dataset = load_hh_rlhf(synthetic_hh)
    rows = dataset.to_list()
    final_only = [
        _pair_length(tiny_tokenizer, row["prompt"][-1:], row["chosen"], row["rejected"]) for row in rows
    ]
    max_length = max(final_only) - 1  # the longest final exchange cannot fit: at least one drop
    expected = [_expected_fit(tiny_tokenizer, row, max_length) for row in rows]
    assert any(prompt is not None and prompt != row["prompt"] for prompt, row in zip(expected, rows))

    prepared, report = prepare_preference_pairs(dataset, tiny_tokenizer, max_length)

    expected_rows = [{**row, "prompt": prompt} for row, prompt in zip(rows, expected) if prompt is not None]
    assert prepared.to_list() == expected_rows
    shortened = [
        i
        for i, (row, prompt) in enumerate(zip(rows, expected))
        if prompt is not None and prompt != row["prompt"]
    ]
    dropped = [i for i, prompt in enumerate(expected) if prompt is None]
    assert (report.total, report.kept, report.shortened) == (60, 60 - len(dropped), len(shortened))
    assert report.dropped == {data.FINAL_TURN_TOO_LONG: len(dropped)}
    assert report.examples[data.FINAL_TURN_TOO_LONG] == dropped[:5]
    assert report.examples["shortened"] == shortened[:5]
    # Nothing is left for trl.RewardTrainer to filter out silently.
    assert all(
        _pair_length(tiny_tokenizer, r["prompt"], r["chosen"], r["rejected"]) <= max_length
        for r in expected_rows
    )


def test_shortening_keeps_the_system_message_and_the_final_user_turn(tiny_tokenizer):
    from datasets import Dataset

    system = {"role": "system", "content": "Be kind."}
    long_turn = " ".join(["garden river kettle"] * 30)
    row = {
        "prompt": [system, user(long_turn), assistant(long_turn), user("short question?")],
        "chosen": [assistant("gladly yes")],
        "rejected": [assistant("nope")],
    }
    max_length = _pair_length(
        tiny_tokenizer, [system, user("short question?")], row["chosen"], row["rejected"]
    )
    prepared, report = prepare_preference_pairs(Dataset.from_list([row]), tiny_tokenizer, max_length)
    assert prepared[0]["prompt"] == [system, user("short question?")]
    assert report.shortened == 1 and report.summary().startswith(
        "prepare_preference_pairs(max_length="
        f"{max_length}): 1 rows, kept 1 (1 shortened, e.g. rows 0), dropped 0"
    )


def test_prepare_rejects_bad_arguments(tiny_tokenizer, synthetic_hh):
    dataset = load_hh_rlhf(synthetic_hh)
    with pytest.raises(ValueError, match="max_length=0"):
        prepare_preference_pairs(dataset, tiny_tokenizer, 0)
    with pytest.raises(ValueError, match="no 'rejected' column"):
        prepare_preference_pairs(dataset.remove_columns("rejected"), tiny_tokenizer, 100)


# ------------------------------------------------------------------------------------------------- SQuAD


CONTEXT = "Mira went to the harbor to paint a green lantern. The old tower is 12 steps from the river."
NESTED_V2 = {
    "version": "v2.0",
    "data": [
        {
            "title": "Harbor",
            "paragraphs": [
                {
                    "context": CONTEXT,
                    "qas": [
                        {
                            "id": "q1",
                            "question": "  Where did Mira go? ",
                            "answers": [
                                {"text": "the harbor", "answer_start": 13},
                                {"text": "harbor", "answer_start": 17},
                            ],
                            "is_impossible": False,
                        },
                        {
                            "id": "q2",
                            "question": "Who painted the tower?",
                            "answers": [],
                            "plausible_answers": [{"text": "Mira", "answer_start": 0}],
                            "is_impossible": True,
                        },
                    ],
                }
            ],
        }
    ],
}
FLAT = [
    {
        "id": "q1",
        "title": "Harbor",
        "context": CONTEXT,
        "question": "  Where did Mira go? ",
        "answers": {"text": ["the harbor", "harbor"], "answer_start": [13, 17]},
    },
    {
        "id": "q2",
        "title": "Harbor",
        "context": CONTEXT,
        "question": "Who painted the tower?",
        "answers": {"text": [], "answer_start": []},
    },
]


def _write_squad_forms(folder) -> dict[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {
        "nested": folder / "nested.json",
        "flat_jsonl": folder / "flat.jsonl",
        "flat_list": folder / "list.json",
        "flat_under_data": folder / "sample.json",
        "parquet": folder / "flat.parquet",
    }
    paths["nested"].write_text(json.dumps(NESTED_V2))
    write_jsonl(paths["flat_jsonl"], FLAT)
    paths["flat_list"].write_text(json.dumps(FLAT))
    # transformers' own SQuAD sample layout: flat records under "data", without titles.
    untitled = [{key: value for key, value in record.items() if key != "title"} for record in FLAT]
    paths["flat_under_data"].write_text(json.dumps({"version": 2.0, "data": untitled}))
    pq.write_table(pa.Table.from_pylist(FLAT), paths["parquet"])
    return {name: str(path) for name, path in paths.items()}


def test_squad_prompt_is_system_plus_context_and_question(tmp_path):
    dataset = load_squad_prompts(_write_squad_forms(tmp_path)["nested"], system_prompt="Answer briefly.")
    first, second = dataset.to_list()
    assert first["prompt"] == [
        {"role": "system", "content": "Answer briefly."},
        user(f"Context: {CONTEXT}\n\nQuestion: Where did Mira go?"),
    ]
    assert first["answers"] == {"text": ["the harbor", "harbor"], "answer_start": [13, 17]}
    assert (first["is_impossible"], second["is_impossible"]) == (False, True)
    assert second["answers"] == {"text": [], "answer_start": []}
    without_system = load_squad_prompts(_write_squad_forms(tmp_path)["nested"], system_prompt=None)
    assert without_system[0]["prompt"] == [user(f"Context: {CONTEXT}\n\nQuestion: Where did Mira go?")]


def test_squad_prompt_without_context_is_the_question_alone(tiny_tokenizer, tmp_path):
    dataset = load_squad_prompts(
        _write_squad_forms(tmp_path)["nested"], system_prompt=None, include_context=False
    )
    assert dataset[0]["prompt"] == [user("Where did Mira go?")]
    assert dataset[0]["context"] == CONTEXT
    # Cutting a context that is not in the prompt cannot help: such a prompt is dropped, not rewritten.
    prepared, report = prepare_prompts(dataset, tiny_tokenizer, 3, long_prompts="cut_context")
    assert prepared.num_rows == 0 and report.dropped == {data.PROMPT_TOO_LONG: 2}


def test_every_squad_form_gives_identical_prompts_and_answers(tmp_path):
    forms = {name: load_squad_prompts(path).to_list() for name, path in _write_squad_forms(tmp_path).items()}
    reference = forms.pop("nested")
    for name, rows in forms.items():
        for row in rows:
            if name == "flat_under_data":
                assert row.pop("title") == ""
                row["title"] = "Harbor"
        assert rows == reference, name


def test_synthetic_nested_and_flat_squad_match_and_answers_point_into_context(tmp_path):
    nested = load_squad_prompts(write_tiny_squad(tmp_path / "s.json", n=40, seed=2))
    flat = load_squad_prompts(write_tiny_squad(tmp_path / "s.jsonl.gz", n=40, seed=2, nested=False))
    assert nested.to_list() == flat.to_list()
    assert nested.num_rows == 40
    for row in nested:
        for text, start in zip(row["answers"]["text"], row["answers"]["answer_start"]):
            assert row["context"][start : start + len(text)] == text


def test_squad_hub_id_goes_through_datasets_load_dataset(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_list(FLAT)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    pretend_cached(monkeypatch, tmp_path, "rajpurkar/squad_v2")
    from_hub = load_squad_prompts("rajpurkar/squad_v2", split="validation").to_list()
    assert calls == [("rajpurkar/squad_v2", {"data_dir": None, "split": "validation"})]
    assert from_hub == load_squad_prompts(_write_squad_forms(tmp_path)["nested"]).to_list()


def _third_party_nested() -> dict:
    """NESTED_V2 plus the damage third-party SQuAD-format files carry; every bad question is named here."""
    document = json.loads(json.dumps(NESTED_V2))
    qas = document["data"][0]["paragraphs"][0]["qas"]
    qas.append({"id": "q3", "question": "Where is the river?", "answers": [{"text": "river", "answer_start": None}]})
    qas.append({"question": "No id here?", "answers": [{"text": "Mira", "answer_start": 0}]})
    qas.append({"id": "q5", "question": "Text is a number?", "answers": [{"text": 12, "answer_start": 0}]})
    qas.append("not a question object")
    qas.append({"id": "q7", "question": "How many steps?", "answers": [{"text": "12", "answer_start": 67}]})
    document["data"][0]["paragraphs"].append(
        {"qas": [{"id": "q8", "question": "Lost context?", "answers": []},
                 {"id": "q9", "question": "Also lost?", "answers": []}]}
    )
    return document


THIRD_PARTY_DROPS = {  # record path -> reason, written by hand from _third_party_nested
    "bad.json: row 0.paragraphs[0].qas[2]": data.BAD_ANSWER,
    "bad.json: row 0.paragraphs[0].qas[3]": data.MISSING_FIELD,
    "bad.json: row 0.paragraphs[0].qas[4]": data.BAD_ANSWER,
    "bad.json: row 0.paragraphs[0].qas[5]": data.MALFORMED_ROW,
    "bad.json: row 0.paragraphs[1].qas[0]": data.MISSING_FIELD,
    "bad.json: row 0.paragraphs[1].qas[1]": data.MISSING_FIELD,
}


def test_bad_squad_records_are_skipped_and_counted_by_reason(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_third_party_nested()))
    dataset, report = load_squad_prompts(path, return_report=True)
    assert dataset["id"] == ["q1", "q2", "q7"]
    assert CONTEXT[67:69] == "12"  # q7's offset points at its answer
    assert (report.total, report.kept) == (9, 3)
    expected: dict[str, list[str]] = {}
    for location, reason in THIRD_PARTY_DROPS.items():
        expected.setdefault(reason, []).append(location)
    assert report.dropped == {reason: len(rows) for reason, rows in expected.items()}
    assert {reason: report.examples[reason] for reason in expected} == expected


def test_bad_flat_squad_rows_are_skipped_and_counted(tmp_path):
    rows = [*FLAT,
            {"id": None, "context": CONTEXT, "question": "Null id?", "answers": {"text": [], "answer_start": []}},
            {"id": "q4", "context": CONTEXT, "question": "Null start?",
             "answers": {"text": ["harbor"], "answer_start": [None]}},
            {"id": "q5", "context": CONTEXT, "question": "Unpaired?",
             "answers": {"text": ["harbor", "the harbor"], "answer_start": [17]}},
            [1, 2]]
    path = tmp_path / "flat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "{broken\n")
    dataset, report = load_squad_prompts(path, return_report=True)
    assert dataset["id"] == ["q1", "q2"]
    assert report.dropped == {data.MISSING_FIELD: 1, data.BAD_ANSWER: 2, data.MALFORMED_ROW: 2}
    assert report.examples[data.MALFORMED_ROW] == ["flat.jsonl: row 5 (line 6)", "flat.jsonl: row 6 (line 7)"]


def test_on_bad_row_error_names_the_squad_record_path(tmp_path):
    broken = json.loads(json.dumps(NESTED_V2))
    del broken["data"][0]["paragraphs"][0]["qas"][1]["question"]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(
        ValueError, match=r"broken\.json: row 0\.paragraphs\[0\]\.qas\[1\]: missing_field: missing 'question'"
    ):
        load_squad_prompts(str(path), on_bad_row="error")
    null_start = tmp_path / "null.json"
    null_start.write_text(json.dumps(_third_party_nested()))
    with pytest.raises(ValueError, match=r"qas\[2\]: bad_answer: answers\[0\]: missing 'answer_start'"):
        load_squad_prompts(null_start, on_bad_row="error")
    with pytest.raises(ValueError, match="choose one of skip, error"):
        load_squad_prompts(null_start, on_bad_row="ignore")


def test_only_bad_squad_records_is_an_error_with_the_summary(tmp_path):
    path = tmp_path / "all_bad.jsonl"
    path.write_text(json.dumps({"question": "no id or context"}) + "\n")
    with pytest.raises(ValueError, match="no usable questions in .*missing_field 1"):
        load_squad_prompts(path)


# --------------------------------------------------------------------------------------- prompt encoding


@pytest.fixture(scope="module")
def squad_prompts(tmp_path_factory):
    return load_squad_prompts(write_tiny_squad(tmp_path_factory.mktemp("squad") / "s.json", n=30, seed=5))


def test_prompt_ids_equal_the_chat_template_with_one_bos(tiny_tokenizer, squad_prompts):
    prepared, report = prepare_prompts(squad_prompts, tiny_tokenizer, max_prompt_length=4096)
    assert report.kept == 30 and report.dropped == {}
    for row in prepared:
        expected = template_ids(tiny_tokenizer, row["prompt"], add_generation_prompt=True)
        assert row["input_ids"] == expected
        assert row["input_ids"].count(BOS_ID) == 1 and row["input_ids"][0] == BOS_ID
        assert tiny_tokenizer.decode(row["input_ids"]).endswith(
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        )


def test_long_prompts_are_dropped_and_counted(tiny_tokenizer, squad_prompts):
    lengths = [len(template_ids(tiny_tokenizer, row["prompt"], True)) for row in squad_prompts]
    limit = sorted(lengths)[len(lengths) // 2]
    prepared, report = prepare_prompts(squad_prompts, tiny_tokenizer, max_prompt_length=limit)
    too_long = [index for index, length in enumerate(lengths) if length > limit]
    assert report.dropped == {data.PROMPT_TOO_LONG: len(too_long)}
    assert report.examples[data.PROMPT_TOO_LONG] == too_long[:5]
    assert prepared["id"] == [row["id"] for index, row in enumerate(squad_prompts) if index not in too_long]


def _sentences(text: str) -> list[str]:
    return re.findall(r"[^.!?]+[.!?]", text)


def test_cut_context_keeps_whole_sentences_around_the_answer(tiny_tokenizer, squad_prompts):
    lengths = [len(template_ids(tiny_tokenizer, row["prompt"], True)) for row in squad_prompts]
    limit = min(lengths) + 5
    prepared, report = prepare_prompts(squad_prompts, tiny_tokenizer, limit, long_prompts="cut_context")
    by_id = {row["id"]: row for row in squad_prompts}
    assert report.kept + report.dropped_total == 30 and report.shortened > 0
    for row in prepared:
        original = by_id[row["id"]]
        assert len(row["input_ids"]) <= limit
        assert row["input_ids"] == template_ids(tiny_tokenizer, row["prompt"], True)
        sentences = [sentence.strip() for sentence in _sentences(original["context"])]
        kept = [sentence.strip() for sentence in _sentences(row["context"])]
        first = sentences.index(kept[0])
        assert sentences[first : first + len(kept)] == kept  # a contiguous run of whole sentences
        assert row["answers"]["text"] == original["answers"]["text"]  # every answer survives the cut
        for text, start in zip(row["answers"]["text"], row["answers"]["answer_start"]):
            assert row["context"][start : start + len(text)] == text
        # Maximal: one more sentence on either side would not fit.
        for neighbour in (first - 1, first + len(kept)):
            if 0 <= neighbour < len(sentences) and row["context"] != original["context"]:
                wider = sentences[min(first, neighbour) : max(first + len(kept), neighbour + 1)]
                prompt = [
                    *row["prompt"][:-1],
                    user(f"Context: {' '.join(wider)}\n\nQuestion: {original['question']}"),
                ]
                assert len(template_ids(tiny_tokenizer, prompt, True)) > limit


# Real contexts are full of initials and abbreviations before the answers ("Running back C. J. Anderson").
INITIALS_SENTENCES = [
    "The Harbor Owls opened the season at home against the River Foxes.",
    "Running back C. J. Anderson ran for 90 yards before the half.",
    "Safety T. J. Ward made the key stop near St. Louis Street.",
    "Dr. Mira Lane of the U.S. rowing team watched from the north stand.",
    "The Owls won by three points.",
    "Fans walked home along the river after the game.",
]
INITIALS_CONTEXT = " ".join(INITIALS_SENTENCES)


def _answer(text: str, after: int = 0) -> dict:
    return {"text": text, "answer_start": INITIALS_CONTEXT.index(text, after)}


INITIALS_QUESTIONS = {
    "q1": ("Who ran for 90 yards?", [_answer("C. J. Anderson"), _answer("Anderson"), _answer("C. J. Anderson")]),
    "q2": ("Who made the key stop?", [_answer("T. J. Ward"), _answer("Ward")]),
    "q3": ("Who watched from the north stand?", [_answer("Dr. Mira Lane"), _answer("Mira Lane")]),
    # Reference answers in the first and the fifth sentence: no short window holds both.
    "q4": ("Which team opened at home?", [_answer("The Harbor Owls"), _answer("The Owls", 60)]),
    "q5": ("Who sold the tickets?", []),  # v2.0: unanswerable
}


def test_sentences_do_not_end_at_initials_or_abbreviations():
    spans = data.sentence_spans(INITIALS_CONTEXT)
    assert [INITIALS_CONTEXT[start:end] for start, end in spans] == INITIALS_SENTENCES
    text = 'He said "Go now." Then he left! Did he? Yes. It was 1990. Done'
    assert [text[a:b] for a, b in data.sentence_spans(text)] == [
        'He said "Go now."', "Then he left!", "Did he?", "Yes.", "It was 1990.", "Done"]


@pytest.fixture
def initials_prompts(tmp_path):
    qas = [{"id": qid, "question": question, "answers": answers, "is_impossible": not answers}
           for qid, (question, answers) in INITIALS_QUESTIONS.items()]
    path = tmp_path / "initials.json"
    path.write_text(json.dumps({"version": "v2.0", "data": [
        {"title": "Owls", "paragraphs": [{"context": INITIALS_CONTEXT, "qas": qas}]}]}))
    return load_squad_prompts(path, system_prompt=None)


def _window_length(tokenizer, question: str, first: int, last: int) -> int:
    window = " ".join(INITIALS_SENTENCES[first : last + 1])
    return len(template_ids(tokenizer, [user(f"Context: {window}\n\nQuestion: {question}")], True))


def test_cut_context_keeps_every_answer_or_drops_the_row_as_answer_cut(tiny_tokenizer, initials_prompts):
    answer_sentence = {"q1": 1, "q2": 2, "q3": 3, "q4": 0, "q5": 0}
    limit = max(_window_length(tiny_tokenizer, INITIALS_QUESTIONS[qid][0], index, index)
                for qid, index in answer_sentence.items())
    assert _window_length(tiny_tokenizer, INITIALS_QUESTIONS["q4"][0], 0, 4) > limit  # q4 cannot keep both
    assert _window_length(tiny_tokenizer, INITIALS_QUESTIONS["q1"][0], 0, 5) > limit  # every row is cut

    prepared, report = prepare_prompts(initials_prompts, tiny_tokenizer, limit, long_prompts="cut_context")

    assert report.dropped == {data.ANSWER_CUT: 1} and report.examples[data.ANSWER_CUT] == [3]
    assert prepared["id"] == ["q1", "q2", "q3", "q5"] and report.shortened == 4
    assert {"id", "context", "answers", "is_impossible", "input_ids"} <= set(prepared.column_names)
    for row in prepared:
        question, answers = INITIALS_QUESTIONS[row["id"]]
        assert row["answers"]["text"] == [answer["text"] for answer in answers]
        offset = INITIALS_CONTEXT.index(row["context"])  # the cut context is one piece of the original
        for answer, start in zip(answers, row["answers"]["answer_start"]):
            assert start == answer["answer_start"] - offset
            assert row["context"][start : start + len(answer["text"])] == answer["text"]
        kept = [sentence for sentence in INITIALS_SENTENCES if sentence in row["context"]]
        assert row["context"] == " ".join(kept)  # whole sentences: never "... Running back C. J."
        assert len(row["input_ids"]) <= limit
    assert prepared[3]["is_impossible"] is True  # q5 stays unanswerable, with no answers
    assert prepared[3]["answers"] == {"text": [], "answer_start": []}


def test_a_prompt_that_cannot_fit_at_all_is_prompt_too_long(tiny_tokenizer, initials_prompts):
    prepared, report = prepare_prompts(initials_prompts, tiny_tokenizer, 8, long_prompts="cut_context")
    assert prepared.num_rows == 0 and report.dropped == {data.PROMPT_TOO_LONG: 5}


def test_cut_context_needs_context_and_question_columns(tiny_tokenizer, squad_prompts):
    with pytest.raises(ValueError, match="no 'context' column"):
        prepare_prompts(
            squad_prompts.remove_columns("context"), tiny_tokenizer, 50, long_prompts="cut_context"
        )


class _DoubleBosTokenizer:
    """A tokenizer whose template writes BOS and whose encoding adds another."""

    bos_token_id = 0

    def apply_chat_template(self, conversations, **kwargs):
        return [[0, 0, 7, 8] for _ in conversations]


def test_a_doubled_bos_is_collapsed_to_one():
    assert data.encode_chat(_DoubleBosTokenizer(), [user("x")], add_generation_prompt=True) == [0, 7, 8]


# ------------------------------------------------------------------------------------- reports, registry


def test_report_summary_is_one_line():
    report = DataReport("step", total=4)
    report.record_kept(0)
    report.record_kept(1, shortened=True)
    report.record_dropped(2, "a_reason")
    report.record_dropped(3, "a_reason")
    assert (
        report.summary()
        == "step: 4 rows, kept 2 (1 shortened, e.g. rows 1), dropped 2: a_reason 2 (e.g. rows 2, 3)"
    )
    assert Counter(report.dropped) == Counter({"a_reason": 2})


def test_builtin_data_sources_are_registered():
    from trl_multiadapter.registry import data_sources

    assert data_sources.get("hh_rlhf") is load_hh_rlhf
    assert data_sources.get("squad") is load_squad_prompts


def test_drop_limit_is_a_share_of_the_rows_and_names_the_setting():
    report = DataReport("load_hh_rlhf(x.jsonl)", total=4)
    for row in (0, 1):
        report.record_kept(row)
    report.record_dropped(2, data.MALFORMED_ROW)
    report.record_dropped(3, data.NON_STRING_FIELD)
    data.check_drop_fraction(report, 0.5)  # exactly half: allowed
    with pytest.raises(data.TooManyDroppedError) as caught:
        data.check_drop_fraction(report, 0.49, "data.max_drop_fraction")
    assert str(caught.value) == (
        "load_hh_rlhf(x.jsonl): dropped 2 of 4 rows (50.0%), more than data.max_drop_fraction=0.49: "
        "malformed_row 1 (e.g. rows 2); non_string_field 1 (e.g. rows 3); check that the source is the right "
        "file in the right format, or raise data.max_drop_fraction"
    )
    data.check_drop_fraction(DataReport("empty"), 0.0)  # nothing read: nothing to judge
