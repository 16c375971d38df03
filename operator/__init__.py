"""kaito.operator: the Kopf operator that turns Workspaces into GPU nodes, inference services and tuning jobs.

Layers (each module's docstring says who calls it):
- `schema` (pydantic Workspace, v1alpha1/v1beta1) -> `crd` (the generated CRD);
- `admission` (Kaito's rules, used by the webhook and the handlers);
- `render` + `nodes`, `render_inference`, `render_tuning`: the pure
  render(workspace, settings, nodes) -> objects;
- `kube` (the one module that talks to the API), `reconcile` (one idempotent pass),
  `readiness` (the preset's readiness timeout), `handlers` (thin Kopf handlers),
  `settings`, `deploy` (install manifests), `cli`.
Imports neither torch nor transformers (nor kaito.runtime / kaito.tuning).
"""
