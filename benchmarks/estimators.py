"""s/iteration and peak memory of MultiAdapterPPOTrainer with each advantage estimator, on one workload.

    OMP_NUM_THREADS=1 python benchmarks/estimators.py [--size small] [--iterations 3] [--batch 8] [--k 4]

Systems: ``gae`` (value head on the policy), ``gae_critic`` (a separate LoRA critic), ``rloo`` and ``grpo``
(critic-free: no value head or critic exists). Every system gets the same rows: ``batch / k`` prompts from the
shared benchmark work dir (``_common``), each repeated k times, exactly ``--new-tokens`` sampled tokens
(``stop_token=None``), the same reward adapter, policy LoRA (r16/a32 on q,v), ``ppo_epochs`` and mini-batch
size. ``gae`` and ``gae_critic`` treat the k copies as independent rows; ``gae_grouped`` (gae with
``num_generations=k``), ``rloo`` and ``grpo`` compute each prompt once for its k rows (shared_prompt.py), so
``gae_grouped`` vs ``gae`` is the prompt sharing alone and ``rloo`` vs ``gae_grouped`` the missing value head. Each system runs in a fresh process: imports and a
throwaway iteration on a 1-layer model first, then ``_protocol.measure_peak`` over building the trainer
(weights copied into ordinary memory) and ``1 + --iterations`` iterations; s/iteration is the median of
the iterations after the first. Ratios are against ``gae`` from this run; timings on a shared CPU are noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK_ROOT = HERE / ".work" / "estimators"
SYSTEMS = {  # name -> (advantage_estimator, value_model, num_generations = k: a prompt's rows share its computation)
    "gae": ("gae", "head", False),
    "gae_grouped": ("gae", "head", True),
    "gae_critic": ("gae", "critic", False),
    "rloo": ("rloo", "none", True),
    "grpo": ("grpo", "none", True),
}
VOCAB_SIZES = {"tiny": 1024, "small": 8000, "medium": 8000}


# --------------------------------------------------------------------------------------------- controller


def measure(system: str, args, workdir: Path) -> dict:
    import _protocol

    return _protocol.run_worker_script(__file__, system, [
        "--workdir", str(workdir), "--iterations", str(args.iterations), "--batch", str(args.batch), "--k", str(args.k),
        "--new-tokens", str(args.new_tokens), "--mini-batch", str(args.mini_batch), "--ppo-epochs", str(args.ppo_epochs),
        "--threads", str(args.threads)])


def report(results: dict[str, dict], args) -> dict:
    gae = results["gae"]
    ratios = {name: {"s_per_iteration": row["s_per_iteration"] / gae["s_per_iteration"],
                     "peak_memory": row["peak_rss_above_baseline"] / gae["peak_rss_above_baseline"],
                     "trainable_parameters": row["trainable_parameters"] / gae["trainable_parameters"]}
              for name, row in results.items()}
    settings = {key: getattr(args, key) for key in ("size", "iterations", "batch", "k", "new_tokens", "mini_batch",
                                                      "ppo_epochs", "threads")}
    print(f"Advantage estimators, {args.size} model, {args.batch} rows ({args.batch // args.k} prompts x {args.k}), "
          f"{args.new_tokens} new tokens, {args.ppo_epochs} PPO epochs, mini-batch {args.mini_batch}, "
          f"{args.threads} thread(s); ratios vs gae (value head) from this run")
    print("| system | s/iteration | x gae | peak RSS above baseline (MiB) | x gae | trainable params | value params |")
    print("|---|---|---|---|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row['s_per_iteration']:.2f} | {ratios[name]['s_per_iteration']:.3f} | "
              f"{row['peak_rss_above_baseline']:.0f} | {ratios[name]['peak_memory']:.3f} | "
              f"{row['trainable_parameters']:,} | {row['value_parameters']:,} |")
    return {"settings": settings, "systems": results, "ratios_vs_gae": ratios}


# --------------------------------------------------------------------------------------------- worker


def trainer_for(system: str, base, tokenizer, reward_adapter, args, output_dir: str):
    from peft import LoraConfig

    from trl_multiadapter import MultiAdapterPPOConfig, MultiAdapterPPOTrainer

    estimator, value_model, grouped = SYSTEMS[system]
    config = MultiAdapterPPOConfig(
        output_dir=output_dir, advantage_estimator=estimator, value_model=value_model,
        num_generations=args.k if grouped else 1, batch_size=args.batch, mini_batch_size=args.mini_batch,
        ppo_epochs=args.ppo_epochs, learning_rate=1e-5, max_new_tokens=args.new_tokens, stop_token=None, seed=0,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
    trainer = MultiAdapterPPOTrainer(base, args=config, processing_class=tokenizer, reward_adapter=reward_adapter,
                                     peft_config=lora)
    trainer.create_optimizer_and_scheduler(None)
    return trainer


def grouped_queries(workdir: Path, args) -> list:
    import torch

    prompts = json.loads((workdir / "prompts.json").read_text())["input_ids"][: args.batch // args.k]
    return [torch.tensor(ids) for ids in prompts for _ in range(args.k)]


def warm_up(system: str, tokenizer, args) -> None:
    """One iteration of the same system on a 1-layer model: code paths and thread pools before the baseline."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as output_dir:
        warm_args = argparse.Namespace(**{**vars(args), "new_tokens": 2, "ppo_epochs": 1})
        trainer = trainer_for(system, LlamaForCausalLM(config), tokenizer, None, warm_args, output_dir)
        queries = [torch.tensor([2, 10, 11, 12]) for _ in range(args.batch)]
        trainer.step(queries, scores=[float(i % 3) for i in range(args.batch)])


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import _protocol
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    workdir = args.workdir
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(workdir / "tokenizer")
    queries = grouped_queries(workdir, args)
    warm_up(args.worker, tokenizer, args)
    output_dir = tempfile.mkdtemp()
    holder, times = {}, []

    def build():
        base = AutoModelForCausalLM.from_pretrained(workdir / "base", dtype=torch.float32)
        trainer = trainer_for(args.worker, base, tokenizer, str(workdir / "reward_adapter"), args, output_dir)
        _protocol.materialise_parameters(trainer.model)
        holder["trainer"] = trainer
        return trainer

    def run(trainer) -> None:
        for _ in range(1 + args.iterations):
            start = time.perf_counter()
            trainer.step(queries)
            times.append(time.perf_counter() - start)

    result = _protocol.measure_peak(build, run)
    model = holder["trainer"].model
    result.update(
        s_per_iteration=statistics.median(times[1:]), iteration_seconds=times,
        trainable_parameters=sum(p.numel() for p in model.trainable_parameters()),
        value_parameters=sum(p.numel() for name, p in model.named_parameters() if "value" in name or ".critic." in name),
    )
    args.result.write_text(json.dumps({"system": args.worker, **result}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", choices=sorted(VOCAB_SIZES), help="benchmark model size (small: 24M)")
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations after one untimed")
    parser.add_argument("--batch", type=int, default=8, help="rows (completions) per iteration")
    parser.add_argument("--k", type=int, default=4, help="completions per prompt (num_generations of rloo/grpo)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--mini-batch", type=int, default=4, help="a multiple of --k")
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch % args.k or args.mini_batch % args.k:
        parser.error(f"--batch {args.batch} and --mini-batch {args.mini_batch} must be multiples of --k {args.k}")
    if args.worker:
        worker(args)
        return
    import _common

    systems = ["gae", *[name for name in args.systems if name != "gae"]]  # gae is the reference of the ratios
    workdir = args.workdir or WORK_ROOT / args.size
    _common.ensure_workdir(workdir, _common.FixtureSettings(model_size=args.size, vocab_size=VOCAB_SIZES[args.size]))
    results = {system: measure(system, args, workdir) for system in systems}
    summary = report(results, args)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
