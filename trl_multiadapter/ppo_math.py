"""PPO for language models as pure tensor functions (Ziegler et al. 2019; Schulman et al. 2017).

No config objects, model, I/O or state: every function maps tensors to tensors, keeps the dtype of its
main input and is tested against a direct implementation of its formula. Shapes use B = batch,
T = sequence positions, V = vocabulary, R = response positions.

Masks mark the positions a quantity is taken over; any nonzero entry counts as inside. Values outside
a mask never reach a masked statistic (they are selected away, not multiplied by zero, so a ``nan`` or
``inf`` there stays harmless, gradients included).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Added to the variance before dividing by the standard deviation, as TRL's PPO does.
WHITEN_EPS = 1e-8

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _softmax_precision(logits: torch.Tensor) -> torch.Tensor:
    # Sums over a vocabulary lose too much in 16-bit floats; _row_by_row casts the result back.
    return logits.float() if logits.dtype in _LOW_PRECISION else logits


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(_softmax_precision(logits), dim=-1)


def _row_by_row(per_row, *tensors: torch.Tensor) -> torch.Tensor:
    # One batch row at a time: the temporaries are (T, V), never (B, T, V).
    return torch.stack([per_row(*rows) for rows in zip(*tensors)]).to(tensors[0].dtype)


def _as_bool(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if mask.shape != like.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the values have shape {tuple(like.shape)}")
    return mask.to(torch.bool)


def _inside(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Select, not multiply: nan * 0 = nan. Selecting before any arithmetic also keeps gradients finite.
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _masked_sum(x: torch.Tensor, mask: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    inside = _inside(x, mask)
    return inside.sum() if axis is None else inside.sum(axis)


# ---------------------------------------------------------------------------------------------------
# Log-probabilities and entropy
# ---------------------------------------------------------------------------------------------------


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(a_t | s_t) = z_t[a_t] / τ − log Σ_v exp(z_t[v] / τ).

    logits (B, T, V), labels (B, T) integer token ids, temperature τ > 0 (the one used when sampling)
    -> (B, T) in the dtype of ``logits``. Rows are processed one at a time so no (B, T, V) temporary
    is allocated besides what autograd saves; 16-bit logits are reduced in float32.
    log_softmax(z)[a] = z[a] − logsumexp(z) avoids materialising the whole log_softmax.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels have shape {tuple(labels.shape)}; expected logits.shape[:-1] = {tuple(logits.shape[:-1])}"
        )

    def row_logprobs(row_logits: torch.Tensor, row_labels: torch.Tensor) -> torch.Tensor:
        z = _softmax_precision(row_logits)
        if temperature != 1.0:
            z = z / temperature
        return z.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1) - z.logsumexp(-1)

    return _row_by_row(row_logprobs, logits, labels)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H_t = −Σ_v p_t(v) log p_t(v),  p_t = softmax(z_t).

    logits (B, T, V) -> (B, T) in the dtype of ``logits``. Vocabulary entries with probability 0
    (e.g. logits of −inf) contribute 0, as in the limit p log p -> 0.
    """

    def row_entropy(row_logits: torch.Tensor) -> torch.Tensor:
        logp = _log_softmax(row_logits)
        p = logp.exp()
        # masked_fill, not where: keeps the gradient finite where log p = -inf
        return -(p * logp.masked_fill(p == 0, 0.0)).sum(-1)

    return _row_by_row(row_entropy, logits)


