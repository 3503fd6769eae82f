"""`launcher check`: every host of a hostfile checked (ssh, versions, devices, disk, an all-reduce across them); the
same check `launcher run --hostfile` makes before it starts anything."""

from __future__ import annotations

import argparse
import os
import sys

from launcher.launch.cluster import Cluster, read_cluster
from launcher.launch.preflight import judge
from launcher.launch.remote import check_cluster
from launcher.views import print_check

NAME, SETTINGS = "check", False
UNREACHABLE_EXIT_CODE = 255
"""A host ssh cannot reach (ssh's own code for it)."""


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        NAME, help="check every host of a hostfile: ssh, versions, GPUs against slots, disk, an all-reduce across them"
    )
    parser.add_argument("--hostfile", required=True, metavar="FILE", help="the nodes, one 'HOST slots=N' per line")
    parser.add_argument("--include", default="", metavar="SPEC", help="only these hosts/slots")
    parser.add_argument("--exclude", default="", metavar="SPEC", help="all but these hosts/slots")
    parser.add_argument("--ssh-config", metavar="FILE", help="ssh client configuration to reach the hosts (ssh -F)")
    parser.add_argument("--ssh-port", type=int, metavar="N", help="the hosts' ssh port")
    parser.add_argument("--master-port", type=int, metavar="N", help="port of the all-reduce's rendezvous")
    parser.add_argument("--output-dir", default=".", metavar="DIR", help="where runs will write (default: here)")
    parser.add_argument("--gpu", action="store_true", help="the run uses GPUs: each host needs one per slot")
    return parser


def run(args: argparse.Namespace) -> int:
    cluster = read_cluster(
        runner="ssh", hostfile=args.hostfile, include=args.include, exclude=args.exclude,
        ssh_config=args.ssh_config, ssh_port=args.ssh_port, master_port=args.master_port,
    )  # fmt: skip
    problem = preflight(cluster, args.output_dir, cuda=args.gpu, always_show=True)
    return 0 if problem is None else problem


def preflight(cluster: Cluster, output_dir: str, *, cuda: bool, always_show: bool = False) -> int | None:
    """Check every host (launch.remote.check_cluster) and judge them (launch.preflight): None when all is well,
    else the exit code, after the table and every problem (255: a host ssh cannot reach; 1: anything else)."""
    print(f"launcher: checking {len(cluster.hosts)} host(s): ssh, versions, devices, disk, an all-reduce", flush=True)
    reports, allreduce = check_cluster(cluster, os.path.abspath(output_dir))
    rows = judge(cluster.hosts, reports, cuda=cuda)
    problems = [p for row in rows for p in row.problems]
    if isinstance(allreduce, str):
        problems.append(allreduce)
    elif isinstance(allreduce, dict) and not allreduce["right"]:
        problems.append("the all-reduce across the hosts gave a wrong sum")
    if problems or always_show:
        print_check(rows, allreduce, cluster.hosts[0].name)
    if not problems:
        return None
    print("launcher: the hosts are not ready; nothing was started:", file=sys.stderr)
    for p in problems:
        print(f"  {p}", file=sys.stderr)
    print("fix those, or leave the hosts out with --exclude (--no-check skips this check)", file=sys.stderr)
    return UNREACHABLE_EXIT_CODE if any(r.report is None for r in rows) else 1
