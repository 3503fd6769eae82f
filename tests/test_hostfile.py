"""Hostfiles and --include/--exclude filters: table-driven, checked against DeepSpeed's own runner where
both accept the input, and refused with the line, its number and the fix where DeepSpeed warns or goes on."""

from __future__ import annotations

import pytest

from launcher.errors import ConfigError
from launcher.hostfile import Host, parse_hostfile, select, world
from tests.conftest import ROOT

VALID = {
    "one host": ("localhost slots=2\n", [("localhost", 2)]),
    "comments, blanks, tabs": (
        "# cluster A\n\nnode-1 slots=8   # the first\n\tnode-2\tslots=4\n  \n",
        [("node-1", 8), ("node-2", 4)],
    ),
    "addresses and dotted names": (
        "127.0.0.1 slots=1\n127.0.0.2 slots=1\ngpu01.cluster.example slots=8\n",
        [("127.0.0.1", 1), ("127.0.0.2", 1), ("gpu01.cluster.example", 8)],
    ),  # fmt: skip
    "DeepSpeed's worker form": ("worker-0 slots=16\nworker-1 slots=16\n", [("worker-0", 16), ("worker-1", 16)]),
}


@pytest.mark.parametrize("case", VALID)
def test_a_hostfile_gives_its_hosts_in_order_as_deepspeeds_runner_reads_them(case):
    from deepspeed.launcher.runner import _parse_hostfile

    text, expected = VALID[case]
    hosts = parse_hostfile(text)
    assert [(h.name, len(h.slots)) for h in hosts] == expected
    assert all(h.slots == tuple(range(n)) for h, (_, n) in zip(hosts, expected, strict=True))
    # Where DeepSpeed accepts a line, it reads the same (its parser drops whole-line comments only).
    plain = "\n".join(line.split("#")[0] for line in text.splitlines())
    assert list(_parse_hostfile(plain.splitlines(keepends=True)).items()) == expected


BAD = {
    "duplicate host": ("a slots=1\nb slots=2\na slots=4\n", "line 3: 'a slots=4': a is already on line 1"),
    "zero slots": ("a slots=0\n", "line 1: 'a slots=0': slots=0 must be a whole number of processes, at least 1"),
    "slots not a number": ("a slots=two\n", "slots=two must be a whole number"),
    "no slots": ("a\n", "line 1: 'a': write 'HOST slots=N', one host per line (e.g. 'a slots=8')"),
    "two hosts on a line": ("a b slots=1\n", "write 'HOST slots=N', one host per line"),
    "a space-joined name": ("my host slots=1\n", "one host per line"),
    "a semicolon": ("a;reboot slots=1\n", "'a;reboot' is not a host name"),
    "a dollar": ("$(touch /tmp/pwned) slots=1\n", "'$(touch' is not a host name"),
    "a backquote": ("`id` slots=1\n", "'`id`' is not a host name"),
    "a leading dash": ("-oProxyCommand=x slots=1\n", "is not a host name"),
    "empty": ("# nothing here\n\n", "no hosts; write one 'HOST slots=N' line per node"),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_hostfile_is_refused_quoting_the_line_and_its_number(case):
    text, expected = BAD[case]
    with pytest.raises(ConfigError) as e:
        parse_hostfile(text, source="hosts.txt")
    assert expected in str(e.value), str(e.value)
    assert "hosts.txt" in str(e.value)


def test_every_bad_line_is_reported_at_once():
    with pytest.raises(ConfigError) as e:
        parse_hostfile("a slots=0\nok slots=1\nb;c slots=1\n")
    assert [p.split(":")[0] for p in e.value.problems] == ["hostfile, line 1", "hostfile, line 3"]


HOSTS = "worker-0 slots=4\nworker-1 slots=4\nworker-2 slots=2\n"
FILTERS = {
    # (include, exclude): what is left, in the hostfile's order
    ("worker-1", ""): {"worker-1": [0, 1, 2, 3]},
    ("worker-0@worker-1:0,2", ""): {"worker-0": [0, 1, 2, 3], "worker-1": [0, 2]},
    ("worker-2@worker-0:3", ""): {"worker-0": [3], "worker-2": [0, 1]},  # hostfile order, not the filter's
    ("worker-1:2@worker-1:0", ""): {"worker-1": [0, 2]},  # one host named twice: both parts' slots
    ("", "worker-1"): {"worker-0": [0, 1, 2, 3], "worker-2": [0, 1]},
    ("", "worker-0:0,1@worker-2:1"): {"worker-0": [2, 3], "worker-1": [0, 1, 2, 3], "worker-2": [0]},
    ("", "worker-2:0,1"): {"worker-0": [0, 1, 2, 3], "worker-1": [0, 1, 2, 3]},  # a host left without slots
    ("", ""): {"worker-0": [0, 1, 2, 3], "worker-1": [0, 1, 2, 3], "worker-2": [0, 1]},
}


@pytest.mark.parametrize("include, exclude", FILTERS)
def test_include_and_exclude_pick_the_slots_deepspeeds_runner_picks(include, exclude):
    from deepspeed.launcher.runner import _parse_hostfile, parse_inclusion_exclusion

    chosen = select(parse_hostfile(HOSTS), include, exclude)
    assert {h.name: list(h.slots) for h in chosen} == FILTERS[(include, exclude)]
    assert [h.name for h in chosen] == list(FILTERS[(include, exclude)])
    pool = _parse_hostfile(HOSTS.splitlines(keepends=True))
    assert dict(parse_inclusion_exclusion(pool, include, exclude)) == FILTERS[(include, exclude)]


@pytest.mark.parametrize(
    "include, exclude, expected",
    [
        (
            "worker-9",
            "",
            "--include=worker-9: no host 'worker-9' in the hostfile (it has worker-0, worker-1, worker-2)",
        ),
        ("worker-2:2", "", "--include=worker-2:2: worker-2 has slots 0-1, not 2"),
        ("worker-0:a", "", "'worker-0:a' should be HOST or HOST:SLOT,SLOT (e.g. worker-0:0,1)"),
        ("worker-0", "worker-1", "--include and --exclude: give one of them, not both"),
        ("", "worker-0@worker-1@worker-2", "--exclude=worker-0@worker-1@worker-2: leaves no slot on any host"),
    ],
)
def test_a_filter_that_cannot_work_is_refused(include, exclude, expected):
    with pytest.raises(ConfigError) as e:
        select(parse_hostfile(HOSTS), include, exclude)
    assert expected in str(e.value)


def test_the_shipped_hostfiles_parse():
    shipped = sorted((ROOT / "hostfiles").glob("*.txt"))
    assert {p.name for p in shipped} >= {"localhost.txt", "two-nodes.txt", "loopback-two-nodes.txt"}
    for path in shipped:
        hosts = parse_hostfile(path.read_text(), source=str(path))
        assert hosts and all(isinstance(h, Host) for h in hosts)
    assert world(parse_hostfile((ROOT / "hostfiles/two-nodes.txt").read_text())) == (2, 16)
    assert world(parse_hostfile((ROOT / "hostfiles/loopback-two-nodes.txt").read_text())) == (2, 2)
