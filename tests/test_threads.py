"""course_lib.threads: a deliberate CPU thread count (PyTorch's default collapses on shared machines)."""
import os
import subprocess
import sys

import pytest
import torch

from course_lib.threads import ENV_VAR, apply_thread_policy, choose_threads, default_threads


def test_default_is_one_thread_on_small_machines_and_half_the_cores_on_big_ones():
    assert [default_threads(c) for c in (1, 2, 4, 8, 16, 64)] == [1, 1, 1, 4, 8, 8]


def test_the_environment_and_the_argument_override(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "3")
    assert choose_threads() == 3 and choose_threads(2) == 2
    monkeypatch.delenv(ENV_VAR)
    assert choose_threads() == default_threads()
    for bad in ("0", "-1", "two"):
        with pytest.raises(ValueError, match="whole number of threads"):
            choose_threads(bad)


def test_apply_sets_torch(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert apply_thread_policy(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_importing_course_lib_first_makes_openmp_threads_sleep():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import course_lib, os; print(os.environ.get('OMP_WAIT_POLICY'))"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == "PASSIVE"
    code = "import torch, course_lib, os; print(os.environ.get('OMP_WAIT_POLICY'))"        # too late: left alone
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == "None"


def test_cli_threads_option_is_checked():
    from course_lib.cli import main

    assert main(["--threads", "0", "env"]) == 2
