"""Seconds per PPO iteration of MultiAdapterPPOTrainer, and where they go.

Runs the trainer on ``build_tiny_model("medium")`` (~53M parameters, the benchmark model) with a fresh
policy LoRA and a random reward adapter: batch 8, 32 sampled tokens per response (fixed length, as in
the TRL 0.11 comparison), 4 PPO epochs, for each mini-batch size asked for. Prints mean seconds per
iteration after warm-up and the split into generation, reward and reference passes, training
forwards, backwards, optimizer steps and adapter switching (time inside ``model.role`` enter/exit).

    python benchmarks/profile_iteration.py --threads 2 --mini-batch-sizes 1 8 --iterations 3
    python benchmarks/profile_iteration.py --dtype bfloat16     # opt-in bf16 frozen base
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PHASES = (
    ("generation", "time/rollout/generation"),
    ("reward forward", "time/rollout/score"),
    ("reference forward", "time/rollout/reference"),
    ("old logprobs (forward mode)", "time/rollout/old_logprobs"),
    ("training forwards", "time/optimisation/forward"),
    ("backwards", "time/optimisation/backward"),
    ("optimizer steps", "time/optimisation/step"),
)


class SwitchTimer:
    """Time spent entering and leaving ``MultiAdapterModel.role`` (the switch itself, not the body)."""

    def __init__(self, model):
        self.seconds, self.switches = 0.0, 0
        self._role = model.role
        model.role = self  # an instance attribute shadows the method for the model's own calls too

    def __call__(self, name):
        return _TimedRole(self._role(name), self)


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


def write_reward_adapter(folder: Path, base) -> Path:
    """A random SEQ_CLS LoRA + score head over ``base``'s decoder, in RewardTrainer's on-disk format."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForSequenceClassification

    from trl_multiadapter.testing import tiny_llama_config

    torch.manual_seed(1)
    model = LlamaForSequenceClassification(tiny_llama_config("medium"))
    model.model.load_state_dict(base.model.state_dict())
    config = LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def prompts(count: int) -> list[str]:
    subjects = ("the harbor", "a violin", "the old library", "an orchard", "the glacier", "a bakery", "the tower")
    return [
        f"Question {i}: what should a visitor know about {subjects[i % len(subjects)]} before going there"
        + " and why" * (i % 4)
        + "?"
        for i in range(count)
    ]


def profile(mini_batch_size: int, args, reward_dir: Path, output_dir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    from trl_multiadapter import MultiAdapterModel, MultiAdapterPPOConfig, MultiAdapterPPOTrainer
    from trl_multiadapter.testing import BENCHMARK_VOCAB_SIZE, build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(BENCHMARK_VOCAB_SIZE)
    torch.manual_seed(0)
    model = MultiAdapterModel.from_pretrained(build_tiny_model("medium"), reward_adapter=reward_dir, dtype=args.dtype)
    switches = SwitchTimer(model)
    config = MultiAdapterPPOConfig(
        output_dir=str(output_dir), batch_size=8, mini_batch_size=mini_batch_size, ppo_epochs=4, max_new_tokens=32,
        stop_token=None, max_steps=args.warmup + args.iterations, save_strategy="no", seed=0, disable_tqdm=True,
        report_to="none", use_cpu=True, learning_rate=1e-5, rollout_logprobs=args.rollout_logprobs,
    )
    dataset = Dataset.from_dict({"prompt": prompts(8 * (args.warmup + args.iterations))})
    trainer = MultiAdapterPPOTrainer(model=model, args=config, processing_class=tokenizer, train_dataset=dataset)
    per_iteration_switch = []

    class RecordSwitches(TrainerCallback):
        def on_step_begin(self, *a, **k):
            switches.seconds, switches.switches = 0.0, 0

        def on_step_end(self, *a, **k):
            per_iteration_switch.append((switches.seconds, switches.switches))

    trainer.add_callback(RecordSwitches())
    trainer.train()
    history = [entry for entry in trainer.state.log_history if "time/iteration" in entry][args.warmup :]
    measured = per_iteration_switch[args.warmup :]
    seconds = sum(entry["time/iteration"] for entry in history) / len(history)
    breakdown = {label: sum(entry.get(key, 0.0) for entry in history) / len(history) for label, key in PHASES}
    breakdown["adapter switching"] = sum(s for s, _ in measured) / len(measured)
    return {
        "mini_batch_size": mini_batch_size, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "seconds_per_iteration": seconds, "breakdown": breakdown, "switches_per_iteration": measured[0][1],
        "first_ratio": [entry["policy/first_ratio"] for entry in history],
    }


def print_report(result: dict) -> None:
    total = result["seconds_per_iteration"]
    print(f"\nmini_batch_size={result['mini_batch_size']}  dtype={result['dtype']}  threads={result['threads']}: "
          f"{total:.3f} s/iteration ({result['switches_per_iteration']} role switches)")
    accounted = 0.0
    for label, value in result["breakdown"].items():
        accounted += value if label != "adapter switching" else 0.0
        print(f"  {label:<30} {value:8.3f} s  {100 * value / total:5.1f} %")
    print(f"  {'other (data, math, logging)':<30} {total - accounted:8.3f} s  {100 * (total - accounted) / total:5.1f} %")
    print("  (adapter switching is contained in the passes above)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--mini-batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--rollout-logprobs", choices=["generation", "forward"], default="generation")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    from trl_multiadapter.testing import build_tiny_model

    results = []
    with tempfile.TemporaryDirectory() as scratch:
        reward_dir = write_reward_adapter(Path(scratch) / "reward", build_tiny_model("medium"))
        for mini_batch_size in args.mini_batch_sizes:
            result = profile(mini_batch_size, args, reward_dir, Path(scratch) / f"run-{mini_batch_size}")
            print_report(result)
            results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
