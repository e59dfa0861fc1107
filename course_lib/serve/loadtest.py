"""A bounded load test: many clients at once, with and without dynamic batching. Chapter 7.

:func:`load_test` runs ``concurrency`` client threads against one model on 127.0.0.1 until ``requests``
requests are done or ``time_limit`` seconds have passed, whichever comes first, and records each
request's latency. Before and after, it reads the server's Prometheus metrics
(``nv_inference_count``: inferences, i.e. batch items; ``nv_inference_exec_count``: executions, i.e.
batches the model ran) and its statistics extension (how many executions of each batch size): their
ratio is the average batch size the dynamic batcher formed. :func:`batching_twin` writes a copy of a
model without ``dynamic_batching`` so one server can serve both and the comparison is fair.
"""
from __future__ import annotations

import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from course_lib.serve.client import infer, make_client
from course_lib.serve.model_config import parse_config
from course_lib.serve.server import ServeError


@dataclass
class LoadResult:
    """Chapter 7: what one load-test run measured (latencies in ms, wall time in s)."""
    model: str
    concurrency: int
    requested: int
    completed: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    inferences: int                      # batch items the model computed (metrics delta)
    executions: int                      # model executions, i.e. batches (metrics delta)
    batch_sizes: dict[int, int] = field(default_factory=dict)   # batch size -> executions
    first_error: str = ""

    @property
    def throughput(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    @property
    def mean_batch(self) -> float:
        return self.inferences / self.executions if self.executions else float("nan")

    def row(self) -> dict:
        return {"model": self.model, "concurrency": self.concurrency, "requests": self.completed,
                "errors": self.errors, "p50 ms": round(self.percentile(50), 1), "p90 ms": round(self.percentile(90), 1),
                "p99 ms": round(self.percentile(99), 1), "req/s": round(self.throughput, 1),
                "inferences": self.inferences, "executions": self.executions,
                "mean batch": round(self.mean_batch, 2)}


_METRIC = re.compile(r'^(nv_inference_(?:count|exec_count|request_success|request_failure))\{([^}]*)\}\s+([0-9.e+]+)$')


def scrape_metrics(text: str, model: str) -> dict[str, int]:
    """Chapter 7: the counters of one model from Prometheus text (summed over its versions)."""
    counts = {"nv_inference_count": 0, "nv_inference_exec_count": 0,
              "nv_inference_request_success": 0, "nv_inference_request_failure": 0}
    for line in text.splitlines():
        m = _METRIC.match(line.strip())
        if m and f'model="{model}"' in m.group(2):
            counts[m.group(1)] += int(float(m.group(3)))
    return counts


def batch_statistics(url: str, model: str) -> dict[int, int]:
    """Chapter 7: executions per batch size so far, from the server's statistics extension (HTTP)."""
    client = make_client(url, "http")
    try:
        stats = client.get_inference_statistics(model)["model_stats"]
    finally:
        client.close()
    out: dict[int, int] = {}
    for entry in stats:
        for b in entry.get("batch_stats", []):
            out[int(b["batch_size"])] = out.get(int(b["batch_size"]), 0) + int(b["compute_infer"]["count"])
    return out


def load_test(server, model: str, feed: dict[str, np.ndarray], concurrency: int, requests: int,
              time_limit: float = 60.0, protocol: str = "http", timeout: float = 30.0) -> LoadResult:
    """Chapter 7: ``concurrency`` clients send ``feed`` to ``model`` until ``requests`` are done or
    ``time_limit`` seconds pass; ``server`` is a started :class:`~course_lib.serve.server.TritonServer`.

    Every client thread has its own connection; a request is counted when its response arrived.
    Failed requests are counted (and the first error kept), not retried; when the server stops
    answering, the run ends at once.
    """
    if concurrency < 1 or requests < 1 or time_limit <= 0:
        raise ValueError(f"concurrency {concurrency}, requests {requests}, time_limit {time_limit}: expected > 0")
    url = server.http_url if protocol == "http" else server.grpc_url
    before, hist0 = scrape_metrics(server.metrics(), model), batch_statistics(server.http_url, model)
    lock = threading.Lock()
    issued, gone = [0], threading.Event()
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + time_limit

    def worker():
        client = make_client(url, protocol, timeout)
        try:
            while True:
                with lock:
                    if issued[0] >= requests or time.monotonic() >= deadline or gone.is_set():
                        return
                    issued[0] += 1
                t0 = time.perf_counter()
                try:
                    infer(url, model, feed, protocol=protocol, timeout=timeout, client=client)
                except ServeError as e:
                    with lock:
                        errors.append(str(e))
                    if str(e).startswith(("no Triton server", "the server at")):
                        gone.set()                    # the server is down: end the run, do not hammer it
                    continue
                with lock:
                    latencies.append((time.perf_counter() - t0) * 1e3)
        finally:
            client.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(time_limit + timeout + 5)
    seconds = time.perf_counter() - start
    time.sleep(0.3)                                   # let the metrics endpoint catch up
    try:
        after, hist1 = scrape_metrics(server.metrics(), model), batch_statistics(server.http_url, model)
    except Exception:                                 # the server went away during the run: no counts
        after, hist1 = before, hist0
    return LoadResult(model=model, concurrency=concurrency, requested=requests, completed=len(latencies),
                      errors=len(errors), seconds=seconds, latencies_ms=latencies,
                      inferences=after["nv_inference_count"] - before["nv_inference_count"],
                      executions=after["nv_inference_exec_count"] - before["nv_inference_exec_count"],
                      batch_sizes={b: n - hist0.get(b, 0) for b, n in sorted(hist1.items()) if n - hist0.get(b, 0)},
                      first_error=errors[0] if errors else "")


def contract_feed(repo: str | Path, model: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Chapter 7: seeded inputs for one sub-model of a generated repository, as it takes them on the wire."""
    import json

    from course_lib.cnsd.config import get_config
    from course_lib.cnsd.contract import contracts, example_inputs
    from course_lib.serve.client import wire_feed

    record = json.loads((Path(repo) / "repository.json").read_text())
    name = model.removesuffix("_nobatch")
    h, w = (s or 64 for s in record["image_size"])
    contract = contracts(get_config(record["config"]), 1, h, w)[name]
    return wire_feed(example_inputs(contract, seed=seed), batched=record["models"][name]["max_batch_size"] > 0)


def sweep(server, models: list[str], feed: dict[str, np.ndarray], concurrencies=(1, 4, 8), requests: int = 50,
          repeats: int = 3, time_limit: float = 30.0, warmup: int = 5, protocol: str = "http") -> list[LoadResult]:
    """Chapter 7: every (repeat, concurrency, model), models interleaved so that a busy moment of the
    machine hits all of them; ``warmup`` requests per model first (not counted)."""
    for model in models:
        load_test(server, model, feed, 1, warmup, time_limit, protocol)
    return [load_test(server, model, feed, c, requests, time_limit, protocol)
            for _ in range(repeats) for c in concurrencies for model in models]


def summary(results: list[LoadResult]) -> list[dict]:
    """Chapter 7: one row per (model, concurrency): medians over the repeats, throughput min-max,
    and the batches the server formed (all repeats together)."""
    rows = []
    for key in dict.fromkeys((r.model, r.concurrency) for r in results):
        runs = [r for r in results if (r.model, r.concurrency) == key]
        tput = [r.throughput for r in runs]
        sizes: dict[int, int] = {}
        for r in runs:
            for b, n in r.batch_sizes.items():
                sizes[b] = sizes.get(b, 0) + n
        inferences, executions = sum(r.inferences for r in runs), sum(r.executions for r in runs)
        rows.append({"model": key[0], "clients": key[1], "runs": len(runs),
                     "requests": sum(r.completed for r in runs), "errors": sum(r.errors for r in runs),
                     "p50 ms": round(float(np.median([r.percentile(50) for r in runs])), 1),
                     "p90 ms": round(float(np.median([r.percentile(90) for r in runs])), 1),
                     "req/s": round(float(np.median(tput)), 1), "req/s min-max": f"{min(tput):.0f}-{max(tput):.0f}",
                     "inferences": inferences, "executions": executions,
                     "mean batch": round(inferences / executions, 2) if executions else float("nan"),
                     "batch sizes": " ".join(f"{b}:{n}" for b, n in sorted(sizes.items()))})
    return rows


def batching_twin(repo: str | Path, model: str, out: str | Path, queue_delay_us: int | None = None) -> list[str]:
    """Chapter 7: a repository with ``model`` twice: as generated (dynamic batching) and as
    ``<model>_nobatch`` (the same files, ``dynamic_batching`` removed); returns the two names."""
    from google.protobuf import text_format

    repo, out = Path(repo), Path(out)
    cfg = parse_config(repo / model / "config.pbtxt")
    if cfg.max_batch_size < 1 or not cfg.HasField("dynamic_batching"):
        raise ValueError(f"{model}: max_batch_size {cfg.max_batch_size}, dynamic batching "
                         f"{cfg.HasField('dynamic_batching')}: export with --dynamic B for the batching experiment")
    if out.exists():
        shutil.rmtree(out)
    names = [model, f"{model}_nobatch"]
    for name in names:
        shutil.copytree(repo / model, out / name, copy_function=_link_or_copy)
        twin = parse_config(out / name / "config.pbtxt")
        twin.name = name
        if name.endswith("_nobatch"):
            twin.ClearField("dynamic_batching")
        elif queue_delay_us is not None:
            twin.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
        (out / name / "config.pbtxt").write_text(text_format.MessageToString(twin))
    return names


def _link_or_copy(src, dst):
    """Hard-link the model files (large, never edited), copy the rest (config.pbtxt is rewritten)."""
    if not str(src).endswith((".onnx", ".data", ".plan")):
        return shutil.copy2(src, dst)
    try:
        Path(dst).hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def plot_load(results: list[LoadResult], path: str | Path | None = None):
    """Chapter 7: latency (p50, bar to p90) and throughput (median, bar over min-max) against the number of
    concurrent clients, one line per model; medians over repeats (see :func:`summary`)."""
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for model in dict.fromkeys(r.model for r in results):
        rows = [row for row in summary(results) if row["model"] == model]
        c = [row["clients"] for row in rows]
        p50, p90 = np.array([row["p50 ms"] for row in rows]), np.array([row["p90 ms"] for row in rows])
        tput = np.array([row["req/s"] for row in rows])
        lo_hi = np.array([[float(v) for v in row["req/s min-max"].split("-")] for row in rows])
        ax1.errorbar(c, p50, yerr=[np.zeros_like(p50), p90 - p50], marker="o", capsize=3, label=model)
        ax2.errorbar(c, tput, yerr=[tput - lo_hi[:, 0], lo_hi[:, 1] - tput], marker="o", capsize=3, label=model)
        for row in rows:
            ax2.annotate(f"b={row['mean batch']:.1f}", (row["clients"], row["req/s"]), fontsize=8,
                         textcoords="offset points", xytext=(4, -10))
    ax1.set(xlabel="concurrent clients", ylabel="latency ms (p50, bar to p90)", title="latency")
    ax2.set(xlabel="concurrent clients", ylabel="requests / s", title="throughput (b = mean batch)")
    for ax in (ax1, ax2):
        ax.set_xticks(sorted({r.concurrency for r in results}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        from course_lib.files import save_png

        save_png(fig, path)
    return fig
