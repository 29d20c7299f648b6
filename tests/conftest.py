"""Shared fixtures. Expensive objects are session-scoped and reused across test files.

This file is shared by every test module: add fixtures with small edits, keep them session-scoped
when they are expensive, and never download anything.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The default tiny tokenizer (vocabulary 1024). Do not mutate it; build your own if you need to."""
    from trl_multiadapter.testing import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny causal LM + tokenizer, loadable with ``from_pretrained`` like a hub id."""
    from trl_multiadapter.testing import build_tiny_model

    path = tmp_path_factory.mktemp("tiny-causal-lm")
    build_tiny_model("tiny", task="causal", seed=0).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_causal_lm():
    """A fresh tiny causal LM (seed 0) per test: tests may wrap and train it."""
    from trl_multiadapter.testing import build_tiny_model

    return build_tiny_model("tiny", task="causal", seed=0)


# --- foundation: markers and hypothesis profile -------------------------------------------------
# A loaded 2-core CI machine makes wall-clock deadlines flaky; property tests bound their work with
# max_examples instead.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("trl_multiadapter", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "trl_multiadapter"))


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``gpu`` when CUDA is not available (they run on GPU machines only)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in gpu_items:
        item.add_marker(skip)


# --- reward: a tiny reward adapter trained once per session --------------------------------------


@pytest.fixture(scope="session")
def tiny_reward_adapter_dir(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    """A reward adapter trained once per session (~15 s on 2 cores) on synthetic hh-rlhf pairs.

    The base is ``tiny_model_dir``; the pairs come from ``write_tiny_hh_rlhf`` through the real loaders
    (chosen answers use HELPFUL_WORDS, rejected ones DISMISSIVE_WORDS) and the adapter learns that
    preference on the held-out file. Returns a namespace: ``adapter_dir``, ``base_model_dir``, ``result``
    (RewardAdapterResult), ``config``, ``train_pairs`` / ``eval_pairs`` (TRL conversational format) and
    ``wall_seconds``. Load it with ``MultiAdapterModel.from_pretrained(base_model_dir, reward_adapter=adapter_dir)``.
    """
    import time
    from types import SimpleNamespace

    from trl_multiadapter.data import load_hh_rlhf, prepare_preference_pairs
    from trl_multiadapter.reward import RewardAdapterConfig, train_reward_adapter
    from trl_multiadapter.testing import write_tiny_hh_rlhf

    root = tmp_path_factory.mktemp("tiny-reward")
    train_pairs, _ = prepare_preference_pairs(load_hh_rlhf(write_tiny_hh_rlhf(root / "train.jsonl", 256, seed=0)),
                                              tiny_tokenizer, 256)
    eval_pairs, _ = prepare_preference_pairs(load_hh_rlhf(write_tiny_hh_rlhf(root / "test.jsonl", 48, seed=1)),
                                             tiny_tokenizer, 256)
    # A higher learning rate than the recipe default: the tiny random base learns the preference in 3 epochs.
    config = RewardAdapterConfig(
        learning_rate=1e-3, num_train_epochs=3, per_device_train_batch_size=8, per_device_eval_batch_size=8,
        gradient_checkpointing=False, max_length=256, seed=0, disable_tqdm=True,
    )
    started = time.perf_counter()
    result = train_reward_adapter(str(tiny_model_dir), train_pairs, None, root / "adapter", config,
                                  eval_dataset=eval_pairs)
    return SimpleNamespace(
        adapter_dir=result.output_dir, base_model_dir=tiny_model_dir, result=result, config=config,
        train_pairs=train_pairs.to_list(), eval_pairs=eval_pairs.to_list(), wall_seconds=time.perf_counter() - started,
    )


# --- pipeline: one finished tiny_cpu run per session ----------------------------------------------


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished tiny_cpu run (all stages) made once per session by the CLI, as a user runs it: in a
    subprocess whose output goes to a file (no TTY), kept beside the run as ``run.log``. Every evaluated
    sample is written (``evaluate.num_shown_samples=1000``) so tests can recount the aggregates."""
    import subprocess
    import sys
    from pathlib import Path

    run_dir = tmp_path_factory.mktemp("tiny-cpu-run") / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MPLBACKEND": "Agg"}
    env.pop("TRL_MULTIADAPTER_LAUNCHED", None)
    with open(run_dir.parent / "run.log", "w") as log:
        code = subprocess.call([sys.executable, "-m", "trl_multiadapter", "run", "tiny_cpu", "--output_dir",
                                str(run_dir), "--set", "evaluate.num_shown_samples=1000"],
                               stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parents[1])
    assert code == 0, (run_dir.parent / "run.log").read_text()[-3000:]
    return run_dir


# --- a trained-looking policy adapter ----------------------------------------------------------


@pytest.fixture(scope="session")
def write_random_policy_adapter():
    """``write(path, seed) -> path``: a CAUSAL_LM LoRA (r=4, all-linear) over the tiny base whose B matrices
    are random, so the policy differs from the base; saved with peft's save_pretrained."""
    def write(path, seed: int = 0):
        import torch
        from peft import LoraConfig, get_peft_model

        from trl_multiadapter.testing import build_tiny_model

        peft_model = get_peft_model(build_tiny_model("tiny"), LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                                         target_modules="all-linear"))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        peft_model.save_pretrained(path)
        return path

    return write
