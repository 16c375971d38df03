"""The pod network of the cluster harness: pod-to-pod addresses, built only from namespaces we own.

Used by tests/cluster/kubelet.py. A "network" container (`--network none`) holds a Linux
bridge in its own network namespace; each pod's sandbox gets one veth pair, created inside
that namespace, with the peer moved straight into the pod's namespace as eth0 and given the
pod's address (10.244.0.0/24, the way a CNI plugin does it). The host's network namespace
never sees a device, route or rule: `ip` runs through `nsenter --net=/proc/<pid>/ns/net`.
Pod addresses are fixed per pod name before the pod starts, so a StatefulSet's DNS names
(`<name>-<i>.<headless service>`) can be written into every pod's /etc/hosts (--add-host).
"""

from __future__ import annotations

import ipaddress
import subprocess
import threading

SUBNET = ipaddress.ip_network("10.244.0.0/24")
BRIDGE = "kbr0"


def _ip(pid: str, *args: str) -> None:
    proc = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "ip", *args], capture_output=True, text=True,
                          timeout=30, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} in netns of {pid}: {proc.stderr.strip()}")


class PodNetwork:
    """Addresses by pod name, and the bridge they are plugged into."""

    def __init__(self, bridge_pid: str) -> None:
        self.bridge_pid = bridge_pid
        self._lock = threading.Lock()
        self._addresses: dict[str, str] = {}
        self._hosts = SUBNET.hosts()
        next(self._hosts)  # .1 stays free, as a gateway would take it
        _ip(bridge_pid, "link", "add", BRIDGE, "type", "bridge")
        _ip(bridge_pid, "link", "set", BRIDGE, "up")

    def address(self, pod_key: str) -> str:
        """The pod's address, the same every time it is asked (before or after the pod starts)."""
        with self._lock:
            if pod_key not in self._addresses:
                self._addresses[pod_key] = str(next(self._hosts))
            return self._addresses[pod_key]

    def plug(self, pod_key: str, pod_pid: str) -> str:
        """eth0 in the pod's namespace on the bridge, with the pod's address; returns it."""
        addr = self.address(pod_key)
        host_end = f"kv{addr.rsplit('.', 1)[1]}"  # one address per pod: a unique name
        _ip(self.bridge_pid, "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", pod_pid)
        _ip(self.bridge_pid, "link", "set", host_end, "master", BRIDGE, "up")
        _ip(pod_pid, "addr", "add", f"{addr}/{SUBNET.prefixlen}", "dev", "eth0")
        _ip(pod_pid, "link", "set", "eth0", "up")
        return addr
