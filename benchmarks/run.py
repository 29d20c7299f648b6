"""One entry point for the benchmarks of DESIGN.md section 6: speed against TRL 0.11.4, memory against
four separate model copies, adapter-switching cost and scaling, measured and printed in one run.

    python benchmarks/run.py            # full run (~15-25 min on an idle 2-core CPU); writes results/latest.*
    python benchmarks/run.py --quick    # tiny model, 2 rounds, no TRL venv (CI); writes results/quick.*
    python benchmarks/run.py --estimate-only

Every system runs in its own worker process and loads the same weights, adapters and prompts from one
work dir (``_common.py``). TRL 0.11.4 runs in its own venv (created on first use under
``benchmarks/.venv-trl-0.11.4``). Timed iterations alternate systems round by round with a rotating
order; ratios pair the systems of each round (see ``_report.py``). Parity comes first: if our
logprobs, reference logprobs or rewards on fixed ids differ from the baseline's by more than the
tolerance, the speed comparison is refused.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _common  # noqa: E402
import _protocol  # noqa: E402
import _report  # noqa: E402

RESULTS_DIR = HERE / "results"
WORK_ROOT = HERE / ".work"  # shared weights, worker logs (gitignored)
TRL_VENV = HERE / ".venv-trl-0.11.4"
TRL_TORCH = "torch==2.13.0"
TRL_PACKAGES = ["trl==0.11.4", "transformers==4.46.3", "peft==0.13.2", "accelerate==1.1.1", "tokenizers==0.20.3",
                "datasets==3.1.0", "numpy==2.2.6", "rich"]
PARITY_TOLERANCE = 1e-5
PARITY_REQUIRED = ("logprobs", "ref_logprobs", "scores")
FULL_MIN_ROUNDS = 6

# Seconds per iteration measured on the 2-core reference CPU (issue 8) for the 53M model, batch 8,
# 32 tokens, used only for the duration estimate. Ours is assumed at the targets.
_ESTIMATE_TRL_S = {1: 12.15, 8: 7.98}
_ESTIMATE_SPEEDUP = {"trl": 1.0, "separate": 0.9, "ours_fp32": 1.3, "ours_bf16": 1.7}
_ESTIMATE_MODEL_SCALE = {"medium": 1.0, "small": 0.45, "tiny": 0.02}
_ESTIMATE_WORKER_START_S = 10.0


@dataclass(frozen=True)
class Plan:
    """Everything a run does. ``full()`` and ``quick()`` are the two presets; flags edit a preset."""

    mode: str
    fixture: _common.FixtureSettings
    batch_size: int
    response_length: int
    mini_batches: tuple[int, ...]
    rounds: int
    warmup: int
    bf16: bool
    baseline: str  # "trl_0_11_4" or "separate_copies"
    ppo_epochs: int = 4
    learning_rate: float = 1e-5
    threads: int = 2
    seed: int = 0
    memory_mini_batches: tuple[int, ...] = (1, 8)
    memory_target_mini_batch: int = 1
    memory_iterations: int = 2
    scaling_batch_sizes: tuple[int, ...] = (4, 8, 16)
    scaling_response_lengths: tuple[int, ...] = (16, 32, 64)
    scaling_mini_batch: int = 4
    scaling_rounds: int = 3
    scaling_warmup: int = 1
    phases: tuple[str, ...] = ("parity", "speed", "memory", "scaling")
    workers_in_parallel: int = 2
    share_processes: bool = False  # quick: one process per venv and phase instead of one per system

    @classmethod
    def full(cls, threads: int) -> Plan:
        return cls(mode="full", fixture=_common.FixtureSettings(), batch_size=8, response_length=32, mini_batches=(1, 8),
                   rounds=6, warmup=1, bf16=True, baseline="trl_0_11_4", threads=threads)

    @classmethod
    def quick(cls, threads: int) -> Plan:
        fixture = _common.FixtureSettings(model_size="tiny", vocab_size=1024, prompt_min_tokens=8, prompt_max_tokens=16,
                                          num_prompts=48, parity_batch=4, parity_response_length=8)
        return cls(mode="quick", fixture=fixture, batch_size=4, response_length=8, mini_batches=(1, 4), rounds=2,
                   warmup=1, bf16=True, baseline="separate_copies", threads=threads, memory_mini_batches=(1,),
                   scaling_batch_sizes=(2, 4, 8), scaling_response_lengths=(4, 8, 16), scaling_mini_batch=2,
                   scaling_rounds=2, scaling_warmup=0, share_processes=True)

    @property
    def is_complete_full_run(self) -> bool:
        return (self.mode == "full" and self.rounds >= FULL_MIN_ROUNDS and self.bf16 and self.baseline == "trl_0_11_4"
                and set(self.phases) == {"parity", "speed", "memory", "scaling"} and {1, 8} <= set(self.mini_batches)
                and self.fixture == _common.FixtureSettings() and self.batch_size == 8 and self.response_length == 32)

    @property
    def output_stem(self) -> str:
        if self.mode == "quick":
            return "quick"
        return "latest" if self.is_complete_full_run else "partial"


@dataclass(frozen=True)
class SystemSpec:
    """One worker: a system kind with its PPO shape."""

    kind: str  # "trl" | "ours" | "separate" | "plain"
    mini_batch_size: int
    batch_size: int
    response_length: int
    dtype: str = "float32"
    label: str = field(default="", compare=False)

    @property
    def name(self) -> str:
        return self.label or f"{self.kind}/mb{self.mini_batch_size}"


# --------------------------------------------------------------------------------------------- workers


def system_config(plan: Plan, spec: SystemSpec) -> dict:
    return {"kind": spec.kind, "dtype": spec.dtype, "batch_size": spec.batch_size,
            "mini_batch_size": spec.mini_batch_size, "response_length": spec.response_length,
            "ppo_epochs": plan.ppo_epochs, "learning_rate": plan.learning_rate, "seed": plan.seed}


def start_worker(plan: Plan, specs: list[SystemSpec], workdir: Path, log_name: str) -> _protocol.Worker:
    """One process hosting ``specs`` (all TRL, or all from our venv)."""
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": str(plan.threads)}
    if specs[0].kind == "trl":
        python, script = TRL_VENV / "bin" / "python", HERE / "trl_0_11_4_worker.py"
        env["PYTHONPATH"] = ""  # nothing from our venv may leak into TRL 0.11.4's
    else:
        python, script = Path(sys.executable), HERE / "ours_worker.py"
    config = {"workdir": str(workdir), "threads": plan.threads,
              "systems": {spec.name: system_config(plan, spec) for spec in specs}}
    return _protocol.Worker(log_name.replace("/", "_"), python, script, config, workdir / "logs", env=env)


@dataclass
class Handle:
    """A system inside a worker process."""

    name: str
    worker: _protocol.Worker

    def call(self, command: str, **args):
        return self.worker.call(command, system=self.name, **args)


def group_specs(plan: Plan, specs: list[SystemSpec]) -> list[list[SystemSpec]]:
    """A process per system; with ``share_processes`` one per venv (TRL / ours), to save start-ups."""
    if not plan.share_processes:
        return [[spec] for spec in specs]
    groups = [[spec for spec in specs if spec.kind == "trl"], [spec for spec in specs if spec.kind != "trl"]]
    return [group for group in groups if group]


def start_and_setup(plan: Plan, specs: list[SystemSpec], workdir: Path) -> tuple[dict[str, Handle], list]:
    groups = group_specs(plan, specs)
    workers = [start_worker(plan, group, workdir, "+".join(spec.name for spec in group)[:120]) for group in groups]
    try:
        with concurrent.futures.ThreadPoolExecutor(plan.workers_in_parallel) as pool:
            for group, info in zip(groups, pool.map(lambda worker: worker.call("setup"), workers)):
                print(f"  started {', '.join(spec.name for spec in group)}: {info}", flush=True)
    except BaseException:
        close_all(workers)
        raise
    handles = {spec.name: Handle(spec.name, worker) for group, worker in zip(groups, workers) for spec in group}
    return handles, workers


def close_all(workers: list[_protocol.Worker]) -> None:
    for worker in workers:
        worker.close()


# --------------------------------------------------------------------------------------------- TRL venv


def ensure_trl_venv(venv: Path = TRL_VENV) -> dict:
    """Create TRL 0.11.4's venv unless it exists with the right versions; returns the versions found."""
    python = venv / "bin" / "python"
    found = _trl_venv_versions(python)
    if found is not None:
        return found
    print(f"creating the TRL 0.11.4 venv in {venv} (a few minutes, once)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    # torch first, pinned again below: nothing TRL 0.11.4 needs may pull in another torch.
    subprocess.run([*pip, TRL_TORCH], check=True)
    subprocess.run([*pip, TRL_TORCH, *TRL_PACKAGES], check=True)
    found = _trl_venv_versions(python)
    if found is None:
        raise RuntimeError(f"{venv} was created but does not import trl 0.11.4 with {TRL_TORCH}; delete it and rerun")
    return found


def _trl_venv_versions(python: Path) -> dict | None:
    if not python.exists():
        return None
    probe = ("import json, torch, trl, transformers, peft; print(json.dumps({'torch': torch.__version__, "
             "'trl': trl.__version__, 'transformers': transformers.__version__, 'peft': peft.__version__}))")
    completed = subprocess.run([str(python), "-c", probe], capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": ""})
    if completed.returncode != 0:
        return None
    versions = json.loads(completed.stdout.strip().splitlines()[-1])
    expected = {"trl": "0.11.4", "transformers": "4.46.3", "peft": "0.13.2"}
    if any(versions[name] != version for name, version in expected.items()) or not versions["torch"].startswith("2.13.0"):
        return None
    return versions


# --------------------------------------------------------------------------------------------- phases


def speed_specs(plan: Plan) -> list[SystemSpec]:
    baseline_kind = "trl" if plan.baseline == "trl_0_11_4" else "separate"
    specs = []
    for mini_batch in plan.mini_batches:
        shape = {"mini_batch_size": mini_batch, "batch_size": plan.batch_size, "response_length": plan.response_length}
        specs.append(SystemSpec(baseline_kind, label=f"{plan.baseline}/mb{mini_batch}", **shape))
        specs.append(SystemSpec("ours", label=f"ours_fp32/mb{mini_batch}", **shape))
        if plan.bf16:
            specs.append(SystemSpec("ours", dtype="bfloat16", label=f"ours_bf16/mb{mini_batch}", **shape))
    return specs


def run_rounds(handles: dict[str, Handle], batch_sizes: dict[str, int], prompts: list[list[int]],
               rounds: int, warmup: int, title: str) -> dict[str, dict[str, list]]:
    """``warmup`` discarded rounds, then ``rounds`` recorded ones; the order rotates every round."""
    names = list(handles)
    records: dict[str, dict[str, list]] = {name: {} for name in names}
    for round_index in range(warmup + rounds):
        shift = round_index % len(names)
        order = names[shift:] + names[:shift]
        line = []
        for name in order:
            queries = _common.prompt_batch(prompts, round_index, batch_sizes[name])
            result = handles[name].call("iteration", queries=queries)
            line.append(f"{name} {result['seconds']:.2f}s")
            if round_index >= warmup:
                for key, value in result.items():
                    if isinstance(value, (int, float)):
                        records[name].setdefault(key, []).append(value)
        kind = "warm-up" if round_index < warmup else f"round {round_index - warmup + 1}/{rounds}"
        print(f"  {title} {kind}: " + ", ".join(line), flush=True)
    return records


def run_parity(plan: Plan, handles: dict[str, Handle], workdir: Path) -> dict:
    """Every system computes logprobs, reference logprobs, values and scores for the same fixed ids."""
    import torch

    plain_spec = SystemSpec("plain", 1, plan.batch_size, plan.response_length, label="plain")
    plain_handles, plain_workers = start_and_setup(replace(plan, share_processes=False), [plain_spec], workdir)
    outputs = {}
    try:
        for name, handle in {**handles, **plain_handles}.items():
            if name.startswith("separate"):
                continue
            path = workdir / f"parity_{name.replace('/', '_')}.pt"
            handle.call("parity", out_path=str(path))
            outputs[name] = torch.load(path)
    finally:
        close_all(plain_workers)
    return compare_parity(plan, outputs)


def compare_parity(plan: Plan, outputs: dict[str, dict]) -> dict:
    ours_fp32 = f"ours_fp32/mb{plan.mini_batches[0]}"
    if plan.baseline == "trl_0_11_4":
        reference_names = [f"trl_0_11_4/mb{mini_batch}" for mini_batch in plan.mini_batches]
        reference = "trl_0_11_4"
    else:
        reference_names, reference = ["plain"], "plain_transformers"
    pairs, required = {}, []
    for reference_name in reference_names:
        key = f"{ours_fp32} vs {reference_name}"
        pairs[key] = _differences(outputs[ours_fp32], outputs[reference_name])
        required.append(key)
        if plan.bf16:
            pairs[f"ours_bf16/mb{plan.mini_batches[0]} vs {reference_name}"] = _differences(
                outputs[f"ours_bf16/mb{plan.mini_batches[0]}"], outputs[reference_name])
    if reference != "plain_transformers":
        for name in [*reference_names, ours_fp32]:
            pairs[f"{name} vs plain"] = _differences(outputs[name], outputs["plain"])
    failures = [f"{key}: {quantity} differs by {pairs[key][quantity]:.2e}" for key in required for quantity in
                PARITY_REQUIRED if not pairs[key][quantity] <= PARITY_TOLERANCE]
    return {"reference": reference, "tolerance": PARITY_TOLERANCE, "required": list(PARITY_REQUIRED),
            "required_pairs": required, "pairs": pairs, "passed": not failures, "failure": "; ".join(failures) or None}


def _differences(first: dict, second: dict) -> dict[str, float]:
    return {name: _common.max_abs_difference(first[name], second[name]) for name in ("logprobs", "ref_logprobs",
                                                                                    "values", "scores")}


def run_speed_and_parity(plan: Plan, workdir: Path, prompts: list[list[int]]) -> tuple[dict | None, dict | None]:
    if not {"parity", "speed"} & set(plan.phases):
        return None, None
    specs = speed_specs(plan)
    print(f"\n== speed: {', '.join(spec.name for spec in specs)}")
    handles, workers = start_and_setup(plan, specs, workdir)
    try:
        parity = None
        if "parity" in plan.phases:
            print("== parity on fixed ids")
            parity = run_parity(plan, handles, workdir)
            print(f"  parity {'passed' if parity['passed'] else 'FAILED: ' + parity['failure']}")
            if not parity["passed"]:
                print("  the speed comparison is refused: the systems do not compute the same numbers")
                return parity, None
        if "speed" not in plan.phases:
            return parity, None
        batch_sizes = {spec.name: spec.batch_size for spec in specs}
        records = run_rounds(handles, batch_sizes, prompts, plan.rounds, plan.warmup, "speed")
    finally:
        close_all(workers)
    speed = {"rounds": plan.rounds, "warmup": plan.warmup, "mini_batches": list(plan.mini_batches),
             "order": "rotated by one system per round", "systems": records}
    return parity, _report.summarise_speed(speed, plan.baseline)


def run_memory(plan: Plan, workdir: Path, prompts: list[list[int]]) -> dict:
    """One fresh single-system process per measurement: build the system, run ``memory_iterations``."""
    jobs = []
    for mini_batch in plan.memory_mini_batches:
        for label, kind in (("multi_adapter", "ours"), ("separate_copies", "separate")):
            jobs.append((mini_batch, label, SystemSpec(kind, mini_batch, plan.batch_size, plan.response_length,
                                                       label=f"memory_{label}/mb{mini_batch}")))
    batches = [_common.prompt_batch(prompts, index, plan.batch_size) for index in range(plan.memory_iterations)]
    print(f"\n== memory: {', '.join(spec.name for _, _, spec in jobs)}")

    def measure(job):
        mini_batch, label, spec = job
        with start_worker(plan, [spec], workdir, spec.name) as worker:
            result = worker.call("memory", system=spec.name, batches=batches)
        print(f"  {spec.name}: peak {result['peak_rss_above_baseline']:.0f} MiB above baseline "
              f"(anonymous {result['peak_anon_above_baseline']:.0f}, file-backed growth {result['rss_file_delta']:.0f})",
              flush=True)
        return mini_batch, label, result

    memory: dict[str, dict] = {}
    with concurrent.futures.ThreadPoolExecutor(plan.workers_in_parallel) as pool:
        for mini_batch, label, result in pool.map(measure, jobs):
            memory.setdefault(f"mb{mini_batch}", {})[label] = result
    return _report.summarise_memory(memory)


def run_scaling(plan: Plan, workdir: Path, prompts: list[list[int]]) -> dict:
    sweeps = {
        "batch_size": {"x": list(plan.scaling_batch_sizes), "response_length": plan.response_length},
        "response_length": {"x": list(plan.scaling_response_lengths), "batch_size": plan.batch_size},
    }
    shapes = sorted({(batch, plan.response_length) for batch in plan.scaling_batch_sizes}
                    | {(plan.batch_size, length) for length in plan.scaling_response_lengths})
    specs = [SystemSpec("ours", plan.scaling_mini_batch, batch, length, label=f"ours_fp32/b{batch}/r{length}")
             for batch, length in shapes]
    print(f"\n== scaling (mini-batch {plan.scaling_mini_batch}): {', '.join(spec.name for spec in specs)}")
    handles, workers = start_and_setup(plan, specs, workdir)
    try:
        batch_sizes = {spec.name: spec.batch_size for spec in specs}
        records = run_rounds(handles, batch_sizes, prompts, plan.scaling_rounds, plan.scaling_warmup, "scaling")
    finally:
        close_all(workers)
    sweeps["batch_size"]["seconds"] = [records[f"ours_fp32/b{b}/r{plan.response_length}"]["seconds"]
                                       for b in plan.scaling_batch_sizes]
    sweeps["response_length"]["seconds"] = [records[f"ours_fp32/b{plan.batch_size}/r{length}"]["seconds"]
                                            for length in plan.scaling_response_lengths]
    scaling = {"mini_batch_size": plan.scaling_mini_batch, "rounds": plan.scaling_rounds,
               "warmup": plan.scaling_warmup, "sweeps": sweeps}
    return _report.summarise_scaling(scaling)


# --------------------------------------------------------------------------------------------- estimate


def estimate_seconds(plan: Plan, trl_venv_ready: bool, workdir_ready: bool) -> float:
    scale = _ESTIMATE_MODEL_SCALE[plan.fixture.model_size]

    def iteration_s(kind: str, mini_batch: int, batch: int, length: int) -> float:
        trl_s = _ESTIMATE_TRL_S[1] if mini_batch < 4 else _ESTIMATE_TRL_S[8]
        work = (batch / 8) * (64 + length) / 96
        return max(0.2, scale * trl_s * work / _ESTIMATE_SPEEDUP[kind])

    total = 0.0 if workdir_ready else 20.0
    if plan.baseline == "trl_0_11_4" and not trl_venv_ready:
        total += 240.0
    baseline_kind = "trl" if plan.baseline == "trl_0_11_4" else "separate"
    if {"speed", "parity"} & set(plan.phases):
        kinds = [baseline_kind, "ours_fp32"] + (["ours_bf16"] if plan.bf16 else [])
        workers = 3 if plan.share_processes else len(kinds) * len(plan.mini_batches) + 1
        total += _ESTIMATE_WORKER_START_S * workers / plan.workers_in_parallel
        if "speed" in plan.phases:
            per_round = sum(iteration_s(kind, mb, plan.batch_size, plan.response_length)
                            for kind in kinds for mb in plan.mini_batches)
            total += per_round * (plan.rounds + plan.warmup)
    if "memory" in plan.phases:
        for mb in plan.memory_mini_batches:
            for kind in ("ours_fp32", "separate"):
                run_s = _ESTIMATE_WORKER_START_S + plan.memory_iterations * iteration_s(kind, mb, plan.batch_size,
                                                                                        plan.response_length)
                total += run_s / plan.workers_in_parallel * 1.5  # two at a time share the cores
    if "scaling" in plan.phases:
        shapes = {(b, plan.response_length) for b in plan.scaling_batch_sizes} | {
            (plan.batch_size, r) for r in plan.scaling_response_lengths}
        total += _ESTIMATE_WORKER_START_S * (1 if plan.share_processes else len(shapes) / plan.workers_in_parallel)
        per_round = sum(iteration_s("ours_fp32", plan.scaling_mini_batch, b, r) for b, r in shapes)
        total += per_round * (plan.scaling_rounds + plan.scaling_warmup)
    return total


# --------------------------------------------------------------------------------------------- main


def machine_info(threads: int) -> dict:
    import torch

    cpu = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_start": list(os.getloadavg())}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 rounds, no TRL venv; writes quick.json")
    parser.add_argument("--estimate-only", action="store_true", help="print the plan and its estimated duration")
    parser.add_argument("--rounds", type=int, help="timed rounds per system (full: 6)")
    parser.add_argument("--warmup", type=int, help="discarded warm-up rounds (full: 1)")
    parser.add_argument("--mini-batches", type=int, nargs="+", help="mini-batch sizes to time (full: 1 8)")
    parser.add_argument("--scaling-rounds", type=int, help="timed rounds per scaling point (full: 3)")
    parser.add_argument("--skip", nargs="+", default=[], choices=["parity", "speed", "memory", "scaling"],
                        help="phases to leave out (a run that skips any writes partial.json, not latest.json)")
    parser.add_argument("--also", nargs="+", default=[], choices=list(EXTRA_BENCHMARKS),
                        help="also run these same-run comparisons and add their tables: estimators (gae vs rloo "
                             "vs grpo, s/iteration and peak memory), shared_prompt (k samples per prompt, shared "
                             "vs unshared prompt computation)")
    parser.add_argument("--no-bf16", action="store_true", help="leave out our opt-in bf16 frozen base")
    parser.add_argument("--baseline", choices=["trl_0_11_4", "separate_copies"],
                        help="what ours is timed against (full: trl_0_11_4; --quick: separate_copies)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads per worker (default: all cores; the reference numbers use 2 of 2)")
    parser.add_argument("--workdir", type=Path, help="where the shared weights and logs go (default: benchmarks/.work/SIZE)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def build_plan(args: argparse.Namespace) -> Plan:
    plan = Plan.quick(args.threads) if args.quick else Plan.full(args.threads)
    changes = {}
    if args.rounds is not None:
        changes["rounds"] = args.rounds
    if args.warmup is not None:
        changes["warmup"] = args.warmup
    if args.mini_batches:
        changes["mini_batches"] = tuple(args.mini_batches)
    if args.scaling_rounds is not None:
        changes["scaling_rounds"] = args.scaling_rounds
    if args.skip:
        changes["phases"] = tuple(phase for phase in plan.phases if phase not in args.skip)
    if args.no_bf16:
        changes["bf16"] = False
    if args.baseline:
        changes["baseline"] = args.baseline
    plan = replace(plan, **changes)
    validate_plan(plan)
    return plan


def validate_plan(plan: Plan) -> None:
    if plan.rounds < 1 or plan.warmup < 0 or plan.scaling_rounds < 1:
        raise SystemExit("--rounds and --scaling-rounds must be >= 1 and --warmup >= 0")
    for mini_batch in plan.mini_batches:
        if mini_batch < 1 or plan.batch_size % mini_batch:
            raise SystemExit(f"--mini-batches: {mini_batch} must divide the batch size {plan.batch_size}")
    if "speed" in plan.phases and "parity" not in plan.phases and plan.baseline == "trl_0_11_4":
        raise SystemExit("--skip parity: timing against TRL 0.11.4 is only compared after parity; skip speed too")
    for batch in plan.scaling_batch_sizes:
        if batch % plan.scaling_mini_batch:
            raise SystemExit(f"scaling batch {batch} is not a multiple of its mini-batch {plan.scaling_mini_batch}")


def print_plan(plan: Plan, estimate_s: float) -> None:
    speed_systems = ", ".join(spec.name for spec in speed_specs(plan))
    print(f"benchmark plan ({plan.mode}; results -> {plan.output_stem}.json): model {plan.fixture.model_size}, "
          f"batch {plan.batch_size}, {plan.response_length} sampled tokens, {plan.ppo_epochs} PPO epochs, "
          f"{plan.threads} threads per worker")
    print(f"  phases: {', '.join(plan.phases)}; speed systems: {speed_systems}")
    print(f"  speed: {plan.warmup} warm-up + {plan.rounds} rounds; scaling: batch {list(plan.scaling_batch_sizes)} x "
          f"response {list(plan.scaling_response_lengths)}, {plan.scaling_warmup} + {plan.scaling_rounds} rounds; "
          f"memory at mini-batch {list(plan.memory_mini_batches)}")
    print(f"  estimated duration: ~{math.ceil(estimate_s / 60)} min on an idle machine like the reference 2-core CPU")


# The critic-free estimators and shared-prompt comparisons live in their own scripts (one fresh process per
# system, their own workloads); --also runs them in the same run and keeps their JSON beside ours.
EXTRA_BENCHMARKS = {"estimators": "estimators.py", "shared_prompt": "shared_prompt.py"}


def run_extra_benchmark(name: str, workdir: Path, threads: int) -> dict:
    output = workdir / f"{name}.json"
    output.unlink(missing_ok=True)
    print(f"\n== {name}", flush=True)
    script = Path(__file__).resolve().parent / EXTRA_BENCHMARKS[name]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    completed = subprocess.run([sys.executable, str(script), "--threads", str(threads), "--json", str(output)],
                               env=env, check=False)
    if completed.returncode != 0 or not output.exists():
        raise SystemExit(f"benchmarks/{EXTRA_BENCHMARKS[name]} failed (exit {completed.returncode}); run it alone "
                         "to see why")
    return json.loads(output.read_text())


def run(plan: Plan, workdir: Path, command: str, estimate_s: float, also: tuple[str, ...] = ()) -> dict:
    started = time.perf_counter()

    def progress(phase: str) -> None:
        minutes = (time.perf_counter() - started) / 60
        print(f"  [{phase} done: {minutes:.1f} min elapsed of ~{math.ceil(estimate_s / 60)} estimated]", flush=True)

    results = {"schema": 1, "mode": plan.mode, "complete": plan.is_complete_full_run,
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": command,
               "machine": machine_info(plan.threads), "settings": _settings(plan)}
    warn_if_busy(plan)
    print(f"\n== fixtures in {workdir}")
    _common.ensure_workdir(workdir, plan.fixture)
    prompts = json.loads((workdir / "prompts.json").read_text())["input_ids"]
    if plan.baseline == "trl_0_11_4" and {"parity", "speed"} & set(plan.phases):
        results["machine"]["trl_venv"] = ensure_trl_venv()
    results["parity"], results["speed"] = run_speed_and_parity(plan, workdir, prompts)
    progress("parity and speed")
    if "memory" in plan.phases:
        results["memory"] = run_memory(plan, workdir, prompts)
        progress("memory")
    if "scaling" in plan.phases:
        results["scaling"] = run_scaling(plan, workdir, prompts)
        progress("scaling")
    for name in also:
        results[name] = run_extra_benchmark(name, workdir, plan.threads)
        progress(name)
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["duration_s"] = time.perf_counter() - started
    results.update(_report.headline(results))
    return results


def warn_if_busy(plan: Plan) -> None:
    load = os.getloadavg()[0]
    if plan.mode == "full" and load > 0.5:
        print(f"  WARNING: load average {load:.1f} before the run: other work on this machine makes timings noise; "
              "run the full benchmark on a quiet machine")


def _settings(plan: Plan) -> dict:
    settings = asdict(plan)
    spec = plan.fixture
    settings["model_description"] = (f"{spec.model_size} Llama (vocab {spec.vocab_size}), batch {plan.batch_size}, "
                                     f"prompts {spec.prompt_min_tokens}-{spec.prompt_max_tokens} tokens, "
                                     f"{plan.response_length} sampled tokens, {plan.ppo_epochs} PPO epochs")
    settings["memory_mini_batch"] = plan.memory_target_mini_batch
    return settings


def write_outputs(results: dict, output_dir: Path, stem: str) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / f"{stem}.json", output_dir / f"{stem}.md", output_dir / f"{stem}.png"]
    paths[0].write_text(json.dumps(results, indent=1) + "\n")
    paths[1].write_text(_report.render_markdown(results))
    _report.render_png(results, paths[2])
    return paths


def print_ratios(results: dict) -> None:
    print("\n== results")
    for name, target in results["targets"].items():
        value = results[name]
        shown = "n/a" if value is None else f"{value:.4f}"
        met = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        print(f"  {name:34s} {shown:>10s}   target {target['target']:8s} {met}")
    if results.get("speed_ratio_vs_separate") is not None:
        print(f"  {'speed_ratio_vs_separate':34s} {results['speed_ratio_vs_separate']:10.4f}   (quick-run baseline)")
    print(f"  took {results['duration_s'] / 60:.1f} min")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = build_plan(args)
    workdir = args.workdir or (WORK_ROOT / plan.fixture.model_size)
    workdir_ready = (workdir / "manifest.json").exists()
    trl_ready = plan.baseline != "trl_0_11_4" or _trl_venv_versions(TRL_VENV / "bin" / "python") is not None
    estimate = estimate_seconds(plan, trl_ready, workdir_ready)
    print_plan(plan, estimate)
    if args.estimate_only:
        return 0
    command = "python benchmarks/run.py " + " ".join(shlex.quote(arg) for arg in (argv if argv is not None
                                                                                   else sys.argv[1:]))
    results = run(plan, workdir, command.strip(), estimate, tuple(args.also))
    paths = write_outputs(results, args.output_dir, plan.output_stem)
    print_ratios(results)
    print("  wrote " + ", ".join(str(path) for path in paths))
    parity = results.get("parity")
    return 1 if parity is not None and not parity["passed"] else 0


if __name__ == "__main__":
    sys.exit(main())
