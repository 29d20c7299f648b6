"""Shared vs unshared prompt computation on a GRPO-like workload: k samples per prompt, long prompts.

    OMP_NUM_THREADS=1 python benchmarks/shared_prompt.py [--size medium] [--prompts 2] [--k 4]
        [--prompt-tokens 256] [--new-tokens 32] [--rounds 3] [--threads 1]

One iteration is what a critic-free PPO step computes with the model: sampling k responses per prompt
(``sample_rollout``, logprobs captured while sampling), the reward adapter's scores, the reference
logprobs, then one training forward + backward over the batch as one mini-batch of whole groups.
"shared" passes ``group_size=k`` to the sampler, the reward source and ``RolePasses``; "unshared" passes
1 (today's computation). Both run in this one process on the same weights (the 53M benchmark model of
``benchmarks/run.py`` by default, from ``_common``) and the same prompts, alternating round by round
with a rotating order; the ratio is unshared / shared seconds per iteration, paired within each round.
Before timing, a parity check on one rollout: reference logprobs, scores and the policy loss's gradient
of both must agree within 1e-5 (the speed comparison is refused otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
WORK_ROOT = HERE / ".work"
VOCAB_SIZES = {"tiny": 1024, "small": 8000, "medium": 8000}
PARITY_TOLERANCE = 1e-5


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="medium", choices=sorted(VOCAB_SIZES), help="benchmark model (medium: 53M)")
    parser.add_argument("--prompts", type=int, default=2, help="distinct prompts per iteration")
    parser.add_argument("--k", type=int, default=4, help="samples per prompt (num_generations)")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="mean prompt length (+-16 tokens)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--workdir", type=Path, help="shared weights (default: benchmarks/.work/SIZE)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def build(args):
    import _common
    import torch

    from trl_multiadapter.model import MultiAdapterModel

    settings = _common.FixtureSettings(model_size=args.size, vocab_size=VOCAB_SIZES[args.size])
    workdir = _common.ensure_workdir(args.workdir or WORK_ROOT / args.size, settings)
    model = MultiAdapterModel.from_pretrained(str(workdir / "base"), policy_adapter=str(workdir / "policy_adapter"),
                                              reward_adapter=str(workdir / "reward_adapter"))
    generator = torch.Generator().manual_seed(0)
    prompts = []
    for _ in range(args.prompts):
        length = args.prompt_tokens + int(torch.randint(-16, 17, (1,), generator=generator))
        prompts.append(torch.randint(_common.FIRST_ORDINARY_TOKEN_ID, VOCAB_SIZES[args.size], (length,),
                                     generator=generator))
    return model, prompts


class Iteration:
    """One GRPO-like iteration with a given group size (1: unshared)."""

    def __init__(self, model, group_size: int, k: int, new_tokens: int):
        from trl_multiadapter.batching import RolePasses
        from trl_multiadapter.rollout import SamplingSettings
        from trl_multiadapter.scoring import RewardAdapterScores

        self.model, self.k = model, k
        # no stop token: every response has new_tokens tokens, so both variants do the same work
        self.settings = SamplingSettings(max_new_tokens=new_tokens, temperature=1.0, group_size=group_size)
        self.passes = RolePasses(model, 1.0, mini_batch_size=10**9, keep_logits=False, autocast=contextlib.nullcontext,
                                 group_size=group_size)
        self.scores = RewardAdapterScores(model, pad_token_id=0, group_size=group_size)

    def __call__(self, query_ids, query_mask, seed: int) -> dict:
        import torch

        from trl_multiadapter import ppo_math
        from trl_multiadapter.batching import padded_batch
        from trl_multiadapter.rollout import sample_rollout

        seconds = {}
        start = time.perf_counter()
        torch.manual_seed(seed)
        rollout = sample_rollout(self.model, query_ids, query_mask, self.settings)
        seconds["sampling"] = time.perf_counter() - start
        mark = time.perf_counter()
        scores = self.scores(rollout, {})
        ref_logprobs, _ = self.passes.reference(rollout)
        seconds["no_grad_passes"] = time.perf_counter() - mark
        mark = time.perf_counter()
        grouped = scores.view(-1, self.k)
        advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).flatten()
        batch = padded_batch(rollout).trimmed()
        mask = batch.response_mask
        _, logprobs, _ = self.passes.policy(batch)
        kl = ppo_math.kl_penalty(logprobs, ref_logprobs[:, : logprobs.shape[1]], "k3")
        ratio = torch.exp(logprobs - rollout.logprobs[:, : logprobs.shape[1]])
        loss = ppo_math.masked_mean(-ratio * advantages[:, None] + 0.04 * kl, mask)
        for parameter in self.model.trainable_parameters():
            parameter.grad = None
        loss.backward()
        seconds["training_forward_backward"] = time.perf_counter() - mark
        seconds["iteration"] = time.perf_counter() - start
        grads = [parameter.grad.clone() for parameter in self.model.trainable_parameters() if parameter.grad is not None]
        return {"seconds": seconds, "rollout": rollout, "scores": scores, "ref_logprobs": ref_logprobs,
                "loss": loss.detach(), "grads": grads}


def parity(shared: dict, unshared: dict) -> dict:
    mask = unshared["rollout"].response_mask.bool()
    differences = {
        "response_ids_equal": bool((shared["rollout"].response_ids == unshared["rollout"].response_ids).all()),
        "logprobs": (shared["rollout"].logprobs - unshared["rollout"].logprobs)[mask].abs().max().item(),
        "ref_logprobs": (shared["ref_logprobs"] - unshared["ref_logprobs"])[mask].abs().max().item(),
        "scores": (shared["scores"] - unshared["scores"]).abs().max().item(),
        "loss": (shared["loss"] - unshared["loss"]).abs().item(),
        "grads": max((a - b).abs().max().item() for a, b in zip(shared["grads"], unshared["grads"])),
    }
    differences["ok"] = differences["response_ids_equal"] and all(
        value <= PARITY_TOLERANCE for key, value in differences.items() if key not in ("response_ids_equal", "ok"))
    return differences


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from trl_multiadapter.rollout import left_pad

    torch.set_num_threads(args.threads)
    model, prompts = build(args)
    query_ids, query_mask = left_pad([prompt for prompt in prompts for _ in range(args.k)], 0)
    systems = {"shared": Iteration(model, args.k, args.k, args.new_tokens),
               "unshared": Iteration(model, 1, args.k, args.new_tokens)}
    print(f"{args.size} model, {args.prompts} prompts x k={args.k} ({query_ids.shape[0]} rows), prompts "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens, {args.new_tokens} new tokens, "
          f"{args.threads} thread(s)", flush=True)
    # warm-up round doubles as the parity check: same seed, so the same samples
    outputs = {name: system(query_ids, query_mask, seed=0) for name, system in systems.items()}
    check = parity(outputs["shared"], outputs["unshared"])
    print(f"parity (max abs difference, shared vs unshared): {json.dumps(check)}", flush=True)
    if not check["ok"]:
        print(f"parity failed (tolerance {PARITY_TOLERANCE}): speed comparison refused")
        return 1
    rounds = []
    for index in range(args.rounds):
        order = list(systems) if index % 2 == 0 else list(reversed(systems))
        rounds.append({name: systems[name](query_ids, query_mask, seed=index + 1)["seconds"] for name in order})
        print(f"round {index + 1}: " + ", ".join(f"{name} {rounds[-1][name]['iteration']:.2f} s" for name in systems),
              flush=True)
    phases = list(rounds[0]["shared"])
    summary = {name: {phase: statistics.median(r[name][phase] for r in rounds) for phase in phases} for name in systems}
    ratios = {phase: statistics.median(r["unshared"][phase] / r["shared"][phase] for r in rounds) for phase in phases}
    print("| phase | unshared s | shared s | speed-up (unshared / shared) |")
    print("|---|---|---|---|")
    for phase in phases:
        print(f"| {phase} | {summary['unshared'][phase]:.2f} | {summary['shared'][phase]:.2f} | {ratios[phase]:.2f}x |")
    print(f"shared-prompt speed-up per iteration: {ratios['iteration']:.2f}x (median of {args.rounds} paired rounds)")
    if args.json:
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "parity": check,
                                         "seconds": summary, "speedup": ratios, "rounds": rounds}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
