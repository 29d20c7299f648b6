"""Controller <-> worker protocol and memory probes for the benchmarks (standard library only).

This module is imported by the controller (``run.py``, our venv) and by every worker, including
``trl_0_11_4_worker.py`` which runs inside TRL 0.11.4's own venv. It must not import the project.

Protocol: the controller writes one JSON object per line to a worker's stdin,
``{"cmd": name, "args": {...}}``, and the worker answers with one line
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``. Large arrays travel as files
in the benchmark work dir; only their paths go through the pipe. Workers move their own stdout
onto stderr at start-up, so library prints can never corrupt the protocol stream.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

MIB = 1024 * 1024


# --------------------------------------------------------------------------------------------- worker side


_PROTOCOL_OUT = None


def serve(handlers: dict[str, Callable[..., object]]) -> None:
    """Answer commands from stdin until ``exit`` or end of input. Call once, at the end of a worker."""
    protocol_out = _take_over_stdout()
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        command = request.get("cmd")
        if command == "exit":
            _reply(protocol_out, {"ok": True, "result": None})
            return
        handler = handlers.get(command)
        if handler is None:
            _reply(protocol_out, {"ok": False, "error": f"unknown command {command!r}; known: {sorted(handlers)}"})
            continue
        try:
            result = handler(**request.get("args", {}))
            _reply(protocol_out, {"ok": True, "result": result})
        except Exception:  # noqa: BLE001 - the controller shows the traceback and decides
            _reply(protocol_out, {"ok": False, "error": traceback.format_exc()})


def _take_over_stdout():
    """Keep the real stdout for protocol lines only; everything else printed goes to stderr."""
    global _PROTOCOL_OUT
    if _PROTOCOL_OUT is None:
        sys.stdout.flush()
        protocol_fd = os.dup(1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        _PROTOCOL_OUT = os.fdopen(protocol_fd, "w", buffering=1)
    return _PROTOCOL_OUT


def _reply(stream, message: dict) -> None:
    stream.write(json.dumps(message) + "\n")
    stream.flush()


def read_worker_config() -> dict:
    """The worker's settings: the JSON file named by the single command-line argument.

    Also moves stdout onto stderr from here on, before any library is imported and can print.
    """
    _take_over_stdout()
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {Path(sys.argv[0]).name} CONFIG.json")
    return json.loads(Path(sys.argv[1]).read_text())


# --------------------------------------------------------------------------------------------- controller side


class WorkerError(RuntimeError):
    pass


class Worker:
    """A worker subprocess running ``script`` under ``python``, driven command by command."""

    def __init__(self, name: str, python: str | os.PathLike, script: str | os.PathLike, config: dict, log_dir: Path,
                 env: dict[str, str] | None = None):
        self.name = name
        log_dir.mkdir(parents=True, exist_ok=True)
        config_path = log_dir / f"{name}.config.json"
        config_path.write_text(json.dumps(config, indent=1))
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in close()
        self._process = subprocess.Popen(
            [str(python), str(script), str(config_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, **(env or {})},
        )

    def call(self, command: str, **args) -> object:
        if self._process.poll() is not None:
            raise WorkerError(f"worker {self.name} exited with code {self._process.returncode}; see {self.log_path}:\n"
                              + self.log_tail())
        self._process.stdin.write(json.dumps({"cmd": command, "args": args}) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            self._process.wait(timeout=30)
            raise WorkerError(f"worker {self.name} died during {command!r} (exit code {self._process.returncode}); "
                              f"see {self.log_path}:\n" + self.log_tail())
        reply = json.loads(line)
        if not reply["ok"]:
            raise WorkerError(f"worker {self.name} failed in {command!r}:\n{reply['error']}")
        return reply["result"]

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                self.call("exit")
                self._process.wait(timeout=60)
            except (WorkerError, OSError, subprocess.TimeoutExpired, ValueError):
                self._process.kill()
                self._process.wait()
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


# --------------------------------------------------------------------------------------------- memory


def process_memory_mb() -> dict[str, float]:
    """Linux ``/proc/self/status`` figures in MiB: VmRSS, VmHWM (peak RSS), RssAnon, RssFile."""
    wanted = {"VmRSS", "VmHWM", "RssAnon", "RssFile"}
    figures = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in wanted:
            figures[key] = int(value.split()[0]) / 1024  # kB -> MiB
    return figures


def unique_set_size_mb() -> float:
    """USS: private pages of this process (``Private_Clean + Private_Dirty`` of smaps_rollup), MiB."""
    total_kb = 0
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Private_Clean", "Private_Dirty"):
            total_kb += int(value.split()[0])
    return total_kb / 1024


def release_free_memory() -> None:
    """Collect garbage and hand glibc's free heap pages back, so a baseline holds only live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline just includes the allocator's cache
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's VmHWM to the current RSS (``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class AnonymousPeakSampler:
    """Samples RssAnon in a thread: a second, anonymous-memory-only view of the peak (may miss spikes)."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, process_memory_mb()["RssAnon"])
            time.sleep(self.interval_s)

    def reset(self) -> None:
        self.peak_mb = process_memory_mb()["RssAnon"]

    def __enter__(self):
        self.reset()
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, process_memory_mb()["RssAnon"])


def materialise_parameters(module) -> int:
    """Copy every parameter and buffer into fresh (anonymous) memory; returns the bytes copied.

    Loaders may leave tensors backed by memory-mapped safetensors files: their pages count as file
    RSS that comes and goes with the page cache, which makes RSS-based peaks meaningless. After this
    call the weights are ordinary heap memory on every system, so peak RSS measures what is used.
    """
    copied = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        tensor.data = tensor.data.clone()
        copied += tensor.numel() * tensor.element_size()
    return copied


def measure_peak(build: Callable[[], object], run: Callable[[object], None]) -> dict[str, float]:
    """Peak memory of ``run(build())`` above the current (post-import) baseline, in MiB.

    The kernel's peak RSS is reset after ``build()``: loading may briefly hold a file-backed and an
    anonymous copy of the weights, which is a property of the loader, not of PPO. The built models
    stay resident during ``run``, so they are inside the peak. Returns ``peak_rss_above_baseline``
    (VmHWM during ``run`` minus the baseline RSS), ``peak_anon_above_baseline`` (sampled RssAnon),
    ``build_peak_above_baseline``, ``resident_after_build``, ``rss_file_delta`` (file-backed RSS
    beyond the baseline: near 0 when nothing big is memory-mapped) and ``uss_end`` (private memory).
    """
    release_free_memory()
    baseline = process_memory_mb()
    if not reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): memory needs Linux >= 4.0")
    with AnonymousPeakSampler() as sampler:
        built = build()
        build_peak = process_memory_mb()["VmHWM"]
        release_free_memory()
        after_build = process_memory_mb()
        reset_peak_rss()
        sampler.reset()
        run(built)
    end = process_memory_mb()
    return {
        "baseline_rss": baseline["VmRSS"],
        "peak_rss_above_baseline": end["VmHWM"] - baseline["VmRSS"],
        "peak_anon_above_baseline": sampler.peak_mb - baseline["RssAnon"],
        "build_peak_above_baseline": build_peak - baseline["VmRSS"],
        "resident_after_build": after_build["VmRSS"] - baseline["VmRSS"],
        "rss_file_delta": end["RssFile"] - baseline["RssFile"],
        "uss_end": unique_set_size_mb(),
    }


def run_worker_script(script: str, system: str, arguments: list[str]) -> dict:
    """Run ``script --worker SYSTEM --result FILE ARGUMENTS`` in a fresh process (its own peak memory, no
    state from other systems) and return the JSON it wrote; stop with its stderr tail if it failed."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        result_path = Path(scratch) / "result.json"
        command = [sys.executable, script, "--worker", system, "--result", str(result_path), *arguments]
        completed = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})
        if completed.returncode != 0:
            raise SystemExit(f"worker {system} failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
        return json.loads(result_path.read_text())