# ---------------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """mean(x) = Σ m·x / Σ m.

    x and mask of the same shape; ``axis=None`` gives a scalar, an integer axis reduces only that axis.
    An empty mask (Σ m = 0) gives ``nan``, like ``torch.mean`` of an empty tensor.
    """
    mask = _as_bool(mask, x)
    count = mask.sum() if axis is None else mask.sum(axis)
    return _masked_sum(x, mask, axis) / count


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """var(x) = Σ m·(x − mean)² / (n − 1)   (n = Σ m; divisor n when ``unbiased=False``).

    x and mask of the same shape -> scalar. Follows ``torch.var``: ``nan`` when the divisor is 0
    (n = 1 unbiased, or an empty mask). ``masked_whiten`` handles those cases explicitly.
    """
    mask = _as_bool(mask, x)
    x = _inside(x, mask)
    n = mask.sum()
    centered = x - masked_mean(x, mask)
    return _masked_sum(centered.square(), mask) / (n - 1 if unbiased else n)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """whiten(x) = (x − mean) / sqrt(var + ε)   (+ mean again when ``shift_mean=False``).

    x and mask of the same shape -> same shape and dtype; mean and unbiased variance over the masked
    entries, ε = WHITEN_EPS. Entries outside the mask are 0 in the result.

    Fewer than two masked entries carry no spread to divide by, so the scale is 1 there: one entry
    becomes 0 (``shift_mean=True``) or keeps its value (``shift_mean=False``); an empty mask gives all
    zeros. TRL's ``masked_whiten`` divided by n − 1 = 0 and returned ``nan`` for a mini-batch of one.
    """
    mask = _as_bool(mask, x)
    x = _inside(x, mask)
    n = mask.sum()
    mean = _masked_sum(x, mask) / n.clamp(min=1)
    centered = x - mean
    var = _masked_sum(centered.square(), mask) / (n - 1).clamp(min=1)
    scale = torch.where(n > 1, torch.rsqrt(var + WHITEN_EPS), torch.ones_like(var))
    whitened = centered * scale
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros_like(whitened))


# ---------------------------------------------------------------------------------------------------
# KL penalty
# ---------------------------------------------------------------------------------------------------
# Per-sample estimators of KL(π || π_ref) from d = log π(a) − log π_ref(a), a ~ π
# (J. Schulman, "Approximating KL divergence", 2020).


def _kl_k1(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio


def _kl_abs(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio.abs()


def _kl_k2(log_ratio: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_ratio.square()


def _kl_k3(log_ratio: torch.Tensor) -> torch.Tensor:
    # (r − 1) − log r with r = π_ref/π = exp(−d); expm1 keeps r − 1 exact for r near 1.
    return torch.expm1(-log_ratio) + log_ratio


_SAMPLE_KL_ESTIMATORS = {
    "k1": _kl_k1,
    "kl": _kl_k1,
    "abs": _kl_abs,
    "k2": _kl_k2,
    "mse": _kl_k2,
    "k3": _kl_k3,
}
KL_ESTIMATORS = (*_SAMPLE_KL_ESTIMATORS, "full")


def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL_t = Σ_v p_t(v) (log p_t(v) − log q_t(v)),  p = softmax(logits), q = softmax(ref_logits).

    logits, ref_logits (B, T, V), already divided by the sampling temperature -> (B, T) in the dtype
    of ``logits``. Exactly 0 where the two logits are equal.
    """
    if logits.shape != ref_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ref_logits {tuple(ref_logits.shape)} differ in shape")

    def row_kl(row_logits: torch.Tensor, row_ref_logits: torch.Tensor) -> torch.Tensor:
        logp, logq = _log_softmax(row_logits), _log_softmax(row_ref_logits)
        p = logp.exp()
        # p = 0 terms are 0 (limit of p log p), also where both logits are -inf
        return (p * (logp - logq).masked_fill(p == 0, 0.0)).sum(-1)

    return _row_by_row(row_kl, logits, ref_logits)


