"""kaito.runtime: the model server of a Workspace's inference pod.

Serves Kaito's `/chat` and the OpenAI API (`/v1/completions`, `/v1/chat/completions`,
`/v1/responses`, `/v1/models`, LoRA adapter load/unload) with continuous batching,
on one process or across torchrun ranks. Started by `python -m kaito.runtime`
(the operator's pod command, `kaito.runtime.launch.main`) or `kaito serve`
(`kaito.runtime.cli`); roles: `api` (routers) over `openai_serving`/`kaito_chat`/
`responses` (serving logic) over `serving.Runtime` and `engine` (scheduler, plan,
executor, output processor).
"""
