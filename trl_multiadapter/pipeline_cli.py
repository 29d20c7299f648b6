"""The pipeline subcommands of ``trl-multiadapter``: run, reward, ppo, evaluate, export, generate.

This module only parses and hands over (to ``recipe``, ``plan``, ``launch`` and ``pipeline``); it imports
nothing heavy at module level, so ``trl-multiadapter --help`` stays fast. A recipe problem prints one
line naming the key path and the fix, and exits with code 2 (``RecipeError.exit_code``).

    trl-multiadapter run [RECIPE | --config RECIPE] [--set key.path=value ...] [--output_dir DIR]
                         [--dry_run] [--accelerate_config NAME|PATH]

RECIPE is a YAML path or a bundled recipe name (``tiny_cpu``, ``hh_squad``); without one, ``tiny_cpu``
runs. ``reward``, ``ppo``, ``evaluate`` and ``export`` run the stages up to and including that one
(finished stages are skipped).
"""

from __future__ import annotations

import argparse
import sys

PROG = "trl-multiadapter"
DEFAULT_RECIPE = "tiny_cpu"
STAGE_COMMANDS = ("reward", "ppo", "evaluate", "export")
NO_LAUNCHER = "none"  # --accelerate_config none: run in this process, ignoring instance.accelerate_config


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", help=f"recipe YAML path or bundled name (default: {DEFAULT_RECIPE})")
    parser.add_argument("--config", help="recipe YAML path or bundled name (same as the positional argument)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one recipe value, e.g. --set ppo.learning_rate=2e-5 (repeatable)")
    parser.add_argument("--output_dir", help="run folder (overrides the recipe's output_dir)")
    parser.add_argument("--dry_run", action="store_true",
                        help="validate, print the plan, the accelerate config, memory and cost estimates; run nothing")
    parser.add_argument("--accelerate_config", metavar="NAME|PATH",
                        help="re-launch under `accelerate launch` with this config: a bundled name "
                             "(g5_12xlarge, single_gpu, multi_node_example, cpu_ddp) or a file; 'none' runs in "
                             "this process, whatever the recipe's instance.accelerate_config says")


def run_command(args: argparse.Namespace, until: str | None = None) -> int:
    """Validate the recipe, then print the plan (--dry_run), re-launch under accelerate, or run the stages."""
    from .recipe import RecipeError

    command = args.command or "run"
    try:
        return _run(args, command, until)
    except RecipeError as error:
        if getattr(args, "traceback", False):
            raise
        print(f"{PROG} {command}: error: {error}", file=sys.stderr)
        return error.exit_code


def _run(args: argparse.Namespace, command: str, until: str | None) -> int:
    from .launch import AccelerateConfigError, is_launched, read_accelerate_config, relaunch
    from .recipe import RecipeError, check_model_source, check_runtime, load

    if args.recipe and args.config and args.recipe != args.config:
        raise RecipeError("--config", f"two recipes given: {args.recipe!r} and --config {args.config!r}.",
                          "give the recipe once, as the positional argument or with --config.")
    if command == "ppo" and _is_flat_ppo_config(args.config or args.recipe):
        return _run_flat_ppo(args)
    recipe = load(args.config or args.recipe or DEFAULT_RECIPE, args.overrides, output_dir=args.output_dir)
    if until is not None and until not in recipe.stages:
        raise RecipeError("stages", f"the recipe does not include the '{until}' stage.",
                          f"add '{until}' to stages, or use `{PROG} run`.")
    launch_name = args.accelerate_config or recipe.instance.accelerate_config
    if launch_name == NO_LAUNCHER:
        launch_name = None
    try:
        launch = read_accelerate_config(launch_name) if launch_name else None
    except AccelerateConfigError as error:
        key = "--accelerate_config" if args.accelerate_config else "instance.accelerate_config"
        raise RecipeError(key, str(error), "use a bundled config name or an existing file.") from None
    from .pipeline import check_data_sources, data_stage_pending

    if args.dry_run:
        from .plan import format_plan, make_plan

        notes = check_data_sources(recipe, dry_run=True)  # bad files fail here, in seconds
        print(format_plan(make_plan(recipe, launch_name)))
        print("".join(f"Data source: {note}\n" for note in notes), end="")
        print("Dry run: the recipe is valid; nothing was run.")
        return 0
    check_runtime(recipe)  # machine problems first, then the data sources, both before anything is written
    if launch is not None and not is_launched():
        _check_launch_hardware(launch, "--accelerate_config" if args.accelerate_config else "instance.accelerate_config")
    check_model_source(recipe)
    if data_stage_pending(recipe):
        check_data_sources(recipe)
    if launch is not None and launch.num_processes > 1 and not is_launched():
        return relaunch(launch, _relaunch_arguments(command, recipe, args))
    from .pipeline import run_pipeline

    outcome = run_pipeline(recipe, until=until, on_stage=_print_stage)
    if outcome.report and _is_main_process():
        headline = _headline(outcome.report)
        if headline:
            print(headline)
        print(f"report: {outcome.run_dir / 'report.md'}")
    return 0


