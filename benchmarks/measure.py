"""How time and memory are measured.

Time
- CPU: `time.perf_counter` around each call, after `warmup_calls` untimed calls, with
  `torch.set_num_threads` fixed for the whole run (1 unless `--threads` says otherwise; the CSV
  records it). On a shared machine more threads than free cores turn every barrier into a wait
  for the other jobs, which inflates the slower provider's time far more than the faster one's.
- GPU: CUDA events around each call; before each call a 256 MiB buffer is zeroed so that no call
  finds the previous one's data in L2 (what `triton.testing.do_bench` does too).
The providers of one (config, op, mode) are timed interleaved, one call of each per round, to
the end: a provider leaves the rounds when its own repeats are enough (`min_repeats` calls and
`min_seconds` of measured time, or `max_seconds` after 3 calls, or `max_repeats`), and the rounds
stop as soon as fewer than two providers are left. So every timed call comes right after another
provider's call; none is timed back to back with itself on a warm cache (on a CPU measurably
faster than a call right after another provider's) while the others have stopped. The median and the
20th / 80th percentiles are reported, and the 1-minute load average before and after the rounds,
so that each ratio can be read with the load it was made in.

Peak extra memory
- GPU: `torch.cuda.max_memory_allocated()` during one call minus `memory_allocated()` just before
  it (the inputs, and for `backward` the graph that the forward saved), after a warm-up call.
- CPU: the resident-set high-water mark in a fresh process forked from a small server process
  (`serve()`: torch and the package imported, nothing computed): it allocates its own inputs, runs
  one warm-up call (thread pool, lazy initialisation, oneDNN kernels), then resets the kernel's
  high-water mark (`echo 5 > /proc/self/clear_refs`), reads VmRSS, runs one call and reports
  VmHWM - VmRSS. glibc is started with a fixed `MALLOC_MMAP_THRESHOLD_=65536`, so every buffer of
  64 KiB or more is its own mmap that leaves the RSS when freed, and a call cannot hide its peak
  in memory that the warm-up left cached in the heap. Page granularity (4 KiB); includes every
  allocation (torch tensors, C++ std::vector, oneDNN scratch), not only torch's allocator.
"""
from __future__ import annotations

import gc
import json
import os
import select
import signal
import subprocess
import sys
import time
from typing import Callable, Optional, Tuple

import numpy as np
import torch


GPU_MEMORY_METHOD = ("cuda max_memory_allocated during one call minus memory_allocated before it "
                     "(inputs; for backward also the saved graph)")
CPU_MEMORY_METHOD = ("peak RSS delta (VmHWM after a clear_refs reset, minus VmRSS) in a fresh "
                     "forked process after inputs + one warm-up call; MALLOC_MMAP_THRESHOLD_=65536")

# The environment of the measurement server (glibc reads it at start): see the module docstring.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


