"""``MultiAdapterPPOTrainer``: PPO (Ziegler et al. 2019) on one shared base with named adapters.

One iteration (``trainer.step`` or a ``train()`` step)::

    rollout = sample_rollout(...)        policy adapter, KV cache; old logprobs + values captured
    scores  = reward adapter / reward_funcs, read at the last response token
    ref     = reference logprobs           adapters disabled (or policy_init), one no-grad pass
    rewards = -beta * KL_t (+ score at the last token);  GAE;  whitened advantages
    ppo_epochs x mini-batches: clipped policy + value loss, backward, clip, optimizer step

The trainer orchestrates; the math lives in ``ppo_math`` and ``kl_control``.

Why a ``transformers.Trainer`` subclass (as TRL's later PPOTrainer): it brings the accelerator built
from the arguments (DDP environment, mixed precision), ``TrainerState`` and ``log_history``, the
callback system with ``report_to`` integrations, and optimizer/scheduler factories that honour
``optim``, ``lr_scheduler_type`` and ``warmup_steps``. The PPO loop itself replaces ``train()``,
``evaluate()`` and ``save_model()``; the parent's data loaders and ``compute_loss`` are not used.

Data parallelism: the model is never wrapped in ``DistributedDataParallel``. PPO calls custom
methods (``policy_forward``, ``reference_logits``, ``score``) that bypass DDP's gradient hooks, so
the trainer all-reduces the gradients of ``model.trainable_parameters()`` itself before clipping
(one flattened bucket at a time) and broadcasts those parameters from rank 0 at start. Every rank
then applies the same averaged gradient and holds identical adapters after each step.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerState
from transformers.trainer_utils import TrainOutput

from . import ppo_math
from .checkpointing import (
    checkpoint_dir,
    latest_checkpoint,
    rng_file,
    rng_state,
    rotate_checkpoints,
    set_rng_state,
    write_atomically,
)
from .kl_control import RunningMoments, build_kl_controller
from .model import MultiAdapterModel
from .ppo_config import MultiAdapterPPOConfig
from .rollout import (
    PromptSampler,
    Rollout,
    SamplingSettings,
    TrainingBatch,
    left_pad,
    right_pad,
    sample_rollout,
)

ALL_REDUCE_BUCKET_ELEMENTS = 1 << 24  # flattened gradient bucket size (elements) for the all-reduce
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
PPO_STATE_FILE = "ppo_state.pt"
TRAINER_STATE_FILE = "trainer_state.json"
ADAPTERS_DIR = "adapters"

RewardFunction = Callable[..., Sequence[float | None]]


class NonFiniteValueError(FloatingPointError):
    """A NaN or inf reached PPO; raised before any optimizer step could write it into the adapters.

    ``rows`` are this process's rows (empty when another data-parallel process found them; None for a
    value that belongs to no row, such as the gradient norm).
    """

    def __init__(self, step: int, name: str, rows: list[int] | None):
        self.step, self.name, self.rows = step, name, rows
        if rows is None:
            where = "this optimizer step"
        else:
            where = f"rows {rows} of this batch" if rows else "the batch of another process"
        super().__init__(
            f"PPO step {step}: `{name}` has NaN/inf values in {where}; no adapter update was "
            "made. Check the reward source (scores), the learning rate and max_grad_norm (logprobs, losses), or "
            "the prompts of these rows."
        )


@dataclass
class MinibatchResult:
    """Loss and diagnostics of one mini-batch (scalars; ``loss`` keeps its graph)."""

    loss: torch.Tensor
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    policy_clipfrac: torch.Tensor
    value_clipfrac: torch.Tensor
    approxkl: torch.Tensor
    entropy: torch.Tensor
    ratio: torch.Tensor


class MultiAdapterPPOTrainer(Trainer):
    """PPO on a :class:`~trl_multiadapter.MultiAdapterModel` (policy, value, reward and reference on one base).

    Args:
        model: a ``MultiAdapterModel``, a ``transformers`` causal LM, or a model id / path. Ids, paths and
            plain causal LMs are wrapped with ``MultiAdapterModel.from_pretrained`` using ``peft_config``,
            ``reward_adapter`` and the config's model fields (``value_model``, ``reference``,
            ``policy_adapter``, ``critic_init``, ``reward_label_index``, ``model_init_kwargs``).
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
        processing_class = processing_class or _load_tokenizer(model)
        model = _build_model(model, args, reward_adapter, peft_config)
        self.reward_funcs = _as_reward_funcs(reward_funcs)
        _check_reward_weights(args, self.reward_funcs)
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            _check_prompt_columns(dataset, name)
        super().__init__(
            model=model,
            args=args,
            processing_class=processing_class,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self._use_rich_progress()
        self.pad_token_id = _pad_token_id(processing_class)
        self.stop_token_ids = _stop_token_ids(args.stop_token, processing_class, model)
        self.kl_ctl = build_kl_controller(args.adap_kl_ctrl, args.init_kl_coef, args.target, args.horizon)
        self.score_moments = RunningMoments()
        self.timings: dict[str, float] = defaultdict(float)
        self._iteration_start = time.perf_counter()
        self._losses: list[float] = []
        self._trainable = model.trainable_parameters()
        self._sampler = None
        self._broadcast_trainable_parameters()

    # ------------------------------------------------------------------------------------------------
    # properties

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

    def _use_rich_progress(self) -> None:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        self.remove_callback(ProgressCallback)
        self.remove_callback(PrinterCallback)
        if not self.args.disable_tqdm and sys.stdout.isatty():
            from trl.trainer.callbacks import RichProgressCallback

            self.add_callback(RichProgressCallback)

    # ------------------------------------------------------------------------------------------------
    # public API: train / step / evaluate / save

    def train(self, resume_from_checkpoint: bool | str | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Run ``max_steps`` PPO iterations (or ``num_train_epochs`` passes over ``train_dataset``).

        ``resume_from_checkpoint``: True picks the latest complete ``checkpoint-*`` in ``output_dir``;
        a path picks that one. The run then continues exactly as if it had not stopped.
        """
        if self.train_dataset is None:
            raise ValueError("train() needs a train_dataset with a `prompt` column; or drive PPO with step()")
        self._sampler = self._sampler or self._new_sampler()
        max_steps = self._planned_iterations()
        self._ensure_optimizer(max_steps)
        self.state.max_steps = max_steps
        self.state.num_train_epochs = math.ceil(max_steps / self._sampler.batches_per_epoch)
        self.state.compute_steps(self.args, max_steps)
        checkpoint = self._resolve_checkpoint(resume_from_checkpoint)
        if checkpoint is not None:
            self._load_checkpoint(checkpoint)
        self.is_in_train = True
        self.control = self.callback_handler.on_train_begin(self.args, self.state, self.control)
        start = time.perf_counter()
        while self.state.global_step < max_steps and not self.control.should_training_stop:
            self.control = self.callback_handler.on_step_begin(self.args, self.state, self.control)
            stats = self._train_iteration()
            self.state.global_step += 1
            self.state.epoch = self.state.global_step / self._sampler.batches_per_epoch
            self.control = self.callback_handler.on_step_end(self.args, self.state, self.control)
            self._losses.append(stats["loss/policy_avg"] + self.args.vf_coef * stats["loss/value_avg"])
            self._log_save_evaluate(stats)
        self.is_in_train = False
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
        runtime = time.perf_counter() - start
        metrics = {"train_runtime": runtime, "train_steps_per_second": self.state.global_step / max(runtime, 1e-9)}
        return TrainOutput(self.state.global_step, _mean(self._losses), metrics)

    def step(
        self,
        query_tensors: Sequence[torch.Tensor],
        response_tensors: Sequence[torch.Tensor] | None = None,
        scores: Sequence[float | torch.Tensor] | torch.Tensor | None = None,
        response_masks: Sequence[torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """One PPO iteration on given prompts (and responses), TRL 0.11 style.

        query_tensors: a list of 1-D prompt token tensors (no padding). response_tensors: the generated
        tokens of each prompt, as TRL 0.11 took them; their old logprobs and values then come from one
        no-grad forward. With ``response_tensors=None`` the trainer samples the responses itself and
        keeps the logprobs and values of sampling (the fast path ``train()`` uses). scores: one scalar
        per response; None scores them with the reward adapter or ``reward_funcs`` from the same token
        ids. response_masks: optional 1-D 0/1 tensors marking the response tokens to train on.
        Returns the metrics of the iteration, with TRL names.
        """
        self._iteration_start = time.perf_counter()
        if response_tensors is None:
            if response_masks is not None:
                raise ValueError("response_masks apply to given response_tensors only")
            query_ids, query_mask = left_pad(query_tensors, self.pad_token_id, self.device)
            with self._timed("time/rollout/generation"):
                rollout = self._generate(query_ids, query_mask)
        else:
            if len(query_tensors) != len(response_tensors):
                raise ValueError(f"step() got {len(query_tensors)} queries but {len(response_tensors)} responses")
            rollout = self._rollout_from_tensors(query_tensors, response_tensors, response_masks)
        if scores is None:
            with self._timed("time/rollout/score"):
                scores = self._score(rollout, {"prompt": self._decode(rollout.query_ids, rollout.query_mask)})
        else:
            scores = _scores_tensor(scores, rollout.batch_size, self.device)
        self._ensure_optimizer(self._planned_iterations())
        stats = self._ppo_update(rollout, scores)
        self.state.global_step += 1
        return stats

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Sample a response for every eval prompt and report its mean score, KL to the reference and length.

        Sampling uses its own seeded RNG, so evaluating never changes the training run's randomness.
        """
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset (a `prompt` column), passed here or to the trainer")
        _check_prompt_columns(dataset, "eval_dataset")
        rows = list(range(self.process_index, len(dataset), self.num_processes))
        totals = torch.zeros(5, dtype=torch.float64, device=self.device)  # score, kl, length, eos, count
        with self._isolated_rng(self.args.seed + self.state.global_step):
            for start in range(0, len(rows), self.args.per_device_eval_batch_size):
                columns = _columns(dataset, rows[start : start + self.args.per_device_eval_batch_size])
                totals += self._evaluate_batch(columns)
        totals = self._sum_across_processes(totals)
        count = totals[4].clamp(min=1)
        metrics = {
            f"{metric_key_prefix}_score": (totals[0] / count).item(),
            f"{metric_key_prefix}_kl": (totals[1] / count).item(),
            f"{metric_key_prefix}_response_length": (totals[2] / count).item(),
            f"{metric_key_prefix}_num_eos_tokens": totals[3].item(),
        }
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

    # ------------------------------------------------------------------------------------------------
    # TRL 0.11 compatibility: dataloader / generate / log_stats

    @property
    def dataloader(self):
        """One pass over this process's share of ``train_dataset`` in batches of ``batch_size``, as dicts of
        columns plus ``input_ids`` (a list of 1-D prompt tensors) and ``query`` (the prompt text)."""
        sampler = self._new_sampler()
        for _ in range(sampler.batches_per_epoch):
            columns = _columns(self.train_dataset, sampler.next_batch())
            ids = self._encode_prompts(columns)
            batch = {"query": self.processing_class.batch_decode(ids), **columns}
            batch["input_ids"] = [torch.tensor(row, device=self.device) for row in ids]
            yield batch

    def generate(self, query_tensor, return_prompt: bool = True, **generation_kwargs):
        """Sample responses like TRL 0.11's ``PPOTrainer.generate`` (cut after the first stop token).

        query_tensor: a 1-D prompt tensor or a list of them. Returns the same structure: token tensors
        of the response (``return_prompt=False``) or prompt + response. ``generation_kwargs`` may set
        max_new_tokens, top_k, top_p and temperature (which must equal ``args.temperature``, the one used
        in logprobs); other TRL 0.11 keys (do_sample, pad_token_id, min_length, eos_token_id) are accepted.
        """
        single = isinstance(query_tensor, torch.Tensor) and query_tensor.dim() == 1
        queries = [query_tensor] if single else list(query_tensor)
        query_ids, query_mask = left_pad(queries, self.pad_token_id, self.device)
        with self.accelerator.autocast():
            rollout = sample_rollout(self.model, query_ids, query_mask, self._sampling_settings(**generation_kwargs))
        responses = [ids[mask.bool()] for ids, mask in zip(rollout.response_ids, rollout.response_mask)]
        outputs = [torch.cat([query, response]) if return_prompt else response for query, response in zip(queries, responses)]
        return outputs[0].unsqueeze(0) if single else outputs

    def log_stats(self, stats: dict[str, Any], batch=None, rewards=None, columns_to_log=None) -> None:
        """Log the metrics returned by :meth:`step` (TRL 0.11 name; ``batch``/``rewards`` are accepted and ignored)."""
        self.log({key: float(value) for key, value in stats.items() if _is_number(value)})

    # ------------------------------------------------------------------------------------------------
    # one iteration

    def _train_iteration(self) -> dict[str, float]:
        self._iteration_start = time.perf_counter()
        columns = _columns(self.train_dataset, self._sampler.next_batch())
        query_ids, query_mask = left_pad(self._encode_prompts(columns), self.pad_token_id, self.device)
        with self._timed("time/rollout/generation"):
            rollout = self._generate(query_ids, query_mask)
        with self._timed("time/rollout/score"):
            scores = self._score(rollout, columns)
        return self._ppo_update(rollout, scores)

    def _ppo_update(self, rollout: Rollout, scores: torch.Tensor) -> dict[str, float]:
        """Everything after sampling and scoring: rewards, advantages, optimisation, KL controller."""
        args = self.args
        self._check_finite(scores=scores[:, None])
        orders = self._minibatch_orders(rollout.batch_size)
        # Old logprobs from the training forward (exact mode, or responses sampled outside): the reference
        # then runs on the same mini-batches, so a policy equal to its reference has a KL of exactly 0.
        exact = args.rollout_logprobs == "forward" or rollout.logprobs is None
        with self._timed("time/rollout/old_logprobs"):
            rollout = self._with_old_logprobs_and_values(rollout, orders[0], exact)
        with self._timed("time/rollout/reference"):
            ref_logprobs, ref_logits = self._reference_logprobs(rollout, orders[0] if exact else None)
        mask = rollout.response_mask
        self._check_finite(logprobs=rollout.logprobs, ref_logprobs=ref_logprobs, values=rollout.values, mask=mask)
        scores = self._penalise_missing_stop(scores, rollout.stopped)
        shaped_scores = self._shape_scores(scores)
        kl = ppo_math.kl_penalty(
            rollout.logprobs, ref_logprobs, args.kl_estimator,
            logits=_at_temperature(rollout.logits, args.temperature),
            ref_logits=_at_temperature(ref_logits, args.temperature),
        )
        kl_coef = self.kl_ctl.value
        rewards, non_score_rewards = ppo_math.per_token_rewards(shaped_scores, kl, kl_coef, mask)
        if args.whiten_rewards:
            rewards = ppo_math.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = ppo_math.compute_gae(rewards, rollout.values, mask, args.gamma, args.lam)
        advantages = ppo_math.masked_whiten(advantages, mask)
        batch = TrainingBatch(
            query_ids=rollout.query_ids, query_mask=rollout.query_mask, response_ids=rollout.response_ids,
            response_mask=mask, old_logprobs=rollout.logprobs, old_values=rollout.values,
            advantages=advantages, returns=returns,
        )
        with self._timed("time/optimisation"):
            train_stats = self._optimise(batch, orders)
        rollout_stats = _rollout_stats(rollout, scores, kl, non_score_rewards, kl_coef)
        stats = self._mean_across_processes({**rollout_stats, **train_stats})
        self.kl_ctl.update(stats["objective/kl"], args.batch_size * self.num_processes)
        stats["lr"] = self.optimizer.param_groups[0]["lr"]  # the rate this iteration used
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        stats["episode"] = (self.state.global_step + 1) * args.batch_size * self.num_processes
        self.timings["time/iteration"] = time.perf_counter() - self._iteration_start
        stats.update(self.timings)
        stats["eps"] = args.batch_size * self.num_processes / max(self.timings["time/iteration"], 1e-9)
        self.timings.clear()
        return stats

    # ------------------------------------------------------------------------------------------------
    # rollout pieces

    def _sampling_settings(self, **generation_kwargs) -> SamplingSettings:
        args = self.args
        overrides = _sampling_overrides(generation_kwargs, args.temperature)
        return SamplingSettings(
            max_new_tokens=overrides.get("max_new_tokens", args.max_new_tokens),
            temperature=args.temperature,
            top_k=overrides.get("top_k", args.top_k),
            top_p=overrides.get("top_p", args.top_p),
            stop_token_ids=self.stop_token_ids,
            pad_token_id=self.pad_token_id,
            keep_logits=args.kl_estimator == "full" and args.rollout_logprobs == "generation",
            capture_values=self.model.value_model == "head",
        )

    def _generate(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> Rollout:
        with self.accelerator.autocast():
            return sample_rollout(self.model, query_ids, query_mask, self._sampling_settings())

    def _score(self, rollout: Rollout, columns: dict[str, list]) -> torch.Tensor:
        """Scores (B,) float32 of the responses, read at the last response token (the stop token)."""
        if self.reward_funcs:
            return self._score_with_functions(rollout, columns)
        if "reward" not in self.model.roles:
            raise ValueError(
                "no reward source: pass reward_adapter=<dir> (or a MultiAdapterModel built with one) or "
                "reward_funcs=[callable], or give scores to step()"
            )
        with torch.inference_mode(), self.accelerator.autocast():
            scores = self.model.score(rollout.input_ids, rollout.attention_mask)
        return scores.float().clone()

    def _score_with_functions(self, rollout: Rollout, columns: dict[str, list]) -> torch.Tensor:
        completion_ids = [ids[mask.bool()].tolist() for ids, mask in zip(rollout.response_ids, rollout.response_mask)]
        texts = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        prompts = columns.get("prompt") or self._decode(rollout.query_ids, rollout.query_mask)
        completions = [
            [{"role": "assistant", "content": text}] if _is_conversational(prompt) else text
            for prompt, text in zip(prompts, texts)
        ]
        extra = {key: value for key, value in columns.items() if key not in ("prompt", "completion")}
        weights = self.args.reward_weights or [1.0] * len(self.reward_funcs)
        total = torch.zeros(rollout.batch_size, dtype=torch.float64)
        seen = torch.zeros(rollout.batch_size, dtype=torch.bool)
        for function, weight in zip(self.reward_funcs, weights):
            values = function(prompts=prompts, completions=completions, completion_ids=completion_ids,
                              trainer_state=self.state, **extra)
            values, present = _reward_values(values, rollout.batch_size, _function_name(function))
            total += torch.where(present, weight * values, 0.0)  # None: "does not apply", as in TRL's GRPO
            seen |= present
        if not bool(seen.all()):
            rows = (~seen).nonzero().flatten().tolist()
            raise ValueError(f"every reward function returned None for rows {rows}; at least one must score each row")
        return total.float().to(self.device)

    def _with_old_logprobs_and_values(self, rollout: Rollout, first_order: torch.Tensor, exact: bool) -> Rollout:
        """Fill old logprobs/values that sampling did not capture (or all of them when ``exact``)."""
        if exact:
            return self._forward_logprobs_and_values(rollout, first_order)
        if rollout.values is None:  # value_model="critic": one batched no-grad critic pass
            input_ids, attention_mask = rollout.input_ids[:, :-1], rollout.attention_mask[:, :-1]
            with torch.inference_mode(), self.accelerator.autocast():
                values = self.model.critic_values(input_ids, attention_mask)
            rollout.values = values[:, rollout.query_ids.shape[1] - 1 :].float().clone()
        return rollout

    def _forward_logprobs_and_values(self, rollout: Rollout, first_order: torch.Tensor) -> Rollout:
        """Old logprobs/values from the training forward itself, over the first epoch's mini-batches, so the
        first mini-batch's probability ratio is exactly 1."""

        def policy(minibatch: TrainingBatch) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                logits, logprobs, values = self._policy_outputs(minibatch)
            return {"logprobs": logprobs, "values": values, **({"logits": logits} if self._full_kl else {})}

        outputs = self._per_minibatch(rollout, first_order, policy)
        rollout.logprobs, rollout.values, rollout.logits = outputs["logprobs"], outputs["values"], outputs.get("logits")
        return rollout

    def _reference_logprobs(
        self, rollout: Rollout, minibatch_order: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Reference logprobs (B, R) at the sampling temperature (and logits for the full KL), no grad.

        One pass over the whole batch, or over the mini-batches of ``minibatch_order`` (those the old
        logprobs were computed on).
        """
        if minibatch_order is None:
            order, chunk = torch.arange(rollout.batch_size, device=self.device), rollout.batch_size
        else:
            order, chunk = minibatch_order, self.args.mini_batch_size

        def reference(minibatch: TrainingBatch) -> dict[str, torch.Tensor]:
            input_ids, attention_mask = _forward_inputs(minibatch)
            with torch.inference_mode(), self.accelerator.autocast():
                logits = self.model.reference_logits(
                    input_ids, attention_mask, logits_to_keep=minibatch.response_ids.shape[1]
                )
                logprobs = ppo_math.logprobs_from_logits(logits, minibatch.response_ids, self.args.temperature)
            return {"logprobs": logprobs.clone(), **({"logits": logits.clone()} if self._full_kl else {})}

        outputs = self._per_minibatch(rollout, order, reference, chunk)
        return outputs["logprobs"], outputs.get("logits")

    @property
    def _full_kl(self) -> bool:
        return self.args.kl_estimator == "full"

    def _per_minibatch(self, rollout: Rollout, order: torch.Tensor, compute, chunk: int | None = None):
        """Run ``compute`` on trimmed chunks of ``rollout`` taken in ``order``; scatter its (b, w, ...) outputs
        back into zero-filled (B, R, ...) tensors, zero outside the response mask."""
        chunk = chunk or self.args.mini_batch_size
        batch_size, response_length = rollout.response_ids.shape
        gathered: dict[str, torch.Tensor] = {}
        for start in range(0, batch_size, chunk):
            rows = order[start : start + chunk]
            for name, value in compute(_padded_batch(rollout.select(rows)).trimmed()).items():
                if name not in gathered:
                    gathered[name] = value.new_zeros((batch_size, response_length, *value.shape[2:]))
                gathered[name][rows, : value.shape[1]] = value
        mask = rollout.response_mask.bool()
        for name, value in gathered.items():
            inside = mask.view(*mask.shape, *([1] * (value.dim() - 2)))
            gathered[name] = torch.where(inside, value, torch.zeros((), dtype=value.dtype, device=value.device))
        return gathered

    def _penalise_missing_stop(self, scores: torch.Tensor, stopped: torch.Tensor) -> torch.Tensor:
        if self.args.missing_eos_penalty is None:
            return scores
        return ppo_math.penalise_missing_stop(scores, stopped, self.args.missing_eos_penalty)

    def _shape_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Running-moment scaling / normalisation and clipping of the scores (TRL 0.11 options)."""
        args = self.args
        if args.use_score_scaling:
            self.score_moments.update(self._gather(scores))
            scores = ppo_math.scale_scores(
                scores, self.score_moments.mean, self.score_moments.std, shift_mean=args.use_score_norm
            )
        if args.score_clip is not None:
            scores = ppo_math.clip_scores(scores, args.score_clip)
        return scores

    # ------------------------------------------------------------------------------------------------
    # optimisation

    def _minibatch_orders(self, batch_size: int) -> torch.Tensor:
        """One shuffled order of the batch per PPO epoch (ppo_epochs, B), drawn before any forward."""
        return torch.stack([torch.randperm(batch_size) for _ in range(self.args.ppo_epochs)]).to(self.device)

    def _optimise(self, batch: TrainingBatch, orders: torch.Tensor) -> dict[str, float]:
        args = self.args
        records: dict[str, list[float]] = defaultdict(list)
        skipped = optimizer_steps = 0
        grad_norms = []
        for epoch_order in orders:
            for group_start in range(0, batch.batch_size, args.backward_batch_size):
                contributed = 0
                for start in range(group_start, group_start + args.backward_batch_size, args.mini_batch_size):
                    minibatch = batch.select(epoch_order[start : start + args.mini_batch_size]).trimmed()
                    with self._timed("time/optimisation/forward"):
                        result = self._minibatch_loss(minibatch)
                    _record(records, result)
                    if result.ratio.item() > args.ratio_threshold:
                        skipped += 1  # TRL 0.11's ratio_threshold: no gradient from this mini-batch
                        continue
                    with self._timed("time/optimisation/backward"):
                        result.loss.backward()
                    contributed += 1
                with self._timed("time/optimisation/step"):
                    grad_norm = self._optimizer_step(contributed)
                if grad_norm is not None:
                    optimizer_steps += 1
                    grad_norms.append(grad_norm)
        stats = {
            "policy/approxkl_avg": _mean(records["approxkl"]),
            "policy/clipfrac_avg": _mean(records["policy_clipfrac"]),
            "loss/policy_avg": _mean(records["policy_loss"]),
            "loss/value_avg": _mean(records["value_loss"]),
            "val/clipfrac_avg": _mean(records["value_clipfrac"]),
            "policy/entropy_avg": _mean(records["entropy"]),
            "val/ratio": _mean(records["ratio"]),
            "val/ratio_var": float(torch.tensor(records["ratio"], dtype=torch.float64).var(unbiased=False)),
            "policy/first_ratio": records["ratio"][0],
            "policy/skipped_minibatches": float(skipped),
            "policy/optimizer_steps": float(optimizer_steps),
            "policy/grad_norm": _mean(grad_norms) if grad_norms else 0.0,
        }
        return stats

    def _policy_outputs(self, minibatch: TrainingBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Policy logits (b, R, V), logprobs (b, R) at the sampling temperature and values (b, R)."""
        prompt_length, response_length = minibatch.query_ids.shape[1], minibatch.response_ids.shape[1]
        input_ids, attention_mask = _forward_inputs(minibatch)
        with self.accelerator.autocast():
            logits, values = self.model.policy_forward(input_ids, attention_mask, logits_to_keep=response_length)
        logprobs = ppo_math.logprobs_from_logits(logits, minibatch.response_ids, self.args.temperature)
        return logits, logprobs, values[:, prompt_length - 1 :].float()

    def _minibatch_loss(self, minibatch: TrainingBatch) -> MinibatchResult:
        args = self.args
        mask = minibatch.response_mask
        logits, logprobs, values = self._policy_outputs(minibatch)
        self._check_finite(logprobs=logprobs, values=values, mask=mask)
        policy_loss, policy_clipfrac, approxkl = ppo_math.policy_loss(
            logprobs, minibatch.old_logprobs, minibatch.advantages, mask, args.cliprange
        )
        value_loss, value_clipfrac = ppo_math.value_loss(
            values, minibatch.old_values, minibatch.returns, mask, args.cliprange_value
        )
        loss = policy_loss + args.vf_coef * value_loss
        self._check_finite(loss=loss.reshape(1, 1))
        with torch.no_grad():
            ratio = ppo_math.masked_mean(torch.exp(logprobs - minibatch.old_logprobs), mask)
            entropy = ppo_math.masked_mean(
                ppo_math.entropy_from_logits(_at_temperature(logits.detach(), args.temperature)), mask
            )
        return MinibatchResult(
            loss, policy_loss.detach(), value_loss.detach(), policy_clipfrac, value_clipfrac, approxkl, entropy, ratio
        )

    def _optimizer_step(self, contributed: int) -> float | None:
        """Average the accumulated gradients over every contributing mini-batch of every process, clip,
        step. Returns the pre-clip gradient norm, or None when no mini-batch contributed (no step)."""
        total = self._all_reduce_gradients(contributed)
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

    def _all_reduce_gradients(self, contributed: int) -> int:
        """Sum gradients and the count of contributing mini-batches over processes (bucketed)."""
        if self.num_processes == 1:
            return contributed
        import torch.distributed as dist

        for parameter in self._trainable:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        count = torch.tensor([float(contributed)], device=self.device)
        dist.all_reduce(count)
        for bucket in _buckets(self._trainable, ALL_REDUCE_BUCKET_ELEMENTS):
            flat = torch.cat([parameter.grad.flatten() for parameter in bucket])
            dist.all_reduce(flat)
            offset = 0
            for parameter in bucket:
                parameter.grad.copy_(flat[offset : offset + parameter.numel()].view_as(parameter))
                offset += parameter.numel()
        return int(count.item())

    def _ensure_optimizer(self, planned_iterations: int | None) -> None:
        if self.optimizer is None:
            optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
            groups = [{"params": self._trainable, "weight_decay": self.args.weight_decay}]
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        if self.lr_scheduler is None:
            if planned_iterations is None and self.args.lr_scheduler_type not in ("constant", "constant_with_warmup"):
                raise ValueError(
                    f"lr_scheduler_type={self.args.lr_scheduler_type!r} needs the number of PPO iterations: set "
                    "max_steps, or use lr_scheduler_type='constant'"
                )
            # The scheduler steps once per PPO iteration (TRL's convention), not per optimizer step.
            self.create_scheduler(num_training_steps=planned_iterations or 1, optimizer=self.optimizer)

    # ------------------------------------------------------------------------------------------------
    # data

    def _new_sampler(self) -> PromptSampler:
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return PromptSampler(len(self.train_dataset), self.args.batch_size, seed, self.process_index, self.num_processes)

    def _planned_iterations(self) -> int | None:
        if self.args.max_steps > 0:
            return self.args.max_steps
        if self.train_dataset is None:
            return None
        sampler = self._sampler or self._new_sampler()
        return max(1, math.ceil(self.args.num_train_epochs * sampler.batches_per_epoch))

    def _encode_prompts(self, columns: dict[str, list]) -> list[list[int]]:
        if "input_ids" in columns:
            return [list(map(int, ids)) for ids in columns["input_ids"]]
        return [self._encode_prompt(prompt, row) for row, prompt in enumerate(columns["prompt"])]

    def _encode_prompt(self, prompt, row: int) -> list[int]:
        tokenizer = self.processing_class
        if isinstance(prompt, str):
            # A plain-text prompt gets the tokenizer's special tokens (BOS) unless it already starts with them.
            has_bos = tokenizer.bos_token is not None and prompt.startswith(tokenizer.bos_token)
            return tokenizer(prompt, add_special_tokens=not has_bos)["input_ids"]
        if _is_conversational(prompt):
            return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))
        raise TypeError(
            f"prompt of row {row} is a {type(prompt).__name__}; use a string or a list of chat messages "
            "({'role': ..., 'content': ...})"
        )

    def _decode(self, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        return self.processing_class.batch_decode([row[m.bool()].tolist() for row, m in zip(ids, mask)])

    def _rollout_from_tensors(self, queries, responses, response_masks) -> Rollout:
        query_ids, query_mask = left_pad(queries, self.pad_token_id, self.device)
        response_ids, response_mask = right_pad(responses, self.pad_token_id, self.device)
        if response_masks is not None:
            given, _ = right_pad(response_masks, 0, self.device)
            response_mask = response_mask * given
        stopped = torch.zeros(len(queries), dtype=torch.bool, device=self.device)
        if self.stop_token_ids:
            stopped = ppo_math.contains_stop_token(torch.where(response_mask.bool(), response_ids, -1), self.stop_token_ids)
        return Rollout(query_ids, query_mask, response_ids, response_mask, stopped)

    def _evaluate_batch(self, columns: dict[str, list]) -> torch.Tensor:
        query_ids, query_mask = left_pad(self._encode_prompts(columns), self.pad_token_id, self.device)
        settings = self._sampling_settings()
        settings = SamplingSettings(**{**vars(settings), "keep_logits": False, "capture_values": False})
        with self.accelerator.autocast():
            rollout = sample_rollout(self.model, query_ids, query_mask, settings)
        scores = self._score(rollout, columns)
        ref_logprobs, _ = self._reference_logprobs(rollout)
        mask = rollout.response_mask.bool()
        kl = torch.where(mask, ppo_math.kl_penalty(rollout.logprobs, ref_logprobs, "k1"), 0.0).sum(1)
        return torch.stack([
            scores.double().sum(), kl.double().sum(), mask.sum().double(),
            rollout.stopped.double().sum(), torch.tensor(float(rollout.batch_size), dtype=torch.float64),
        ]).to(self.device)

    # ------------------------------------------------------------------------------------------------
    # checks, processes, timing

    def _check_finite(self, mask: torch.Tensor | None = None, **tensors: torch.Tensor | None) -> None:
        """Raise NonFiniteValueError on the first tensor with NaN/inf (inside ``mask`` where shapes match).

        Under data parallelism the verdict is shared, so every rank stops at the same point instead of
        one rank waiting forever in the next all-reduce.
        """
        for name, tensor in tensors.items():
            if tensor is None:
                continue
            bad = ~torch.isfinite(tensor.detach())
            if mask is not None and bad.shape == mask.shape:
                bad &= mask.bool()
            rows = bad.reshape(bad.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
            flagged = self._sum_across_processes(torch.tensor([float(bool(rows))], device=self.device))
            if flagged.item() > 0:
                raise NonFiniteValueError(self.state.global_step, name, rows)

    def _broadcast_trainable_parameters(self) -> None:
        if self.num_processes == 1:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for parameter in self._trainable:
                dist.broadcast(parameter.data, src=0)

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(tensor) if self.num_processes > 1 else tensor

    def _sum_across_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.num_processes == 1:
            return tensor
        import torch.distributed as dist

        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    def _mean_across_processes(self, stats: dict[str, float]) -> dict[str, float]:
        if self.num_processes == 1:
            return stats
        keys = sorted(stats)
        values = torch.tensor([stats[key] for key in keys], dtype=torch.float64, device=self.device)
        values = self._sum_across_processes(values) / self.num_processes
        return dict(zip(keys, values.tolist()))

    @contextmanager
    def _timed(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] += time.perf_counter() - start

    @contextmanager
    def _isolated_rng(self, seed: int):
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    # ------------------------------------------------------------------------------------------------
    # logging, saving, resuming

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
        """Write ``checkpoint-<global_step>`` atomically (temporary folder, then rename)."""
        final_dir = checkpoint_dir(self.args.output_dir, self.state.global_step)
        write_atomically(
            final_dir,
            self._write_checkpoint,
            is_main_process=self.is_world_process_zero(),
            wait_for_everyone=self.accelerator.wait_for_everyone,
        )
        if self.is_world_process_zero():
            rotate_checkpoints(self.args.output_dir, self.args.save_total_limit)
        return final_dir

    def _write_checkpoint(self, folder: Path) -> None:
        from safetensors.torch import save_file

        torch.save(rng_state(), rng_file(folder, self.process_index))
        if not self.is_world_process_zero():
            return
        self.model.save_adapters(folder / ADAPTERS_DIR)
        save_file(self._trainable_state(), str(folder / TRAINABLE_FILE), metadata={"format": "pt"})
        torch.save(self.optimizer.state_dict(), folder / OPTIMIZER_FILE)
        if self.lr_scheduler is not None:
            torch.save(self.lr_scheduler.state_dict(), folder / SCHEDULER_FILE)
        ppo_state = {
            "kl_controller": self.kl_ctl.state_dict(),
            "score_moments": self.score_moments.state_dict(),
            "sampler": self._sampler.state_dict() if self._sampler is not None else None,
            "num_processes": self.num_processes,
        }
        torch.save(ppo_state, folder / PPO_STATE_FILE)
        self.state.save_to_json(str(folder / TRAINER_STATE_FILE))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(folder / ADAPTERS_DIR)

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        names = {id(parameter): name for name, parameter in self.model.named_parameters()}
        return {names[id(parameter)]: parameter.detach().cpu().contiguous() for parameter in self._trainable}

    def _resolve_checkpoint(self, resume_from_checkpoint) -> Path | None:
        if resume_from_checkpoint in (None, False):
            return None
        if resume_from_checkpoint is True:
            found = latest_checkpoint(self.args.output_dir)
            if found is None:
                raise ValueError(
                    f"resume_from_checkpoint=True but {self.args.output_dir} has no complete checkpoint-* folder"
                )
            return found
        path = Path(resume_from_checkpoint)
        if not (path / PPO_STATE_FILE).is_file():
            raise ValueError(f"{path} is not a complete PPO checkpoint (no {PPO_STATE_FILE}); pass a checkpoint-* folder")
        return path

    def _load_checkpoint(self, folder: Path) -> None:
        from safetensors.torch import load_file

        ppo_state = torch.load(folder / PPO_STATE_FILE, weights_only=False)
        if ppo_state["num_processes"] != self.num_processes:
            raise ValueError(
                f"{folder} was written by {ppo_state['num_processes']} processes; resume with the same number "
                f"(this run has {self.num_processes}) so every rank gets its prompts and RNG state back"
            )
        saved = load_file(str(folder / TRAINABLE_FILE))
        names = {id(parameter): name for name, parameter in self.model.named_parameters()}
        with torch.no_grad():
            for parameter in self._trainable:
                name = names[id(parameter)]
                if name not in saved:
                    raise ValueError(f"{folder / TRAINABLE_FILE} has no tensor {name!r}; was it written by this model?")
                parameter.copy_(saved[name])
        self.optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, weights_only=False))
        if self.lr_scheduler is not None and (folder / SCHEDULER_FILE).is_file():
            self.lr_scheduler.load_state_dict(torch.load(folder / SCHEDULER_FILE, weights_only=False))
        self.kl_ctl.load_state_dict(ppo_state["kl_controller"])
        self.score_moments.load_state_dict(ppo_state["score_moments"])
        if ppo_state["sampler"] is not None and self._sampler is not None:
            self._sampler.load_state_dict(ppo_state["sampler"])
        saved_state = TrainerState.load_from_json(str(folder / TRAINER_STATE_FILE))
        self.state.global_step = saved_state.global_step
        self.state.epoch = saved_state.epoch
        self.state.log_history = saved_state.log_history
        set_rng_state(torch.load(rng_file(folder, self.process_index), weights_only=False))


# ----------------------------------------------------------------------------------------------------
# construction helpers


def _build_model(model, args: MultiAdapterPPOConfig, reward_adapter, peft_config) -> MultiAdapterModel:
    if isinstance(model, MultiAdapterModel):
        _check_built_model(model, args, reward_adapter, peft_config)
        return model
    kwargs = dict(args.model_init_kwargs or {})
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing; either turns it on.
    checkpointing = bool(getattr(args, "activation_checkpointing", False) or args.gradient_checkpointing)
    kwargs.setdefault("gradient_checkpointing", checkpointing)
    return MultiAdapterModel.from_pretrained(
        model,
        policy_config=peft_config,
        policy_adapter=args.policy_adapter,
        reward_adapter=reward_adapter,
        reward_label_index=args.reward_label_index,
        value_model=args.value_model or "head",
        critic_init=args.critic_init,
        reference=args.reference or "base",
        **kwargs,
    )


def _check_built_model(model: MultiAdapterModel, args, reward_adapter, peft_config) -> None:
    given = {"reward_adapter": reward_adapter, "peft_config": peft_config, "args.policy_adapter": args.policy_adapter,
             "args.model_init_kwargs": args.model_init_kwargs}
    misplaced = [name for name, value in given.items() if value is not None]
    if misplaced:
        raise ValueError(
            f"{', '.join(misplaced)} only apply when `model` is an id or path; the given MultiAdapterModel already "
            "has its adapters: pass them to MultiAdapterModel.from_pretrained instead"
        )
    for name, wanted, actual in (("value_model", args.value_model, model.value_model),
                                 ("reference", args.reference, model.reference_mode)):
        if wanted is not None and wanted != actual:
            raise ValueError(
                f"args.{name}={wanted!r} but the given MultiAdapterModel was built with {name}={actual!r}; "
                f"leave args.{name}=None or rebuild the model"
            )


def _load_tokenizer(model):
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model))
    raise ValueError("processing_class (the tokenizer) is required when `model` is not an id or path")


def _as_reward_funcs(reward_funcs) -> list:
    if reward_funcs is None:
        return []
    functions = [reward_funcs] if callable(reward_funcs) else list(reward_funcs)
    for index, function in enumerate(functions):
        if not callable(function):
            raise TypeError(
                f"reward_funcs[{index}] is a {type(function).__name__}; pass callables "
                "f(prompts=..., completions=..., **kwargs) -> list[float]"
            )
    return functions


def _check_reward_weights(args, reward_funcs) -> None:
    if args.reward_weights is not None and len(args.reward_weights) != len(reward_funcs):
        raise ValueError(
            f"reward_weights has {len(args.reward_weights)} entries but there are {len(reward_funcs)} reward_funcs; "
            "give one weight per function"
        )


def _check_prompt_columns(dataset, name: str) -> None:
    if dataset is None:
        return
    columns = getattr(dataset, "column_names", None)
    if columns is None and len(dataset) > 0 and isinstance(dataset[0], dict):
        columns = list(dataset[0])
    if columns is not None and "prompt" not in columns and "input_ids" not in columns:
        raise ValueError(
            f"{name} has columns {list(columns)}; it needs a `prompt` column (a string or a list of chat messages) "
            "or an `input_ids` column (encoded prompts)"
        )


def _pad_token_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id  # only a filler: masks, not pad ids, decide what is padding
    raise ValueError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token")


def _stop_token_ids(stop_token: str | None, tokenizer, model: MultiAdapterModel) -> tuple[int, ...]:
    if stop_token is None:
        return ()
    if stop_token == "eos":
        ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        configured = getattr(getattr(model.peft_model.get_base_model(), "generation_config", None), "eos_token_id", None)
        ids |= set(configured if isinstance(configured, (list, tuple)) else [configured] if configured is not None else [])
        if not ids:
            raise ValueError("stop_token='eos' but neither the tokenizer nor the model defines an EOS token")
        return tuple(sorted(ids))
    token_id = tokenizer.convert_tokens_to_ids(stop_token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"stop_token={stop_token!r} is not a token of the tokenizer; use 'eos' or an existing token")
    return (token_id,)


_IGNORED_GENERATION_KEYS = {"do_sample", "pad_token_id", "eos_token_id", "min_length", "use_cache", "batch_size"}
_SAMPLING_KEYS = {"max_new_tokens", "top_k", "top_p", "temperature"}


def _sampling_overrides(generation_kwargs: dict, temperature: float) -> dict:
    unknown = set(generation_kwargs) - _IGNORED_GENERATION_KEYS - _SAMPLING_KEYS
    if unknown:
        raise ValueError(
            f"generation options {sorted(unknown)} are not supported; use {sorted(_SAMPLING_KEYS)} "
            "(set the defaults in MultiAdapterPPOConfig)"
        )
    if generation_kwargs.get("do_sample") is False:
        raise ValueError("PPO samples responses: do_sample=False is not supported")
    if "temperature" in generation_kwargs and float(generation_kwargs["temperature"]) != temperature:
        raise ValueError(
            f"temperature={generation_kwargs['temperature']} differs from args.temperature={temperature}; logprobs "
            "must use the sampling temperature, so set MultiAdapterPPOConfig(temperature=...) instead"
        )
    overrides = {key: generation_kwargs[key] for key in ("max_new_tokens", "top_k", "top_p") if key in generation_kwargs}
    if "top_k" in overrides:
        overrides["top_k"] = int(overrides["top_k"])
    return overrides


# ----------------------------------------------------------------------------------------------------
# small helpers


def _columns(dataset, rows: Sequence[int]) -> dict[str, list]:
    records = [dataset[int(row)] for row in rows]
    return {key: [record[key] for record in records] for key in records[0]}


def _is_conversational(prompt) -> bool:
    return isinstance(prompt, list) and all(isinstance(message, dict) and "role" in message for message in prompt)


def _function_name(function) -> str:
    return getattr(function, "__name__", type(function).__name__)


def _reward_values(values, batch_size: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (B,) float64, present (B,) bool); a NaN value stays NaN so the finiteness check reports it."""
    values = list(values)
    if len(values) != batch_size:
        raise ValueError(f"reward function {name} returned {len(values)} values for {batch_size} completions")
    present = torch.tensor([value is not None for value in values])
    numbers = torch.tensor([0.0 if value is None else float(value) for value in values], dtype=torch.float64)
    return numbers, present


def _scores_tensor(scores, batch_size: int, device) -> torch.Tensor:
    if isinstance(scores, torch.Tensor):
        values = scores.detach().float().flatten()
    else:
        values = torch.stack([torch.as_tensor(score, dtype=torch.float32).reshape(()) for score in scores])
    if values.numel() != batch_size:
        raise ValueError(f"step() got {values.numel()} scores for {batch_size} responses; give one per response")
    return values.to(device)


def _forward_inputs(minibatch: TrainingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + response ids and mask without the last response column: that token is never the input of a
    prediction PPO needs, so logits_to_keep=R gives exactly the R response predictions."""
    input_ids = torch.cat([minibatch.query_ids, minibatch.response_ids], dim=1)[:, :-1]
    attention_mask = torch.cat([minibatch.query_mask, minibatch.response_mask], dim=1)[:, :-1]
    return input_ids, attention_mask


def _at_temperature(logits: torch.Tensor | None, temperature: float) -> torch.Tensor | None:
    if logits is None or temperature == 1.0:
        return logits
    return logits / temperature


def _padded_batch(rollout: Rollout) -> TrainingBatch:
    zeros = torch.zeros_like(rollout.response_ids, dtype=torch.float32)
    return TrainingBatch(rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask,
                         zeros, zeros, zeros, zeros)


def _rollout_stats(rollout: Rollout, scores, kl, non_score_rewards, kl_coef: float) -> dict[str, float]:
    mask = rollout.response_mask.bool()
    kl_per_sequence = torch.where(mask, kl, 0.0).sum(1)
    non_score_per_sequence = torch.where(mask, non_score_rewards, 0.0).sum(1)
    sampled_entropy = torch.where(mask, -rollout.logprobs, 0.0).sum(1)
    return {
        "objective/kl": kl_per_sequence.mean().item(),
        "objective/entropy": sampled_entropy.mean().item(),
        "objective/non_score_reward": non_score_per_sequence.mean().item(),
        "objective/rlhf_reward": (scores + non_score_per_sequence).mean().item(),
        "objective/scores": scores.mean().item(),
        "objective/kl_coef": kl_coef,
        "val/num_eos_tokens": rollout.stopped.sum().item(),
        "val/response_length": mask.sum(1).float().mean().item(),
    }


def _record(records: dict[str, list[float]], result: MinibatchResult) -> None:
    for name in ("policy_loss", "value_loss", "policy_clipfrac", "value_clipfrac", "approxkl", "entropy", "ratio"):
        records[name].append(getattr(result, name).item())


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _buckets(parameters: Sequence[torch.nn.Parameter], max_elements: int):
    bucket, size = [], 0
    for parameter in parameters:
        if bucket and size + parameter.numel() > max_elements:
            yield bucket
            bucket, size = [], 0
        bucket.append(parameter)
        size += parameter.numel()
    if bucket:
        yield bucket


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1)
