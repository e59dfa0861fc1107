"""Chapter 7's commands: serve-install, serve-repo, serve, request, serve-bench (Triton Inference Server).

A failure of the server or of a request prints one line (``error: ...``) and exits with code 1;
bad arguments exit with code 2 like every other command.
"""
from __future__ import annotations

import functools
import json
import signal
import sys
import time
from pathlib import Path

from course_lib.cli.args import (ddim_steps, image_file, int_at_least, nonneg_int, out_folder, positive_float,
                                 positive_int, seed_int)
from course_lib.cli.common import say

port = int_at_least(1, 65535)

SERVER_FILE = ".server.json"     # written into the repository by `serve`: where `request --repo` finds it


def one_line_errors(func):
    """A ServeError (server down, Triton refused the request, ...) becomes one line and exit code 1."""
    @functools.wraps(func)
    def wrapper(args):
        from course_lib.serve.server import ServeError

        try:
            return func(args)
        except ServeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return wrapper


def _table(rows: list[dict]) -> str:
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    lines = ["  ".join(k.ljust(widths[k]) for k in keys)]
    lines += ["  ".join(str(r[k]).ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)


def cmd_serve_install(args) -> int:
    from course_lib.serve.install import install_tritonserver

    install_tritonserver(say=say, force=args.force)
    return 0


def cmd_serve_repo(args) -> int:
    from course_lib.serve.model_config import check_repository
    from course_lib.serve.repository import write_repository

    write_repository(args.onnx_dir, args.out, target=args.target, plan_dir=args.plan_dir, config=args.config,
                     vocab=args.vocab, max_batch_size=args.max_batch_size, batching=not args.no_batching,
                     instances=args.instances, threads=args.model_threads)
    say(_table(check_repository(args.out)))
    say(f"wrote {args.out} (--target {args.target}); parsed and checked against the contract")
    return 0


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop()


@one_line_errors
def cmd_serve(args) -> int:
    from course_lib.serve.server import TritonServer

    server = TritonServer(args.repo, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, models=args.models, threads=args.model_threads,
                          startup_timeout=args.startup_timeout)
    info = Path(args.repo) / SERVER_FILE
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        start = time.perf_counter()
        server.start()
        info.write_text(json.dumps({"http": server.http_url, "grpc": server.grpc_url,
                                    "metrics": server.metrics_url, "pid": server.process.pid}) + "\n")
        say(f"ready in {time.perf_counter() - start:.1f} s: HTTP {server.http_url}, gRPC {server.grpc_url}, "
            f"metrics {server.metrics_url}")
        say(f"python -m course_lib request --repo {args.repo} --out out.png   (Ctrl-C stops the server)")
        deadline = time.monotonic() + args.for_seconds if args.for_seconds else None
        while deadline is None or time.monotonic() < deadline:
            if server.process.poll() is not None:
                say(f"error: tritonserver exited (code {server.process.returncode}): {server.first_error()}")
                return 1
            time.sleep(0.5)
        return 0
    except (_Stop, KeyboardInterrupt):
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        info.unlink(missing_ok=True)
        server.stop()
        say("server stopped")


def _url(args) -> str:
    if args.url:
        return args.url
    if args.repo:
        info = Path(args.repo) / SERVER_FILE
        if not info.is_file():
            raise ValueError(f"{info}: missing: no server is running on {args.repo} "
                             f"(python -m course_lib serve --repo {args.repo})")
        return json.loads(info.read_text())["grpc" if args.protocol == "grpc" else "http"]
    raise ValueError("which server? give --url 127.0.0.1:PORT or --repo REPO (of a running serve)")


@one_line_errors
def cmd_request(args) -> int:
    from course_lib.samples import read_image, sample_photo, write_image
    from course_lib.serve.client import request_canny2image

    photo = read_image(args.image) if args.image else sample_photo()
    url = _url(args)
    start = time.perf_counter()
    images = request_canny2image(url, photo, args.prompt, protocol=args.protocol, timeout=args.timeout,
                                 ddim_steps=args.steps, image_resolution=args.resolution, seed=args.seed)
    write_image(args.out, images[0])
    say(f"canny2image via {args.protocol} {url}: {(time.perf_counter() - start) * 1e3:.0f} ms -> {args.out}")
    return 0


@one_line_errors
def cmd_serve_bench(args) -> int:
    """The chapter's batching experiment from the command line: one sub-model with and without batching."""
    import tempfile

    from course_lib.files import write_json
    from course_lib.serve.loadtest import batching_twin, contract_feed, plot_load, summary, sweep
    from course_lib.serve.server import TritonServer

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        models = batching_twin(args.repo, args.model, Path(tmp) / "repo", queue_delay_us=args.queue_delay_us)
        feed = contract_feed(args.repo, args.model)
        with TritonServer(Path(tmp) / "repo", threads=args.model_threads) as server:
            results = sweep(server, models, feed, args.concurrency, args.requests, args.repeats, args.time_limit)
    rows = summary(results)
    say(_table(rows))
    if args.out:
        write_json(args.out, {"rows": rows, "runs": [r.row() for r in results]})
        say(f"wrote {args.out}")
    if args.plot:
        plot_load(results, args.plot)
        say(f"wrote {args.plot}")
    return 0 if all(r["errors"] == 0 for r in rows) else 1


def add_commands(sub) -> None:
    """Register chapter 7's commands."""
    i = sub.add_parser("serve-install", help="unpack the tritonserver of nvidia-pytriton (Python backend) into this environment")
    i.add_argument("--force", action="store_true", help="unpack again")

    r = sub.add_parser("serve-repo", help="write a Triton model repository from the ONNX exports (and plans)")
    r.add_argument("--onnx-dir", required=True, help="python -m course_lib export's folder")
    r.add_argument("--out", required=True, type=out_folder, help="the repository folder to write")
    r.add_argument("--target", choices=["cpu", "gpu"], default="cpu",
                   help="cpu: Python-backend models on ONNX Runtime (the bundled server); gpu: NVIDIA's container")
    r.add_argument("--plan-dir", help="--target gpu: serve <name>.plan from here as TensorRT plans")
    r.add_argument("--config", choices=["tiny", "sd15"], default="tiny", help="the preset the exports come from")
    r.add_argument("--vocab", help="CLIP vocabulary for canny2image (sd15; tiny uses the byte-level tokenizer)")
    r.add_argument("--max-batch-size", type=nonneg_int, default=8, help="max_batch_size in each config.pbtxt (0: no batching)")
    r.add_argument("--no-batching", action="store_true", help="no dynamic_batching blocks")
    r.add_argument("--instances", type=positive_int, default=1, help="instances of each sub-model")
    r.add_argument("--model-threads", type=positive_int, default=1, help="ONNX Runtime / torch threads per model instance")

    s = sub.add_parser("serve", help="start the bundled tritonserver on 127.0.0.1 (free ports) for a repository")
    s.add_argument("--repo", required=True, help="the model repository serve-repo wrote")
    s.add_argument("--http-port", type=port, help="HTTP port (default: a free one)")
    s.add_argument("--grpc-port", type=port, help="gRPC port (default: a free one)")
    s.add_argument("--metrics-port", type=port, help="metrics port (default: a free one)")
    s.add_argument("--models", nargs="+", help="load only these models (default: all)")
    s.add_argument("--model-threads", type=positive_int, default=1, help="OMP threads per stub process")
    s.add_argument("--startup-timeout", type=positive_float, default=120.0, help="seconds to wait for the server to be ready")
    s.add_argument("--for", dest="for_seconds", type=positive_float, help="stop after this many seconds (default: Ctrl-C)")

    q = sub.add_parser("request", help="send one canny2image request through tritonclient; save the image")
    q.add_argument("--image", help="input photo (default: the sample photo, as run uses)")
    q.add_argument("--prompt", default="a bird", help="what to draw on the photo's edges")
    q.add_argument("--out", required=True, type=image_file, help="output image (.png)")
    q.add_argument("--url", help="127.0.0.1:PORT of the server (default: the one serve --repo REPO started)")
    q.add_argument("--repo", help="the repository a running serve serves (its address is read from there)")
    q.add_argument("--protocol", choices=["http", "grpc"], default="http", help="tritonclient's protocol")
    q.add_argument("--steps", type=ddim_steps, default=20, help="DDIM steps")
    q.add_argument("--resolution", type=int_at_least(64), default=256, help="the photo's shorter side is resized to this")
    q.add_argument("--seed", type=seed_int, default=2946901, help="seed of the initial noise")
    q.add_argument("--timeout", type=positive_float, default=600.0, help="seconds to wait for the image")

    b = sub.add_parser("serve-bench", help="load test one sub-model with and without dynamic batching (chapter 7)")
    b.add_argument("--repo", required=True, help="a --target cpu repository (exported with --dynamic B)")
    b.add_argument("--model", default="unet", help="the sub-model to load test")
    b.add_argument("--concurrency", type=positive_int, nargs="+", default=[1, 4, 8], help="clients in flight, one run each")
    b.add_argument("--requests", type=positive_int, default=50, help="requests per run")
    b.add_argument("--repeats", type=positive_int, default=3, help="runs per concurrency (the table gives their median)")
    b.add_argument("--time-limit", type=positive_float, default=30.0, help="seconds per run at most")
    b.add_argument("--queue-delay-us", type=nonneg_int, help="dynamic batching's max_queue_delay_microseconds")
    b.add_argument("--model-threads", type=positive_int, default=1, help="OMP threads per stub process")
    b.add_argument("--out", help="JSON with the table and every run")
    b.add_argument("--plot", help="PNG of latency and throughput against clients")
    for parser, func in ((i, cmd_serve_install), (r, cmd_serve_repo), (s, cmd_serve), (q, cmd_request),
                         (b, cmd_serve_bench)):
        parser.set_defaults(func=func)
