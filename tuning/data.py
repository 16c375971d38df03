"""Training data: files in the data dir -> checked rows -> token ids with loss masks -> batches.

Called by `kaito.tuning.trainer` (`build_features`, `Collator`) and tests. Reads csv, json, jsonl,
parquet and arrow files with pyarrow (no pickle; DatasetConfig.dataset_extension
picks the reader for files named otherwise), recognises Kaito's formats
(OpenAI `messages`, context/response or prompt/completion columns, plain
`text`), and names file, row and column for every bad row. Labels are -100
everywhere except the assistant/response tokens (and their end-of-turn
token), so the loss teaches answers, not prompts. With packing, several
examples share one row; `position_ids` restart at 0 for each one, which makes
transformers build a block-diagonal causal mask (no attention across
examples) when no attention_mask is passed.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from kaito.presets.errors import InvalidInput
from kaito.tuning.config import READERS, DatasetConfig

log = logging.getLogger("kaito.tuning")

DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".arrow")
ROLES = ("system", "user", "assistant")
IGNORE = -100
# Column pairs tried, in order, when DatasetConfig names none.
PAIRS = (("prompt", "completion"), ("context", "response"), ("Context", "Response"), ("instruction", "response"))


def _dataset_base(data_dir: Path, dataset_path: Optional[str]) -> Path:
    """dataset_path under the data dir; Kaito's form (relative to /mnt: `data/x`, `/mnt/data/x`) maps there too."""
    if not dataset_path:
        return data_dir
    base = data_dir / dataset_path.lstrip("/")
    if base.exists():
        return base
    # Kaito joins dataset_path onto /mnt, and its data volume is /mnt/data.
    kaito = dataset_path.strip("/").removeprefix("mnt/")
    if kaito == "data" or kaito.startswith("data/"):
        alt = data_dir / kaito.removeprefix("data").lstrip("/")
        if alt.exists():
            return alt
    raise InvalidInput(f"training_config.DatasetConfig.dataset_path {dataset_path!r}: not found under {data_dir}")


def find_data_files(data_dir: Path, dataset_path: Optional[str] = None, reader: Optional[str] = None) -> list[Path]:
    """Every data file under data_dir (or dataset_path within it), sorted; none is an error.

    With a reader (DatasetConfig.dataset_extension), a named file is read with
    it whatever its suffix, and a folder's files of other suffixes count too.
    """
    data_dir = Path(data_dir)
    base = _dataset_base(data_dir, dataset_path)
    every: list[Path] = []
    if base.is_file():
        files = [base]
    elif base.is_dir():
        every = sorted(p for p in base.rglob("*") if p.is_file() and not p.name.startswith("."))
        files = [p for p in every if p.suffix.lower() in DATA_SUFFIXES] or (every if reader else [])
    else:
        raise InvalidInput(f"--data {data_dir}: no such directory")
    if not files:
        other = f"; to read {every[0].name} name its format in DatasetConfig.dataset_extension" if every else ""
        raise InvalidInput(f"--data {base}: no data files ({', '.join(DATA_SUFFIXES)}); the dataset is empty{other}")
    for f in files:
        if f.suffix.lower() not in DATA_SUFFIXES and not reader:
            raise InvalidInput(
                f"{f}: unsupported file type; use one of {', '.join(DATA_SUFFIXES)} "
                "or name the format in DatasetConfig.dataset_extension"
            )
    return files


def read_rows(path: Path, reader: Optional[str] = None) -> list[dict[str, Any]]:
    """All rows of one data file as dicts; `reader` (csv, json, parquet, arrow) overrides the file's suffix."""
    import pyarrow as pa

    suffix = "." + READERS[reader] if reader else path.suffix.lower()
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if suffix == ".csv":
            import pyarrow.csv as pcsv

            return pcsv.read_csv(path).to_pylist()
        if suffix == ".arrow":
            try:
                return pa.ipc.open_stream(pa.memory_map(str(path))).read_all().to_pylist()
            except pa.ArrowInvalid:
                return pa.ipc.open_file(pa.memory_map(str(path))).read_all().to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise InvalidInput(f"{path}: cannot read as {suffix[1:]}: {e}") from None
    text = path.read_text(encoding="utf-8", errors="replace")
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidInput(f"{path}: not valid JSON: {e}") from None
    else:  # jsonl, and .json files in JSON-lines form (the HF convention)
        rows = []
        for n, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InvalidInput(f"{path}: row {len(rows)} (line {n + 1}) is not valid JSON: {e.msg}") from None
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise InvalidInput(f"{path}: row {i} is a {type(r).__name__}, not an object of columns")
    return rows


