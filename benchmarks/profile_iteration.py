"""Seconds per PPO iteration of MultiAdapterPPOTrainer, and where they go.

Uses the benchmark's shared work dir (``_common.py``: the ``medium`` ~53M Llama, its policy LoRA on
q/v, the reward adapter, the value head and the 56-72-token prompts), so the numbers line up with
``run.py``'s comparison against TRL 0.11.4. Each iteration is ``trainer.step(prompts)``: KV-cache
sampling of 32 tokens per prompt (fixed length) that keeps old logprobs and values, one reward and
one reference pass over the batch, then 4 PPO epochs. Prints mean seconds per iteration after
warm-up, the split into phases, and the time spent switching adapters (``model.role`` enter/exit).

    python benchmarks/profile_iteration.py --threads 2 --mini-batch-sizes 1 8 --iterations 3
    python benchmarks/profile_iteration.py --dtype bfloat16     # opt-in bf16 frozen base
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PHASES = (
    ("generation (prefill + decode)", "time/rollout/generation"),
    ("reward forward", "time/rollout/score"),
    ("reference forward", "time/rollout/reference"),
    ("old logprobs (forward mode)", "time/rollout/old_logprobs"),
    ("training forwards", "time/optimisation/forward"),
    ("backwards", "time/optimisation/backward"),
    ("optimizer steps", "time/optimisation/step"),
)


class SwitchTimer:
    """Time spent entering and leaving adapter roles (the switch itself, not the body): the public
    ``model.role`` and the model's internal ``_adapters_of`` its own forwards use."""

    def __init__(self, model):
        self.seconds, self.switches = 0.0, 0
        for name in ("role", "_adapters_of"):
            original = getattr(model, name)
            # An instance attribute shadows the method, for the model's own calls too.
            setattr(model, name, lambda role, original=original: _TimedRole(original(role), self))


class _TimedRole:
    def __init__(self, context, timer):
        self.context, self.timer = context, timer

    def _timed(self, method, *args):
        start = time.perf_counter()
        try:
            return method(*args)
        finally:
            self.timer.seconds += time.perf_counter() - start
            self.timer.switches += 1

    def __enter__(self):
        return self._timed(self.context.__enter__)

    def __exit__(self, *exc_info):
        return self._timed(self.context.__exit__, *exc_info)


def build_trainer(workdir: Path, mini_batch_size: int, dtype: str, rollout_logprobs: str):
    import torch
    from safetensors.torch import load_file
    from transformers import PreTrainedTokenizerFast

    from trl_multiadapter import MultiAdapterModel, MultiAdapterPPOConfig, MultiAdapterPPOTrainer

    tokenizer = PreTrainedTokenizerFast.from_pretrained(workdir / "tokenizer")
    model = MultiAdapterModel.from_pretrained(
        str(workdir / "base"), policy_adapter=str(workdir / "policy_adapter"),
        reward_adapter=str(workdir / "reward_adapter"), dtype=getattr(torch, dtype),
    )
    head = load_file(str(workdir / "value_head.safetensors"))
    with torch.no_grad():
        model.value_head.weight.copy_(head["weight"])
        model.value_head.bias.copy_(head["bias"])
    config = MultiAdapterPPOConfig(
        output_dir=str(workdir / "profile_output"), batch_size=8, mini_batch_size=mini_batch_size, ppo_epochs=4,
        max_new_tokens=32, stop_token=None, learning_rate=1e-5, save_strategy="no", seed=0, disable_tqdm=True,
        report_to="none", use_cpu=True, rollout_logprobs=rollout_logprobs,
    )
    return MultiAdapterPPOTrainer(model=model, args=config, processing_class=tokenizer)


def profile(workdir: Path, mini_batch_size: int, args) -> dict:
    import torch

    trainer = build_trainer(workdir, mini_batch_size, args.dtype, args.rollout_logprobs)
    switches = SwitchTimer(trainer.model)
    prompts = json.loads((workdir / "prompts.json").read_text())["input_ids"]
    history, switch_seconds, switch_counts = [], [], []
    for iteration in range(args.warmup + args.iterations):
        batch = prompts[(iteration * 8) % len(prompts) :][:8]
        switches.seconds, switches.switches = 0.0, 0
        stats = trainer.step([torch.tensor(prompt) for prompt in batch])
        if iteration >= args.warmup:
            history.append(stats)
            switch_seconds.append(switches.seconds)
            switch_counts.append(switches.switches)
    count = len(history)
    breakdown = {label: sum(entry.get(key, 0.0) for entry in history) / count for label, key in PHASES}
    breakdown["adapter switching"] = sum(switch_seconds) / count
    return {
        "mini_batch_size": mini_batch_size, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "seconds_per_iteration": sum(entry["time/iteration"] for entry in history) / count,
        "seconds_each": [round(entry["time/iteration"], 3) for entry in history],
        "breakdown": breakdown, "role_switches_per_iteration": switch_counts[0],
        "first_ratio": [entry["policy/first_ratio"] for entry in history],
    }


def print_report(result: dict) -> None:
    total = result["seconds_per_iteration"]
    print(f"\nmini_batch_size={result['mini_batch_size']}  dtype={result['dtype']}  threads={result['threads']}: "
          f"{total:.3f} s/iteration {result['seconds_each']}  ({result['role_switches_per_iteration']} role "
          f"enter/exits, first ratio {result['first_ratio']})")
    accounted = 0.0
    for label, value in result["breakdown"].items():
        if label != "adapter switching":
            accounted += value
        print(f"  {label:<31} {value:8.3f} s  {100 * value / total:6.2f} %")
    other = total - accounted
    print(f"  {'other (data, PPO math, logging)':<31} {other:8.3f} s  {100 * other / total:6.2f} %")
    print("  (adapter switching is part of the passes above)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--mini-batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--rollout-logprobs", choices=["generation", "forward"], default="generation")
    # Its own copy of the benchmark fixtures, so a profile never races run.py over the same folder.
    parser.add_argument("--workdir", type=Path, default=HERE / ".work" / "profile-medium")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import _common
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    workdir = _common.ensure_workdir(args.workdir, _common.FixtureSettings())
    results = []
    for mini_batch_size in args.mini_batch_sizes:
        result = profile(workdir, mini_batch_size, args)
        print_report(result)
        results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
