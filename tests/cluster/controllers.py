"""The cluster's other controllers, played against kmock's emulated API server.

Started by the `cluster` fixture (tests/cluster/conftest.py) beside the real Kopf operator.
One polling loop (every 0.5 s) acts as:

  Karpenter   a NodeClaim without a node gets a Ready Node carrying its labels and requirements
              (tests/operator/op_harness.provision), and the claim is marked Ready;
  Deployment / StatefulSet / Job controllers
              each wants `replicas` pods (a Job one); the pod objects are created in the API with
              the template's labels (a StatefulSet's pods are <name>-<i> with the pod-index label,
              the DNS names of its headless Service become --add-host entries);
  kubelet     tests/cluster/kubelet.py runs each pod with docker, exactly as rendered;
  status      pod phase/Ready, the workload's readyReplicas and the Job's Complete/Failed
              conditions are written back from the containers' real state.

Pods start in worker threads (docker calls block), so one slow image pull never stalls the
status of the others. Spec changes to a running workload are not rolled out (not needed by
the seed's flows).
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from dataclasses import dataclass, field

from kubelet import Kubelet, Pod, PodFailed
from op_harness import NC, Harness, provision

KINDS = {"Deployment": "apps/v1/deployments", "StatefulSet": "apps/v1/statefulsets", "Job": "batch/v1/jobs"}
PATHS = {"Deployment": "/apis/apps/v1", "StatefulSet": "/apis/apps/v1", "Job": "/apis/batch/v1"}
POD_INDEX = "apps.kubernetes.io/pod-index"


@dataclass
class Controllers:
    h: Harness
    kubelet: Kubelet
    pods: dict = field(default_factory=dict)  # (ns, pod name) -> Pod | Exception | None (starting)
    events: list = field(default_factory=list)  # what happened, for failure messages

    def note(self, event: str) -> None:
        """Record what the harness did (shown by a failing test; live on stderr with -s)."""
        self.events.append(f"{time.strftime('%X')} {event}")
        print(f"cluster: {event}", file=sys.stderr, flush=True)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.tick()
            except Exception as exc:  # noqa: BLE001 -- keep playing the cluster; the test sees the event
                self.note(f"controller error: {type(exc).__name__}: {exc}")
            await asyncio.sleep(0.5)

    async def tick(self) -> None:
        for claim in self.h.objects(NC):
            if not (claim.get("status") or {}).get("nodeName"):
                node = await provision(self.h, claim)
                self.note(f"karpenter: node {node} for {claim['metadata']['name']}")
        for kind, resource in KINDS.items():
            for obj in self.h.objects(resource):
                await self.reconcile(kind, obj)

    def _pod_names(self, kind: str, obj: dict) -> list[str]:
        name = obj["metadata"]["name"]
        if kind == "Job":
            return [f"{name}-{obj['metadata']['uid'][:5]}"]
        replicas = int(obj["spec"].get("replicas", 1))
        if kind == "StatefulSet":
            return [f"{name}-{i}" for i in range(replicas)]
        digest = hashlib.sha256(str(obj["spec"]["template"]).encode()).hexdigest()[:10]
        return [f"{name}-{digest}-{i}" for i in range(replicas)]

    async def reconcile(self, kind: str, obj: dict) -> None:
        ns = obj["metadata"]["namespace"]
        names = self._pod_names(kind, obj)
        for i, pod_name in enumerate(names):
            if (ns, pod_name) not in self.pods:
                self.pods[ns, pod_name] = None
                labels = dict(obj["spec"]["template"]["metadata"].get("labels") or {})
                if kind == "StatefulSet":
                    labels[POD_INDEX] = str(i)
                asyncio.get_running_loop().create_task(self._start(kind, obj, pod_name, labels))
        pods = [self.pods.get((ns, n)) for n in names]
        await self._write_status(kind, obj, [p for p in pods if isinstance(p, Pod)], pods)

    async def _start(self, kind: str, obj: dict, pod_name: str, labels: dict) -> None:
        ns = obj["metadata"]["namespace"]
        spec = obj["spec"]["template"]["spec"]
        await self._create_pod_object(ns, pod_name, labels, spec)
        objects = {f"configmap/{o['metadata']['name']}": o for o in self.h.objects("v1/configmaps")
                   if o["metadata"].get("namespace") == ns}
        objects.update({f"secret/{o['metadata']['name']}": o for o in self.h.objects("v1/secrets")
                        if o["metadata"].get("namespace") == ns})
        hosts = {}
        if kind == "StatefulSet":  # <pod>.<headless service> resolves to the pod's address
            svc = obj["spec"]["serviceName"]
            for i in range(int(obj["spec"].get("replicas", 1))):
                peer = f"{obj['metadata']['name']}-{i}"
                hosts[f"{peer}.{svc}"] = self.kubelet.address(ns, peer)
        self.note(f"kubelet: starting {ns}/{pod_name}")
        try:
            pod = await asyncio.to_thread(self.kubelet.start, ns, pod_name, labels, spec, objects, hosts)
        except PodFailed as exc:
            self.pods[ns, pod_name] = exc
            self.note(f"kubelet: {ns}/{pod_name} failed: {exc}")
            await self._pod_status(ns, pod_name, "Failed", False, str(exc))
            return
        self.pods[ns, pod_name] = pod
        self.note(f"kubelet: {ns}/{pod_name} running")

    async def _create_pod_object(self, ns: str, name: str, labels: dict, spec: dict) -> None:
        body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
                "spec": spec, "status": {"phase": "Pending"}}
        async with self.h.k8s.post(f"/api/v1/namespaces/{ns}/pods", json=body) as r:
            assert r.status < 300, await r.text()

    async def _pod_status(self, ns: str, name: str, phase: str, ready: bool, message: str = "") -> None:
        status = {"phase": phase, "message": message,
                  "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
        current = (self.h.obj("v1/pods", ns, name) or {}).get("status") or {}
        if {k: current.get(k) for k in status} != status:
            await self.h.patch(f"/api/v1/namespaces/{ns}/pods/{name}/status", {"status": status})

    async def _write_status(self, kind: str, obj: dict, running: list[Pod], all_pods: list) -> None:
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        if kind == "Job":
            status = await self._job_status(all_pods)
        else:
            ready = 0
            for pod in running:
                ok = await asyncio.to_thread(self.kubelet.ready, pod)
                await self._pod_status(ns, pod.name, "Running", ok)
                ready += ok
            status = {"replicas": len(all_pods), "readyReplicas": ready, "availableReplicas": ready}
        current = obj.get("status") or {}
        if {k: current.get(k) for k in status} != status:
            await self.h.patch(f"{PATHS[kind]}/namespaces/{ns}/{KINDS[kind].rsplit('/', 1)[1]}/{name}/status",
                               {"status": status})

    async def _job_status(self, pods: list) -> dict:
        pod = pods[0] if pods else None
        if isinstance(pod, PodFailed):
            return {"failed": 1, "active": 0,
                    "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                    "message": str(pod)[:500]}]}
        if not isinstance(pod, Pod):
            return {"active": 1}
        code = await asyncio.to_thread(self.kubelet.exit_code, pod)
        if code is None:
            await self._pod_status(pod.namespace, pod.name, "Running", True)
            return {"active": 1}
        phase = "Succeeded" if code == 0 else "Failed"
        await self._pod_status(pod.namespace, pod.name, phase, False)
        if code == 0:
            return {"succeeded": 1, "active": 0, "conditions": [{"type": "Complete", "status": "True"}]}
        return {"failed": 1, "active": 0, "conditions": [{"type": "Failed", "status": "True",
                "reason": "BackoffLimitExceeded", "message": f"trainer exited {code}"}]}

    def service_port(self, ns: str, service: str, port: int) -> int:
        """The host loopback port where `service:port` reaches a ready pod it selects (as kube-proxy would)."""
        svc = self.h.obj("v1/services", ns, service)
        assert svc is not None, f"no Service {ns}/{service}"
        target = next(int(p.get("targetPort", p["port"])) for p in svc["spec"]["ports"] if int(p["port"]) == port)
        selector = svc["spec"]["selector"]
        for (pns, _), pod in self.pods.items():
            if pns == ns and isinstance(pod, Pod) and all(pod.labels.get(k) == v for k, v in selector.items()):
                return pod.ports[target]
        raise AssertionError(f"Service {ns}/{service} selects no running pod ({selector})")
