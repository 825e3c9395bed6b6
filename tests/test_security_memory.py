"""The memory cap counts the jail's tmpfs: what a job keeps in its private /tmp or /dev/shm is
memory of the host, so process memory plus tmpfs stays within `max_memory_bytes` (issue 24,
hole 9: 1 GiB in /dev/shm plus 0.75 GiB of process memory ran under a 1 GiB cap).

Real bubblewrap, real processes (tests/sandbox_jobs/sandbox_job.py `tmpfs`), scaled down: a
512 MiB cap, 300 MiB in the tmpfs and 300 MiB in the process.
"""

from __future__ import annotations

import json

import pytest
from test_security_jail import MIB, host_deadline, make_job

from runner.sandbox import gpu_launch, sandbox_plan


@pytest.mark.parametrize("folder", ["/dev/shm", "/tmp"])
@pytest.mark.sandbox
def test_tmpfs_plus_process_memory_over_the_cap_is_oom(tmp_path, folder):
    lines: list[str] = []
    job = make_job(tmp_path, "tmpfs", folder, "300", "300", "30", lines=lines,
                   max_memory_bytes=512 * MIB)
    with host_deadline(60):
        result = gpu_launch(job)
    log = (tmp_path / "job.log").read_text()
    said = f"{result.reason}: {result.detail}\nlines: {lines}\njob.log: {log}"
    assert any(f"{folder} holds 300 MiB" in line for line in lines), said  # the tmpfs part fit
    assert result.reason == "oom", said
    assert result.wall_seconds < 20, said  # stopped, not left to run out its 30 s
    assert "memory cap" in result.detail
    assert not (tmp_path / "out" / "result.json").exists()


@pytest.mark.sandbox
def test_tmpfs_plus_process_memory_within_the_cap_runs(tmp_path):
    job = make_job(tmp_path, "tmpfs", "/dev/shm", "100", "100", "2",
                   max_memory_bytes=512 * MIB)
    assert sandbox_plan(job)["tmpfs"] == {"/tmp": job.tmp_size_bytes,
                                          "/dev/shm": job.tmp_size_bytes}
    with host_deadline(60):
        result = gpu_launch(job)
    assert result.reason == "ok", (tmp_path / "job.log").read_text()
    assert json.loads((tmp_path / "out" / "result.json").read_text()) == {"held": True}
