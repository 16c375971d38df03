"""Synthetic dolly-15k-oai-style data for the tuning tests and benchmark (offline, deterministic).

Rows have one `messages` column of system/user/assistant turns, like
philschmid/dolly-15k-oai-style; answers follow a fixed pattern so that a
tiny model can learn them in a few dozen steps.
"""

from __future__ import annotations

import random
from pathlib import Path

SYSTEM = "You are a helpful assistant."
TOPICS = ["Kubernetes", "a GPU", "a registry", "an adapter", "quantization", "a tokenizer", "batching", "a workspace"]


def dolly_rows(n: int, seed: int = 0, long_every: int = 0) -> list[dict]:
    """n rows; with long_every=k every k-th answer is repeated to make lengths mixed."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        answer = f"The answer about {topic} is forty two."
        if long_every and i % long_every == 0:
            answer = " ".join([answer] * rng.randint(6, 12))
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"What is {topic}?"},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return rows


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path
