"""The kubelet of the cluster harness: runs one rendered pod spec with docker, exactly as written.

Called by tests/cluster/controllers.py (and its tests) for each pod a Deployment, StatefulSet
or Job of the operator asks for. Nothing of the spec is rewritten: images are pulled by the
daemon from the loopback registry they name, init containers run in order to completion,
then the containers start with the pod's command/args (`$(VAR)` expanded from the container's
env, as Kubernetes does), env (values and fieldRef), volumes (emptyDir, configMap, secret with
`items`, read-only where the mount says so) and ports.

Networking, without touching the host's: each pod gets a pause container on `--network none`
(its own loopback), every container of the pod joins it (`--network container:<pause>`), and
two tests/cluster/forward.py processes per pod link loopback ports across the namespace
boundary through unix sockets: the pod reaches the registry at the host port its image
references name, and each containerPort is published on a free host loopback port (Service
access and readiness probes). Pods reach each other (torchrun) on the pod network of
tests/cluster/podnet.py: a bridge in a namespace of its own, one veth per pod. DNS names the
pod spec uses are given with `--add-host`.

Not played (no part of the seed's flows depends on them): scheduling (affinity, tolerations,
GPU resources: there is one node per NodeClaim and no GPU), liveness restarts, and
imagePullSecrets (the loopback registry is anonymous).
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from podnet import PodNetwork

FORWARD = Path(__file__).with_name("forward.py")
VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
FIELD_REF = re.compile(r"metadata\.labels\['([^']+)'\]")


class PodFailed(Exception):
    """A container of the pod exited non-zero (init) or could not start; the message has its log."""


@dataclass
class Pod:
    """A running pod: its containers, published ports and forwarders."""

    name: str
    namespace: str
    labels: dict
    spec: dict
    root: Path
    pause: str = ""
    containers: list = field(default_factory=list)  # docker names, init ones included
    ports: dict = field(default_factory=dict)  # containerPort -> host loopback port
    procs: list = field(default_factory=list)  # forwarders
    phase: str = "Pending"
    message: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion in command and args (unknown names stay as written)."""
    return VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), text)


