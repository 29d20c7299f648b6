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
