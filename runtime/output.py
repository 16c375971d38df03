"""The output processor: sampled tokens become text, stop checks and events.

Called by the engine (`kaito.runtime.engine`) on whichever of its threads sampled the tokens: `append`
advances each row by its token (EOS, stop strings, max_tokens and the context length end it), decodes text
incrementally so a multi-byte character is never split, holds back text that could still become a stop
string, and queues a `Token` per row and a `Finished` per finished row in the caller's outbox (delivered by
`kaito.runtime.sequence.flush`, one wake-up per event loop per step); `finish` ends a row for any reason.
The hot path stays lean: detokenization calls the Rust tokenizer directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kaito.runtime.sequence import Finished, Sequence, Token


def fast_decode(tok) -> Callable[[list[int]], str]:
    """decode(ids, skip_special_tokens=True), straight to the Rust tokenizer when that gives the same text.

    transformers' wrapper (type conversion, kwargs) costs several times the decode itself, once per row
    and token; it only adds work when clean_up_tokenization_spaces is set.
    """
    backend = getattr(tok, "_tokenizer", None)
    if backend is not None and hasattr(backend, "decode") and not getattr(tok, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


# Prompt tokens the detokenizer reads before the first output token (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET),
# so the first token's text is what follows the prompt (" w1428", not "w1428"): prompt + text reads right.
PROMPT_CONTEXT = 5


def _ids_from(s: Sequence, start: int, end: int | None = None) -> list[int]:
    """ids[start:end] of the detokenizer's stream: the prompt's last tokens (`detok_tail`), then the output."""
    tail, n = s.detok_tail or [], len(s.detok_tail or [])
    if start >= n:
        return s.output_ids[start - n:None if end is None else end - n]
    if end is not None and end <= n:
        return tail[start:end]
    return tail[start:] + s.output_ids[:None if end is None else end - n]


def detok(s: Sequence, decode: Callable[[list[int]], str], final: bool) -> str:
    """Incremental detokenization (prefix/read offsets into the prompt's tail + output ids), so multi-byte
    characters are never split and a word's leading space is kept as after the prompt."""
    if s.detok_tail is None:
        s.detok_tail = list(s.prompt_ids[-PROMPT_CONTEXT:])
        s.detok_prefix, s.detok_read = 0, len(s.detok_tail)
    prev = decode(_ids_from(s, s.detok_prefix, s.detok_read))
    new = decode(_ids_from(s, s.detok_prefix))
    if len(new) > len(prev) and (final or not new.endswith("\ufffd")):
        delta = new[len(prev):]
        s.text += delta
        s.detok_prefix, s.detok_read = s.detok_read, len(s.detok_tail) + len(s.output_ids)
        return delta
    return ""


def check_stop(s: Sequence) -> str | None:
    """Cut the text at the first stop string found near the unsent end; "stop" when one was."""
    longest = max(len(x) for x in s.params.stop)
    window_start = max(0, s.emitted - longest)
    hits = [(s.text.find(x, window_start), x) for x in s.params.stop]
    hits = [(i, x) for i, x in hits if i >= 0]
    if hits:
        s.text = s.text[: min(i for i, _ in hits)]
        return "stop"
    return None


def release(s: Sequence, final: bool) -> str:
    """Text safe to send now: hold back what could still become a stop string."""
    hold = 0 if final or not s.params.stop else max(len(x) for x in s.params.stop) - 1
    upto = max(s.emitted, len(s.text) - hold)
    out = s.text[s.emitted:upto]
    s.emitted = upto
    return out


class OutputProcessor:
    """Advances rows by their sampled tokens and ends them; `eos_ids` and `tok` may be replaced (tests)."""

    def __init__(self, tokenizer, *, eos_ids: list[int], max_model_len: int, metrics=None):
        self.tok = tokenizer
        self.eos_ids = list(eos_ids)
        self.max_model_len = max_model_len
        self.metrics = metrics

    @property
    def tok(self):
        return self._tok

    @tok.setter
    def tok(self, tokenizer) -> None:
        self._tok, self._decode = tokenizer, fast_decode(tokenizer)

    def append(self, seqs: list[Sequence], tokens: list, infos: list, outbox: list) -> None:
        """Each unfinished row takes its token (None only for rows already ended) and sends it; ends the rows
        that stop here."""
        now = time.monotonic()
        for s, t, info in zip(seqs, tokens, infos):
            if s.finish_reason is not None or s.cancelled:
                continue
            if self.metrics is not None:
                self.metrics.record_token(s, now)
            if s.first_token_at is None:
                s.first_token_at = now
            s.last_token_at = now
            s.output_ids.append(t)
            reason = self._stop_reason(s, t)
            if reason is not None:
                s.push(Token(t, release(s, final=True), info), outbox)
                self.finish(s, reason, outbox)
            else:
                s.pending = t
                s.push(Token(t, release(s, final=False), info), outbox)

    def _stop_reason(self, s: Sequence, t: int) -> str | None:
        """Decode the new token's text; why the row ends here, or None."""
        reason: str | None
        if t in self.eos_ids and not s.params.ignore_eos:
            reason, by_string = "stop", False
        else:
            detok(s, self._decode, final=False)
            reason = check_stop(s) if s.params.stop else None
            by_string = reason is not None
        if reason is None and (len(s.output_ids) >= s.params.max_tokens
                               or len(s.prompt_ids) + len(s.output_ids) >= self.max_model_len):
            reason = "length"
        if reason is not None and not by_string and s.detok_read < len(s.detok_tail or []) + len(s.output_ids):
            detok(s, self._decode, final=True)  # flush bytes held back for an unfinished character
            if s.params.stop:
                check_stop(s)
        return reason

    def finish(self, s: Sequence, reason: str, outbox: list) -> None:
        s.finish_reason = reason
        if self.metrics is not None:
            self.metrics.record_finished(s, reason)
        s.push(Finished(reason, len(s.prompt_ids), len(s.output_ids)), outbox)
