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


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "transformers-forward"])
def test_no_forward_reads_a_cache_column_it_did_not_write(loaded, monkeypatch, fast):
    """The K/V buffers are allocated uninitialised: filled with NaN here, any column a forward read before
    writing it would turn that row's logits to NaN. Waves of arrivals (a wider prompt beside running rows, the
    batch outgrowing its row capacity, holes filled by eviction, the batch emptied and refilled, the window
    regrown) must keep every row's logits those of a fresh prefill of its tokens."""
    from kaito.runtime import executor as ex_mod

    monkeypatch.setattr(ex_mod, "fresh_buffer", lambda like, shape: like.new_full(shape, float("nan")))
    if not fast:
        monkeypatch.setenv("KAITO_FAST_DECODE", "0")
    ex = BatchExecutor(loaded.model)
    assert (ex.fast is not None) == fast
    fresh = BatchExecutor(loaded.model)
    rows: list[list[int]] = []

    def admit(prompts):
        logits = ex.prefill(prompts, [()] * len(prompts))
        rows.extend(list(p) for p in prompts)
        assert not logits.isnan().any()

    def decode(step):
        toks = [(7 * step + 3 * r) % 700 + 10 for r in range(len(rows))]
        logits = ex.decode(toks)
        for r, t in zip(rows, toks):
            r.append(t)
        want = torch.cat([fresh.prefill([r], [()]) for r in rows])
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)

    def evict(keep):
        ex.evict(keep)
        rows[:] = [rows[i] for i in keep]

    admit([[1, 40, 41]])
    decode(0)
    admit([[1, 50, 51, 52, 53, 54, 55, 56], [1, 60]])  # wider than the window: old row padded on the left
    decode(1)
    admit([[1, 70, 71, 72]] * 3)  # 6 rows: past the capacity of 4, a regrow
    for step in range(2, 5):
        decode(step)
    evict([0, 5, 2, 4])  # holes filled by the last rows
    decode(5)
    evict([])  # the wave is over: the buffers stay, the window restarts at their right end
    admit([[1, 80, 81], [1, 90]])
    for step in range(6, 6 + HEADROOM + 8):  # past the headroom: a slide or a regrow
        decode(step)
