"""trl-multiadapter: multi-adapter PPO on one shared, frozen base model.

Heavy submodules (torch, transformers, peft) are imported lazily so that
``import trl_multiadapter`` and the CLI's ``--help`` stay fast.
"""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0.dev0"

_LAZY_ATTRIBUTES = {
    "MultiAdapterModel": "trl_multiadapter.model",
    "MultiAdapterPPOConfig": "trl_multiadapter.ppo_config",
    "MultiAdapterPPOTrainer": "trl_multiadapter.ppo_trainer",
}

__all__ = ["MultiAdapterModel", "MultiAdapterPPOConfig", "MultiAdapterPPOTrainer", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .model import MultiAdapterModel
    from .ppo_config import MultiAdapterPPOConfig
    from .ppo_trainer import MultiAdapterPPOTrainer


def __getattr__(name: str):
    module_name = _LAZY_ATTRIBUTES.get(name)
    if module_name is None:
        raise AttributeError(f"module 'trl_multiadapter' has no attribute {name!r}")
    value = getattr(import_module(module_name), name)
    globals()[name] = value
    return value
