"""TRL 0.11's ``PPOConfig``: its fields and defaults, mapped onto :class:`MultiAdapterPPOConfig`.

A real dataclass (``HfArgumentParser((ScriptArguments, PPOConfig))`` parses it, as TRL 0.11's
``examples/scripts/ppo.py`` does) whose defaults are TRL 0.11.4's, so a script that relies on them trains
with the hyper-parameters it had: ``batch_size=128``, ``mini_batch_size=128``, ``seed=0`` and
``max_grad_norm=None``, which means *no* gradient clipping here as it did there (the native config clips
at 1.0 by default). :meth:`PPOConfig.to_multiadapter` builds the native config the trainer runs on.

Added fields, named as in the native config: ``kl_estimator`` (TRL's ``kl_penalty`` under its native
name, with the estimators only the native side has), ``temperature`` (used in sampling *and* in every
logprob), ``output_dir`` and ``multiadapter_kwargs`` (any other :class:`MultiAdapterPPOConfig` field).
No torch import: parsing stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

# TRL 0.11 accepted these four; k2 and k3 are the native names of "mse" and a further estimator.
TRL_KL_PENALTIES = ("kl", "abs", "mse", "full")
NATIVE_ONLY_KL_ESTIMATORS = ("k1", "k2", "k3")

# Fields TRL 0.11 used only for experiment tracking or the hub; kept so scripts can read them.
TRACKING_FIELDS = ("exp_name", "task_name", "model_name", "query_dataset", "reward_model", "tracker_project_name")
# Fields TRL 0.11 filled at runtime (the trainer sets them again at construction, as TRL did).
RUNTIME_FIELDS = ("world_size", "is_encoder_decoder", "is_peft_model", "global_backward_batch_size",
                  "global_batch_size")


def _script_name() -> str:
    # TRL 0.11's exp_name default: the running script's file name without ".py".
    name = os.path.basename(sys.argv[0])
    return name[: -len(".py")] if name.endswith(".py") else name


@dataclass
class PPOConfig:
    """TRL 0.11's PPO settings (same names, same defaults); see the module docstring for what is added."""

    # ---- tracking (TRL 0.11: "used only for tracking purposes") ---------------------------------------
    exp_name: str = field(default_factory=_script_name, metadata={"help": "Name of this experiment."})
    seed: int = field(default=0, metadata={"help": "Random seed (LoRA and value-head init, sampling, shuffling)."})
    log_with: Literal["wandb", "tensorboard"] | None = field(
        default=None, metadata={"help": "'wandb' or 'tensorboard' (becomes the native report_to)."}
    )
    task_name: str | None = field(default=None, metadata={"help": "Tracking only."})
    model_name: str = field(default="gpt2", metadata={"help": "Tracking only (scripts read it to load the model)."})
    query_dataset: str = field(default="stanfordnlp/imdb", metadata={"help": "Tracking only."})
    reward_model: str = field(default="sentiment-analysis:lvwerra/distilbert-imdb", metadata={"help": "Tracking only."})
    remove_unused_columns: bool = field(
        default=True,
        metadata={"help": "The dataloader keeps only input_ids, attention_mask, label, query and response columns."},
    )
    tracker_kwargs: dict | str | None = field(
        default_factory=dict, metadata={"help": "Ignored: configure trackers with their environment variables."}
    )
    accelerator_kwargs: dict | str | None = field(
        default_factory=dict, metadata={"help": "Only 'mixed_precision' ('no' or 'bf16') is used."}
    )
    project_kwargs: dict | str | None = field(
        default_factory=dict, metadata={"help": "Only 'logging_dir' is used (the native logging_dir)."}
    )
    tracker_project_name: str = field(default="trl", metadata={"help": "Tracking only (e.g. set WANDB_PROJECT)."})
    push_to_hub_if_best_kwargs: dict | str | None = field(
        default_factory=dict, metadata={"help": "Not supported: a non-empty value warns and is ignored."}
    )
    steps: int = field(
        default=20000, metadata={"help": "Samples to train on (TRL 0.11 only derived total_ppo_epochs from it)."}
    )

    # ---- PPO -----------------------------------------------------------------------------------------
    learning_rate: float = field(default=1.41e-5, metadata={"help": "Adam learning rate."})
    adap_kl_ctrl: bool = field(default=True, metadata={"help": "Adaptive KL controller (else fixed)."})
    init_kl_coef: float = field(default=0.2, metadata={"help": "Initial KL coefficient."})
    kl_penalty: str = field(default="kl", metadata={"help": "'kl', 'abs', 'mse' or 'full'."})
    target: float = field(default=6.0, metadata={"help": "Target KL of the adaptive controller."})
    horizon: float = field(default=10000.0, metadata={"help": "Horizon of the adaptive controller."})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip range."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip range."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss weight."})
    batch_size: int = field(default=128, metadata={"help": "Rollouts per step() on each process."})
    forward_batch_size: int | None = field(
        default=None, metadata={"help": "Deprecated in TRL 0.11: overrides mini_batch_size, with a warning."}
    )
    mini_batch_size: int = field(default=128, metadata={"help": "Rollouts per forward/backward pass."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Mini-batches per optimizer step."})
    world_size: int | None = field(default=None, metadata={"help": "Set by the trainer: number of processes."})
    ppo_epochs: int = field(default=4, metadata={"help": "Optimisation passes over each batch."})
    max_grad_norm: float | None = field(
        default=None, metadata={"help": "Gradient clipping norm; None: no clipping (TRL 0.11's default)."}
    )
    optimize_cuda_cache: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of optimize_device_cache (which has no effect here)."}
    )
    optimize_device_cache: bool = field(default=False, metadata={"help": "No effect (no cache flushing needed)."})
    early_stopping: bool = field(default=False, metadata={"help": "Not supported: True warns and is ignored."})
    target_kl: float = field(default=1.0, metadata={"help": "Used only with early_stopping (not supported)."})
    compare_steps: int = field(default=1, metadata={"help": "Used only with push_to_hub_if_best_kwargs."})
    ratio_threshold: float = field(default=10.0, metadata={"help": "Skip mini-batches whose mean ratio exceeds it."})
    use_score_scaling: bool = field(default=False, metadata={"help": "Scale scores by their running std."})
    use_score_norm: bool = field(default=False, metadata={"help": "With use_score_scaling, also subtract the mean."})
    score_clip: float | None = field(default=None, metadata={"help": "Clip scores to [-score_clip, score_clip]."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten per-token rewards before GAE."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    is_encoder_decoder: bool | None = field(default=None, metadata={"help": "Set by the trainer (always False)."})
    is_peft_model: bool | None = field(default=None, metadata={"help": "Set by the trainer (always True)."})
    backward_batch_size: int | None = field(
        default=None, metadata={"help": "Computed: mini_batch_size * gradient_accumulation_steps."}
    )
    global_backward_batch_size: int | None = field(default=None, metadata={"help": "Set by the trainer."})
    global_batch_size: int | None = field(default=None, metadata={"help": "Set by the trainer."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Read by scripts for dataset.map."})

    # ---- added: native names and settings ------------------------------------------------------------
    kl_estimator: str | None = field(
        default=None,
        metadata={"help": "Native name of kl_penalty (k1/kl, abs, k2/mse, k3, full); overrides it when set."},
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature, also used in every logprob (TRL 0.11 used 1 there)."}
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Where save_model/checkpoints go; None: a fresh temporary folder."}
    )
    multiadapter_kwargs: dict | str | None = field(
        default_factory=dict,
        metadata={"help": "Any other MultiAdapterPPOConfig field, e.g. {\"stop_token\": \"<|eot_id|>\"} (JSON)."},
    )

    def __post_init__(self) -> None:
        for name in ("tracker_kwargs", "accelerator_kwargs", "project_kwargs", "push_to_hub_if_best_kwargs",
                     "multiadapter_kwargs"):
            setattr(self, name, _as_dict(getattr(self, name), name))
        if self.optimize_cuda_cache is not None:
            warnings.warn("PPOConfig(optimize_cuda_cache=...) is deprecated in TRL 0.11 (optimize_device_cache) and "
                          "has no effect here", FutureWarning, stacklevel=3)
        if self.forward_batch_size is not None:
            warnings.warn("PPOConfig(forward_batch_size=...) is deprecated: it sets mini_batch_size", stacklevel=3)
            self.mini_batch_size = self.forward_batch_size
        for name in ("batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"PPOConfig({name}={getattr(self, name)}) is invalid: use at least 1")
        self.backward_batch_size = self.mini_batch_size * self.gradient_accumulation_steps
        if self.batch_size % self.backward_batch_size != 0:
            raise ValueError(
                f"PPOConfig: `batch_size` ({self.batch_size}) must be a multiple of `mini_batch_size * "
                f"gradient_accumulation_steps` ({self.mini_batch_size} * {self.gradient_accumulation_steps} = "
                f"{self.backward_batch_size}); change batch_size or lower the other two"
            )
        valid = (*TRL_KL_PENALTIES, *NATIVE_ONLY_KL_ESTIMATORS)
        for name in ("kl_penalty", "kl_estimator"):
            value = getattr(self, name)
            if value is not None and value not in valid:
                raise ValueError(f"PPOConfig({name}={value!r}) is not one of {list(valid)}")
        if self.log_with == "wandb":
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                raise ImportError("PPOConfig(log_with='wandb') needs wandb: pip install wandb")

    @property
    def total_ppo_epochs(self) -> int:
        """TRL 0.11's ceil(steps / batch_size)."""
        return -(-self.steps // self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        """The fields as one flat dict (nested dicts flattened with '/'), as TRL 0.11's ``to_dict``."""
        from .core import flatten_dict

        return flatten_dict(dict(vars(self)))

    def to_multiadapter(self):
        """The :class:`~trl_multiadapter.MultiAdapterPPOConfig` these settings mean (see the module docstring)."""
        from ..devices import use_cpu
        from ..ppo_config import MultiAdapterPPOConfig

        self._warn_unsupported()
        settings: dict[str, Any] = {
            "output_dir": self.output_dir or tempfile.mkdtemp(prefix="trl011-ppo-"),
            "save_strategy": "no",  # TRL 0.11 wrote no checkpoints
            "report_to": self.log_with or "none",
            "seed": self.seed,
            "learning_rate": self.learning_rate,
            "batch_size": self.batch_size,
            "mini_batch_size": self.mini_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "ppo_epochs": self.ppo_epochs,
            "init_kl_coef": self.init_kl_coef,
            "adap_kl_ctrl": self.adap_kl_ctrl,
            "target": self.target,
            "horizon": self.horizon,
            "kl_estimator": self.kl_estimator or self.kl_penalty,
            "gamma": self.gamma,
            "lam": self.lam,
            "cliprange": self.cliprange,
            "cliprange_value": self.cliprange_value,
            "vf_coef": self.vf_coef,
            "ratio_threshold": self.ratio_threshold,
            "use_score_scaling": self.use_score_scaling,
            # TRL 0.11 ignored use_score_norm without use_score_scaling; the native config refuses it.
            "use_score_norm": self.use_score_norm and self.use_score_scaling,
            "score_clip": self.score_clip,
            "whiten_rewards": self.whiten_rewards,
            # The native trainer treats 0 as "no clipping"; None is TRL 0.11's spelling of the same.
            "max_grad_norm": 0.0 if self.max_grad_norm is None else self.max_grad_norm,
            "temperature": self.temperature,
            "disable_tqdm": True,
        }
        if use_cpu():
            settings["use_cpu"] = True
        if self.gradient_checkpointing:  # transformers 5 renamed the field
            names = {f.name for f in dataclasses.fields(MultiAdapterPPOConfig)}
            settings["activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"] = True
        mixed_precision = self.accelerator_kwargs.get("mixed_precision")
        if mixed_precision == "bf16":
            settings["bf16"] = True
        elif mixed_precision == "fp16":
            settings["fp16"] = True  # refused by the native config, with the reason
        if "logging_dir" in self.project_kwargs:
            settings["logging_dir"] = self.project_kwargs["logging_dir"]
        settings.update(self.multiadapter_kwargs)
        return MultiAdapterPPOConfig(**settings)

    def _warn_unsupported(self) -> None:
        if self.early_stopping:
            warnings.warn("PPOConfig(early_stopping=True) is not supported and is ignored: every step runs all "
                          "ppo_epochs (ratio_threshold still skips mini-batches whose ratio blows up)", stacklevel=3)
        if self.push_to_hub_if_best_kwargs:
            warnings.warn("PPOConfig(push_to_hub_if_best_kwargs=...) is not supported and is ignored: save with "
                          "ppo_trainer.save_pretrained(dir) and upload the folder", stacklevel=3)
        if self.use_score_norm and not self.use_score_scaling:
            warnings.warn("PPOConfig(use_score_norm=True) acts only with use_score_scaling=True (as in TRL 0.11): "
                          "ignored", stacklevel=3)
        ignored = sorted(set(self.accelerator_kwargs) - {"mixed_precision"})
        ignored += sorted(set(self.project_kwargs) - {"logging_dir"})
        if ignored:
            warnings.warn(f"PPOConfig accelerator_kwargs/project_kwargs keys {ignored} are ignored: the native "
                          "trainer builds its accelerator from MultiAdapterPPOConfig (set its fields through "
                          "multiadapter_kwargs)", stacklevel=3)


def _as_dict(value, name: str) -> dict:
    if value is None:
        return {}
    if isinstance(value, str):  # from the command line: JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"PPOConfig({name}=...) must be a JSON object, got {value!r}: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"PPOConfig({name}=...) must be a dict (or a JSON object string), got {type(value).__name__}")
    return value