def _check_launch_hardware(launch, key: str) -> None:
    """A config that asks for GPUs stops here, in one line, on a machine without CUDA."""
    from .launch import missing_gpus
    from .recipe import RecipeError

    problem = missing_gpus(launch)
    if problem is not None:
        raise RecipeError(key, problem, f"use --accelerate_config cpu_ddp (2 CPU processes) or --accelerate_config "
                                        f"{NO_LAUNCHER} (one process, no launcher).")


def _headline(report: dict) -> str | None:
    """The closing line: the report's first base vs aligned rows (ground truth first when the data has one)."""
    headline = report.get("headline")
    if not headline:
        return None
    parts = [f"{row['label']}: base {row['base']:.3f} -> aligned {row['aligned']:.3f}"
             for row in headline["rows"][:2] if isinstance(row["base"], (int, float))]
    if isinstance(headline.get("win_rate"), (int, float)):
        parts.append(f"win rate {headline['win_rate']:.2f}")
    return "result: " + "; ".join(parts) if parts else None


def _is_flat_ppo_config(path: str | None) -> bool:
    """A YAML file of MultiAdapterPPOConfig fields (TRL style) rather than a sectioned recipe."""
    from pathlib import Path

    import yaml

    from .recipe import Recipe

    if path is None or not Path(path).is_file():
        return False
    content = yaml.safe_load(Path(path).read_text()) or {}
    sections = {name for name in Recipe.__dataclass_fields__ if name != "output_dir"}
    return isinstance(content, dict) and not sections & set(content)


def _run_flat_ppo(args: argparse.Namespace) -> int:
    from .launch import is_launched, read_accelerate_config, relaunch
    from .recipe import RecipeError

    if args.overrides or args.dry_run:
        raise RecipeError("--set", "a flat MultiAdapterPPOConfig file takes no --set or --dry_run.",
                          "edit the YAML file, or use a sectioned recipe (docs/recipes.md).")
    config = args.config or args.recipe
    if args.accelerate_config not in (None, NO_LAUNCHER) and not is_launched():
        launch = read_accelerate_config(args.accelerate_config)
        _check_launch_hardware(launch, "--accelerate_config")
        extra = ["--output_dir", args.output_dir] if args.output_dir else []
        return relaunch(launch, ["ppo", "--config", config, *extra])
    from .ppo_script import run_flat_ppo

    run_flat_ppo(config, output_dir=args.output_dir)
    return 0


def _relaunch_arguments(command: str, recipe, args: argparse.Namespace) -> list[str]:
    arguments = [command, str(recipe.source)]
    for override in args.overrides:
        arguments += ["--set", override]
    return arguments + ["--output_dir", recipe.output_dir]


def _print_stage(name: str, status: str) -> None:
    if _is_main_process():
        print(f"[{name}] {status}", flush=True)


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def run_run(args: argparse.Namespace) -> int:
    return run_command(args)


def stage_runner(stage: str):
    def run(args: argparse.Namespace) -> int:
        return run_command(args, until=stage)

    run.__name__ = f"run_{stage}"
    return run


# ------------------------------------------------------------------------------------------- generate


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base model: hub id, folder, or builtin:tiny")
    parser.add_argument("--adapter", help="policy adapter folder (PEFT CAUSAL_LM, e.g. RUN/export/policy); omit to "
                                          "sample from the base")
    parser.add_argument("--prompt", action="append", required=True, help="a user message (repeatable)")
    parser.add_argument("--system_prompt", help="system message before each prompt")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens; 0: all (PPO's default)")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--greedy", action="store_true", help="decode greedily instead of sampling")
    parser.add_argument("--seed", type=int, default=0)


def run_generate(args: argparse.Namespace) -> int:
    """Sample with PPO's sampler (``rollout.sample_rollout``); a bad adapter or base is a one-line error
    (ValueError / FileNotFoundError, exit code 1, from ``cli.main``)."""
    from .export import generate_from_adapter

    for prompt, answer in generate_from_adapter(
        args.base, args.adapter, args.prompt, system_prompt=args.system_prompt,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        do_sample=not args.greedy, seed=args.seed,
    ):
        print(f">>> {prompt}\n{answer}\n")
    return 0