@dataclass
class Example:
    """One normalised training example: chat messages, or plain text."""

    messages: Optional[list[dict[str, str]]] = None
    text: Optional[str] = None
    loss_on_all: bool = False  # trl's completion_only_loss / assistant_only_loss set to false


def _detect(cfg: DatasetConfig, columns: set[str], path: Path) -> tuple[str, tuple[str, ...]]:
    if cfg.messages_column:
        return "messages", (cfg.messages_column,)
    if cfg.context_column:
        return "pair", (cfg.context_column, cfg.response_column or "response")
    if cfg.response_column:
        # Kaito: "main text column for standalone entries or the response part in prompt-response setups".
        if "context" in columns:
            return "pair", ("context", cfg.response_column)
        return "text", (cfg.response_column,)
    if cfg.text_column:
        return "text", (cfg.text_column,)
    if "messages" in columns:
        return "messages", ("messages",)
    for a, b in PAIRS:
        if a in columns and b in columns:
            return "pair", (a, b)
    text = cfg.dataset_text_field or "text"
    if text in columns:
        return "text", (text,)
    raise InvalidInput(
        f"{path}: no known format in columns {sorted(columns)}: expected 'messages', prompt/completion, "
        f"context/response or {text!r}; or name columns in DatasetConfig (messages_column, context_column, "
        "response_column, text_column) or TrainingArguments.dataset_text_field"
    )


def _fail(path: Path, row: int, column: str, why: str) -> InvalidInput:
    return InvalidInput(f"{path}: row {row}, column {column!r}: {why}")


