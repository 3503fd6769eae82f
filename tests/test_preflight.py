"""`launcher check`'s judgement of the hosts' probes (launcher/launch/preflight.py), pure."""

from __future__ import annotations

from launcher.hostfile import parse_hostfile
from launcher.launch.preflight import MIN_FREE_BYTES, judge

HOSTS = parse_hostfile("node-1 slots=2\nnode-2 slots=2\nnode-3 slots=2\n")
VERSIONS = {"python": "3.11.7", "torch": "2.13.0", "deepspeed": "0.19.8", "transformers": "5.24.0", "peft": "0.21.2",
            "bitsandbytes": "0.50.2"}  # fmt: skip


def _report(**changes):
    report = {"versions": dict(VERSIONS), "gpus": 2, "folder": "/shared/runs", "free_bytes": 50 * 2**30,
              "writable": True}  # fmt: skip
    for key, value in changes.items():
        if key in VERSIONS:
            report["versions"][key] = value
        else:
            report[key] = value
    return report


def test_hosts_alike_have_no_problem():
    rows = judge(HOSTS, {h.name: _report() for h in HOSTS}, cuda=True)
    assert [(r.host, r.problems) for r in rows] == [("node-1", []), ("node-2", []), ("node-3", [])]


def test_each_problem_names_the_host_what_is_wrong_and_the_fix():
    reports = {
        "node-1": _report(),
        "node-2": _report(torch="2.12.0", gpus=1, writable=False),
        "node-3": "ssh: connect to host node-3 port 22: Connection refused",
    }
    rows = judge(HOSTS, reports, cuda=True)
    assert rows[0].problems == []
    assert rows[1].problems == [
        "node-2: torch 2.12.0, the first host (node-1) has 2.13.0: install the same version on every host",
        "node-2: 1 GPU(s), its slots need 2: lower slots= in the hostfile",
        "node-2: cannot write in /shared/runs: fix its permissions or give output_dir",
    ]
    assert rows[2].report is None and rows[2].problems == [f"node-3: {reports['node-3']}"]


def test_devices_are_judged_only_for_a_gpu_run_and_disk_always():
    reports = {h.name: _report(gpus=0) for h in HOSTS}
    reports["node-3"] = _report(gpus=0, free_bytes=MIN_FREE_BYTES // 2)
    rows = judge(HOSTS, reports, cuda=False)
    assert [r.problems for r in rows[:2]] == [[], []]
    assert rows[2].problems == ["node-3: 0.50 GiB free in /shared/runs: free some space"]
