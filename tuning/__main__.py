"""`python -m kaito.tuning ...`: the tuning Job's container command.

    # one GPU (or CPU):
    python -m kaito.tuning --config /mnt/config/training_config.yaml --preset phi-3-mini-128k-instruct \
        --method qlora --data /mnt/data --output /mnt/results \
        --push REGISTRY/IMAGE:TAG --push-secret /var/run/secrets/kaito/docker/config.json
    # several GPUs on one node (DDP; accelerate picks NCCL, or gloo on CPU):
    torchrun --standalone --nproc_per_node 4 -m kaito.tuning --config ... --preset ... --method lora ...
    # two nodes:
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        -m kaito.tuning ...

Same flags as `kaito tune`; see kaito.tuning.cli and kaito.tuning.trainer.
"""

import sys

from kaito.tuning.cli import main

if __name__ == "__main__":
    sys.exit(main())