def _messages(value: Any, path: Path, row: int, col: str) -> list[dict[str, str]]:
    if isinstance(value, str):  # csv cells hold JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _fail(path, row, col, "is a string that is not a JSON list of messages") from None
    if not isinstance(value, (list, tuple)) or not value:
        raise _fail(path, row, col, "must be a non-empty list of {role, content} messages")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise _fail(path, row, col, f"message {j} is not an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise _fail(path, row, col, f"message {j} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise _fail(path, row, col, f"message {j} has no text content")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise _fail(path, row, col, "has no assistant message to learn from")
    return out


def _normalise(row: dict, kind: str, cols: tuple[str, ...], path: Path, i: int, cfg: DatasetConfig) -> Example:
    for c in cols:
        if c not in row:
            raise _fail(path, i, c, f"missing (row has {sorted(row)})")
    if kind == "messages":
        return Example(messages=_messages(row[cols[0]], path, i, cols[0]), loss_on_all=cfg.assistant_only_loss is False)
    if kind == "pair":
        ctx, resp = row[cols[0]], row[cols[1]]
        if ctx is not None and not isinstance(ctx, str):
            raise _fail(path, i, cols[0], f"must be text, got {type(ctx).__name__}")
        if not isinstance(resp, str) or not resp.strip():
            raise _fail(path, i, cols[1], "must be non-empty text (the response to learn)")
        msgs = ([{"role": "user", "content": ctx}] if ctx else []) + [{"role": "assistant", "content": resp}]
        return Example(messages=msgs, loss_on_all=cfg.completion_only_loss is False)
    text = row[cols[0]]
    if not isinstance(text, str) or not text.strip():
        raise _fail(path, i, cols[0], "must be non-empty text")
    return Example(text=text)


def load_examples(data_dir: Path, cfg: DatasetConfig) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples: every file read and checked, shuffled with the seed, split."""
    examples: list[Example] = []
    for path in find_data_files(data_dir, cfg.dataset_path, cfg.dataset_extension):
        rows = read_rows(path, cfg.dataset_extension)
        if not rows:
            continue
        columns = set().union(*(r.keys() for r in rows[:100]))
        kind, cols = _detect(cfg, columns, path)
        examples.extend(_normalise(r, kind, cols, path, i, cfg) for i, r in enumerate(rows))
    if not examples:
        raise InvalidInput(f"--data {data_dir}: the dataset is empty (no rows in any data file)")
    if cfg.shuffle_dataset:
        random.Random(cfg.shuffle_seed).shuffle(examples)
    n_train = max(1, round(len(examples) * cfg.train_test_split))
    return examples[:n_train], examples[n_train:]


def _render(tok, messages, add_generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _assistant_spans(tok, messages) -> tuple[str, list[tuple[int, int]]]:
    """Full chat text and the character spans of assistant turns (content + end-of-turn marks).

    Found by rendering growing prefixes, which works for any chat template
    (Phi-3's has no {% generation %} markers for HF's assistant masks).
    """
    full = _render(tok, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_render(tok, messages[:i], True)) if i else 0
        upto = _render(tok, messages[: i + 1], False)
        end = 0
        while end < min(len(upto), len(full)) and upto[end] == full[end]:
            end += 1
        if i == len(messages) - 1:
            end = len(full)  # the final turn keeps its eos: the model learns to stop
        spans.append((start, end))
    return full, spans


def tokenize(tok, ex: Example, max_len: int) -> Optional[dict[str, list[int]]]:
    """input_ids and labels (-100 outside answers), cut to max_len; None if no answer token survives."""
    if ex.messages is not None and tok.chat_template:
        text, spans = _assistant_spans(tok, ex.messages)
        if ex.loss_on_all:
            spans = [(0, len(text))]
    elif ex.messages is not None:  # no chat template: "prompt\nresponse<eos>"
        prompt = "\n".join(m["content"] for m in ex.messages[:-1])
        prefix = prompt + "\n" if prompt else ""
        text = prefix + ex.messages[-1]["content"] + (tok.eos_token or "")
        spans = [(0 if ex.loss_on_all else len(prefix), len(text))]
    else:
        assert ex.text is not None, "an Example holds messages or text"
        text = ex.text + (tok.eos_token or "")
        spans = [(0, len(text))]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][:max_len]
    labels = [IGNORE] * len(ids)
    for k, (s, e) in enumerate(enc["offset_mapping"][: len(ids)]):
        # Whole tokens only: a span may end inside a shared prefix such as "<|".
        if any(a <= s and e <= b and s < e for a, b in spans):
            labels[k] = ids[k]
    if all(x == IGNORE for x in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def tokenize_all(tok, examples: list[Example], max_len: int) -> list[dict[str, list[int]]]:
    out = [t for t in (tokenize(tok, e, max_len) for e in examples) if t is not None]
    dropped = len(examples) - len(out)
    if dropped:
        log.warning("%d examples had no answer tokens within max_seq_length=%d and were dropped", dropped, max_len)
    if not out:
        raise InvalidInput(
            f"the dataset is empty after tokenization: no example keeps an answer within "
            f"DatasetConfig.max_seq_length={max_len}; raise it"
        )
    return out


def build_features(
    tok, data_dir: Path, cfg: DatasetConfig, max_len: int
) -> tuple[list[dict[str, list[int]]], Optional[list[dict[str, list[int]]]]]:
    """(train, eval or None) rows ready for the Collator: read, split, tokenized, packed as configured."""
    train_ex, eval_ex = load_examples(data_dir, cfg)
    train = tokenize_all(tok, train_ex, max_len)
    evals = tokenize_all(tok, eval_ex, max_len) if eval_ex else None
    if cfg.packing:
        train = pack(train, max_len)
    if evals and (cfg.packing if cfg.eval_packing is None else cfg.eval_packing):
        evals = pack(evals, max_len)
    return train, evals


def pack(features: list[dict[str, list[int]]], max_len: int) -> list[dict[str, list[int]]]:
    """Greedy, order-keeping packing into rows of at most max_len tokens with per-example position ids."""
    rows: list[dict[str, list[int]]] = []
    cur: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for f in features:
        n = len(f["input_ids"])
        if cur["input_ids"] and len(cur["input_ids"]) + n > max_len:
            rows.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": []}
        cur["input_ids"] += f["input_ids"]
        # The first token of an example is never a target: unpacked, the shift
        # drops it; packed, it would be predicted from the previous example.
        cur["labels"] += [IGNORE] + f["labels"][1:]
        cur["position_ids"] += list(range(n))
    if cur["input_ids"]:
        rows.append(cur)
    return rows


class Collator:
    """Pads a batch to its longest row; packed rows carry position_ids and no attention_mask."""

    def __init__(self, pad_id: int, pad_to_multiple_of: Optional[int] = None):
        self.pad_id = pad_id
        self.multiple = pad_to_multiple_of

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(b["input_ids"]) for b in batch)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple
        packed = "position_ids" in batch[0]
        ids, labels, extra = [], [], []
        for b in batch:
            pad = width - len(b["input_ids"])
            ids.append(b["input_ids"] + [self.pad_id] * pad)
            labels.append(b["labels"] + [IGNORE] * pad)
            # Padding gets its own position run (a separate "sequence") when
            # packed, so it never joins a real example's attention block.
            extra.append(b["position_ids"] + list(range(pad)) if packed else [1] * (width - pad) + [0] * pad)
        out = {
            "input_ids": torch.tensor(ids),  # [B, T]
            "labels": torch.tensor(labels),  # [B, T]
            "num_tokens": torch.tensor(sum(len(b["input_ids"]) for b in batch)),
        }
        out["position_ids" if packed else "attention_mask"] = torch.tensor(extra)
        return out
