"""kaito.presets.yamlio: the one reader of YAML mappings, on real files."""

import pytest
from kaito.presets.errors import InvalidInput
from kaito.presets.registry import PresetRegistry
from kaito.presets.yamlio import parse_mapping, read_mapping


def test_a_mapping_comes_back_and_an_empty_file_is_empty(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("a: 1\nb: [x]\n")
    assert read_mapping(f, "a mapping") == {"a": 1, "b": ["x"]}
    f.write_text("# only a comment\n")
    assert read_mapping(f, "a mapping") == {}


@pytest.mark.parametrize("text, expected", [
    ("- 1\n- 2\n", "--config X: the top level must be a mapping of settings, not a list"),
    ("just text\n", "--config X: the top level must be a mapping of settings, not the text 'just text'"),
    ("7\n", "--config X: the top level must be a mapping of settings, not the number 7"),
    ("a: [unclosed\n", "--config X: not valid YAML: "),
])
def test_refusals_name_the_document_and_what_is_expected(text, expected):
    with pytest.raises(InvalidInput) as e:
        parse_mapping(text, "--config X", "a mapping of settings")
    assert str(e.value).startswith(expected)


def test_file_problems_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(InvalidInput, match=r"^--config .*nope.yaml: no such file; mount it$"):
        read_mapping(tmp_path / "nope.yaml", "a mapping", name=f"--config {tmp_path / 'nope.yaml'}", missing="mount it")
    with pytest.raises(InvalidInput, match="no such file"):
        read_mapping(tmp_path, "a mapping")  # a directory is not a file
    f = tmp_path / "latin1.yaml"
    f.write_bytes(b"a: caf\xe9\n")
    with pytest.raises(InvalidInput, match=r"latin1.yaml: not UTF-8 text"):
        read_mapping(f, "a mapping")


@pytest.mark.parametrize("text, expected", [
    ("- name: x\n", "the top level must be a mapping with keys family, defaults, presets, not a list"),
    ("presets: {name: x}\n", "presets must be a list of preset mappings, got dict"),
    ("defaults: [1]\npresets: []\n", "defaults must be a mapping of preset fields, got list"),
    ("presets: [7]\n", "presets[0] must be a mapping, got int"),
])
def test_preset_files_of_the_wrong_shape_are_refused(tmp_path, text, expected):
    f = tmp_path / "fam.yaml"
    f.write_text(text)
    with pytest.raises(InvalidInput) as e:
        PresetRegistry().load_file(f)
    assert expected in str(e.value) and str(f) in str(e.value)
