"""TRL 0.11's ``PPOTrainer``: constructor, ``dataloader``, ``generate``, ``step`` and ``log_stats``.

A :class:`~trl_multiadapter.MultiAdapterPPOTrainer` underneath: the PPO iteration is the native one.
This class adds what TRL 0.11 scripts call: the constructor ``PPOTrainer(config, model, ref_model,
tokenizer, dataset, optimizer, data_collator, num_shared_layers, lr_scheduler)``, the optimizer and
scheduler built (and accelerate-wrapped) at construction, ``step``'s input checks and TRL 0.11's stat
keys next to the native ones, ``generate`` with ``length_sampler``/``batch_size``/``generate_ref_response``
and greedy decoding, ``log_stats``, ``save_pretrained`` and the attributes ``config``, ``tokenizer``,
``ref_model``, ``current_device``, ``dataset``, ``is_distributed``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import distributed
from ..model import MultiAdapterModel
from ..ppo_config import MultiAdapterPPOConfig
from ..ppo_trainer import MultiAdapterPPOTrainer
from ..rollout import left_pad
from .config import PPOConfig
from .data import check_dataset, trl_dataloader
from .generation import sampling_overrides
from .model import set_gradient_checkpointing
from .stats import LossSettings, StepRecord, minibatch_stats, step_stats, timing_stats


class PPOTrainer(MultiAdapterPPOTrainer):
    """:class:`MultiAdapterPPOTrainer` with TRL 0.11's constructor, loop helpers and statistics.

    ``config``: a :class:`~trl_multiadapter.trl011.PPOConfig` (TRL 0.11's fields and defaults) or a
    native :class:`MultiAdapterPPOConfig`. ``ref_model`` must be None: the reference is the base with
    every adapter disabled, so nothing is copied (``num_shared_layers`` is therefore ignored, with a
    warning). ``training_data_collator`` is ignored (``step`` pads the token tensors itself).
    """

    def __init__(self, config: PPOConfig | MultiAdapterPPOConfig | None = None, model: MultiAdapterModel | None = None,
                 ref_model=None, tokenizer=None, dataset=None, optimizer: torch.optim.Optimizer | None = None,
                 data_collator: Callable | None = None, num_shared_layers: int | None = None,
                 lr_scheduler=None, training_data_collator: Callable | None = None):
        from transformers import PreTrainedTokenizerBase

        config = config if config is not None else PPOConfig()
        if not isinstance(config, (PPOConfig, MultiAdapterPPOConfig)):
            raise ValueError(f"config must be a trl_multiadapter.trl011.PPOConfig, got {type(config).__name__}")
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise ValueError(f"tokenizer must be a transformers tokenizer (PreTrainedTokenizerBase), got "
                             f"{type(tokenizer).__name__}")
        if not isinstance(model, MultiAdapterModel):
            raise ValueError(f"model must be an AutoModelForCausalLMWithValueHead from trl_multiadapter.trl011 (a "
                             f"MultiAdapterModel), got {type(model).__name__}")
        if ref_model is not None:
            raise ValueError("ref_model must be None: the reference is the policy's base model with every adapter "
                             "disabled (no second copy); pass ref_model=None")
        if num_shared_layers is not None:
            warnings.warn("num_shared_layers is ignored: policy and reference already share the whole base model "
                          "(the reference is the base with adapters disabled, nothing is copied)", UserWarning,
                          stacklevel=2)
        if training_data_collator is not None:
            warnings.warn("training_data_collator is ignored: step() pads the token tensors itself", UserWarning,
                          stacklevel=2)
        check_dataset(dataset)
        if dataset is None:
            warnings.warn("No dataset is provided: iterate your own batches of exactly config.batch_size queries "
                          "(per process) and pass them to step()", UserWarning, stacklevel=2)
        _check_scheduler(lr_scheduler)
        self._trl_config = config if isinstance(config, PPOConfig) else None
        args = config.to_multiadapter() if isinstance(config, PPOConfig) else config
        super().__init__(model=model, args=args, processing_class=tokenizer, train_dataset=None,
                         optimizers=(optimizer, lr_scheduler))
        if getattr(config, "gradient_checkpointing", False) and not model.gradient_checkpointing:
            set_gradient_checkpointing(model, True)
        self._build_wrapped_optimizer()
        self._record: StepRecord | None = None
        self.passes = _RecordingPasses(self.passes, lambda: self._record,
                                       LossSettings(args.cliprange, args.cliprange_value, args.vf_coef,
                                                    args.ratio_threshold, args.temperature))
        self.dataset = dataset
        self.dataloader = None
        if dataset is not None:
            self.dataloader = self.accelerator.prepare(self.prepare_dataloader(dataset, data_collator))
        self.current_step = 0
        if self._trl_config is not None:
            self._trl_config.world_size = self.num_processes
            self._trl_config.global_backward_batch_size = args.backward_batch_size * self.num_processes
            self._trl_config.global_batch_size = args.batch_size * self.num_processes
            self._trl_config.is_encoder_decoder, self._trl_config.is_peft_model = False, True

    def _build_wrapped_optimizer(self) -> None:
        """Optimizer and scheduler now (TRL 0.11 built them in the constructor), wrapped by accelerate as
        TRL 0.11's were (``trainer.optimizer.optimizer`` is the torch optimizer). The scheduler wrapper steps
        once per iteration on every process (``split_batches=True``), as the native trainer's schedule does."""
        from accelerate.optimizer import AcceleratedOptimizer
        from accelerate.scheduler import AcceleratedScheduler

        self.create_optimizer_and_scheduler(self.args.max_steps if self.args.max_steps > 0 else None)
        if not isinstance(self.optimizer, AcceleratedOptimizer):
            self.optimizer = AcceleratedOptimizer(self.optimizer, device_placement=False)
        if self.lr_scheduler is not None and not isinstance(self.lr_scheduler, AcceleratedScheduler):
            self.lr_scheduler = AcceleratedScheduler(self.lr_scheduler, self.optimizer, step_with_optimizer=True,
                                                     split_batches=True)

    # ------------------------------------------------------------------------------------------------
    # TRL 0.11 attributes

    @property
    def config(self) -> PPOConfig | MultiAdapterPPOConfig:
        """The config as given (a TRL ``PPOConfig``; the native settings it maps to are ``trainer.args``)."""
        return self._trl_config if self._trl_config is not None else self.args

    @property
    def tokenizer(self):
        return self.processing_class

    @property
    def ref_model(self) -> None:
        """None: the reference is ``model`` in its ``reference`` role (the base with adapters disabled)."""
        return None

    @property
    def current_device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_distributed(self) -> bool:
        return self.num_processes > 1

    @property
    def is_peft_model(self) -> bool:
        return True

    @property
    def is_encoder_decoder(self) -> bool:
        return False

    @property
    def running(self):
        """The running moments of the scores (TRL 0.11's ``running``)."""
        return self.score_moments

    def prepare_dataloader(self, dataset, data_collator: Callable | None = None) -> torch.utils.data.DataLoader:
        """TRL 0.11's dataloader over ``dataset`` (see :mod:`trl_multiadapter.trl011.data`)."""
        remove = self._trl_config.remove_unused_columns if self._trl_config is not None else True
        return trl_dataloader(dataset, self.args.batch_size, data_collator, remove, self.args.seed)

    # ------------------------------------------------------------------------------------------------
    # generate

    def generate(self, query_tensor: torch.Tensor | list[torch.Tensor], length_sampler: Callable[[], int] | None = None,
                 batch_size: int = 4, return_prompt: bool = True, generate_ref_response: bool = False,
                 **generation_kwargs):
        """Responses to one 1-D query tensor (returned as (1, L)) or to a list of them (a list of 1-D tensors),
        as TRL 0.11's ``generate``: prompt + response, or only the response with ``return_prompt=False``;
        each response ends after its first stop token.

        length_sampler: called for each chunk of ``batch_size`` queries (once for a single query) to draw
        ``max_new_tokens``. generate_ref_response: also return the reference's responses (the base with
        adapters disabled) as a second value. generation_kwargs: ``max_new_tokens``, ``top_k``, ``top_p``,
        ``do_sample`` (False: greedy), ``eos_token_id``, ``temperature`` (must equal the config's, which
        PPO's logprobs use); ``pad_token_id``, ``min_length=-1`` and ``use_cache`` are accepted. Beam search,
        repetition penalties and other distribution changes are refused with the reason.
        """
        single = isinstance(query_tensor, torch.Tensor)
        if single and query_tensor.dim() != 1:
            raise ValueError("query_tensor must be a tensor of shape (seq_len,) or a list of tensors of shape (seq_len,)")
        queries = [query_tensor] if single else list(query_tensor)
        overrides = sampling_overrides(generation_kwargs, self.args.temperature)
        chunk = len(queries) if single else max(1, min(int(batch_size), len(queries)))
        roles = ("policy", "reference") if generate_ref_response else ("policy",)
        outputs = []
        for role in roles:
            responses = []
            for start in range(0, len(queries), chunk):
                settings = dict(overrides)
                if length_sampler is not None:
                    settings["max_new_tokens"] = int(length_sampler())
                if role == "reference":
                    settings["role"] = "reference"
                responses += self._responses(queries[start : start + chunk], settings)
            joined = [torch.cat([query.to(response.device), response]) if return_prompt else response
                      for query, response in zip(queries, responses)]
            outputs.append(joined[0].unsqueeze(0) if single else joined)
        return tuple(outputs) if generate_ref_response else outputs[0]

    def _responses(self, queries: Sequence[torch.Tensor], overrides: dict) -> list[torch.Tensor]:
        from .generation import require_sampler_fields

        require_sampler_fields(overrides)
        rollout = self._generate(*left_pad(queries, self.pad_token_id, self.device), for_training=False, **overrides)
        return [ids[mask.bool()] for ids, mask in zip(rollout.response_ids, rollout.response_mask)]

    # ------------------------------------------------------------------------------------------------
    # step

    def step(self, queries: list[torch.Tensor], responses: list[torch.Tensor] | None = None,
             scores: list[torch.Tensor] | None = None,
             response_masks: list[torch.Tensor] | None = None) -> dict[str, float | Any]:
        """One PPO iteration on given queries, responses and scores, as TRL 0.11's ``step``.

        The inputs are checked as TRL 0.11 checked them (:meth:`_step_safety_checker`). Returns TRL 0.11's
        31 keys with their meaning (``ppo/mean_scores`` after scaling and clipping, ``ppo/loss/value``
        unweighted, ...) next to the native metrics (``objective/scores``, ``loss/policy_avg``, ``val/ratio``,
        ``lr``, ...). responses / scores None: the trainer samples / scores them (native behaviour).
        """
        queries, responses, scores, response_masks = self._step_safety_checker(
            self.args.batch_size, queries, responses, scores, response_masks)
        self._record = StepRecord()
        try:
            native = super().step(queries, responses, scores, response_masks)
            record = self._record
        finally:
            self._record = None
        started = time.perf_counter()
        stats = step_stats(record, self.args.kl_estimator, self.args.temperature)
        scalars = distributed.mean_across_processes(
            {key: value for key, value in stats.items() if isinstance(value, float)}, self.device)
        stats.update(scalars)
        stats["ppo/learning_rate"] = native["lr"]
        stats.update(timing_stats(record, native["time/optimisation"], time.perf_counter() - started))
        return {**stats, **native}

    def _step_safety_checker(self, batch_size: int | None, queries, responses, scores, masks=None):
        """TRL 0.11's checks of ``step``'s inputs; returns them on ``current_device`` (scores as 0-d tensors)."""
        given = {"queries": queries, "responses": responses, "scores": scores}
        for name, tensors in given.items():
            if tensors is None and name != "queries":
                continue
            if not isinstance(tensors, list):
                raise ValueError(f"{name} must be a list of tensors - got {type(tensors)}")
            if not tensors or not all(isinstance(tensor, torch.Tensor) for tensor in tensors):
                kinds = sorted({type(tensor).__name__ for tensor in tensors})
                raise ValueError(f"Elements in {name} must be tensors - got {kinds or 'an empty list'}")
            if batch_size is not None and len(tensors) != batch_size:
                raise ValueError(f"Batch size ({batch_size}) does not match number of examples - but got "
                                 f"{len(tensors)} for: {name}")
        for name in ("queries", "responses"):
            for index, tensor in enumerate(given[name] or []):
                if tensor.dim() != 1 or tensor.is_floating_point() or tensor.numel() == 0:
                    raise ValueError(f"{name}[{index}] must be a non-empty 1-D tensor of token ids - got shape "
                                     f"{tuple(tensor.shape)}, dtype {tensor.dtype}")
        device = self.current_device
        queries = [tensor.to(device) for tensor in queries]
        responses = [tensor.to(device) for tensor in responses] if responses is not None else None
        if scores is not None:
            checked = []
            for score in scores:
                if score.dim() > 1 or score.numel() != 1:
                    raise ValueError(f"Scores must be 1-dimensional - got {score.dim()} for {score}")
                checked.append(score.to(device).reshape(()))
            scores = checked
        if masks is not None:
            if responses is None or len(masks) != len(responses):
                raise ValueError("response_masks need one mask per given response")
            for index, (mask, response) in enumerate(zip(masks, responses)):
                if mask.shape != response.shape:
                    raise ValueError(f"response_masks[{index}] has shape {tuple(mask.shape)} but responses[{index}] "
                                     f"has {tuple(response.shape)}")
            masks = [mask.to(device) for mask in masks]
        return queries, responses, scores, masks

    def _shape_scores(self, scores: torch.Tensor) -> torch.Tensor:
        shaped = super()._shape_scores(scores)
        if self._record is not None:  # TRL 0.11's ppo/mean_scores is taken after scaling and clipping
            self._record.scores = shaped.detach().clone()
            self._record.kl_coef = self.kl_ctl.value
            self._record.scores_shaped = time.perf_counter()
        return shaped

    # ------------------------------------------------------------------------------------------------
    # logging and saving

    def log_stats(self, stats: dict[str, Any], batch: dict | None = None, rewards=None,
                  columns_to_log: Sequence[str] = ("query", "response")) -> None:
        """Log the scalar entries of ``stats`` plus ``env/reward_mean`` / ``env/reward_std`` of ``rewards``
        (gathered over processes) to ``state.log_history`` and the ``report_to`` backends. Arrays and
        TRL 0.11's wandb ``game_log`` table are not logged (``batch`` and ``columns_to_log`` are accepted)."""
        logs = {key: float(value) for key, value in stats.items() if _is_number(value)}
        if rewards is not None:
            values = rewards if isinstance(rewards, torch.Tensor) else torch.stack(
                [torch.as_tensor(reward, dtype=torch.float32).reshape(()) for reward in rewards])
            values = self.accelerator.gather(values.float().flatten().to(self.current_device))
            logs["env/reward_mean"] = values.mean().item()
            logs["env/reward_std"] = values.std().item()
        self.current_step += 1
        self.log(logs)

    def save_pretrained(self, save_directory: str, push_to_hub: bool = False, **kwargs) -> None:
        """Write the model's adapters and heads and the tokenizer to ``save_directory`` (``save_model``)."""
        if push_to_hub:
            raise ValueError("save_pretrained(push_to_hub=True) is not supported: save, then upload the folder with "
                             "huggingface_hub.upload_folder")
        self.save_model(save_directory)

    def push_to_hub(self, *args, **kwargs):
        raise NotImplementedError("push_to_hub is not supported: ppo_trainer.save_pretrained(dir), then "
                                  "huggingface_hub.upload_folder(folder_path=dir, repo_id=...)")


class _RecordingPasses:
    """The trainer's ``RolePasses``, also filling the current :class:`StepRecord` (when there is one) with
    the old logprobs, the reference logprobs and every training forward's TRL 0.11 statistics."""

    def __init__(self, passes, current_record: Callable[[], StepRecord | None], settings: LossSettings):
        self._passes, self._current_record, self._settings = passes, current_record, settings

    def __getattr__(self, name):
        if name == "_passes":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self._passes, name)

    def old_logprobs_and_values(self, rollout, first_order, exact):
        record = self._current_record()
        if record is not None:
            record.forward_started = time.perf_counter()
        rollout = self._passes.old_logprobs_and_values(rollout, first_order, exact)
        if record is not None:
            record.add_rollout(rollout)
        return rollout

    def reference(self, rollout, minibatch_order=None):
        ref_logprobs, ref_logits = self._passes.reference(rollout, minibatch_order)
        record = self._current_record()
        if record is not None:
            record.ref_logprobs, record.ref_logits = ref_logprobs, ref_logits
            record.reference_done = time.perf_counter()
        return ref_logprobs, ref_logits

    def policy(self, minibatch):
        logits, logprobs, values = self._passes.policy(minibatch)
        record = self._current_record()
        if record is not None and torch.is_grad_enabled():
            if record.optimisation_started is None:
                record.optimisation_started = time.perf_counter()
            with torch.no_grad():
                record.minibatches.append(minibatch_stats(minibatch, logits.detach(), logprobs.detach(),
                                                          values.detach(), self._settings))
        return logits, logprobs, values


def _check_scheduler(lr_scheduler) -> None:
    if lr_scheduler is not None and not isinstance(lr_scheduler, torch.optim.lr_scheduler.LRScheduler):
        raise ValueError(f"lr_scheduler must be a torch.optim.lr_scheduler.LRScheduler, got "
                         f"{type(lr_scheduler).__name__}")


def _is_number(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    return isinstance(value, torch.Tensor) and value.numel() == 1