class Kubelet:
    """Runs pods with one docker daemon (DOCKER_HOST in `env`)."""

    def __init__(self, env: dict[str, str], work: Path, registry_port: int, pause_image: str) -> None:
        self.env, self.work, self.pause_image = env, work, pause_image
        self.network: PodNetwork | None = None  # pod-to-pod addresses, once start_network ran
        # Host loopback ports every pod reaches at the same address (the registry, test servers).
        self.host_ports: list[int] = [registry_port]
        self.pods: dict[tuple[str, str], Pod] = {}

    def docker(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        proc = subprocess.run(["docker", *args], env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise PodFailed(f"docker {' '.join(args[:3])} ... exited {proc.returncode}: {proc.stderr[-1500:]}")
        return proc

    def start_network(self) -> None:
        """The bridge's own sandbox (tests/cluster/podnet.py); pods started afterwards get eth0 on it."""
        self.docker("run", "-d", "--name", "kaito-podnet", "--network", "none", "--entrypoint", "sleep",
                    self.pause_image, "infinity")
        self.network = PodNetwork(self.docker("inspect", "-f", "{{.State.Pid}}", "kaito-podnet").stdout.strip())

    def address(self, namespace: str, name: str) -> str:
        """The pod's address on the pod network (known before the pod starts), else loopback."""
        return self.network.address(f"{namespace}/{name}") if self.network else "127.0.0.1"

    # ------------------------------------------------------------------ pod lifecycle

    def start(self, namespace: str, name: str, labels: dict, spec: dict, objects: dict[str, dict],
              hosts: dict[str, str] | None = None) -> Pod:
        """Create the pod's sandbox and volumes, run the init containers, start the containers.

        `objects` maps "configmap/NAME" and "secret/NAME" to those objects (what the API server
        holds); `hosts` are extra name -> address entries (headless Service DNS names).
        """
        pod = Pod(name, namespace, labels, spec, self.work / "pods" / f"{namespace}-{name}")
        self.pods[(namespace, name)] = pod
        pod.root.mkdir(parents=True, exist_ok=True)
        self._sandbox(pod, hosts or {})
        volumes = self._volumes(pod, objects)
        for c in spec.get("initContainers") or []:
            cname = self._run(pod, c, volumes, detach=False)
            code = int(self.docker("inspect", "-f", "{{.State.ExitCode}}", cname).stdout.strip())
            if code != 0:
                pod.phase, pod.message = "Failed", f"init container {c['name']} exited {code}: {self.logs(cname)}"
                raise PodFailed(pod.message)
        for c in spec["containers"]:
            self._run(pod, c, volumes, detach=True)
        pod.phase = "Running"
        return pod

    def _sandbox(self, pod: Pod, hosts: dict[str, str]) -> None:
        pod.pause = f"{pod.namespace}-{pod.name}-pause"
        args = ["run", "-d", "--name", pod.pause, "--hostname", pod.name, "--network", "none",
                "--entrypoint", "sleep"]
        # The pod's own name resolves to its address, as in the kubelet's /etc/hosts (gloo binds to it).
        for host, addr in {pod.name: self.address(pod.namespace, pod.name), **hosts}.items():
            args += ["--add-host", f"{host}:{addr}"]
        self.docker(*args, self.pause_image, "infinity")
        pod.containers.append(pod.pause)
        pid = self.docker("inspect", "-f", "{{.State.Pid}}", pod.pause).stdout.strip()
        if self.network:
            self.network.plug(f"{pod.namespace}/{pod.name}", pid)
        inside, outside = [], []
        for port in self.host_ports:
            sock = pod.root / f"host-{port}.sock"
            inside.append(f"tcp:127.0.0.1:{port}=unix:{sock}")
            outside.append(f"unix:{sock}=tcp:127.0.0.1:{port}")
        for c in pod.spec["containers"]:
            for p in c.get("ports") or []:
                port = int(p["containerPort"])
                sock, pod.ports[port] = pod.root / f"port-{port}.sock", free_port()
                inside.append(f"unix:{sock}=tcp:127.0.0.1:{port}")
                outside.append(f"tcp:127.0.0.1:{pod.ports[port]}=unix:{sock}")
        for sock in pod.root.glob("*.sock"):
            sock.unlink()
        pod.procs.append(self._forwarder(["nsenter", f"--net=/proc/{pid}/ns/net"], inside, pod.root / "fwd-in.log"))
        pod.procs.append(self._forwarder([], outside, pod.root / "fwd-out.log"))

    def _forwarder(self, prefix: list[str], pairs: list[str], log: Path) -> subprocess.Popen:
        proc = subprocess.Popen([*prefix, sys.executable, str(FORWARD), *pairs], stdout=subprocess.PIPE,
                                stderr=open(log, "w"), text=True)
        if proc.stdout.readline().strip() != "ready":
            raise PodFailed(f"forwarder {' '.join(prefix)} did not start: {log.read_text()[-800:]}")
        return proc

    def _volumes(self, pod: Pod, objects: dict[str, dict]) -> dict[str, Path]:
        out = {}
        for vol in pod.spec.get("volumes") or []:
            d = pod.root / "volumes" / vol["name"]
            d.mkdir(parents=True, exist_ok=True)
            if "configMap" in vol:
                cm = objects.get(f"configmap/{vol['configMap']['name']}")
                if cm is None:
                    raise PodFailed(f"volume {vol['name']}: ConfigMap {vol['configMap']['name']} not found")
                files = {k: v.encode() for k, v in (cm.get("data") or {}).items()}
                self._project(d, files, vol["configMap"].get("items"))
            elif "secret" in vol:
                sec = objects.get(f"secret/{vol['secret']['secretName']}")
                if sec is None:
                    raise PodFailed(f"volume {vol['name']}: Secret {vol['secret']['secretName']} not found")
                files = {k: base64.b64decode(v) for k, v in (sec.get("data") or {}).items()}
                self._project(d, files, vol["secret"].get("items"))
            # emptyDir (disk or medium: Memory): a fresh directory any container user may write,
            # as the kubelet makes it (mode 0777).
            os.chmod(d, 0o777)
            out[vol["name"]] = d
        return out

    @staticmethod
    def _project(d: Path, files: dict[str, bytes], items: list | None) -> None:
        """ConfigMap/Secret keys as files, mode 0644 (Kubernetes' defaultMode), `items` renaming them."""
        chosen = {i["key"]: i["path"] for i in items} if items else {k: k for k in files}
        for key, path in chosen.items():
            if key not in files:
                raise PodFailed(f"key {key} not found in the volume's source")
            (d / path).parent.mkdir(parents=True, exist_ok=True)
            (d / path).write_bytes(files[key])
            os.chmod(d / path, 0o644)

    def _env(self, pod: Pod, c: dict) -> dict[str, str]:
        env = {}
        for e in c.get("env") or []:
            if "value" in e:
                env[e["name"]] = expand(str(e["value"]), env)
            elif "fieldRef" in (e.get("valueFrom") or {}):
                path = e["valueFrom"]["fieldRef"]["fieldPath"]
                label = FIELD_REF.fullmatch(path)
                value = {"metadata.name": pod.name, "metadata.namespace": pod.namespace}.get(path)
                env[e["name"]] = pod.labels.get(label.group(1), "") if label else (value or "")
            else:
                raise PodFailed(f"container {c['name']}: env {e['name']}: only value and fieldRef are supported")
        return env

    def _run(self, pod: Pod, c: dict, volumes: dict[str, Path], detach: bool) -> str:
        name = f"{pod.namespace}-{pod.name}-{c['name']}"[:120]
        self.docker("pull", c["image"], timeout=1200)
        env = self._env(pod, c)
        # The pod's containers share the pause container's network namespace; /dev/shm is shared
        # through the pod's dshm emptyDir volume, as on a node.
        args = ["run", "--name", name, "--network", f"container:{pod.pause}"]
        for k, v in env.items():
            args += ["-e", f"{k}={v}"]
        for m in c.get("volumeMounts") or []:
            if m["name"] not in volumes:
                raise PodFailed(f"container {c['name']}: volumeMount {m['name']} names no volume of the pod")
            args += ["-v", f"{volumes[m['name']]}:{m['mountPath']}" + (":ro" if m.get("readOnly") else "")]
        command = [expand(x, env) for x in c.get("command") or []]
        rest = [expand(x, env) for x in c.get("args") or []]
        if command:
            args += ["--entrypoint", command[0]]
            rest = command[1:] + rest
        args += ["-d"] if detach else []
        pod.containers.append(name)
        proc = self.docker(*args, c["image"], *rest, check=False, timeout=3600)
        if proc.returncode != 0 and detach:
            raise PodFailed(f"container {c['name']} did not start: {proc.stderr[-1500:]}")
        return name

    # ------------------------------------------------------------------ status

    def state(self, cname: str) -> dict:
        out = self.docker("inspect", "-f", "{{json .State}}", cname, check=False)
        return json.loads(out.stdout) if out.returncode == 0 else {}

    def logs(self, cname: str, lines: int = 30) -> str:
        out = self.docker("logs", "--tail", str(lines), cname, check=False)
        return (out.stdout + out.stderr)[-3000:]

    def ready(self, pod: Pod) -> bool:
        """Every container running and its readinessProbe (httpGet) answering 2xx, as the kubelet checks."""
        import httpx

        for c in pod.spec["containers"]:
            if not self.state(f"{pod.namespace}-{pod.name}-{c['name']}"[:120]).get("Running"):
                return False
            probe = (c.get("readinessProbe") or {}).get("httpGet")
            if probe:
                try:
                    r = httpx.get(f"http://127.0.0.1:{pod.ports[int(probe['port'])]}{probe['path']}", timeout=5)
                except httpx.HTTPError:
                    return False
                if not 200 <= r.status_code < 400:
                    return False
        return True

    def exit_code(self, pod: Pod) -> int | None:
        """The first container's exit code once it has exited (Jobs), else None."""
        state = self.state(f"{pod.namespace}-{pod.name}-{pod.spec['containers'][0]['name']}"[:120])
        return None if state.get("Running") or not state else int(state.get("ExitCode", 1))

    def stop(self, pod: Pod) -> None:
        for proc in pod.procs:
            proc.terminate()
            proc.wait(10)
        for cname in reversed(pod.containers):
            self.docker("rm", "-f", cname, check=False)
        self.pods.pop((pod.namespace, pod.name), None)

    def stop_all(self) -> None:
        for pod in list(self.pods.values()):
            self.stop(pod)
