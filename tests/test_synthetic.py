"""The synthetic data writers: real on-disk formats, exact counts, planted preference, valid offsets.

Every check here re-derives what it needs from the raw files with code written in this test (plain string
splitting, ``json``, ``gzip``), independent of the writer and of ``trl_multiadapter.data``.
"""

from __future__ import annotations

import gzip
import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trl_multiadapter.testing import write_tiny_hh_rlhf, write_tiny_squad
from trl_multiadapter.testing.words import DISMISSIVE_WORDS, HELPFUL_WORDS

HELPFUL = {word.lower() for word in HELPFUL_WORDS}
DISMISSIVE = {word.lower() for word in DISMISSIVE_WORDS}
FINAL_ASSISTANT = "\n\nAssistant:"


def read_json_lines(path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def split_final_answer(transcript: str) -> tuple[str, str]:
    """(everything before the last assistant marker, the last assistant answer)."""
    head, marker, answer = transcript.rpartition(FINAL_ASSISTANT)
    assert marker, f"no assistant turn in {transcript!r}"
    return head, answer.strip()


def planted_counts(answer: str) -> tuple[int, int]:
    tokens = re.findall(r"[a-z]+", answer.lower())
    return sum(token in HELPFUL for token in tokens), sum(token in DISMISSIVE for token in tokens)


def load_with_datasets(path, tmp_path, **kwargs):
    from datasets import load_dataset

    return load_dataset(
        "json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf-cache"), **kwargs
    )


# ----------------------------------------------------------------------------------------------- hh-rlhf


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_hh_rlhf_loads_with_datasets_and_has_exactly_n_rows(tmp_path, suffix):
    path = write_tiny_hh_rlhf(tmp_path / f"pairs{suffix}", n=37, seed=3)
    dataset = load_with_datasets(path, tmp_path)
    assert dataset.num_rows == 37
    assert dataset.column_names == ["chosen", "rejected"]
    assert dataset.to_list() == read_json_lines(path)


def test_gzip_file_decompresses_to_the_plain_file(tmp_path):
    plain = write_tiny_hh_rlhf(tmp_path / "pairs.jsonl", n=10, seed=5)
    packed = write_tiny_hh_rlhf(tmp_path / "pairs.jsonl.gz", n=10, seed=5)
    assert gzip.decompress(packed.read_bytes()) == plain.read_bytes()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_every_pair_carries_the_planted_preference(tmp_path, n, seed):
    rows = read_json_lines(write_tiny_hh_rlhf(tmp_path / "pairs.jsonl", n=n, seed=seed))
    assert len(rows) == n
    for row in rows:
        chosen_prompt, chosen_answer = split_final_answer(row["chosen"])
        rejected_prompt, rejected_answer = split_final_answer(row["rejected"])
        assert chosen_prompt == rejected_prompt
        assert row["chosen"].startswith("\n\nHuman: ")
        helpful, dismissive = planted_counts(chosen_answer)
        assert helpful >= 1 and dismissive == 0, chosen_answer
        helpful, dismissive = planted_counts(rejected_answer)
        assert dismissive >= 1 and helpful == 0, rejected_answer
        # The signal lives only in the answers: the shared prompt has no planted word.
        assert planted_counts(chosen_prompt) == (0, 0), chosen_prompt
        assert 4 <= len(chosen_answer.split()) <= 10
        assert len(chosen_answer.split()) == len(rejected_answer.split())


def test_hh_rlhf_has_the_tricky_transcript_features(tmp_path):
    rows = read_json_lines(write_tiny_hh_rlhf(tmp_path / "pairs.jsonl", n=200, seed=0))
    transcripts = [row["chosen"] for row in rows]
    turn_counts = [len(re.findall(r"\n\n(?:Human|Assistant):", text)) for text in transcripts]
    assert max(turn_counts) >= 5  # three user turns and their answers
    assert min(turn_counts) == 2
    inline_human = [text for text in transcripts if re.search(r"(?<!\n\n)Human:", text)]
    assert inline_human
    # A turn with several paragraphs: a blank line not followed by a turn marker.
    assert any(re.search(r"\n\n(?!Human:|Assistant:)", text) for text in transcripts)


def test_hh_rlhf_is_deterministic_per_seed(tmp_path):
    first = write_tiny_hh_rlhf(tmp_path / "a.jsonl.gz", n=20, seed=11).read_bytes()
    again = write_tiny_hh_rlhf(tmp_path / "b.jsonl.gz", n=20, seed=11).read_bytes()
    other = write_tiny_hh_rlhf(tmp_path / "c.jsonl.gz", n=20, seed=12).read_bytes()
    assert first == again
    assert first != other


