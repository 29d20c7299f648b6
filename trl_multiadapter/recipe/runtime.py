"""Checks against the machine a run really starts on (4-bit needs CUDA, a hub push needs the hub).

They run when a run starts, never in ``--dry_run``: a recipe for a GPU instance plans fine on a laptop.
"""

from __future__ import annotations

import urllib.request

from .errors import fail
from .sections import ExportConfig, Recipe


def check_runtime(recipe: Recipe) -> None:
    """Checks against the machine a run really starts on (not done by --dry_run)."""
    if recipe.quantization.load_in_4bit:
        _check_4bit_runtime()
    if recipe.export.push_to_hub:
        _check_hub_push(recipe.export)


def check_model_source(recipe: Recipe) -> None:
    """A hub model id that cannot be loaded now (offline and not cached, a typo, gated) fails in one line,
    in seconds, instead of ~50 s of retries inside from_pretrained."""
    from pathlib import Path

    from ..builtin_models import is_builtin
    from ..hub import HubUnreachableError, check_hub_reachable

    for key, name in (("model.name_or_path", recipe.model.name_or_path), ("model.tokenizer", recipe.model.tokenizer)):
        if name is None or is_builtin(name) or Path(name).exists():
            continue
        try:
            check_hub_reachable(name, "model")
        except HubUnreachableError as error:
            fail(key, str(error), "fix the id, pre-download the model, or point the key at a local folder.")


def _check_4bit_runtime() -> None:
    import importlib.util

    from .. import devices

    if not devices.cuda_available():
        fail("quantization.load_in_4bit", "4-bit loading needs a CUDA GPU, and this machine has none.",
             "run on a GPU instance, or set quantization.load_in_4bit=false (e.g. --set "
             "quantization.load_in_4bit=false --set model.dtype=float32 on CPU).")
    if importlib.util.find_spec("bitsandbytes") is None:
        fail("quantization.load_in_4bit", "4-bit loading needs the bitsandbytes package, which is not installed.",
             "pip install 'trl-multiadapter[quant]' (or bitsandbytes), or set quantization.load_in_4bit=false.")


def _check_hub_push(export: ExportConfig) -> None:
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        fail("export.push_to_hub", "the Hugging Face Hub is switched off here (HF_HUB_OFFLINE=1).",
             "unset HF_HUB_OFFLINE, or set export.push_to_hub=false and upload the exported folder later.")
    if get_token() is None:
        fail("export.push_to_hub", "no Hugging Face token found.",
             "run `hf auth login` (or set HF_TOKEN), or set export.push_to_hub=false.")
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=5)
    except OSError as error:  # URLError, timeouts, DNS failures: all mean "no hub from here"
        fail("export.push_to_hub", f"cannot reach {constants.ENDPOINT} ({type(error).__name__}).",
             "check the network, or set export.push_to_hub=false and upload the exported folder later.")
