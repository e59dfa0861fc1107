"""Start and stop a Triton server on 127.0.0.1: free ports, the library-path fix, health and readiness.

Chapter 7 introduces :class:`TritonServer`. It runs the ``tritonserver`` binary that
:mod:`course_lib.serve.install` unpacked, as a child process in its own process group, so that stopping
it also stops the Python backend's stub processes (one per model instance). Three things make that
binary work inside this Python environment, and the class does them for the student:

1. ``LD_LIBRARY_PATH`` starts with this interpreter's ``LIBDIR``. The stub is linked against
   ``libpython3.X.so``; without the fix the loader may pick the system's copy (another patch release)
   and a model fails to load with ``'_thread.RLock' object has no attribute '_recursion_count'``.
2. ``PATH`` starts with this interpreter's folder: the stub's embedded Python looks for ``python3`` on
   the PATH to find its ``sys.prefix``, and so this environment's numpy, onnxruntime and torch.
3. ``PYTHONPATH`` starts with the folder holding this ``course_lib``, so the models import the same code.

Ports are chosen free on 127.0.0.1 at start (or given); the server never listens on another address.
Every start gets its own shared-memory prefix for the Python backend, removed again at :meth:`stop`,
also after a crash or a kill.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from course_lib.serve.install import TritonDist, require_tritonserver

HOST = "127.0.0.1"
# what the bundled server always logs on a machine without a GPU: not the error a student looks for
NOISE = ("CudaDriverHelper", "NVML", "DCGM", "cudaGetDeviceCount", "pinned memory", "CUDA memory pool")


class ServeError(RuntimeError):
    """Chapter 7: the server or a request failed; the message is one line (the CLI prints it)."""


def one_line(text: str, limit: int = 600) -> str:
    """Chapter 7: collapse a (server) message to one line of at most ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def free_ports(count: int = 3, host: str = HOST) -> list[int]:
    """Chapter 7: ``count`` distinct ports that are free on ``host`` right now (the OS picks them)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def check_port_free(port: int, host: str = HOST) -> None:
    """Chapter 7: raise :class:`ServeError` (one line) when ``host:port`` is taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            raise ServeError(f"port {port} on {host} is taken (another server?): choose another port, or "
                             f"leave the port out to get a free one") from None


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the Python that started it dies (Linux prctl), so a
    crashed notebook kernel or test run leaves no server behind."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)        # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def server_env(dist: TritonDist, threads: int = 1) -> dict[str, str]:
    """Chapter 7: the environment the server and its Python stubs need (the three fixes above)."""
    import course_lib

    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(dist.libs), env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    root = str(Path(course_lib.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = str(threads)          # torch in the canny2image stub; ORT reads its config
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


class TritonServer:
    """Chapter 7: one ``tritonserver`` on 127.0.0.1; a context manager that always stops it.

    Args:
        repo: the model repository (``python -m course_lib serve-repo`` writes one).
        http_port, grpc_port, metrics_port: fixed ports, or None for free ones chosen at start.
        models: load only these models (``--model-control-mode explicit``); default: all of the repository.
        threads: OMP threads per stub process (the models' own thread settings are in their config).
        startup_timeout: seconds to wait for readiness (model loading included) before giving up.
        log_path: where the server's log goes (default: a temporary file, removed at stop).

    ``start()`` returns once ``/v2/health/ready`` answers 200, or raises :class:`ServeError` with the
    server's first error line. ``http_url`` / ``grpc_url`` are ``127.0.0.1:PORT`` (what tritonclient
    takes), ``metrics_url`` the Prometheus endpoint.
    """

    def __init__(self, repo: str | os.PathLike, *, http_port: int | None = None, grpc_port: int | None = None,
                 metrics_port: int | None = None, models: list[str] | None = None, threads: int = 1,
                 startup_timeout: float = 120.0, exit_timeout: int = 5, log_path: str | os.PathLike | None = None):
        self.repo = Path(repo)
        if not self.repo.is_dir():
            raise FileNotFoundError(f"model repository {self.repo}: no such folder "
                                    f"(write one with python -m course_lib serve-repo)")
        self.fixed_ports = (http_port, grpc_port, metrics_port)
        self.models = list(models) if models else None
        self.threads = threads
        self.startup_timeout = startup_timeout
        self.exit_timeout = exit_timeout
        self.log_path = Path(log_path) if log_path else None
        self._own_log = log_path is None
        self.process: subprocess.Popen | None = None
        self.ports: tuple[int, int, int] | None = None
        self._shm_prefix = ""

    # ------------------------------------------------------------------------------------- addresses
    @property
    def http_url(self) -> str:
        return f"{HOST}:{self._port(0)}"

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self._port(1)}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self._port(2)}/metrics"

    def _port(self, i: int) -> int:
        if self.ports is None:
            raise ServeError("the server has not been started")
        return self.ports[i]

    # ------------------------------------------------------------------------------------- lifecycle
    def command(self, dist: TritonDist) -> list[str]:
        """Chapter 7: the ``tritonserver`` command line this server runs (printed by the chapter)."""
        http, grpc, metrics = self._port(0), self._port(1), self._port(2)
        cmd = [str(dist.binary), f"--model-repository={self.repo.resolve()}",
               f"--backend-directory={dist.backends}",
               f"--http-address={HOST}", f"--http-port={http}", f"--grpc-address={HOST}", f"--grpc-port={grpc}",
               f"--metrics-address={HOST}", f"--metrics-port={metrics}", "--allow-metrics=true",
               "--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0", "--strict-readiness=true",
               f"--exit-timeout-secs={self.exit_timeout}", "--log-verbose=0",
               f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}"]
        if self.models:
            cmd += ["--model-control-mode=explicit"] + [f"--load-model={m}" for m in self.models]
        return cmd

    def start(self) -> "TritonServer":
        """Chapter 7: start the server and wait until it is ready (all its models loaded)."""
        if self.process is not None and self.process.poll() is None:
            raise ServeError(f"the server is already running (pid {self.process.pid})")
        dist = require_tritonserver()
        dist.prepare_python_backend()
        for port in self.fixed_ports:
            if port is not None:
                check_port_free(port)
        auto = iter(free_ports(3))
        self.ports = tuple(p if p is not None else next(auto) for p in self.fixed_ports)
        self._shm_prefix = f"course{os.getpid()}x{uuid.uuid4().hex[:8]}_"
        if self._own_log:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command(dist), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=server_env(dist, self.threads),
                                            start_new_session=True,      # its own process group: stubs included
                                            preexec_fn=_die_with_parent)
        atexit.register(self.stop)                       # a kernel that exits normally stops it too
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServeError(f"tritonserver exited (code {self.process.returncode}) before it was ready: "
                                 f"{self.first_error()}")
            if self.ready():
                return
            time.sleep(0.2)
        raise ServeError(f"tritonserver was not ready after {self.startup_timeout:.0f} s: {self.first_error()}")

    def stop(self) -> int | None:
        """Chapter 7: stop the server and its stubs (SIGTERM, then SIGKILL); returns its exit code.

        Safe to call twice, and after a crash. Removes the Python backend's shared memory and, if the
        log was temporary, the log.
        """
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self._signal(signal.SIGTERM)
                try:
                    self.process.wait(self.exit_timeout + 5)
                except subprocess.TimeoutExpired:
                    self._signal(signal.SIGKILL)
                    self.process.wait()
            self._signal(signal.SIGKILL)                 # stubs left behind by a crashed server
            code = self.process.returncode
        self._remove_shm()
        atexit.unregister(self.stop)
        if self._own_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
        return code

    def kill(self) -> None:
        """Chapter 7: SIGKILL the server and its stubs at once (the fault experiment); then :meth:`stop`."""
        self._signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait()

    def _signal(self, sig: int) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, sig)             # the group this server leads, nothing else
        except (ProcessLookupError, PermissionError):
            pass

    def _remove_shm(self) -> None:
        if self._shm_prefix and os.path.isdir("/dev/shm"):
            for path in Path("/dev/shm").glob(f"{self._shm_prefix}*"):
                path.unlink(missing_ok=True)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------- health, logs
    def _get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, OSError):
            return 0, b""

    def live(self) -> bool:
        """Chapter 7: ``GET /v2/health/live`` is 200: the process serves HTTP."""
        return self._get("/v2/health/live")[0] == 200

    def ready(self) -> bool:
        """Chapter 7: ``GET /v2/health/ready`` is 200: every model it was asked to load is ready."""
        return self._get("/v2/health/ready")[0] == 200

    def model_ready(self, name: str) -> bool:
        """Chapter 7: ``GET /v2/models/<name>/ready`` is 200."""
        return self._get(f"/v2/models/{name}/ready")[0] == 200

    def metrics(self) -> str:
        """Chapter 7: the Prometheus text of the metrics endpoint."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
            return r.read().decode()

    def log(self) -> str:
        """The server's log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def first_error(self) -> str:
        """The first error line of the log, as one line (the CPU machine's CUDA/NVML notices skipped)."""
        lines = [line for line in self.log().splitlines() if line.strip() and not any(n in line for n in NOISE)]
        for line in lines:
            if line.startswith("E") and "] " in line:
                return one_line(line.split("] ", 1)[1].strip('"'))
        for line in lines:
            if "error" in line.lower():
                return one_line(line)
        return one_line(lines[-1]) if lines else "no log output"
