import gzip

import numpy as np
import pytest

from tfqat.config import DataConfig
from tfqat.data import DataError, eval_windows, load_corpus, prepare_data, train_dataset

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. ") * 40


def user_corpus(tmp_path, n=4):
    root = tmp_path / "texts"
    root.mkdir()
    for i in range(n):
        (root / f"doc{i}.txt").write_text(f"Document {i}. " + TEXT, encoding="utf-8")
    return root


def cfg_for(tmp_path, root, **kw):
    return DataConfig(corpus=[str(root)], valid=["doc1"], test=["doc2"], seq_len=16,
                      cache_dir=str(tmp_path / "cache"), **kw)


def test_builtin_split_is_by_whole_works():
    c = load_corpus(DataConfig())
    train, valid, test = (set(c.names(s)) for s in ("train", "valid", "test"))
    assert {"austen/persuasion", "shakespeare/hamlet"} == valid
    assert {"austen/northangerabbey", "shakespeare/sonnets", "shakespeare/macbeth"} == test
    assert not (train & valid) and not (train & test)
    assert "austen/emma" in train and len(train) == 48 - 5


def test_tokenizer_round_trip_and_cache(tmp_path):
    root = user_corpus(tmp_path)
    cfg = cfg_for(tmp_path, root)
    d = prepare_data(cfg, vocab_size=300)
    for s in ["Hello, world!", "Ünïcödé ✓ text", "  spaces\tand\nnewlines  ", TEXT[:200]]:
        assert d.tokenizer.decode(d.tokenizer.encode(s)) == s
    assert d.ids["train"].dtype == np.int32 and d.ids["train"][0] == d.tokenizer.eos_id
    again = prepare_data(cfg, vocab_size=300)
    assert again.key == d.key and np.array_equal(again.ids["test"], d.ids["test"])
    (root / "doc3.txt").write_text("changed " + TEXT)
    assert prepare_data(cfg, vocab_size=300).key != d.key  # content hash, not file names


def test_bad_corpus_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(DataConfig(corpus=[str(tmp_path / "nope")]))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no text files"):
        load_corpus(DataConfig(corpus=[str(empty)]))
    root = user_corpus(tmp_path)
    (root / "bad.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(DataError, match=r"bad.txt: not UTF-8 text \(byte 3.*re-encode"):
        load_corpus(cfg_for(tmp_path, root))
    (root / "bad.txt").unlink()
    with pytest.raises(DataError, match="valid split is empty"):
        load_corpus(DataConfig(corpus=[str(root)], valid=["nothing*"], test=["doc2"]))


def test_gzip_and_folders(tmp_path):
    root = user_corpus(tmp_path)
    with gzip.open(root / "doc9.txt.gz", "wt", encoding="utf-8") as f:
        f.write("zipped " + TEXT)
    c = load_corpus(cfg_for(tmp_path, root))
    assert "doc9" in c.names("train")


def test_train_dataset_windows_are_deterministic_and_resumable():
    ids = np.arange(1000, dtype=np.int32)
    ds = train_dataset(ids, seq_len=16, batch_size=4, seed=3, start_step=0, steps=5)
    batches = [(x.numpy(), y.numpy()) for x, y in ds]
    assert len(batches) == 5
    x, y = batches[2]
    assert x.shape == (4, 16) and np.array_equal(y, x + 1)  # targets are the next tokens
    resumed = [(x.numpy(), y.numpy()) for x, y in train_dataset(ids, 16, 4, 3, start_step=2, steps=5)]
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(batches[2:], resumed))
    assert not np.array_equal(batches[0][0], batches[1][0])  # random offsets


@pytest.mark.parametrize("n, L, stride", [(2, 8, 4), (129, 128, 64), (1000, 16, 5), (37, 8, 8)])
def test_eval_windows_score_every_token_once(n, L, stride):
    ids = np.arange(n, dtype=np.int32) + 10
    x, y, m = eval_windows(ids, L, stride)
    assert sorted(y[m > 0].tolist()) == list(ids[1:])
    assert np.array_equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