@pytest.mark.parametrize("name", ["pairs.json", "pairs.parquet", "pairs.txt"])
def test_hh_rlhf_rejects_unknown_suffix(tmp_path, name):
    with pytest.raises(ValueError, match=r"\.jsonl"):
        write_tiny_hh_rlhf(tmp_path / name, n=3)


def test_writers_reject_non_positive_counts(tmp_path):
    with pytest.raises(ValueError, match="positive integer"):
        write_tiny_hh_rlhf(tmp_path / "pairs.jsonl", n=0)
    with pytest.raises(ValueError, match="positive integer"):
        write_tiny_squad(tmp_path / "squad.json", n=-1)


# ------------------------------------------------------------------------------------------------- SQuAD


def nested_questions(document: dict) -> list[dict]:
    """Flatten the original SQuAD layout with a loop written here (the test's own implementation)."""
    flat = []
    for article in document["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                flat.append(
                    {
                        "id": qa["id"],
                        "title": article["title"],
                        "context": paragraph["context"],
                        "question": qa["question"],
                        "answers": {
                            "text": [answer["text"] for answer in qa["answers"]],
                            "answer_start": [answer["answer_start"] for answer in qa["answers"]],
                        },
                    }
                )
    return flat


def assert_answers_point_into_context(records: list[dict]) -> None:
    for record in records:
        texts, starts = record["answers"]["text"], record["answers"]["answer_start"]
        assert texts and len(texts) == len(starts)
        for text, start in zip(texts, starts):
            assert record["context"][start : start + len(text)] == text, (record["id"], text, start)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 60), seed=st.integers(0, 2**31))
def test_nested_squad_has_n_answerable_questions(tmp_path, n, seed):
    path = write_tiny_squad(tmp_path / "squad.json", n=n, seed=seed, nested=True)
    document = json.loads(path.read_text())
    assert set(document) == {"version", "data"}
    questions = nested_questions(document)
    assert len(questions) == n
    assert len({record["id"] for record in questions}) == n
    assert_answers_point_into_context(questions)
    for article in document["data"]:
        assert set(article) == {"title", "paragraphs"}
        for paragraph in article["paragraphs"]:
            assert set(paragraph) == {"context", "qas"} and paragraph["qas"]
            for qa in paragraph["qas"]:
                assert set(qa) == {"id", "question", "answers"}


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json"])
def test_flat_squad_matches_nested_and_loads_with_datasets(tmp_path, suffix):
    nested = write_tiny_squad(tmp_path / "nested.json", n=23, seed=4, nested=True)
    flat = write_tiny_squad(tmp_path / f"flat{suffix}", n=23, seed=4, nested=False)
    flat_rows = read_json_lines(flat)
    assert flat_rows == nested_questions(json.loads(nested.read_text()))
    assert_answers_point_into_context(flat_rows)
    dataset = load_with_datasets(flat, tmp_path)
    assert dataset.num_rows == 23
    assert dataset.to_list() == flat_rows


def test_nested_squad_loads_with_datasets_field_data(tmp_path):
    path = write_tiny_squad(tmp_path / "nested.json", n=9, seed=2)
    articles = load_with_datasets(path, tmp_path, field="data")
    question_count = sum(len(paragraph["qas"]) for article in articles for paragraph in article["paragraphs"])
    assert question_count == 9


def test_some_squad_questions_have_several_reference_answers(tmp_path):
    rows = read_json_lines(write_tiny_squad(tmp_path / "flat.jsonl", n=100, seed=0, nested=False))
    assert any(len(row["answers"]["text"]) > 1 for row in rows)


def test_squad_is_deterministic_per_seed(tmp_path):
    first = write_tiny_squad(tmp_path / "a.json", n=15, seed=8).read_bytes()
    again = write_tiny_squad(tmp_path / "b.json", n=15, seed=8).read_bytes()
    other = write_tiny_squad(tmp_path / "c.json", n=15, seed=9).read_bytes()
    assert first == again
    assert first != other


def test_squad_rejects_a_suffix_that_does_not_fit_the_layout(tmp_path):
    with pytest.raises(ValueError, match=r"\.json"):
        write_tiny_squad(tmp_path / "nested.jsonl", n=3, nested=True)
    with pytest.raises(ValueError, match=r"\.jsonl"):
        write_tiny_squad(tmp_path / "flat.parquet", n=3, nested=False)


