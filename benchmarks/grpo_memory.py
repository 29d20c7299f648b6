"""Peak memory of TRL's GRPOTrainer with our reward adapter on the policy's own model, vs the same run with the
reward as a separate AutoModelForSequenceClassification (what ``reward_funcs=["path"]`` builds).

    OMP_NUM_THREADS=1 python benchmarks/grpo_memory.py [--size medium] [--steps 2] [--batch 8] [--num-generations 4]

Both systems train the same LoRA policy with the same GRPOConfig on the same base weights and prompts. The
separate reward is the same reward adapter merged into its own copy of the base (so both score alike); TRL
feeds it through its own reward-model path (decode, re-encode). Each system runs in a fresh process:
imports and a throwaway tiny GRPO run first (library pages, thread pools, dataset caches land in the
baseline), then ``_protocol.measure_peak``: building the trainer (weights copied into ordinary memory, so
memory-mapped safetensors do not distort RSS), then ``--steps`` GRPO steps; the peak is the kernel's peak RSS
during the steps minus the post-import baseline. The ratio printed is adapter / separate, from this run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK_ROOT = HERE / ".work" / "grpo_memory"
SYSTEMS = ("reward_adapter", "separate_model")
VOCAB_SIZES = {"tiny": 1024, "small": 8000, "medium": 8000}


# --------------------------------------------------------------------------------------------- controller


def prepare(workdir: Path, size: str) -> Path:
    """The shared weights (``_common``: base, tokenizer, reward adapter, prompts) and the merged reward model."""
    import _common
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _common.ensure_workdir(workdir, _common.FixtureSettings(model_size=size, vocab_size=VOCAB_SIZES[size]))
    merged_dir = workdir / "merged_reward_model"
    if not (merged_dir / "config.json").is_file():
        base = AutoModelForCausalLM.from_pretrained(workdir / "base", dtype=torch.float32)
        classifier = _common.sequence_classifier(base)
        merged = PeftModel.from_pretrained(classifier, str(workdir / "reward_adapter")).merge_and_unload()
        merged.save_pretrained(merged_dir)
    return merged_dir


def measure(system: str, args, workdir: Path) -> dict:
    import _protocol

    return _protocol.run_worker_script(__file__, system, [
        "--workdir", str(workdir), "--steps", str(args.steps), "--batch", str(args.batch),
        "--num-generations", str(args.num_generations), "--max-completion-length", str(args.max_completion_length),
        "--threads", str(args.threads)])


def report(results: dict[str, dict], args) -> dict:
    adapter, separate = results["reward_adapter"], results["separate_model"]
    summary = {
        "settings": {key: getattr(args, key) for key in ("size", "steps", "batch", "num_generations",
                                                         "max_completion_length", "threads")},
        "systems": results,
        "memory_ratio_reward_adapter_vs_separate": adapter["peak_rss_above_baseline"] / separate["peak_rss_above_baseline"],
        "resident_ratio_after_build": adapter["resident_after_build"] / separate["resident_after_build"],
    }
    print(f"GRPO peak memory above the post-import baseline (MiB), {args.size} model, batch {args.batch} "
          f"({args.num_generations} generations per prompt), {args.max_completion_length} new tokens, {args.steps} steps")
    print("| system | peak RSS | sampled anon peak | resident after build | file RSS delta | parameters (M) |")
    print("|---|---|---|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row['peak_rss_above_baseline']:.0f} | {row['peak_anon_above_baseline']:.0f} | "
              f"{row['resident_after_build']:.0f} | {row['rss_file_delta']:.0f} | {row['parameters'] / 1e6:.1f} |")
    print(f"peak memory ratio, reward adapter / separate reward model: "
          f"{summary['memory_ratio_reward_adapter_vs_separate']:.3f}")
    return summary


# --------------------------------------------------------------------------------------------- worker


def prompt_dataset(workdir: Path, tokenizer, count: int):
    from datasets import Dataset

    ids = json.loads((workdir / "prompts.json").read_text())["input_ids"][:count]
    return Dataset.from_dict({"prompt": tokenizer.batch_decode(ids, skip_special_tokens=True)})


def grpo_args(output_dir: str, args, steps: int):
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=output_dir, use_cpu=True, bf16=False, per_device_train_batch_size=args.batch,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length, max_steps=steps,
        learning_rate=1e-5, logging_steps=1, save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
        dataloader_num_workers=0, beta=0.04,
    )


def policy_lora():
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])


def warm_up(workdir: Path, tokenizer, args) -> None:
    """A throwaway 1-step GRPO run on a 1-layer model: TRL, datasets and torch code paths run once before the baseline."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import GRPOTrainer

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)

    def constant(completion_ids, **kwargs):
        return [float(len(ids)) for ids in completion_ids]

    with tempfile.TemporaryDirectory() as output_dir:
        warm_args = argparse.Namespace(**{**vars(args), "max_completion_length": 4})
        GRPOTrainer(model=model, reward_funcs=[constant], args=grpo_args(output_dir, warm_args, 1),
                    train_dataset=prompt_dataset(workdir, tokenizer, args.batch), processing_class=tokenizer,
                    peft_config=policy_lora()).train()


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import _protocol
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import GRPOTrainer

    from trl_multiadapter.trl_reward import RewardAdapterFunction

    workdir = args.workdir
    tokenizer = AutoTokenizer.from_pretrained(workdir / "tokenizer")
    prompts = prompt_dataset(workdir, tokenizer, 4 * args.batch)
    warm_up(workdir, tokenizer, args)
    output_dir = tempfile.mkdtemp()

    def build():
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(workdir / "base", dtype=torch.float32)
        _protocol.materialise_parameters(base)
        if args.worker == "reward_adapter":
            reward = RewardAdapterFunction(workdir / "reward_adapter")
            trainer = GRPOTrainer(model=base, reward_funcs=[reward], args=grpo_args(output_dir, args, args.steps),
                                  train_dataset=prompts, processing_class=tokenizer, peft_config=policy_lora())
            reward.attach(trainer)
        else:
            reward_model = AutoModelForSequenceClassification.from_pretrained(
                workdir / "merged_reward_model", num_labels=1, dtype=torch.float32)
            _protocol.materialise_parameters(reward_model)
            trainer = GRPOTrainer(model=base, reward_funcs=[reward_model], reward_processing_classes=[tokenizer],
                                  args=grpo_args(output_dir, args, args.steps), train_dataset=prompts,
                                  processing_class=tokenizer, peft_config=policy_lora())
        return trainer

    def run(trainer) -> None:
        trainer.train()

    holder = {}

    def build_and_keep():
        holder["trainer"] = build()
        return holder["trainer"]

    result = _protocol.measure_peak(build_and_keep, run)
    trainer = holder["trainer"]
    models = [trainer.model] + [function for function in trainer.reward_funcs if isinstance(function, torch.nn.Module)]
    result["parameters"] = sum(parameter.numel() for model in models for parameter in model.parameters())
    result["mean_reward"] = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
    args.result.write_text(json.dumps({"system": args.worker, **result}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="medium", choices=sorted(VOCAB_SIZES), help="benchmark model size (medium: 53M)")
    parser.add_argument("--steps", type=int, default=2, help="GRPO steps measured")
    parser.add_argument("--batch", type=int, default=8, help="completions per step (per_device_train_batch_size)")
    parser.add_argument("--num-generations", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-completion-length", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch % args.num_generations:
        parser.error(f"--batch {args.batch} must be a multiple of --num-generations {args.num_generations}")
    if args.worker:
        worker(args)
        return
    workdir = args.workdir or WORK_ROOT / args.size
    prepare(workdir, args.size)
    results = {system: measure(system, args, workdir) for system in SYSTEMS}
    summary = report(results, args)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
