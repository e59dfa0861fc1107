"""Measure how PyTorch's CPU thread count behaves on this machine, idle and beside a busy neighbour.

    python tools/thread_policy.py [--repeats 7]

Each case runs in a fresh process (the thread count and OMP_WAIT_POLICY must be set before torch
starts): one forward of the tiny UNet at 256x384, median of --repeats after one warm-up. "busy" starts
a neighbour process that keeps every core busy with its own PyTorch work, as other jobs do on a shared
CI machine or lab server. The table goes to stdout (docs/benchmarks.md keeps a copy).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import os, statistics, sys, time, json
import torch
torch.set_num_threads(int(sys.argv[1]))
from course_lib.cnsd import build_cnsd, contracts, example_inputs, get_config
model = build_cnsd(get_config("tiny"), seed=0)
run = model.positional("unet")
feed = list(example_inputs(contracts(model.config, 1, 256, 384)["unet"]).values())
times = []
with torch.inference_mode():
    for i in range(int(sys.argv[2]) + 1):
        t = time.perf_counter(); run(*feed); times.append((time.perf_counter() - t) * 1e3)
print(json.dumps({"median": statistics.median(times[1:]), "min": min(times[1:]), "max": max(times[1:])}))
"""

NEIGHBOUR = r"""
import torch, time
torch.set_num_threads(2)
a = torch.randn(512, 512)
end = time.time() + 600
while time.time() < end:
    a @ a
"""


def case(threads: int, repeats: int, wait_policy: str | None) -> dict:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    else:
        env.pop("OMP_WAIT_POLICY", None)
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(repeats)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    rows = []
    for load in ("idle", "busy"):
        neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR]) if load == "busy" else None
        try:
            time.sleep(2 if neighbour else 0)
            for threads in sorted({1, cores}):
                for policy in (None, "PASSIVE"):
                    r = case(threads, args.repeats, policy)
                    rows.append((load, threads, policy or "default", r))
                    print(f"{load:5s} threads={threads} OMP_WAIT_POLICY={policy or 'default':8s} "
                          f"median {r['median']:8.1f} ms  (min {r['min']:.1f}, max {r['max']:.1f})", flush=True)
        finally:
            if neighbour:
                neighbour.kill()
    print(f"\n| load | torch threads | OMP_WAIT_POLICY | tiny UNet forward, median ms (min-max) |\n|---|---|---|---|")
    for load, threads, policy, r in rows:
        print(f"| {load} | {threads} | {policy} | {r['median']:.0f} ({r['min']:.0f}-{r['max']:.0f}) |")


if __name__ == "__main__":
    main()
