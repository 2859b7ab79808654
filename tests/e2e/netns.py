"""Several hosts on one machine: a network namespace per party on a private switch (not a test module).

``lan(["guest", "host"])`` makes, for this process only (names carry the pid):

    fldsl-<pid>-sw             a namespace holding a bridge: the switch
    fldsl-<pid>-<party>        one per party: loopback, and eth0 = 10.231.<k>.<i>/24 on the switch

and yields ``{party: Host(netns, address)}``. Traffic stays inside these namespaces; everything is deleted on
exit, also when the test fails (deleting a namespace deletes the veth ends in it). Needs root and iproute2:
``unavailable()`` says why not, for a skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Host:
    netns: str
    address: str

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"fldsl-{os.getpid()}-probe"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as e:
        return f"cannot create a network namespace: {getattr(e, 'stderr', '') or e}"
    _ip("netns", "del", probe)
    return None


@contextlib.contextmanager
def lan(parties: list[str]) -> Iterator[dict[str, Host]]:
    pid = os.getpid()
    subnet = 10 + pid % 200  # 10.231.<subnet>.0/24: unlikely to meet a network of the machine's own
    switch = f"fldsl-{pid}-sw"
    made: list[str] = []
    try:
        _ip("netns", "add", switch)
        made.append(switch)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        hosts: dict[str, Host] = {}
        for i, party in enumerate(parties, start=1):
            ns = f"fldsl-{pid}-{party}"
            _ip("netns", "add", ns)
            made.append(ns)
            # Made inside the party's namespace, so no interface ever appears in the machine's own.
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"port{i}")
            _ip("-n", ns, "link", "set", f"port{i}", "netns", switch)
            _ip("-n", switch, "link", "set", f"port{i}", "master", "br0")
            _ip("-n", switch, "link", "set", f"port{i}", "up")
            address = f"10.231.{subnet}.{i}"
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            hosts[party] = Host(ns, address)
        yield hosts
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)