def synchronize(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


def timed_call(fn: Callable, device_type: str) -> Tuple[float, tuple]:
    """Wall time of one synchronised call and its result (the warm-up calls: they also decide
    the time budget and give the output that the correctness check compares)."""
    synchronize(device_type)
    start = time.perf_counter()
    result = fn()
    synchronize(device_type)
    return time.perf_counter() - start, result


class Timer:
    """Times one call: perf_counter on CPU; on GPU CUDA events, with a 256 MiB buffer zeroed
    before the call so that it does not find the previous call's data in L2."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        if device_type == "cuda":
            self.flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn: Callable) -> float:
        if self.device_type == "cuda":
            self.flush.zero_()
            self.start.record()
            result = fn()
            self.end.record()
            self.end.synchronize()
            del result
            return self.start.elapsed_time(self.end) / 1e3
        begin = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - begin
        del result
        return seconds


def enough(seconds: list, policy) -> bool:
    """Whether one provider's repeats are enough (module docstring)."""
    total = sum(seconds)
    return (len(seconds) >= policy.max_repeats
            or (len(seconds) >= policy.min_repeats and total >= policy.min_seconds)
            or (len(seconds) >= 3 and total >= policy.max_seconds))


def time_interleaved(fns: dict, timer: Callable[[Callable], float], policy) -> dict:
    """Repeats of several providers' calls in rounds, one call of each active provider per round
    in the order of `fns`. A provider leaves when its own repeats are enough; the rounds end when
    fewer than two providers are left, so no provider is ever timed back to back with itself
    (unless it was alone from the start). Returns {name: [seconds]}."""
    samples = {name: [] for name in fns}
    active = list(fns)
    while active:
        for name in active:
            samples[name].append(timer(fns[name]))
        active = [name for name in active if not enough(samples[name], policy)]
        if len(active) < 2 and len(fns) >= 2:
            break
    return samples


def load_average() -> Optional[float]:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def summarize(samples: list) -> dict:
    values = np.asarray(samples, dtype=np.float64)
    return {
        "repeats": len(values),
        "time_median_s": float(np.median(values)),
        "time_p20_s": float(np.percentile(values, 20)),
        "time_p80_s": float(np.percentile(values, 80)),
    }


def gpu_peak_extra_bytes(fn: Callable) -> int:
    """Peak bytes allocated during one call beyond what was allocated before it."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return int(peak)


# ------------------------------------------------------------------------------------------------
# CPU: peak RSS in a fresh process
# ------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _peak_rss_in_this_process(request: dict) -> dict:
    """Runs in the freshly forked process: see the module docstring."""
    from .configs import BenchConfig
    from .providers import PROVIDERS
    from .workloads import make_inputs, mode_callable

    config = BenchConfig.from_dict(request["config"])
    torch.set_num_threads(request["threads"])
    inputs = make_inputs(config, "cpu")
    fn = mode_callable(PROVIDERS[request["provider"]], request["op"], request["mode"], inputs)
    result = fn()  # warm-up
    del result
    gc.collect()
    if not _reset_high_water_mark():
        return {"error": "cannot reset VmHWM (/proc/self/clear_refs not writable)"}
    before_kib = _status_kib("VmRSS")
    result = fn()
    peak_kib = _status_kib("VmHWM") - before_kib
    del result
    return {"peak_bytes": peak_kib * 1024}


REPLY_MARK = "BIMI-MEMORY-REPLY "


def serve() -> None:
    """The measurement server (`python -m benchmarks.measure --serve`): torch and the package
    imported, nothing computed, so no thread pool exists to break a fork. For each JSON request on
    stdin it forks a child that measures and writes its answer to a pipe; the server waits (with
    the request's timeout, killing a child that overruns) and prints one reply line."""
    import torch._dynamo  # noqa: F401  (the custom ops import it on their first call: seconds)

    import bimi_kernels.functional  # noqa: F401

    for line in sys.stdin:
        request = json.loads(line)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the measurement process
            os.close(read_fd)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)  # stray prints must not reach the reply channel
            try:
                answer = _peak_rss_in_this_process(request)
            except BaseException as exc:
                answer = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            os.write(write_fd, json.dumps(answer).encode())
            os._exit(0)
        os.close(write_fd)
        chunks, deadline = [], time.monotonic() + request["timeout_s"]
        while True:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([read_fd], [], [], max(remaining, 0))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                answer = {"error": f"timed out after {request['timeout_s']:.0f} s"}
                break
            chunk = os.read(read_fd, 65536)
            if not chunk:
                answer = json.loads(b"".join(chunks) or b"{}")
                break
            chunks.append(chunk)
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
        if not answer:
            answer = {"error": f"measurement process died (wait status {status}; killed for memory?)"}
        print(REPLY_MARK + json.dumps(answer), flush=True)


class MemoryServer:
    """Client of `serve()`: one server for the run, one fresh forked process per measurement."""

    def __init__(self):
        repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, **MALLOC_ENV)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo_root, env.get("PYTHONPATH")]))
        self.process = subprocess.Popen([sys.executable, "-m", "benchmarks.measure", "--serve"],
                                        cwd=repo_root, env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)

    def peak_extra_bytes(self, config, provider, op, mode, threads, timeout_s) -> Tuple[Optional[int], str]:
        """(peak extra bytes or None, error message)."""
        request = {"config": config.to_dict(), "provider": provider, "op": op,
                   "mode": mode, "threads": threads, "timeout_s": timeout_s}
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            for line in self.process.stdout:
                if line.startswith(REPLY_MARK):
                    answer = json.loads(line[len(REPLY_MARK):])
                    break
            else:
                return None, "the memory measurement server exited"
        except OSError as exc:
            return None, f"the memory measurement server failed: {exc}"
        if "peak_bytes" in answer:
            return int(answer["peak_bytes"]), ""
        return None, answer.get("error", "no answer")

    def close(self) -> None:
        """The server holds no state worth a clean interpreter shutdown (seconds with torch)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stdin.close()
        self.process.stdout.close()


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        print("usage: python -m benchmarks.measure --serve  (started by benchmarks.run)", file=sys.stderr)
        sys.exit(2)
