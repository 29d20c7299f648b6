"""The ``trl-multiadapter`` command line: parse, validate, hand over.

Every subcommand is one ``Subcommand`` in ``SUBCOMMANDS``: a name, a one-line help, a function that
adds its arguments to an ``argparse`` parser, and a function that runs it and returns the exit code.
Run functions import their implementation inside the function, so ``--help`` never loads torch.
Adding a subcommand takes one entry in ``SUBCOMMANDS`` and two small functions, as ``env`` does::

    def _add_env_arguments(parser):
        parser.add_argument("--json", action="store_true", help="print the report as JSON")

    def _run_env(args) -> int:
        from .env_info import collect_env_info, format_env_info  # heavy imports happen here, on use
        ...
        return 0

    Subcommand("env", "Print versions ...", _add_env_arguments, _run_env),

(the pipeline subcommands, ``generate`` included, are built the same way in ``pipeline_cli``).

Exit codes: 0 success; 1 a user error reported in one line (missing file, bad adapter or value,
missing optional dependency, broken plugin); 2 a usage error (unknown subcommand or flag, bad flag
value) or a recipe error (the key path and the fix, ``RecipeError.exit_code``); 130 interrupted.
``--traceback`` shows the full traceback instead of the one-line message.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import __version__

PROG = "trl-multiadapter"
EXIT_USER_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """Raised instead of argparse's print-usage-and-exit, so ``main`` reports it in one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse calls this for unknown choices, flags and bad values
        raise UsageError(f"{self.prog}: error: {message}")


def _add_env_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _run_env(args: argparse.Namespace) -> int:
    from .env_info import collect_env_info, format_env_info

    info = collect_env_info()
    print(info.to_json() if args.json else format_env_info(info))
    return 0


def _pipeline_subcommands() -> tuple[Subcommand, ...]:
    from . import pipeline_cli as p

    stage_help = "Run the stages of a recipe up to and including {0} (finished stages are skipped)."
    return (
        Subcommand("run", "Run every stage of a recipe (data, reward, ppo, evaluate, export) and the report.",
                   p.add_recipe_arguments, p.run_run),
        *(Subcommand(stage, stage_help.format(stage), p.add_recipe_arguments, p.stage_runner(stage))
          for stage in p.STAGE_COMMANDS),
        Subcommand("generate", "Sample answers from a base model + policy adapter.", p.add_generate_arguments,
                   p.run_generate),
    )


SUBCOMMANDS: tuple[Subcommand, ...] = (
    *_pipeline_subcommands(),
    Subcommand(
        "env",
        "Print versions of Python, torch and the Hugging Face stack, devices, bf16 and 4-bit support.",
        _add_env_arguments,
        _run_env,
    ),
)


def build_parser(subcommands: Sequence[Subcommand] = SUBCOMMANDS) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Multi-adapter PPO on one shared, frozen base model (policy, value, reward, reference).",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "--traceback", action="store_true", help="show the full traceback when a command fails"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for subcommand in subcommands:
        sub = commands.add_parser(subcommand.name, help=subcommand.help, description=subcommand.help)
        subcommand.add_arguments(sub)
        # Also accepted after the subcommand (`run tiny_cpu --traceback`); SUPPRESS keeps a value given before it.
        sub.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                         help="show the full traceback when the command fails")
        sub.set_defaults(_run=subcommand.run)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "fix your input or environment": reported in one line, exit code 1."""
    from .registry import RegistryError

    return (ValueError, FileNotFoundError, ImportError, RegistryError)


class _DropOptionalKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


def _quiet_optional_kernel_notice() -> None:
    """bitsandbytes 0.50's CPU backend tries to fetch an optional kernel from the hub when peft imports it,
    and logs two lines when it cannot (offline, or without the `kernels` package); it then uses its own
    code. The CLI drops just those two records, so a one-line error stays one line."""
    for name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
        logging.getLogger(name).addFilter(_DropOptionalKernelNotice())


def main(argv: Sequence[str] | None = None, subcommands: Sequence[Subcommand] = SUBCOMMANDS) -> int:
    _quiet_optional_kernel_notice()
    parser = build_parser(subcommands)
    try:
        args = parser.parse_args(argv)
    except UsageError as error:
        print(f"{error} (see '{PROG} --help')", file=sys.stderr)
        return EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args._run(args)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _user_errors() as error:
        if args.traceback:
            raise
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR

