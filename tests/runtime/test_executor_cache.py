"""The executor's cache window under a steady stream of requests: when evictions have moved it to the
right end of its buffers it slides back in place (no regrow), and every row's logits stay those of a fresh
prefill of its whole token list."""

from __future__ import annotations

import pytest
import torch
from kaito.runtime.executor import HEADROOM, BatchExecutor
from kaito.runtime.loader import load
from kaito.runtime.settings import RuntimeSettings


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load(RuntimeSettings(model_dir=tiny_model_dir, preset="tiny-phi-3"))


def test_window_slides_back_instead_of_regrowing_and_rows_stay_exact(loaded):
    ex = BatchExecutor(loaded.model)
    slides = []
    real_slide = ex._slide_left
    ex._slide_left = lambda: (slides.append((ex.off, ex.width)), real_slide())[1]
    rows = [[1, 40, 41, 42], [1, 50, 51]]
    ex.prefill(rows, [(), ()])
    bufs = None
    for step in range(3 * HEADROOM):
        if step % 24 == 23:  # the oldest row leaves, a new one arrives: the window drifts right
            ex.evict([1])
            rows = [rows[1], [1, 60 + step % 100, 7]]
            ex.prefill([rows[1]], [()])
        if step == 30:
            bufs = [k.data_ptr() for k, _ in ex.bufs]
        toks = [(5 * step + 3 * r) % 700 + 10 for r in range(2)]
        logits = ex.decode(toks)
        for r, t in enumerate(toks):
            rows[r].append(t)
    assert slides, "the window never reached the buffers' end"
    assert [k.data_ptr() for k, _ in ex.bufs] == bufs, "the buffers were reallocated"
    fresh = BatchExecutor(loaded.model)
    # The last decode fed rows[r][-1]: a fresh prefill of the same tokens gives the same next-token logits.
    want = torch.cat([fresh.prefill([r], [()]) for r in rows])
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