def test_harder_rejected_answers_keep_chosen_strictly_more_helpful(tmp_path):
    """neutral / terse / sparse rejected answers: chosen always has more helpful words and no dismissive ones;
    each kind has its shape (no planted word; a one-or-two-word prefix of chosen; exactly one helpful word)."""
    rows = read_json_lines(write_tiny_hh_rlhf(tmp_path / "pairs.jsonl", n=300, seed=5, neutral_rejected=0.25,
                                              terse_rejected=0.25, sparse_rejected=0.25))
    kinds = {"neutral": 0, "terse": 0, "sparse": 0, "dismissive": 0}
    for row in rows:
        _, chosen = split_final_answer(row["chosen"])
        _, rejected = split_final_answer(row["rejected"])
        chosen_helpful, chosen_dismissive = planted_counts(chosen)
        helpful, dismissive = planted_counts(rejected)
        assert chosen_dismissive == 0 and chosen_helpful > helpful
        chosen_words, rejected_words = chosen[:-1].split(), rejected[:-1].split()
        if dismissive:
            kinds["dismissive"] += 1
        elif len(rejected_words) <= 2 and rejected_words == chosen_words[: len(rejected_words)]:
            kinds["terse"] += 1
        elif helpful == 1 and len(rejected_words) == len(chosen_words):
            kinds["sparse"] += 1
        else:
            assert helpful == 0 and len(rejected_words) == len(chosen_words), rejected
            kinds["neutral"] += 1
    assert all(count > 40 for count in kinds.values()), kinds
    with pytest.raises(ValueError, match="at most 1"):
        write_tiny_hh_rlhf(tmp_path / "bad.jsonl", n=2, neutral_rejected=0.6, terse_rejected=0.6)


def test_unpunctuated_and_made_up_words_keep_the_planted_rule(tmp_path):
    """unpunctuated: a share of pairs ends both answers without "." or "!" (a curt answer is then still a word
    prefix of the chosen one); nonce_words: neutral slots hold made-up words, identical in chosen and
    rejected, never a planted word and never a word of the neutral pools."""
    from trl_multiadapter.testing import words

    known = {word.lower() for word in words.HELPFUL_WORDS + words.DISMISSIVE_WORDS + words.TOPICS + words.VERBS
             + words.ADJECTIVES + words.NAMES + words.FILLER}
    rows = read_json_lines(write_tiny_hh_rlhf(tmp_path / "pairs.jsonl", n=400, seed=3, terse_rejected=0.5,
                                              unpunctuated=0.5, nonce_words=0.5))
    bare = made_up = terse = 0
    for row in rows:
        chosen, rejected = split_final_answer(row["chosen"])[1], split_final_answer(row["rejected"])[1]
        chosen_helpful, chosen_dismissive = planted_counts(chosen)
        assert chosen_dismissive == 0 and chosen_helpful >= planted_counts(rejected)[0]
        assert chosen[-1].isalpha() == rejected[-1].isalpha()  # both end bare or both punctuated
        bare += chosen[-1].isalpha()
        chosen_words, rejected_words = chosen.rstrip(".!").split(), rejected.rstrip(".!").split()
        unknown = [word for word in re.findall(r"[a-z]+", chosen.lower()) if word not in known]
        made_up += bool(unknown)
        if len(rejected_words) < len(chosen_words):  # a curt answer: the chosen one's first words, whole
            assert rejected_words == chosen_words[: len(rejected_words)] and len(rejected_words) <= 2
            terse += 1
        else:  # same skeleton, fewer helpful words; every made-up word of the chosen answer is in the rejected one, same place
            assert planted_counts(rejected)[0] < chosen_helpful
            assert [word for word in rejected_words if word.lower() in unknown] == \
                   [word for word in chosen_words if word.lower() in unknown]
    assert 150 < bare < 250 and made_up > 200 and terse > 150, (bare, made_up, terse)
    plain = read_json_lines(write_tiny_hh_rlhf(tmp_path / "plain.jsonl", n=50, seed=3, terse_rejected=0.5))
    assert plain == read_json_lines(write_tiny_hh_rlhf(tmp_path / "again.jsonl", n=50, seed=3, terse_rejected=0.5,
                                                       unpunctuated=0.0, nonce_words=0.0))
    for name in ("unpunctuated", "nonce_words"):
        with pytest.raises(ValueError, match=name):
            write_tiny_hh_rlhf(tmp_path / "bad.jsonl", n=2, **{name: 1.5})
