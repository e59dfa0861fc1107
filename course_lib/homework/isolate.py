"""Homework grading: each zip graded in a process of its own, under a time and a memory limit.

:func:`course_lib.homework.grade.grade_submission` hands one zip's grading (a function and its
arguments, as a JSON-able job) to :func:`run_isolated`. A helper process (started once, ``python -c``
importing the grader, so the import cost is paid once per grading run) forks a fresh child per job:

* the child sets ``RLIMIT_DATA`` to what it holds now plus ``max_memory_mb`` (heap and private mappings:
  an allocation over it fails in the child only, as a MemoryError or a crash), runs the job and writes
  its result (JSON) to a file, then exits;
* the helper waits for it up to ``timeout`` seconds, kills it (SIGKILL) when over, and answers with what
  happened: finished, exit code, signal, or timed out.

Nothing the child does reaches the grader: not an exception, not a crash, not a hang, not its memory.
The helper is a plain single-threaded process, so forking it is safe (forking the grader itself, whose
torch or ONNX Runtime thread pools may be running, is not). Where there is no ``fork`` (Windows) the job
runs in this process, with no limits. Jobs must not rely on ``__main__``: the helper never imports it.
"""
from __future__ import annotations

import atexit
import importlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_MEMORY, EXIT_DISK_FULL = 0, 1, 70, 75


@dataclass
class Outcome:
    """What became of one isolated job: ``result`` (its JSON) when it finished, else why not."""
    result: object = None
    timed_out: bool = False
    exit_code: int | None = None        # the child's exit code (EXIT_MEMORY, EXIT_DISK_FULL, ...)
    signal: int | None = None           # the signal that killed it

    @property
    def finished(self) -> bool:
        return self.exit_code == EXIT_OK and not self.timed_out

    def describe(self) -> str:
        if self.timed_out:
            return "took longer than the time limit"
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = str(self.signal)
            return f"was killed by signal {name}" + (" (out of memory?)" if self.signal in (9, 6, 11) else "")
        if self.exit_code == EXIT_MEMORY:
            return "ran out of its memory limit"
        return f"ended with exit code {self.exit_code} before writing its result"


def _call(job: dict):
    module, _, name = job["function"].rpartition(".")
    return getattr(importlib.import_module(module), name)(*job.get("args", ()))


# ---------------------------------------------------------------------------------------- the helper

def _limit_memory(max_memory_mb: float) -> None:
    import resource

    now = 0
    try:
        with open("/proc/self/status") as f:
            now = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:")), 0)
    except OSError:
        pass
    limit = now + int(max_memory_mb * 2**20)
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


def _child(job: dict, result_path: str, max_memory_mb: float | None) -> int:
    """In the forked child: limit, run, write the result. Returns the exit code."""
    import errno

    try:
        if max_memory_mb is not None:
            _limit_memory(max_memory_mb)
        result = _call(job)
        from course_lib.files import atomic_write_text
        atomic_write_text(result_path, json.dumps(result) + "\n")
        return EXIT_OK
    except MemoryError:
        return EXIT_MEMORY
    except OSError as e:
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return EXIT_DISK_FULL
        raise


def serve(preload: list[str]) -> None:
    """The helper's loop: one JSON request per line on stdin, one JSON answer per line on the protocol fd."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                                    # anything printed (here or in a child) goes to stderr
    for name in preload:
        importlib.import_module(name)
    print(json.dumps({"ready": True}), file=proto)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:                                 # the child
            code = EXIT_FAILED
            try:
                proto.close()
                os.setpgid(0, 0)
                os.chdir(request["cwd"])              # relative paths mean what they meant to the caller
                code = _child(request["job"], request["result"], request["max_memory_mb"])
            except MemoryError:
                code = EXIT_MEMORY
            except BaseException:  # noqa: BLE001
                import traceback
                traceback.print_exc()
                code = EXIT_FAILED
            finally:
                os._exit(code)
        answer = _wait(pid, request["timeout"])
        print(json.dumps(answer), file=proto)


def _wait(pid: int, timeout: float | None) -> dict:
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.001
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if deadline is not None and time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)       # the child and anything it started
            except OSError:
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"timed_out": True}
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status)}
    return {"exit_code": os.WEXITSTATUS(status)}


# ---------------------------------------------------------------------------------------- the grader side

class _Helper:
    def __init__(self, preload: list[str]):
        paths = [p for p in sys.path if p]           # what this process imports from (the helper runs no __main__)
        code = (f"import sys; sys.path[:0] = {paths!r}; "
                f"from course_lib.homework.isolate import serve; serve({preload!r})")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        ready = self._read(300)
        if not ready or not ready.get("ready"):
            self.close()
            raise RuntimeError("the grading helper process did not start (see the lines above)")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _read(self, timeout: float | None) -> dict | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def run(self, request: dict, timeout: float | None) -> dict | None:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read(None if timeout is None else timeout + 60)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


_helpers: dict[tuple, _Helper] = {}
_lock = threading.Lock()


def run_isolated(function: str, args: list, result_path: str | Path, *, timeout: float | None,
                 max_memory_mb: float | None, preload: tuple[str, ...] = ()) -> Outcome:
    """Homework grading: ``function(*args)`` (a dotted name; JSON-able args and result) in a forked child
    under ``timeout`` seconds and ``max_memory_mb`` MB (None: no limit); its result goes through
    ``result_path`` (a file the caller owns). Returns an :class:`Outcome`, never raises for the job."""
    job = {"function": function, "args": list(args)}
    result_path = Path(result_path)
    if not hasattr(os, "fork"):                     # no fork here: run it in this process, no limits
        return Outcome(result=_call(job), exit_code=EXIT_OK)
    with _lock:
        helper = _helpers.get(preload)
        if helper is None or not helper.alive():
            helper = _helpers[preload] = _Helper(list(preload))
        answer = helper.run({"job": job, "result": os.path.abspath(result_path), "cwd": os.getcwd(),
                             "timeout": timeout, "max_memory_mb": max_memory_mb}, timeout)
        if answer is None:                          # the helper itself stopped answering: start afresh next time
            helper.close()
            _helpers.pop(preload, None)
            return Outcome(timed_out=True)
    outcome = Outcome(timed_out=answer.get("timed_out", False), exit_code=answer.get("exit_code"),
                      signal=answer.get("signal"))
    if outcome.finished:
        try:
            outcome.result = json.loads(result_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            outcome.exit_code = EXIT_FAILED
    return outcome


@atexit.register
def _close_helpers() -> None:
    for helper in list(_helpers.values()):
        helper.close()
    _helpers.clear()