def kl_penalty(
    logprob: torch.Tensor,
    ref_logprob: torch.Tensor,
    estimator: str = "k1",
    logits: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL_t between policy π and reference π_ref at each sampled token, d_t = log π − log π_ref:

    k1 (alias kl)  d                      unbiased, can be negative
    abs            |d|
    k2 (alias mse) ½ d²
    k3             (r − 1) − log r,  r = exp(−d)   unbiased and ≥ 0 (Schulman 2020)
    full           Σ_v p (log p − log q) over the vocabulary (needs ``logits`` and ``ref_logits``)

    logprob, ref_logprob (B, T) -> (B, T); for "full", logits and ref_logits (B, T, V). Every
    estimator is exactly 0 where the inputs are equal.
    """
    if estimator == "full":
        if logits is None or ref_logits is None:
            raise ValueError(
                'kl_penalty(estimator="full") needs logits= and ref_logits= (B, T, V) of the policy and the '
                "reference; pass them, or pick a per-sample estimator: k1, k3, ..."
            )
        return full_kl(logits, ref_logits)
    estimate = _SAMPLE_KL_ESTIMATORS.get(estimator)
    if estimate is None:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
    return estimate(logprob - ref_logprob)


def sequence_kl(
    logprob: torch.Tensor,
    ref_logprob: torch.Tensor,
    response_mask: torch.Tensor,
    estimator: str = "k1",
    logits: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(π ‖ π_ref) of each response: Σ_t mask_t · KL_t with KL_t from :func:`kl_penalty`.

    With ``estimator="k1"`` this is the sampled (Monte Carlo) estimate, Σ_t log π − log π_ref over the
    sampled tokens; with ``"full"`` the exact per-position vocabulary KL, summed over the response.
    logprob, ref_logprob, response_mask (B, T); logits, ref_logits (B, T, V) for "full" -> (B,).
    """
    kl = kl_penalty(logprob, ref_logprob, estimator, logits=logits, ref_logits=ref_logits)
    return torch.where(response_mask.bool(), kl, torch.zeros((), dtype=kl.dtype, device=kl.device)).sum(dim=1)


# ---------------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------------


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = −β·KL_t + 1[t = last response token]·score   (Ziegler et al. 2019, eq. 2).

    scores (B,), kl (B, T), β = ``kl_coef``, response_mask (B, T)
    -> (rewards, non_score_rewards), both (B, T) in the dtype of ``kl`` and 0 outside the mask.
    Every row needs at least one response token: a row without one raises ``ValueError``, because
    its score would have no token to go to.
    """
    mask = _as_bool(response_mask, kl)
    if scores.shape != kl.shape[:1]:
        raise ValueError(f"scores have shape {tuple(scores.shape)}; expected ({kl.shape[0]},), one per row")
    last = last_token_indices(mask)
    empty_rows = (last < 0).nonzero().flatten().tolist()
    if empty_rows:
        raise ValueError(
            f"rows {empty_rows} of response_mask have no response token, so their score has no token to "
            "go to; keep at least the first generated token in every response"
        )
    non_score_rewards = torch.where(mask, -kl_coef * kl, torch.zeros_like(kl))
    score_at_last = scores.to(kl.dtype).unsqueeze(1)
    rewards = non_score_rewards.scatter_add(1, last.unsqueeze(1), score_at_last)
    return rewards, non_score_rewards


def clip_scores(scores: torch.Tensor, clip: float) -> torch.Tensor:
    """score ← clamp(score, −c, c).   scores (B,) -> (B,)."""
    if clip <= 0:
        raise ValueError(f"score clip must be > 0, got {clip}")
    return scores.clamp(-clip, clip)


def scale_scores(
    scores: torch.Tensor, mean: float, std: float, shift_mean: bool = False
) -> torch.Tensor:
    """score ← (score − μ) / (σ + ε) with ``shift_mean``, else score / (σ + ε).

    scores (B,); μ, σ running statistics of past scores (``RunningMoments``); ε = machine epsilon of
    the scores' dtype, as TRL's ``use_score_scaling`` / ``use_score_norm`` -> (B,).
    """
    shifted = scores - mean if shift_mean else scores
    return shifted / (std + torch.finfo(scores.dtype).eps)


def penalise_missing_stop(scores: torch.Tensor, stopped: torch.Tensor, penalty: float) -> torch.Tensor:
    """score ← score − penalty for responses that never produced a stop token.

    scores (B,), stopped (B,) bool (see ``contains_stop_token``) -> (B,).
    """
    return torch.where(stopped.to(torch.bool), scores, scores - penalty)


# ---------------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------------


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over the masked positions:

    δ_t = r_t + γ V_{t+1} − V_t,    A_t = δ_t + γλ A_{t+1},    returns R_t = A_t + V_t,

    where t+1 is the next masked position of the row and V = A = 0 after the last one (an episode
    ends with its response). rewards, values, mask (B, T) -> (advantages, returns), both (B, T) in
    the dtype of ``rewards`` and 0 outside the mask. The mask may start at any column (a response
    after left-padded prompt tokens, or at column 0); unmasked columns are skipped.
    """
    mask = _as_bool(mask, rewards)
    if values.shape != rewards.shape:
        raise ValueError(f"values {tuple(values.shape)} and rewards {tuple(rewards.shape)} differ in shape")
    values = values.to(rewards.dtype)
    zeros = rewards.new_zeros(rewards.shape[0])
    next_value, next_advantage = zeros, zeros
    advantages_reversed = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        inside = mask[:, t]
        next_advantage = torch.where(inside, advantage, next_advantage)
        next_value = torch.where(inside, values[:, t], next_value)
        advantages_reversed.append(torch.where(inside, advantage, zeros))
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = torch.where(mask, advantages + values, torch.zeros_like(advantages))
    return advantages, returns


# ---------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L^CLIP = mean_t max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε)),  ρ_t = exp(log π − log π_old)
    (Schulman et al. 2017, eq. 7, as a loss to minimise).

    logprobs, old_logprobs, advantages, mask (B, T); ε = ``cliprange``
    -> (loss, clipfrac, approxkl) scalars; clipfrac = share of masked tokens where the clipped term is
    the larger one, approxkl = ½ mean (log π − log π_old)² (TRL's ``policy/approxkl``). The
    diagnostics are detached.
    """
    mask = _as_bool(mask, logprobs)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask).detach()
    approxkl = 0.5 * masked_mean(log_ratio.detach().square(), mask)
    return loss, clipfrac, approxkl


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L^V = ½ mean_t max((V_t − R_t)², (V_old,t + clip(V_t − V_old,t, −c, c) − R_t)²).

    values, old_values, returns, mask (B, T); c = ``cliprange_value``
    -> (loss, clipfrac) scalars; clipfrac = share of masked tokens where the clipped term is the
    larger one (detached).
    """
    mask = _as_bool(mask, values)
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_error = (values - returns).square()
    clipped_error = (clipped_values - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    clipfrac = masked_mean((clipped_error > unclipped_error).to(values.dtype), mask).detach()
    return loss, clipfrac


# ---------------------------------------------------------------------------------------------------
# Response masks
# ---------------------------------------------------------------------------------------------------


def first_true_indices(bools: torch.Tensor) -> torch.Tensor:
    """Index of the first True in each row; the row length where there is none.

    bools (B, T) -> (B,) int64.
    """
    positions = torch.arange(bools.shape[-1], device=bools.device)
    return torch.where(bools.to(torch.bool), positions, bools.shape[-1]).min(dim=-1).values


def last_token_indices(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last nonzero entry in each row; −1 where there is none.

    mask (B, T) -> (B,) int64.
    """
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask.to(torch.bool), positions, -1).max(dim=-1).values


def contains_stop_token(response_ids: torch.Tensor, stop_token_ids: Sequence[int]) -> torch.Tensor:
    """Whether each response holds a stop token.   response_ids (B, R) -> (B,) bool."""
    return _is_stop(response_ids, stop_token_ids).any(dim=-1)


def response_mask_from_stop_tokens(
    response_ids: torch.Tensor, stop_token_ids: Sequence[int], pad_token_id: int | None
) -> torch.Tensor:
    """m_j = 1 for j ≤ first stop token (the stop token is the policy's last action), 0 after it.

    response_ids (B, R) generated tokens -> (B, R) int64 (1 = response token). A row without a stop
    token ends at its last non-pad token: the trailing run of ``pad_token_id`` is generation padding,
    while a pad id sampled inside the response stays part of it. ``pad_token_id=None``: no padding.
    """
    length = response_ids.shape[-1]
    first_stop = first_true_indices(_is_stop(response_ids, stop_token_ids))
    if pad_token_id is None:
        last_content = torch.full_like(first_stop, length - 1)
    else:
        last_content = last_token_indices(response_ids != pad_token_id)
    end = torch.where(first_stop < length, first_stop, last_content)
    positions = torch.arange(length, device=response_ids.device)
    return (positions <= end.unsqueeze(-1)).long()


def _is_stop(response_ids: torch.Tensor, stop_token_ids: Sequence[int]) -> torch.Tensor:
    if len(stop_token_ids) == 0:
        raise ValueError("stop_token_ids is empty; pass the EOS / end-of-turn ids, e.g. [tokenizer.eos_token_id]")
    stops = torch.as_tensor(list(stop_token_ids), dtype=response_ids.dtype, device=response_ids.device)
    return torch.isin(response_ids, stops)


# ---------------------------------------------------------------------------------------------------
# Critic-free advantages: k samples per prompt
# ---------------------------------------------------------------------------------------------------
# Rows come in consecutive groups of k completions of one prompt: row i belongs to prompt i // k.
# The sequence return of a row is the sum of its per-token rewards (score − β Σ KL when the KL shapes the
# reward, the score alone when the KL enters the loss), as TRL's RLOO sums its rlhf_reward.

# Added to the group standard deviation before dividing by it, as TRL's GRPOTrainer does.
GRPO_STD_EPS = 1e-4


def _groups(scores: torch.Tensor, k: int, estimator: str) -> torch.Tensor:
    """scores (B,) -> (B / k, k), after checking that B splits into groups of k >= 2."""
    if scores.dim() != 1:
        raise ValueError(f"{estimator}: scores must be 1-D (B,), got shape {tuple(scores.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(
            f"{estimator} needs k >= 2 samples per prompt (num_generations) to form a baseline, got k={k!r}; "
            "raise num_generations or use the gae estimator"
        )
    if scores.shape[0] % k:
        raise ValueError(
            f"{estimator}: {scores.shape[0]} scores do not split into groups of k={k} samples per prompt; "
            "the batch must hold num_generations completions of every prompt"
        )
    return scores.view(-1, k)  # (B / k, k)


def _zero_where_constant(advantages: torch.Tensor, grouped: torch.Tensor) -> torch.Tensor:
    # A group of equal scores carries no signal; its mean may still differ from the scores by a rounding
    # error, which dividing by a tiny spread would blow up. Exact zeros instead.
    constant = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    return torch.where(constant, torch.zeros_like(advantages), advantages)


def rloo_advantages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A_i = s_i − 1/(k−1) Σ_{j≠i} s_j   over the k samples of a prompt (REINFORCE leave-one-out,
    Kool et al. 2019; Ahmadian et al. 2024).

    scores (B,) sequence returns, B = prompts · k with a prompt's k rows consecutive -> (B,) in the dtype of
    ``scores``. k = 2 gives (s1 − s2, s2 − s1); a group of equal scores gives exact zeros; the advantages of a
    group sum to zero. k < 2 has no other sample to leave out and raises ``ValueError``.
    """
    grouped = _groups(scores, k, "rloo")
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)  # (B / k, k)
    return _zero_where_constant(grouped - baseline, grouped).reshape(-1)


def grpo_advantages(
    scores: torch.Tensor, k: int, scale_by_std: bool = True, eps: float = GRPO_STD_EPS
) -> torch.Tensor:
    """A_i = (s_i − mean_g) / (std_g + ε), or s_i − mean_g without ``scale_by_std``, over the k samples of a
    prompt (GRPO, Shao et al. 2024, sec. 4.1.2; Dr. GRPO, Liu et al. 2025, drops the division).

    scores (B,) sequence returns, B = prompts · k with a prompt's k rows consecutive -> (B,) in the dtype of
    ``scores``. std_g is the unbiased group standard deviation, ε = ``eps`` (TRL's GRPOTrainer: 1e-4). A
    group of equal scores gives exact zeros, never ``nan``; k < 2 has no spread and raises ``ValueError``.
    """
    if eps < 0:
        raise ValueError(f"grpo eps must be >= 0, got {eps}")
    grouped = _groups(scores, k, "grpo")
    centered = grouped - grouped.mean(dim=1, keepdim=True)  # (B / k, k)
    if scale_by_std:
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    return _zero_where_constant(centered, grouped).reshape(-1)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + γ G_{t+1}   over the masked positions (t+1 is the next masked position of the row, G = 0
    after the last one).

    rewards, mask (B, T) -> (B, T) in the dtype of ``rewards``, 0 outside the mask.
    """
    mask = _as_bool(mask, rewards)
    rewards = _inside(rewards, mask)
    running = rewards.new_zeros(rewards.shape[0])
    returns_reversed = []
    for t in reversed(range(rewards.shape[1])):
        inside = mask[:, t]
        running = torch.where(inside, rewards[:, t] + gamma * running, running)
        returns_reversed.append(torch.where(inside, running, torch.zeros_like(running)))
    return torch.stack(returns_reversed[::-1], dim=1)


def reinforce_pp_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """A_t = whiten(G_t) over every masked token of the batch,  G_t = Σ_{s ≥ t} γ^{s−t} r_s
    (REINFORCE++, Hu 2025: no critic; the batch-wide whitening is its baseline).

    rewards (B, T) per-token rewards from :func:`per_token_rewards` (score at the last response token,
    −β·KL_t on every token), mask (B, T) -> (B, T) advantages in the dtype of ``rewards``, 0 outside the
    mask. Whitening follows :func:`masked_whiten` (mean and unbiased variance of the masked entries).
    """
    return masked_whiten(discounted_returns(rewards, mask, gamma), mask)


def sequence_returns(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """R = Σ_t m_t r_t, the undiscounted return of each sequence.   rewards, mask (B, T) -> (B,)."""
    return _masked_sum(rewards, _as_bool(mask, rewards), axis=1)


def token_advantages(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """A_t = A for every response token of a sequence: one advantage per sequence spread over its tokens.

    advantages (B,), response_mask (B, T) -> (B, T) in the dtype of ``advantages``, 0 outside the mask.
    """
    if advantages.shape != response_mask.shape[:1]:
        raise ValueError(
            f"advantages have shape {tuple(advantages.shape)}; expected ({response_mask.shape[0]},), one per row"
        )
    spread = advantages.unsqueeze(1).expand(response_mask.shape)
    zero = torch.zeros((), dtype=advantages.dtype, device=advantages.device)
    return torch.where(response_mask.to(torch.bool), spread, zero)


def kl_loss(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """L^KL = β · mean_t [ π_ref/π − log(π_ref/π) − 1 ]   (the k3 estimator inside the loss, GRPO eq. 3-4).

    logprobs (B, T) with gradients, ref_logprobs (B, T), mask (B, T); β = ``beta`` -> (loss, kl) scalars;
    kl = the detached masked mean of k3 (TRL's ``kl`` metric). The mean is over all masked tokens, as
    :func:`policy_loss` averages, so the two terms add on the same scale. Exactly 0 where π = π_ref.
    """
    mask = _as_bool(mask, logprobs)
    kl = masked_mean(_kl_k3(logprobs - ref_logprobs.detach()), mask)
    return beta * kl, kl.detach()


def _gae_estimator(rewards, mask, values, k, gamma, lam, scale_by_std):
    if values is None:
        raise ValueError(
            "the gae estimator needs values (a value head or critic); pass values=, or pick one of "
            f"{', '.join(CRITIC_FREE_ESTIMATORS)}"
        )
    return compute_gae(rewards, values, mask, gamma, lam)


def _rloo_estimator(rewards, mask, values, k, gamma, lam, scale_by_std):
    return token_advantages(rloo_advantages(sequence_returns(rewards, mask), k), mask), None


def _grpo_estimator(rewards, mask, values, k, gamma, lam, scale_by_std):
    return token_advantages(grpo_advantages(sequence_returns(rewards, mask), k, scale_by_std), mask), None


def _reinforce_pp_estimator(rewards, mask, values, k, gamma, lam, scale_by_std):
    return reinforce_pp_returns(rewards, mask, gamma), None


ADVANTAGE_ESTIMATORS = {
    "gae": _gae_estimator,
    "rloo": _rloo_estimator,
    "grpo": _grpo_estimator,
    "reinforce_pp": _reinforce_pp_estimator,
}
CRITIC_FREE_ESTIMATORS = ("rloo", "grpo", "reinforce_pp")


def compute_advantages(
    estimator: str,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None = None,
    *,
    k: int = 1,
    gamma: float = 1.0,
    lam: float = 1.0,
    scale_by_std: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Advantages A_t of the estimator named ``estimator``, from per-token rewards:

    gae           :func:`compute_gae` (needs ``values``; γ, λ)       -> (A, returns R = A + V)
    rloo          :func:`rloo_advantages` of Σ_t r_t over groups of k, on every token   -> (A, None)
    grpo          :func:`grpo_advantages` of Σ_t r_t over groups of k (``scale_by_std``) -> (A, None)
    reinforce_pp  :func:`reinforce_pp_returns` (γ)                                      -> (A, None)

    rewards, mask, values (B, T) -> advantages (B, T) and value targets (B, T), or None for the critic-free
    estimators (nothing to regress a value model on). An unknown name raises ``ValueError`` listing the
    valid ones.
    """
    estimate = ADVANTAGE_ESTIMATORS.get(estimator)
    if estimate is None:
        raise ValueError(f"unknown advantage estimator {estimator!r}; valid: {', '.join(ADVANTAGE_ESTIMATORS)}")
    return estimate(rewards, mask, values, k, gamma, lam, scale_by_std)
