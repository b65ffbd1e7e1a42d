import pytest

from tfqat.config import ConfigError, load_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", ["tiny", "llama-58m", "gpt2-97m"])
def test_shipped_configs_load(name):
    cfg = load_config(name)
    assert cfg.name == name
    assert cfg.data.seq_len <= cfg.model.max_positions


def test_paper_llama_58m_shape():
    m = load_config("llama-58m").model
    assert (m.hidden, m.layers, m.ffn, m.heads, m.vocab_size, m.max_positions) == (512, 16, 1024, 8, 16000, 256)


@pytest.mark.parametrize("text, key, words", [
    ("model:\n  hiden: 256\n", "model.hiden", "unknown key"),
    ("model:\n  hidden: big\n", "model.hidden", "integer"),
    ("model:\n  hidden: 250\n  heads: 4\n", "model.heads", "does not divide hidden"),
    ("model:\n  heads: 4\n  kv_heads: 3\n", "model.kv_heads", "must divide heads"),
    ("model:\n  max_positions: 64\ndata:\n  seq_len: 128\n", "data.seq_len", "longer than model.max_positions"),
    ("train:\n  steps: 0\n", "train.steps", "greater than or equal to 1"),
    ("colour: blue\n", "colour", "unknown key"),
])
def test_config_errors_are_one_line_and_name_file_and_key(tmp_path, text, key, words):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{p}: {key}:"), msg
    assert words in msg


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="no such config file; use one of: .*tiny"):
        load_config("no-such-config")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_overrides_are_validated():
    assert load_config("tiny", {"train.steps": 7}).train.steps == 7
    with pytest.raises(ConfigError, match="train.stepz: unknown key"):
        load_config("tiny", {"train.stepz": 7})


def test_overrides_into_empty_or_scalar_sections(tmp_path):
    p = write(tmp_path, "train:\n")
    assert load_config(p, {"train.steps": 5}).train.steps == 5
    with pytest.raises(ConfigError, match=r"--set model.hidden.x: hidden is a value, not a section"):
        load_config("tiny", {"model.hidden.x": 1})
