"""TRL 0.11 names for PPO scripts: change the imports, keep the loop.

    # from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, set_seed
    # from trl.core import LengthSampler
    from trl_multiadapter.trl011 import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, set_seed
    from trl_multiadapter.trl011.core import LengthSampler

A compatibility surface kept apart from the native API (``MultiAdapterPPOConfig`` /
``MultiAdapterPPOTrainer``, whose names and defaults do not change):

- :class:`PPOConfig` (``config``): TRL 0.11's fields and defaults, mapped onto ``MultiAdapterPPOConfig``;
- :class:`AutoModelForCausalLMWithValueHead` (``model``): a ``MultiAdapterModel`` with TRL 0.11's
  ``from_pretrained`` arguments, attributes and ``compute_reward_score``;
- :class:`PPOTrainer` (``trainer``): TRL 0.11's constructor, ``dataloader``, ``generate``, ``step``
  (input checks, TRL 0.11's stat keys next to the native ones), ``log_stats``, ``save_pretrained``;
- :mod:`~trl_multiadapter.trl011.core`: the ``trl.core`` helpers scripts import.

Every difference from TRL 0.11 is listed in docs/migrating_from_trl_0_11.md. New code should use the
native classes directly.
"""

from ..kl_control import AdaptiveKLController, FixedKLController, RunningMoments
from .config import PPOConfig
from .core import LengthSampler, respond_to_batch, set_seed
from .model import AutoModelForCausalLMWithValueHead
from .trainer import PPOTrainer

__all__ = [
    "AdaptiveKLController",
    "AutoModelForCausalLMWithValueHead",
    "FixedKLController",
    "LengthSampler",
    "PPOConfig",
    "PPOTrainer",
    "RunningMoments",
    "respond_to_batch",
    "set_seed",
]
