"""Data: every file type and format, loss masks on answers only, bad rows named, packing without cross-talk."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
import torch
from kaito.presets.errors import InvalidInput
from kaito.tuning.config import DatasetConfig
from kaito.tuning.data import (
    IGNORE,
    Collator,
    load_examples,
    pack,
    tokenize,
    tokenize_all,
)
from transformers import AutoModelForCausalLM, AutoTokenizer
from tuning_datagen import dolly_rows


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix
    if suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif suffix == ".arrow":
        with pa.ipc.new_stream(path, pa.Table.from_pylist(rows).schema) as w:
            w.write_table(pa.Table.from_pylist(rows))
    elif suffix == ".csv":
        flat = [{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows]
        pcsv.write_csv(pa.Table.from_pylist(flat), path)
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


FORMATS = {
    "messages": lambda i: {"messages": dolly_rows(1 + i)[i]["messages"]},
    "prompt_completion": lambda i: {"prompt": f"What is {i}?", "completion": f"It is {i}."},
    "context_response": lambda i: {"context": f"What is {i}?", "response": f"It is {i}."},
    "text": lambda i: {"text": f"Plain sentence number {i}."},
}


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".json", ".jsonl", ".arrow"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_file_type_and_format_loads(tmp_path, tok, suffix, fmt):
    write(tmp_path / f"d{suffix}", [FORMATS[fmt](i) for i in range(6)])
    train, evals = load_examples(tmp_path, DatasetConfig(train_test_split=0.5))
    assert len(train) == 3 and len(evals) == 3
    feats = tokenize_all(tok, train + evals, 256)
    assert len(feats) == 6
    for f in feats:
        learned = tok.decode([t for t in f["labels"] if t != IGNORE])
        if fmt == "text":
            assert learned.startswith("Plain sentence number")
        else:
            # only the answer (and its end-of-turn/eos marks) carries a loss
            assert learned.startswith("It is" if fmt != "messages" else "The answer about"), learned
            assert "What is" not in learned and "<|user|>" not in learned and "helpful" not in learned


def test_labels_cover_exactly_assistant_turns(tok):
    ex = load_examples.__globals__["Example"](
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello there."},
            {"role": "user", "content": "Bye?"},
            {"role": "assistant", "content": "Goodbye now."},
        ]
    )
    f = tokenize(tok, ex, 512)
    learned = tok.decode([t for t in f["labels"] if t != IGNORE])
    assert learned == "Hello there.<|end|>\nGoodbye now.<|end|>\n<|endoftext|>"
    assert len(f["labels"]) == len(f["input_ids"])


def test_shuffle_is_seeded_and_split_is_stable(tmp_path):
    write(tmp_path / "d.jsonl", [FORMATS["text"](i) for i in range(20)])
    a, _ = load_examples(tmp_path, DatasetConfig(shuffle_seed=7))
    b, _ = load_examples(tmp_path, DatasetConfig(shuffle_seed=7))
    c, _ = load_examples(tmp_path, DatasetConfig(shuffle_seed=8))
    d, _ = load_examples(tmp_path, DatasetConfig(shuffle_dataset=False))
    assert [e.text for e in a] == [e.text for e in b] != [e.text for e in c]
    assert [e.text for e in d] == [f"Plain sentence number {i}." for i in range(20)]


BAD_ROWS = [
    ({"messages": [{"role": "bot", "content": "x"}]}, "row 1, column 'messages': message 0 has role 'bot'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "row 1, column 'messages': has no assistant message"),
    ({"messages": [{"role": "user", "content": 5}]}, "row 1, column 'messages': message 0 has no text content"),
    ({"messages": []}, "row 1, column 'messages': must be a non-empty list"),
    ({"prompt": "q", "completion": ""}, "row 1, column 'completion': must be non-empty text"),
    ({"prompt": "q", "completion": None}, "row 1, column 'completion'"),
    ({"text": ""}, "row 1, column 'text': must be non-empty text"),
    ({"text": None}, "row 1, column 'text'"),
]


@pytest.mark.parametrize("bad,message", BAD_ROWS)
def test_bad_row_names_file_row_and_column(tmp_path, bad, message):
    good = {k: FORMATS["messages"](0)["messages"] if k == "messages" else "ok" for k in bad}
    path = write(tmp_path / "d.jsonl", [good, bad])
    with pytest.raises(InvalidInput) as e:
        load_examples(tmp_path, DatasetConfig())
    assert str(path) in str(e.value) and message in str(e.value)


def test_missing_column_and_unknown_format(tmp_path):
    write(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(InvalidInput, match="no known format in columns.*'answer', 'question'"):
        load_examples(tmp_path, DatasetConfig())
    with pytest.raises(InvalidInput, match="row 0, column 'conv': missing"):
        load_examples(tmp_path, DatasetConfig(messages_column="conv"))


def test_invalid_json_line_is_named(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(InvalidInput, match=r"d.jsonl: row 1 \(line 2\) is not valid JSON"):
        load_examples(tmp_path, DatasetConfig())


@pytest.mark.parametrize("case", ["no_files", "empty_file", "all_truncated", "missing_path"])
def test_empty_dataset_is_an_error(tmp_path, tok, case):
    if case == "no_files":
        (tmp_path / "notes.txt").write_text("hello")
        with pytest.raises(InvalidInput, match="no data files.*the dataset is empty"):
            load_examples(tmp_path, DatasetConfig())
    elif case == "empty_file":
        write(tmp_path / "d.jsonl", [])
        with pytest.raises(InvalidInput, match="the dataset is empty"):
            load_examples(tmp_path, DatasetConfig())
    elif case == "all_truncated":
        write(tmp_path / "d.jsonl", [{"prompt": "word " * 200, "completion": "answer"}])
        ex, _ = load_examples(tmp_path, DatasetConfig())
        with pytest.raises(InvalidInput, match="empty after tokenization.*DatasetConfig.max_seq_length=16"):
            tokenize_all(tok, ex, 16)
    else:
        with pytest.raises(InvalidInput, match="DatasetConfig.dataset_path 'nope.parquet': not found"):
            load_examples(tmp_path, DatasetConfig(dataset_path="nope.parquet"))


def test_packing_keeps_examples_apart(tiny_model_dir, tok):
    """Logits of a packed row equal those of each example run alone: no attention across examples."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.use_cache = False
    model.eval()
    ex = [load_examples.__globals__["Example"](messages=r["messages"]) for r in dolly_rows(5, long_every=2)]
    feats = tokenize_all(tok, ex, 1024)
    packed = pack(feats, sum(len(f["input_ids"]) for f in feats))
    assert len(packed) == 1 and len(packed[0]["input_ids"]) == sum(len(f["input_ids"]) for f in feats)
    batch = Collator(tok.pad_token_id)(packed)
    assert "attention_mask" not in batch and batch["num_tokens"].item() == len(packed[0]["input_ids"])
    with torch.no_grad():
        joint = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        pos = 0
        for f in feats:
            alone = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
            n = len(f["input_ids"])
            torch.testing.assert_close(joint[pos : pos + n], alone, atol=1e-4, rtol=1e-4)
            pos += n
    # the first token of each packed example is never a target (it would be predicted across the boundary)
    starts = [i for i, p in enumerate(packed[0]["position_ids"]) if p == 0]
    assert all(packed[0]["labels"][i] == IGNORE for i in starts)


def test_packing_respects_max_len_and_order():
    feats = [{"input_ids": [i] * n, "labels": [i] * n} for i, n in enumerate([5, 4, 3, 8, 1])]
    rows = pack(feats, 9)
    assert [len(r["input_ids"]) for r in rows] == [9, 3, 9]
    assert [p for r in rows for p in r["position_ids"]] == [*range(5), *range(4), *range(3), *range(8), 0]


def test_collator_pads_unpacked_rows_with_mask():
    batch = Collator(3, pad_to_multiple_of=4)([{"input_ids": [1, 2], "labels": [-100, 2]}, {"input_ids": [5], "labels": [5]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 3], [5, 3, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, -100, -100], [5, -100, -100, -100]]
    assert batch["num_tokens"].item() == 3
