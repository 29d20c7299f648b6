"""``MultiAdapterPPOTrainer``: PPO (Ziegler et al. 2019) on one shared base with named adapters.

One iteration (``trainer.step`` or a ``train()`` step)::

    rollout = sampler(...)               policy adapter, KV cache; old logprobs + values captured;
                                         batch_size rows = batch_size / k prompts, each sampled k times
    scores  = reward_source(rollout)     reward adapter (training format) or reward functions
    ref     = reference logprobs         adapters disabled (or policy_init), one no-grad pass
    rewards = -beta * KL_t (+ score at the last token), or the score alone with the KL in the loss
    advantages = ppo_math.compute_advantages(advantage_estimator): GAE (whitened), RLOO, GRPO, REINFORCE++
    ppo_epochs x mini-batches of whole prompt groups: clipped policy loss (+ value loss with a value model,
    + beta * k3 KL with the KL in the loss), backward, clip, optimizer step

The trainer orchestrates; the math lives in ``ppo_math`` and ``kl_control``, scoring in ``scoring``,
collectives in ``distributed``, resume state in ``checkpointing``, metrics in ``ppo_metrics``.

Why a ``transformers.Trainer`` subclass (as TRL's later PPOTrainer): it brings the accelerator built
from the arguments (DDP environment, mixed precision), ``TrainerState`` and ``log_history``, the
callback system with ``report_to`` integrations, and optimizer/scheduler factories that honour
``optim``, ``lr_scheduler_type`` and ``warmup_steps``. The PPO loop replaces ``train()``,
``evaluate()`` and ``save_model()``; the parent's data loaders and ``compute_loss`` are not used.
Data parallelism: see ``distributed`` (gradients averaged by the trainer, not by a DDP wrapper).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_utils import TrainOutput

from . import distributed, ppo_math
from .batching import RolePasses, at_temperature, minibatch_orders
from .builder import build_model, load_tokenizer
from .checkpointing import ResumeState, resolve_checkpoint, save_checkpoint
from .devices import isolated_rng
from .kl_control import RunningMoments, build_kl_controller
from .model import MultiAdapterModel
from .ppo_config import MultiAdapterPPOConfig
from .ppo_metrics import (
    EvaluationTotals,
    MinibatchResult,
    NonFiniteValueError,
    OptimisationRecord,
    Timings,
    mean,
    nonfinite_rows,
    rollout_stats,
)
from .progress import install_progress
from .prompts import check_prompt_columns, encode_prompts, pad_token_id, select_columns
from .rollout import (
    PromptSampler,
    Rollout,
    SamplingSettings,
    TrainingBatch,
    left_pad,
    ppo_sampling_settings,
    rollout_from_tensors,
    sample_rollout,
    stop_token_ids,
)
from .scoring import RewardFunction, as_reward_functions, reward_source_for, scores_tensor

__all__ = ["MultiAdapterPPOTrainer", "NonFiniteValueError"]


class MultiAdapterPPOTrainer(Trainer):
    """PPO on a :class:`~trl_multiadapter.MultiAdapterModel` (policy, value, reward and reference on one base).

    Args:
        model: a ``MultiAdapterModel``, a ``transformers`` causal LM, a model id / path or a ``builtin:``
            name; all but the first are built by :func:`trl_multiadapter.builder.build_model` with
            ``peft_config``, ``reward_adapter`` and the config's model fields, seeded by ``args.seed``.
        args: a :class:`MultiAdapterPPOConfig`.
        processing_class: the tokenizer (loaded from ``model`` when it is an id/path and this is None).
        train_dataset: prompts for ``train()``: a ``prompt`` column (a string or a list of chat messages)
            or an ``input_ids`` column (already encoded). Other columns go to ``reward_funcs``.
        eval_dataset: prompts for :meth:`evaluate`, same format.
        reward_adapter: directory of a PEFT SEQ_CLS reward adapter (loaded when ``model`` is an id/path).
        reward_funcs: callables in TRL's reward-function form ``f(prompts=, completions=, **kwargs) ->
            list[float]`` receiving decoded text; several are summed (weighted by ``args.reward_weights``).
            They replace the reward adapter as the score.
        peft_config: ``LoraConfig`` of a fresh policy adapter (when ``model`` is an id/path/causal LM).
        callbacks: extra ``TrainerCallback`` objects.
        optimizers: ``(optimizer, lr_scheduler)`` to use instead of the ones built from ``args``.

    Public seams: ``sampler`` (``f(model, query_ids, query_mask, settings) -> Rollout``, default
    :func:`~trl_multiadapter.rollout.sample_rollout`), ``reward_source`` (``f(rollout, columns) ->
    scores (B,)``) and ``passes`` (:class:`~trl_multiadapter.batching.RolePasses`, the policy and reference
    forward passes) may be replaced or wrapped, e.g. in tests or by ``trl011`` to record TRL's statistics.
    """

    def __init__(
        self,
        model: MultiAdapterModel | str | os.PathLike | Any,
        args: MultiAdapterPPOConfig | None = None,
        processing_class=None,
        train_dataset=None,
        eval_dataset=None,
        reward_adapter: str | os.PathLike | None = None,
        reward_funcs: RewardFunction | Sequence[RewardFunction] | None = None,
        peft_config=None,
        callbacks=None,
        optimizers=(None, None),
    ):
        if args is None:
            args = MultiAdapterPPOConfig(output_dir="tmp_trainer")
        if not isinstance(args, MultiAdapterPPOConfig):
            raise TypeError(f"args must be a MultiAdapterPPOConfig, got {type(args).__name__}")
        processing_class = processing_class or load_tokenizer(model)
        model = build_model(model, args, reward_adapter=reward_adapter, peft_config=peft_config)
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            check_prompt_columns(dataset, name)
        super().__init__(model=model, args=args, processing_class=processing_class, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, callbacks=callbacks, optimizers=optimizers)
        install_progress(self)
        self.pad_token_id = pad_token_id(processing_class)
        self.stop_token_ids = stop_token_ids(processing_class, model, args.stop_token)
        self.sampler = sample_rollout
        # k samples per prompt: every pass computes each prompt once (shared_prompt.py)
        self.passes = RolePasses(model, args.temperature, args.mini_batch_size, args.kl_estimator == "full",
                                 self.accelerator.autocast, group_size=args.num_generations)
        self.reward_source = reward_source_for(model, as_reward_functions(reward_funcs), args, processing_class,
                                               self.stop_token_ids, self.accelerator.autocast, lambda: self.state,
                                               group_size=args.num_generations)
        self.kl_ctl = build_kl_controller(args.adap_kl_ctrl, args.init_kl_coef, args.target, args.horizon)
        self.score_moments = RunningMoments()
        self.timings = Timings()
        self._losses: list[float] = []
        self._trainable = model.trainable_parameters()
        self._prompt_order: PromptSampler | None = None
        distributed.broadcast_parameters(self._trainable)

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _move_model_to_device(self, model, device) -> None:
        # A quantized or device-mapped base is already placed; `.to()` would fail or undo the placement.
        base = model.peft_model.get_base_model()
        if getattr(base, "is_quantized", False) or getattr(base, "hf_device_map", None) is not None:
            return
        model.to(device)

    # ------------------------------------------------------------------------------------------------
    # public API: train / step / score_responses / evaluate / save_model

    def train(self, resume_from_checkpoint: bool | str | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Run ``max_steps`` PPO iterations (or ``num_train_epochs`` passes over ``train_dataset``).

        ``resume_from_checkpoint``: True picks the latest complete ``checkpoint-*`` in ``output_dir``;
        a path picks that one. The run then continues exactly as if it had not stopped.
        """
        if self.train_dataset is None:
            raise ValueError("train() needs a train_dataset with a `prompt` column; or drive PPO with step()")
        self._prompt_order = self._prompt_order or self._new_prompt_order()
        max_steps = self._planned_iterations()
        self.create_optimizer_and_scheduler(max_steps)
        self.state.max_steps = max_steps
        self.state.num_train_epochs = math.ceil(max_steps / self._prompt_order.batches_per_epoch)
        self.state.compute_steps(self.args, max_steps)
        checkpoint = resolve_checkpoint(self.args.output_dir, resume_from_checkpoint)
        if checkpoint is not None:
            self._load_checkpoint(checkpoint)
        self.is_in_train = True
        self.control = self.callback_handler.on_train_begin(self.args, self.state, self.control)
        start = time.perf_counter()
        while self.state.global_step < max_steps and not self.control.should_training_stop:
            self.control = self.callback_handler.on_step_begin(self.args, self.state, self.control)
            stats = self._train_iteration()
            self.state.global_step += 1
            self.state.epoch = self.state.global_step / self._prompt_order.batches_per_epoch
            self.control = self.callback_handler.on_step_end(self.args, self.state, self.control)
            self._losses.append(stats["loss/policy_avg"] + self.args.vf_coef * stats.get("loss/value_avg", 0.0)
                                + stats.get("loss/kl_avg", 0.0))
            self._log_save_evaluate(stats)
        self.is_in_train = False
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
        runtime = time.perf_counter() - start
        metrics = {"train_runtime": runtime, "train_steps_per_second": self.state.global_step / max(runtime, 1e-9)}
        return TrainOutput(self.state.global_step, mean(self._losses), metrics)

    def step(
        self,
        query_tensors: Sequence[torch.Tensor],
        response_tensors: Sequence[torch.Tensor] | None = None,
        scores: Sequence[float | torch.Tensor] | torch.Tensor | None = None,
        response_masks: Sequence[torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """One PPO iteration on ``args.batch_size`` given prompts (and responses), for manual loops.

        query_tensors: 1-D prompt token tensors (no padding); with ``num_generations`` k > 1, rows
        [g*k, (g+1)*k) are the k samples of one prompt (repeat each prompt k times, consecutively).
        response_tensors: the generated tokens of each prompt (as TRL 0.11 took them); their old logprobs
        and values then come from one no-grad forward. With ``response_tensors=None`` the trainer samples the responses itself and keeps the
        logprobs and values of sampling (the fast path ``train()`` uses). scores: one scalar per
        response; None scores them with the reward source. response_masks: optional 1-D 0/1 tensors
        marking the response tokens that train (every token stays in the sequence the model sees).
        Returns the metrics of the iteration, with TRL names.
        """
        start = time.perf_counter()
        if len(query_tensors) != self.args.batch_size:
            raise ValueError(
                f"step() got {len(query_tensors)} queries but args.batch_size is {self.args.batch_size} (per "
                "process); pass exactly batch_size queries or change batch_size"
            )
        self._check_prompt_groups(query_tensors)
        if response_tensors is None:
            if response_masks is not None:
                raise ValueError("response_masks apply to given response_tensors only")
            with self.timings.measure("time/rollout/generation"):
                rollout = self._generate(*left_pad(query_tensors, self.pad_token_id, self.device))
        else:
            rollout = rollout_from_tensors(query_tensors, response_tensors, response_masks, self.pad_token_id,
                                           self.stop_token_ids, self.device)
        if scores is None:
            with self.timings.measure("time/rollout/score"):
                scores = self._score(rollout, {})
        else:
            scores = scores_tensor(scores, rollout.batch_size, self.device)
        self.create_optimizer_and_scheduler(self._planned_iterations())
        stats = self._ppo_update(rollout, scores, start)
        self.state.global_step += 1
        return stats

    def score_responses(self, query_tensors: Sequence[torch.Tensor], response_tensors: Sequence[torch.Tensor]):
        """The scores (B,) PPO would use for these responses (1-D ids as sampled, stop token included)."""
        rollout = rollout_from_tensors(query_tensors, response_tensors, None, self.pad_token_id, self.stop_token_ids,
                                       self.device)
        return self._penalise_missing_stop(self._score(rollout, {}), rollout.stopped)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Sample a response for every eval prompt; report its mean score, sampled KL to the reference
        (``{prefix}_kl_k1``: the k1 estimate summed over the response) and length.

        Sampling uses its own seeded RNG, so evaluating never changes the training run's randomness.
        """
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset (a `prompt` column), passed here or to the trainer")
        check_prompt_columns(dataset, "eval_dataset")
        rows = list(range(self.process_index, len(dataset), self.num_processes))
        totals = EvaluationTotals(self.device)
        with isolated_rng(self.args.seed + self.state.global_step):
            for start in range(0, len(rows), self.args.per_device_eval_batch_size):
                columns = select_columns(dataset, rows[start : start + self.args.per_device_eval_batch_size])
                rollout = self._generate(*left_pad(encode_prompts(self.processing_class, columns),
                                                   self.pad_token_id, self.device), for_training=False)
                ref_logprobs, _ = self.passes.reference(rollout)
                totals.add(rollout, self._score(rollout, columns),
                           ppo_math.sequence_kl(rollout.logprobs, ref_logprobs, rollout.response_mask, "k1"))
        metrics = totals.metrics(metric_key_prefix)
        self.log(dict(metrics))
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
        return metrics

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the adapters and heads (``MultiAdapterModel.save_adapters`` layout) and the tokenizer."""
        output_dir = output_dir or self.args.output_dir
        if self.is_world_process_zero():
            self.model.save_adapters(output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            Path(output_dir, "ppo_config.json").write_text(self.args.to_json_string())
        self.accelerator.wait_for_everyone()

    def create_optimizer_and_scheduler(self, num_training_steps: int | None) -> None:
        """Adam over the trainable parameters only; the scheduler steps once per PPO iteration (TRL's
        convention), so schedules that decay need the number of iterations."""
        if self.optimizer is None:
            optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
            groups = [{"params": self._trainable, "weight_decay": self.args.weight_decay}]
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        if self.lr_scheduler is None:
            if num_training_steps is None and self.args.lr_scheduler_type not in ("constant", "constant_with_warmup"):
                raise ValueError(
                    f"lr_scheduler_type={self.args.lr_scheduler_type!r} needs the number of PPO iterations: set "
                    "max_steps, or use lr_scheduler_type='constant'"
                )
            self.create_scheduler(num_training_steps=num_training_steps or 1, optimizer=self.optimizer)

    # ------------------------------------------------------------------------------------------------
    # one iteration, in algorithm order

    def _train_iteration(self) -> dict[str, float]:
        start = time.perf_counter()
        k = self.args.num_generations  # each prompt k times, consecutively: rows [g*k, (g+1)*k) are one group
        rows = [row for row in self._prompt_order.next_batch() for _ in range(k)]
        columns = select_columns(self.train_dataset, rows)
        with self.timings.measure("time/rollout/generation"):
            rollout = self._generate(*left_pad(encode_prompts(self.processing_class, columns), self.pad_token_id,
                                               self.device))
        with self.timings.measure("time/rollout/score"):
            scores = self._score(rollout, columns)
        return self._ppo_update(rollout, scores, start)

    def _ppo_update(self, rollout: Rollout, scores: torch.Tensor, start: float) -> dict[str, float]:
        """Everything after sampling and scoring: rewards, advantages, optimisation, KL controller."""
        args = self.args
        self._check_finite(scores=scores[:, None])
        orders = minibatch_orders(rollout.batch_size, args.ppo_epochs, self.device, group_size=args.num_generations)
        # Old logprobs from the training forward (exact mode, or responses sampled outside): the reference
        # then runs on the same mini-batches, so a policy equal to its reference has a KL of exactly 0.
        exact = args.rollout_logprobs == "forward" or rollout.logprobs is None
        with self.timings.measure("time/rollout/old_logprobs"):
            rollout = self.passes.old_logprobs_and_values(rollout, orders[0], exact)
        with self.timings.measure("time/rollout/reference"):
            ref_logprobs, ref_logits = self.passes.reference(rollout, orders[0] if exact else None)
        mask = rollout.loss_mask
        self._check_finite(logprobs=rollout.logprobs, ref_logprobs=ref_logprobs, values=rollout.values, mask=mask)
        scores = self._penalise_missing_stop(scores, rollout.stopped)
        kl = ppo_math.kl_penalty(rollout.logprobs, ref_logprobs, args.kl_estimator,
                                 logits=at_temperature(rollout.logits, args.temperature),
                                 ref_logits=at_temperature(ref_logits, args.temperature))
        kl_coef = self.kl_ctl.value
        kl_in_loss = args.kl_placement == "loss"
        rewards, non_score_rewards = ppo_math.per_token_rewards(self._shape_scores(scores), kl,
                                                                0.0 if kl_in_loss else kl_coef, mask)
        if args.whiten_rewards:
            rewards = ppo_math.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = self._advantages(rewards, rollout.values, mask)
        batch = TrainingBatch(rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask,
                              rollout.logprobs, rollout.values, advantages, returns, loss_mask=mask,
                              ref_logprobs=ref_logprobs if kl_in_loss else None)
        with self.timings.measure("time/optimisation"):
            train_stats = self._optimise(batch, orders, kl_coef)
        stats = distributed.mean_across_processes(
            {**rollout_stats(rollout, scores, kl, non_score_rewards, kl_coef), **train_stats}, self.device)
        self.kl_ctl.update(stats["objective/kl"], args.batch_size * self.num_processes)
        stats["lr"] = self.optimizer.param_groups[0]["lr"]  # the rate this iteration used
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        stats["episode"] = (self.state.global_step + 1) * args.batch_size * self.num_processes
        self.timings["time/iteration"] = time.perf_counter() - start
        stats.update(self.timings)
        stats["eps"] = args.batch_size * self.num_processes / max(self.timings["time/iteration"], 1e-9)
        self.timings.clear()
        return stats

    def _advantages(self, rewards: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor):
        """Advantages (B, R) and value targets (B, R), None for the critic-free estimators. GAE's are
        whitened over the batch (PPO); RLOO and GRPO keep their group baselines' scale, REINFORCE++ whitens
        its own returns."""
        args = self.args
        advantages, returns = ppo_math.compute_advantages(
            args.advantage_estimator, rewards, mask, values, k=args.num_generations, gamma=args.gamma, lam=args.lam,
            scale_by_std=args.grpo_scale_rewards)
        if args.advantage_estimator == "gae":
            advantages = ppo_math.masked_whiten(advantages, mask)
        return advantages, returns

    def _sampling_settings(self, for_training: bool = True, **overrides) -> SamplingSettings:
        args = self.args
        return ppo_sampling_settings(args, self.stop_token_ids, self.pad_token_id, **{
            "keep_logits": for_training and args.kl_estimator == "full" and args.rollout_logprobs == "generation",
            "capture_values": for_training and self.model.value_model == "head",
            "group_size": args.num_generations if for_training else 1, **overrides})

    def _generate(self, query_ids: torch.Tensor, query_mask: torch.Tensor, for_training: bool = True,
                  **overrides) -> Rollout:
        with self.accelerator.autocast():
            return self.sampler(self.model, query_ids, query_mask, self._sampling_settings(for_training, **overrides))

    def _score(self, rollout: Rollout, columns: dict[str, list]) -> torch.Tensor:
        """Scores (B,) float32 of the responses from the reward source."""
        if self.reward_source is None:
            raise ValueError(
                "no reward source: pass reward_adapter=<dir> (or a MultiAdapterModel built with one) or "
                "reward_funcs=[callable], or give scores to step()"
            )
        return self.reward_source(rollout, columns)

    def _penalise_missing_stop(self, scores: torch.Tensor, stopped: torch.Tensor) -> torch.Tensor:
        penalty = self.args.missing_eos_penalty
        return scores if penalty is None else ppo_math.penalise_missing_stop(scores, stopped, penalty)

    def _shape_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Running-moment scaling / normalisation and clipping of the scores (TRL 0.11 options)."""
        args = self.args
        if args.use_score_scaling:
            self.score_moments.update(self.accelerator.gather(scores) if self.num_processes > 1 else scores)
            scores = ppo_math.scale_scores(scores, self.score_moments.mean, self.score_moments.std,
                                           shift_mean=args.use_score_norm)
        if args.score_clip is not None:
            scores = ppo_math.clip_scores(scores, args.score_clip)
        return scores

    def _optimise(self, batch: TrainingBatch, orders: torch.Tensor, kl_coef: float) -> dict[str, float]:
        """ppo_epochs passes over the batch; an optimizer step every backward_batch_size rollouts."""
        args = self.args
        record = OptimisationRecord()
        for epoch_order in orders:
            for group_start in range(0, batch.batch_size, args.backward_batch_size):
                contributed = 0
                for start in range(group_start, group_start + args.backward_batch_size, args.mini_batch_size):
                    minibatch = batch.select(epoch_order[start : start + args.mini_batch_size]).trimmed()
                    with self.timings.measure("time/optimisation/forward"):
                        result = self._minibatch_loss(minibatch, kl_coef)
                    record.add_minibatch(result)
                    if result.ratio.item() > args.ratio_threshold:
                        record.skipped += 1  # TRL 0.11's ratio_threshold: no gradient from this mini-batch
                        continue
                    with self.timings.measure("time/optimisation/backward"):
                        result.loss.backward()
                    contributed += 1
                with self.timings.measure("time/optimisation/step"):
                    record.add_step(self._optimizer_step(contributed))
        return record.stats()

    def _minibatch_loss(self, minibatch: TrainingBatch, kl_coef: float) -> MinibatchResult:
        """Clipped policy loss, + vf_coef * value loss with a value model, + beta * k3 KL with the KL in the loss."""
        args = self.args
        mask = minibatch.loss_mask
        logits, logprobs, values = self.passes.policy(minibatch)
        self._check_finite(logprobs=logprobs, values=values, mask=mask)
        policy_loss, policy_clipfrac, approxkl = ppo_math.policy_loss(
            logprobs, minibatch.old_logprobs, minibatch.advantages, mask, args.cliprange)
        loss = policy_loss
        value_loss = value_clipfrac = kl_loss = kl = None
        if minibatch.returns is not None:
            value_loss, value_clipfrac = ppo_math.value_loss(
                values, minibatch.old_values, minibatch.returns, mask, args.cliprange_value)
            loss = loss + args.vf_coef * value_loss
            value_loss = value_loss.detach()
        if minibatch.ref_logprobs is not None:
            kl_loss, kl = ppo_math.kl_loss(logprobs, minibatch.ref_logprobs, mask, kl_coef)
            loss = loss + kl_loss
            kl_loss = kl_loss.detach()
        self._check_finite(loss=loss.reshape(1, 1))
        with torch.no_grad():
            ratio = ppo_math.masked_mean(torch.exp(logprobs - minibatch.old_logprobs), mask)
            entropy = ppo_math.masked_mean(
                ppo_math.entropy_from_logits(at_temperature(logits.detach(), args.temperature)), mask)
        return MinibatchResult(loss, policy_loss.detach(), value_loss, policy_clipfrac, value_clipfrac,
                               approxkl, entropy, ratio, kl_loss, kl)

    def _optimizer_step(self, contributed: int) -> float | None:
        """Average the accumulated gradients over every contributing mini-batch of every process, clip,
        step. Returns the pre-clip gradient norm, or None when no mini-batch contributed (no step)."""
        total = distributed.all_reduce_gradients(self._trainable, contributed, self.device)
        if total == 0:
            self.optimizer.zero_grad(set_to_none=True)
            return None
        parameters = [parameter for parameter in self._trainable if parameter.grad is not None]
        for parameter in parameters:
            parameter.grad.div_(total)
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        if not bool(torch.isfinite(grad_norm)):
            raise NonFiniteValueError(self.state.global_step, "gradient norm", None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.item()

    # ------------------------------------------------------------------------------------------------
    # prompts and given responses

    def _new_prompt_order(self) -> PromptSampler:
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return PromptSampler(len(self.train_dataset), self.args.prompts_per_batch, seed, self.process_index,
                             self.num_processes)

    def _planned_iterations(self) -> int | None:
        if self.args.max_steps > 0:
            return self.args.max_steps
        if self.train_dataset is None:
            return None
        order = self._prompt_order or self._new_prompt_order()
        return max(1, math.ceil(self.args.num_train_epochs * order.batches_per_epoch))

    def _check_prompt_groups(self, query_tensors: Sequence[torch.Tensor]) -> None:
        """With k > 1 samples per prompt, the k consecutive rows of a group must share their prompt."""
        k = self.args.num_generations
        for start in range(0, len(query_tensors), k):
            first = torch.as_tensor(query_tensors[start]).flatten()
            for row in range(start + 1, start + k):
                if not torch.equal(torch.as_tensor(query_tensors[row]).flatten().to(first.device), first):
                    raise ValueError(
                        f"step(): rows {start}..{start + k - 1} are one prompt's num_generations={k} samples, but "
                        f"query {row} differs from query {start}; repeat each prompt {k} times consecutively"
                    )

    # ------------------------------------------------------------------------------------------------
    # checks, timing, logging, checkpoints

    def _check_finite(self, mask: torch.Tensor | None = None, **tensors: torch.Tensor | None) -> None:
        """Raise NonFiniteValueError on the first tensor with NaN/inf (inside ``mask`` where shapes match);
        the verdict is shared across processes, so every rank stops at the same point."""
        for name, tensor in tensors.items():
            if tensor is None:
                continue
            rows = nonfinite_rows(tensor, mask)
            if distributed.any_process(bool(rows), self.device):
                raise NonFiniteValueError(self.state.global_step, name, rows)

    def _log_save_evaluate(self, stats: dict[str, float]) -> None:
        if self.control.should_log or (self.state.global_step == 1 and self.args.logging_first_step):
            self.log(dict(stats))
            self.control.should_log = False
        if self.control.should_evaluate:
            self.evaluate()
            self.control.should_evaluate = False
        if self.control.should_save:
            self._save_checkpoint()
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)
            self.control.should_save = False

    def _save_checkpoint(self, *unused) -> Path:
        return save_checkpoint(self)

    def _load_checkpoint(self, folder: Path) -> None:
        ResumeState.load(folder, self.process_index, self.num_processes).restore(self)
