"""Builds the operator's install manifests: namespace, RBAC, Deployment, webhook Service and config.

Called by `kaito operator manifests` (writes deploy/operator.yaml) and by the
tests that compare it with the Helm chart (`charts/kaito`) and validate it.
RBAC lists exactly the verbs the operator uses: `kaito.operator.kube` calls
plus what Kopf needs (watching workspaces and children, its finalizer and
annotations on workspaces, Events, cluster-wide namespace/CRD observation).
The webhook's TLS certificate comes from cert-manager (a self-signed Issuer
and a Certificate); cert-manager injects the CA into the webhook config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kaito.operator.settings import DEFAULT_REGISTRY, KAITO_VERSION

NAME = "kaito-operator"
WEBHOOK_NAME = "kaito-webhook"
CERT_SECRET = "kaito-webhook-cert"


@dataclass(frozen=True)
class DeployValues:
    """The knobs of an install; the Helm chart's values.yaml has the same keys and defaults."""

    namespace: str = "kaito-system"
    image: str = f"{DEFAULT_REGISTRY}/kaito-operator:{KAITO_VERSION}"
    registry: str = DEFAULT_REGISTRY
    bring_your_own_nodes: bool = False
    weights_from_modelpack: bool = False
    webhook_port: int = 8443


# (apiGroup, resources, verbs): every request the operator makes.
RBAC_RULES: list[tuple[str, list[str], list[str]]] = [
    ("kaito.sh", ["workspaces"], ["get", "list", "watch", "patch"]),
    ("kaito.sh", ["workspaces/status"], ["get", "patch"]),
    ("", ["configmaps", "services"], ["get", "create", "patch"]),
    ("apps", ["deployments", "statefulsets"], ["get", "list", "watch", "create", "patch"]),
    ("batch", ["jobs"], ["get", "list", "watch", "create", "patch"]),
    ("karpenter.sh", ["nodeclaims"], ["get", "list", "watch", "create", "delete"]),
    ("", ["nodes"], ["get", "list", "watch"]),
    ("", ["events"], ["create"]),
    # Kopf's cluster-wide observation of namespaces and resource kinds.
    ("", ["namespaces"], ["list", "watch"]),
    ("apiextensions.k8s.io", ["customresourcedefinitions"], ["list", "watch"]),
]


def _labels() -> dict[str, str]:
    return {"app.kubernetes.io/name": NAME, "app.kubernetes.io/part-of": "kaito"}


def build(values: DeployValues = DeployValues()) -> list[dict[str, Any]]:
    ns = values.namespace
    labels = _labels()
    meta = lambda name: {"name": name, "namespace": ns, "labels": dict(labels)}
    env = [
        {"name": "KAITO_REGISTRY", "value": values.registry},
        {"name": "KAITO_BRING_YOUR_OWN_NODES", "value": str(values.bring_your_own_nodes).lower()},
        {"name": "KAITO_WEIGHTS_FROM_MODELPACK", "value": str(values.weights_from_modelpack).lower()},
        {"name": "KAITO_WEBHOOK_PORT", "value": str(values.webhook_port)},
        {"name": "KAITO_WEBHOOK_CERT_DIR", "value": "/certs"},
    ]
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": dict(labels)}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(NAME)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": NAME, "labels": dict(labels)},
            "rules": [{"apiGroups": [g], "resources": list(r), "verbs": list(v)} for g, r, v in RBAC_RULES],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": NAME, "labels": dict(labels)},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NAME},
            "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": ns}],
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta(NAME),
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": dict(labels)},
                "template": {
                    "metadata": {"labels": dict(labels)},
                    "spec": {
                        "serviceAccountName": NAME,
                        "containers": [
                            {
                                "name": "operator",
                                "image": values.image,
                                "command": ["kaito", "operator", "run"],
                                "env": env,
                                "ports": [{"name": "webhook", "containerPort": values.webhook_port}],
                                "volumeMounts": [{"name": "certs", "mountPath": "/certs", "readOnly": True}],
                                "resources": {
                                    "requests": {"cpu": "100m", "memory": "256Mi"},
                                    "limits": {"memory": "1Gi"},
                                },
                                "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False},
                            }
                        ],
                        "volumes": [{"name": "certs", "secret": {"secretName": CERT_SECRET}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta(WEBHOOK_NAME),
            "spec": {
                "selector": dict(labels),
                "ports": [{"name": "webhook", "port": 443, "targetPort": values.webhook_port}],
            },
        },
        {
            "apiVersion": "cert-manager.io/v1",
            "kind": "Issuer",
            "metadata": meta("kaito-selfsigned"),
            "spec": {"selfSigned": {}},
        },
        {
            "apiVersion": "cert-manager.io/v1",
            "kind": "Certificate",
            "metadata": meta(CERT_SECRET),
            "spec": {
                "secretName": CERT_SECRET,
                "dnsNames": [f"{WEBHOOK_NAME}.{ns}.svc", f"{WEBHOOK_NAME}.{ns}.svc.cluster.local"],
                "issuerRef": {"name": "kaito-selfsigned", "kind": "Issuer"},
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {
                "name": "validation.workspace.kaito.sh",
                "labels": dict(labels),
                "annotations": {"cert-manager.io/inject-ca-from": f"{ns}/{CERT_SECRET}"},
            },
            "webhooks": [
                {
                    "name": "validation.workspace.kaito.sh",
                    "admissionReviewVersions": ["v1"],
                    "sideEffects": "None",
                    "failurePolicy": "Fail",
                    "matchPolicy": "Equivalent",
                    "timeoutSeconds": 10,
                    "clientConfig": {
                        "service": {"name": WEBHOOK_NAME, "namespace": ns, "path": "/validate-workspace", "port": 443}
                    },
                    "rules": [
                        {
                            "apiGroups": ["kaito.sh"],
                            # With matchPolicy Equivalent the API server converts v1alpha1
                            # requests to v1beta1 (conversion None) before calling us.
                            "apiVersions": ["v1beta1"],
                            "operations": ["CREATE", "UPDATE"],
                            "resources": ["workspaces"],
                            "scope": "Namespaced",
                        }
                    ],
                }
            ],
        },
    ]


def manifests_yaml(values: DeployValues = DeployValues()) -> str:
    from kaito.operator.crd import dump_yaml

    header = "# Generated by `kaito operator manifests`; the Helm chart charts/kaito renders the same.\n"
    return header + dump_yaml(build(values))
