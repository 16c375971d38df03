"""Progress bars count what is really hashed or sent: a file's bar ends at its layer's tar size, full."""

from __future__ import annotations

from kaito.image_builder import Layer
from kaito.image_builder.progress import RichProgress


def test_a_file_bar_ends_full_at_the_tar_size(tmp_path):
    f = tmp_path / "model-00001.safetensors"
    f.write_bytes(b"x" * 5000)
    prog = RichProgress()
    bar = prog.task("hash:model", "hash model-00001.safetensors", f.stat().st_size)
    layer = Layer.from_file(f, "workspace/weights/model-00001.safetensors", progress=bar, cache=False)
    task = prog.bars.tasks[0]
    assert layer.size > 5000  # headers and padding
    assert task.total == layer.size and task.completed == layer.size
