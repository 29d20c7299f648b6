"""``MultiAdapterPPOConfig``: the PPO settings, a ``transformers.TrainingArguments`` dataclass.

Field names follow TRL 0.11's ``PPOConfig`` (``batch_size``, ``mini_batch_size``, ``ppo_epochs``,
``init_kl_coef``, ``adap_kl_ctrl``, ...) so old configs carry over; everything ``TrainingArguments``
already has (``learning_rate``, ``max_grad_norm``, ``gradient_accumulation_steps``, ``seed``, ``bf16``,
``report_to``, ``logging_steps``, ``save_steps``, ``max_steps``) keeps its transformers meaning, with
``max_steps`` counting PPO iterations. The class parses from flat YAML and CLI flags with
``trl.TrlParser``. This module imports no torch: the CLI's ``--help`` stays fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .roles import NO_VALUE_MODEL, REFERENCE_MODES, VALUE_MODELS

# Accepted by ppo_math.kl_penalty (aliases included); kept here so the config needs no torch import.
KL_ESTIMATORS = ("k1", "kl", "abs", "k2", "mse", "k3", "full")
ROLLOUT_LOGPROB_SOURCES = ("generation", "forward")
# ppo_math.ADVANTAGE_ESTIMATORS / CRITIC_FREE_ESTIMATORS, kept here for the same reason.
ADVANTAGE_ESTIMATORS = ("gae", "rloo", "grpo", "reinforce_pp")
CRITIC_FREE_ESTIMATORS = ("rloo", "grpo", "reinforce_pp")
GROUP_ESTIMATORS = ("rloo", "grpo")  # their baseline comes from the other samples of the same prompt
DEFAULT_GROUP_SIZE = 4  # num_generations of rloo/grpo when left unset
KL_PLACEMENTS = ("reward", "loss")


@dataclass
class MultiAdapterPPOConfig(TrainingArguments):
    """Configuration of :class:`~trl_multiadapter.MultiAdapterPPOTrainer`.

    One PPO iteration (one ``max_steps`` unit) samples ``batch_size`` completions per process
    (``batch_size / num_generations`` prompts, ``num_generations`` completions each), scores them, then runs
    ``ppo_epochs`` passes over the batch in mini-batches of ``mini_batch_size``, taking an optimizer step
    every ``gradient_accumulation_steps`` mini-batches (TRL 0.11 semantics). ``advantage_estimator`` picks
    GAE (with a value model) or a critic-free estimator (RLOO, GRPO, REINFORCE++; see
    docs/advantage_estimators.md). Each field's ``help`` is its documentation.
    """

    _VALID_DICT_FIELDS = [*TrainingArguments._VALID_DICT_FIELDS, "model_init_kwargs"]

    # ---- defaults that differ from TrainingArguments -------------------------------------------------
    learning_rate: float = field(
        default=1.41e-5, metadata={"help": "Adam learning rate of the policy adapter and value head (TRL 0.11 default)."}
    )
    logging_steps: float = field(
        default=1, metadata={"help": "Log metrics every this many PPO iterations (a float < 1 is a ratio of max_steps)."}
    )
    lr_scheduler_type: str = field(
        default="constant",
        metadata={
            "help": "Learning-rate schedule, stepped once per PPO iteration over max_steps iterations (TRL 0.11 "
            "used a constant rate; 'linear', 'cosine', ... as in TrainingArguments)."
        },
    )

    # ---- batch arithmetic -----------------------------------------------------------------------------
    batch_size: int = field(
        default=8,
        metadata={
            "help": "Completions (rollout rows) per PPO iteration on each process: batch_size / num_generations "
            "distinct prompts, each sampled num_generations times. Must be a multiple of "
            "mini_batch_size * gradient_accumulation_steps."
        },
    )
    mini_batch_size: int = field(
        default=1,
        metadata={
            "help": "Rollouts per forward/backward pass during optimisation, on each process. A multiple or a "
            "divisor of num_generations: a mini-batch holds whole prompt groups, or one part of a single group."
        },
    )
    num_generations: int | None = field(
        default=None,
        metadata={
            "help": "k, the completions sampled per prompt; a prompt's k rows are consecutive in the batch and "
            "stay together in every mini-batch. At least 2 for rloo/grpo (their baseline is the other samples "
            f"of the prompt). None: {DEFAULT_GROUP_SIZE} for rloo/grpo, 1 for gae/reinforce_pp."
        },
    )
    ppo_epochs: int = field(default=4, metadata={"help": "Optimisation passes over each batch of rollouts."})

    # ---- KL penalty and controller --------------------------------------------------------------------
    init_kl_coef: float = field(
        default=0.2, metadata={"help": "Initial KL coefficient beta of the per-token penalty -beta * KL_t."}
    )
    adap_kl_ctrl: bool = field(
        default=True, metadata={"help": "Adapt beta towards `target` (Ziegler et al. 2019); False keeps it fixed."}
    )
    target: float = field(default=6.0, metadata={"help": "Target KL (nats per sequence) of the adaptive controller."})
    horizon: float = field(default=10000, metadata={"help": "Horizon (in samples) of the adaptive KL controller."})
    kl_estimator: str = field(
        default="k1",
        metadata={
            "help": "Per-token KL estimator in the reward: k1 (alias kl), abs, k2 (alias mse), k3, or full "
            "(exact KL over the vocabulary)."
        },
    )

    # ---- advantages and losses ------------------------------------------------------------------------
    advantage_estimator: str = field(
        default="gae",
        metadata={
            "help": "How advantages are estimated. 'gae': GAE with the value model, whitened over the batch "
            "(PPO). Critic-free (no value head or critic is built, saved or trained; no value loss): 'rloo': "
            "A_i = R_i - mean of the other k-1 returns of the prompt; 'grpo': A_i = (R_i - mean_g) / (std_g + "
            "1e-4) over the prompt's k returns (without the division when grpo_scale_rewards is False); "
            "'reinforce_pp': REINFORCE++, per-token returns G_t whitened over the batch. R_i is the score plus "
            "the summed per-token KL reward (kl_placement='reward'); every token of a response gets A_i."
        },
    )
    grpo_scale_rewards: bool = field(
        default=True,
        metadata={
            "help": "grpo: divide by the group's standard deviation (GRPO); False only centres on the group "
            "mean (Dr. GRPO)."
        },
    )
    kl_placement: str | None = field(
        default=None,
        metadata={
            "help": "Where the KL to the reference acts. 'reward' (PPO): every token's reward gets -beta * KL_t "
            "(KL_t by kl_estimator), the score is added at the last token. 'loss' (GRPO): rewards are the scores "
            "alone and the loss adds beta * mean_t[pi_ref/pi - log(pi_ref/pi) - 1] (the k3 estimator, with "
            "gradients, over the loss tokens). beta is the KL controller's coefficient (init_kl_coef, adapted "
            "when adap_kl_ctrl). None: 'loss' for grpo (as GRPO and TRL's GRPOTrainer), 'reward' otherwise."
        },
    )
    gamma: float = field(default=1.0, metadata={"help": "Discount factor of GAE."})
    lam: float = field(default=0.95, metadata={"help": "Lambda of GAE."})
    cliprange: float = field(default=0.2, metadata={"help": "Clip range of the probability ratio (policy loss)."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the value function update."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss in the total loss."})
    whiten_rewards: bool = field(
        default=False, metadata={"help": "Whiten the per-token rewards (no mean shift) before GAE."}
    )
    ratio_threshold: float = field(
        default=10.0,
        metadata={
            "help": "Skip a mini-batch (no gradient, no optimizer step) when its mean probability ratio exceeds this."
        },
    )

    # ---- scores -----------------------------------------------------------------------------------------
    use_score_scaling: bool = field(
        default=False, metadata={"help": "Divide scores by their running standard deviation."}
    )
    use_score_norm: bool = field(
        default=False,
        metadata={"help": "With use_score_scaling, also subtract the running mean (normalise instead of scale)."},
    )
    score_clip: float | None = field(
        default=None, metadata={"help": "Clip scores to [-score_clip, score_clip] after scaling; None: no clipping."}
    )
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of a response that never emits the stop token."}
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weights of the reward_funcs in their weighted sum; None: all 1."}
    )

    # ---- sampling ---------------------------------------------------------------------------------------
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature; also used in every logprob computation."}
    )
    top_k: int = field(default=0, metadata={"help": "Top-k sampling; 0 disables it."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold; 1.0 disables it."})
    max_new_tokens: int = field(default=32, metadata={"help": "Maximum number of sampled response tokens."})
    stop_token: str | None = field(
        default="eos",
        metadata={
            "help": "Where responses end: 'eos' (the tokenizer's EOS and the model's eos_token_id, e.g. "
            "<|eot_id|>), a token string, or None for fixed-length responses. Tokens after the first stop "
            "token are padding."
        },
    )

    end_of_turn_token: str | None = field(
        default="auto",
        metadata={
            "help": "How a stopped response is scored by the reward adapter: its stop token is replaced by the "
            "tokens that end an assistant turn in the reward's training format. 'auto' reads them from the "
            "tokenizer's chat template (e.g. <|eot_id|> for Llama 3); a token string names one; None scores "
            "responses exactly as sampled."
        },
    )

    # ---- logprobs ---------------------------------------------------------------------------------------
    rollout_logprobs: str = field(
        default="generation",
        metadata={
            "help": "'generation': take old logprobs and values from the sampling pass (fast; the KV-cache "
            "pass and the training forward differ by float32 rounding, so the first ratio is 1 +- 1e-7 and the "
            "KL at policy = reference ~1e-7). 'forward': recompute them with a no-grad training forward over "
            "the first epoch's mini-batches (one more forward; the first ratio is exactly 1, that KL exactly 0)."
        },
    )

    # ---- model (used when `model` is a model id or path) ---------------------------------------------
    value_model: str | None = field(
        default=None,
        metadata={
            "help": "'head': value head on the policy's hidden states; 'critic': separate LoRA critic adapter; "
            "'none': no value model (the critic-free estimators). None: 'none' with a critic-free "
            "advantage_estimator, else the given MultiAdapterModel's choice, or 'head' when loading by id."
        },
    )
    reference: str | None = field(
        default=None,
        metadata={
            "help": "'base': the base with adapters disabled; 'policy_init': a frozen copy of the starting "
            "policy adapter. None: the model's choice, or 'base' when loading by id."
        },
    )
    policy_adapter: str | None = field(
        default=None, metadata={"help": "Directory of a PEFT adapter the policy starts from (e.g. an SFT adapter)."}
    )
    critic_init: str | None = field(
        default=None, metadata={"help": "With value_model='critic': 'reward' initialises the critic from the reward adapter."}
    )
    reward_label_index: int | None = field(
        default=None, metadata={"help": "Label of a legacy multi-label reward head to read as the score."}
    )
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for MultiAdapterModel.from_pretrained when `model` is an id or path "
            "(e.g. {\"dtype\": \"bfloat16\"} for a bf16 frozen base)."
        },
    )

    def __post_init__(self):
        self._resolve_estimator_defaults()
        self._validate_ppo_fields()
        if self.fp16:
            # PPO's backward and optimizer step run outside accelerate's GradScaler, so fp16 gradients could
            # underflow silently. bf16 needs no loss scaling.
            raise ValueError(
                "`fp16=True` is not supported: PPO's updates run without a loss scaler, so fp16 gradients can "
                "underflow silently. Use bf16=True (A10G, A100, H100, L4 support it) or float32."
            )
        super().__post_init__()

    @property
    def backward_batch_size(self) -> int:
        """Rollouts per optimizer step on one process (TRL 0.11's name)."""
        return self.mini_batch_size * self.gradient_accumulation_steps

    @property
    def critic_free(self) -> bool:
        """True when the advantage estimator needs no value model (rloo, grpo, reinforce_pp)."""
        return self.advantage_estimator in CRITIC_FREE_ESTIMATORS

    @property
    def prompts_per_batch(self) -> int:
        """Distinct prompts per PPO iteration on one process (batch_size counts completions)."""
        return self.batch_size // self.num_generations

    def _resolve_estimator_defaults(self) -> None:
        _require_choice("advantage_estimator", self.advantage_estimator, ADVANTAGE_ESTIMATORS)
        if self.num_generations is None:
            self.num_generations = DEFAULT_GROUP_SIZE if self.advantage_estimator in GROUP_ESTIMATORS else 1
        if self.kl_placement is None:
            self.kl_placement = "loss" if self.advantage_estimator == "grpo" else "reward"
        if self.critic_free and self.value_model is None:
            self.value_model = NO_VALUE_MODEL

    def _validate_estimator_fields(self) -> None:
        k, estimator = self.num_generations, self.advantage_estimator
        _require(k >= 1, "num_generations", k, "sample at least 1 completion per prompt")
        if estimator in GROUP_ESTIMATORS and k < 2:
            raise ValueError(
                f"`num_generations` = {k} is invalid with advantage_estimator={estimator!r}: its baseline is the "
                f"other samples of the same prompt, so set num_generations to 2 or more (e.g. {DEFAULT_GROUP_SIZE}), "
                "or use advantage_estimator='gae' or 'reinforce_pp'."
            )
        if self.batch_size % k:
            raise ValueError(
                f"`batch_size` ({self.batch_size}) must be a multiple of `num_generations` ({k}): batch_size counts "
                f"completions, k per prompt; use batch_size {_nearest_multiples(self.batch_size, k)}."
            )
        if self.mini_batch_size % k and k % self.mini_batch_size:
            raise ValueError(
                f"`mini_batch_size` ({self.mini_batch_size}) must be a multiple or a divisor of `num_generations` "
                f"({k}): a mini-batch holds whole prompt groups or a part of one; use mini_batch_size "
                f"{_nearest_multiples(self.mini_batch_size, k)}, or a divisor of {k}."
            )
        if self.critic_free and self.value_model != NO_VALUE_MODEL:
            raise ValueError(
                f"`value_model` = {self.value_model!r} is invalid with advantage_estimator={estimator!r}, which "
                "trains no value model: leave value_model unset (None) or set it to 'none'."
            )
        if not self.critic_free and self.value_model == NO_VALUE_MODEL:
            raise ValueError(
                f"`value_model` = 'none' is invalid with advantage_estimator={estimator!r}: GAE needs values; use "
                f"'head' or 'critic', or a critic-free estimator ({', '.join(CRITIC_FREE_ESTIMATORS)})."
            )
        _require_choice("kl_placement", self.kl_placement, KL_PLACEMENTS)

    def _validate_ppo_fields(self) -> None:
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "use a positive number of prompts")
        _require(self.mini_batch_size >= 1, "mini_batch_size", self.mini_batch_size, "use at least 1")
        _require(
            self.gradient_accumulation_steps >= 1,
            "gradient_accumulation_steps",
            self.gradient_accumulation_steps,
            "use at least 1",
        )
        if self.batch_size % self.backward_batch_size != 0:
            raise ValueError(
                f"`batch_size` ({self.batch_size}) must be a multiple of `mini_batch_size` * "
                f"`gradient_accumulation_steps` ({self.mini_batch_size} * {self.gradient_accumulation_steps} = "
                f"{self.backward_batch_size}), per process: change batch_size to a multiple of "
                f"{self.backward_batch_size} or lower mini_batch_size/gradient_accumulation_steps."
            )
        self._validate_estimator_fields()
        _require(self.ppo_epochs >= 1, "ppo_epochs", self.ppo_epochs, "use at least 1")
        _require_choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _require_choice("rollout_logprobs", self.rollout_logprobs, ROLLOUT_LOGPROB_SOURCES)
        _require_choice("value_model", self.value_model, VALUE_MODELS, optional=True)
        _require_choice("reference", self.reference, REFERENCE_MODES, optional=True)
        _require_choice("critic_init", self.critic_init, ("reward",), optional=True)
        _require(self.init_kl_coef >= 0, "init_kl_coef", self.init_kl_coef, "use a coefficient >= 0")
        if self.adap_kl_ctrl:
            _require(self.target > 0, "target", self.target, "use a positive target KL")
            _require(self.horizon > 0, "horizon", self.horizon, "use a positive horizon")
        _require(0 <= self.gamma <= 1, "gamma", self.gamma, "use a value in [0, 1]")
        _require(0 <= self.lam <= 1, "lam", self.lam, "use a value in [0, 1]")
        _require(self.cliprange > 0, "cliprange", self.cliprange, "use a positive clip range")
        _require(self.cliprange_value > 0, "cliprange_value", self.cliprange_value, "use a positive clip range")
        _require(self.vf_coef >= 0, "vf_coef", self.vf_coef, "use a weight >= 0")
        _require(self.ratio_threshold > 0, "ratio_threshold", self.ratio_threshold, "use a positive threshold")
        if self.score_clip is not None:
            _require(self.score_clip > 0, "score_clip", self.score_clip, "use a positive bound or None")
        if self.use_score_norm and not self.use_score_scaling:
            raise ValueError(
                "`use_score_norm=True` only acts together with `use_score_scaling=True`: set both, or neither."
            )
        _require(self.temperature > 0, "temperature", self.temperature, "use a positive temperature")
        _require(self.top_k >= 0, "top_k", self.top_k, "use 0 (disabled) or a positive k")
        _require(0 < self.top_p <= 1, "top_p", self.top_p, "use a value in (0, 1]")
        _require(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "sample at least 1 token")
        if self.stop_token is not None and self.stop_token == "":
            raise ValueError("`stop_token` is empty: use 'eos', a token string, or None (null in YAML).")
        if self.missing_eos_penalty is not None and self.stop_token is None:
            raise ValueError(
                "`missing_eos_penalty` needs a stop token: set `stop_token` ('eos' or a token string) or drop the penalty."
            )
        if self.critic_init is not None and self.value_model in ("head", NO_VALUE_MODEL):
            raise ValueError("`critic_init` only applies with `value_model='critic'`.")
        if self.reward_weights is not None and any(math.isnan(w) for w in self.reward_weights):
            raise ValueError("`reward_weights` contains NaN.")


def _require(condition: bool, name: str, value, fix: str) -> None:
    if not condition:
        raise ValueError(f"`{name}` = {value!r} is invalid: {fix}.")


def _nearest_multiples(value: int, factor: int) -> str:
    lower = value - value % factor
    return " or ".join(str(n) for n in (lower, lower + factor) if n >= 1)


def _require_choice(name: str, value, choices: tuple[str, ...], optional: bool = False) -> None:
    if optional and value is None:
        return
    if value not in choices:
        valid = ", ".join(repr(choice) for choice in choices) + (", or None" if optional else "")
        raise ValueError(f"`{name}` = {value!r} is not one of the valid values: {valid}.")
