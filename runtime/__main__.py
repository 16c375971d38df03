"""Kaito inference server: `python -m kaito.runtime` (also `kaito serve`).

One process, one GPU (or CPU):
    python -m kaito.runtime --preset phi-3-mini-4k-instruct --model-dir /workspace/weights \
        --adapters-dir /mnt/adapter --port 5000 [--config /mnt/config/inference_config.yaml]

N GPUs on one node (rank 0 serves HTTP on 5000 and schedules; every rank runs each step,
tensor-parallel when the model has a tp_plan):
    torchrun --standalone --nproc-per-node 4 -m kaito.runtime --preset NAME \
        --model-dir /workspace/weights --adapters-dir /mnt/adapter --port 5000

2 nodes x G GPUs (run on each node; RANK is the node index 0/1, ADDR node 0's address):
    torchrun --nnodes 2 --nproc-per-node G --node-rank $RANK --master-addr ADDR --master-port 29500 \
        -m kaito.runtime --preset NAME --model-dir /workspace/weights --adapters-dir /mnt/adapter --port 5000

CPU check of the same path (gloo, 2 processes):
    torchrun --standalone --nproc-per-node 2 -m kaito.runtime --preset tiny-phi-3 --model-dir DIR --device cpu

Flags: every runtime setting (`--help` lists them, with dashes or underscores, plus Kaito's
--torch_dtype); unknown flags are ignored with one warning line, as Kaito's server does. The process
exits non-zero when the model cannot be loaded or the engine meets an unrecoverable fault.

Environment: LOCAL_RANK (port = --port + LOCAL_RANK, as Kaito), KAITO_<SETTING> for any setting
(e.g. KAITO_MAX_BATCH_SIZE=64, KAITO_API_KEY=...), and one variable per adapter named exactly like
the adapter directory holding its strength (e.g. `phi-3-adapter=0.5`; default 1.0).
"""

import sys

from kaito.runtime.launch import main

if __name__ == "__main__":
    sys.exit(main())
