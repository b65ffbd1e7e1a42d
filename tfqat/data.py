"""Text in, token windows out: corpus loading, the whole-work split, BPE, and tf.data.

The split is by whole documents (a novel, a play) so that held-out text is unseen prose, not
random lines of works the model trained on. Token ids are cached as ``.npy`` beside a
tokenizer file whose name carries a hash of everything it was trained from, so changing the
corpus or the vocabulary size can never silently reuse a stale tokenizer.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable

import numpy as np

from .atomic import write_bytes_atomic
from .config import DataConfig

EOS = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".txt.gz", ".md", ".text")


class DataError(ValueError):
    """A problem with the corpus, reported as one line with the fix."""


def builtin_corpus_dir() -> Path:
    return Path(str(resources.files("tfqat") / "assets" / "corpus"))


def _doc_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).as_posix() if path != root else path.name
    for suffix in (".txt.gz", ".gz", ".txt", ".md", ".text"):
        if rel.endswith(suffix):
            return rel[: -len(suffix)]
    return rel


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a valid gzip file ({e}); re-compress it or use plain text") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
            "re-encode it, e.g. iconv -f latin1 -t utf-8"
        ) from None


def _collect(spec) -> list[tuple[str, Path]]:
    """(name, path) for every text file of a corpus spec: 'builtin' or files/folders."""
    if spec == "builtin":
        roots = [builtin_corpus_dir()]
    elif isinstance(spec, (str, os.PathLike)):
        roots = [Path(spec)]
    elif isinstance(spec, list) and all(isinstance(s, (str, os.PathLike)) for s in spec):
        roots = [Path(s) for s in spec]
    else:
        raise DataError(f"data.corpus: expected 'builtin', a path or a list of paths, got {spec!r}")
    found: list[tuple[str, Path]] = []
    for root in roots:
        root = root.expanduser()
        if root.is_file():
            found.append((_doc_name(root, root.parent), root))
        elif root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
            found.extend((_doc_name(p, root), p) for p in files)
        else:
            raise DataError(f"data.corpus: {root} does not exist; point it at text files or folders")
    if not found:
        raise DataError(f"data.corpus: no text files ({', '.join(TEXT_SUFFIXES)}) under {roots[0]}; add some")
    return found


def _matches(name: str, patterns: Iterable[str]) -> bool:
    from fnmatch import fnmatch

    return any(name == p or fnmatch(name, p) for p in patterns)


@dataclass(frozen=True)
class Corpus:
    """Documents by split: ``{"train": [...], "valid": [...], "test": [...]}`` of (name, text)."""

    splits: dict

    def names(self, split: str) -> list[str]:
        return [n for n, _ in self.splits[split]]


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read every document and split by whole works.

    Raises:
        DataError: missing/empty corpus, non-UTF-8 text, a split with no documents.
    """
    docs = _collect(cfg.corpus)
    splits: dict[str, list] = {"train": [], "valid": [], "test": []}
    for name, path in docs:
        text = _read_text(path)
        if cfg.lowercase:
            text = text.lower()
        if not text.strip():
            continue
        split = "valid" if _matches(name, cfg.valid) else "test" if _matches(name, cfg.test) else "train"
        splits[split].append((name, text))
    for split in ("train", "valid", "test"):
        if not splits[split]:
            hint = {
                "train": "every document matched data.valid/data.test; hold out fewer",
                "valid": f"no document matches data.valid {cfg.valid}; list held-out file names",
                "test": f"no document matches data.test {cfg.test}; list held-out file names",
            }[split]
            raise DataError(f"data: the {split} split is empty ({hint})")
    return Corpus(splits)


def _corpus_hash(corpus: Corpus, vocab_size: int, lowercase: bool) -> str:
    import tokenizers

    h = hashlib.sha256(f"bpe-v1|{vocab_size}|{lowercase}|{tokenizers.__version__}".encode())
    for split in ("train", "valid", "test"):
        for name, text in corpus.splits[split]:
            h.update(f"|{split}|{name}|".encode())
            h.update(hashlib.sha256(text.encode("utf-8")).digest())
    return h.hexdigest()[:16]


class TextTokenizer:
    """Byte-level BPE (the ``tokenizers`` library); id 0 is ``<|endoftext|>``, used as BOS/EOS."""

    def __init__(self, tok):
        self._tok = tok
        self.eos_id = tok.token_to_id(EOS)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "TextTokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def to_str(self) -> str:
        return self._tok.to_str()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))


def train_tokenizer(texts: list[str], vocab_size: int) -> TextTokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tok)


@dataclass
class TokenizedCorpus:
    tokenizer: TextTokenizer
    ids: dict  # split -> np.int32 [n], documents joined by EOS
    key: str  # hash of corpus + tokenizer settings


def prepare_data(cfg: DataConfig, vocab_size: int, progress: bool = True,
                 tokenizer: TextTokenizer | None = None) -> TokenizedCorpus:
    """Load, split, train (or reuse) the BPE and tokenize every split, cached by content hash.

    ``tokenizer``: use this one (an imported checkpoint's own) instead of training a BPE; the
    cache key then hashes the corpus and the tokenizer's JSON, and ``tokenizer.json`` is still
    written into the cache folder, where export picks it up.
    """
    corpus = load_corpus(cfg)
    key = _corpus_hash(corpus, vocab_size, cfg.lowercase)
    if tokenizer is not None:
        key = "imported-" + hashlib.sha256(f"{key}|{tokenizer.to_str()}".encode("utf-8")).hexdigest()[:16]
    cache = Path(cfg.cache_dir) / f"data-{key}"
    tok_path = cache / "tokenizer.json"
    if tokenizer is not None:
        if not tok_path.is_file():
            write_bytes_atomic(tok_path, tokenizer.to_str().encode("utf-8"))
    elif tok_path.is_file():
        tokenizer = TextTokenizer.from_file(tok_path)
    else:
        tokenizer = train_tokenizer([t for _, t in corpus.splits["train"]], vocab_size)
        write_bytes_atomic(tok_path, tokenizer.to_str().encode("utf-8"))
    if tokenizer.vocab_size > vocab_size:
        raise DataError(f"tokenizer has {tokenizer.vocab_size} tokens > model.vocab_size {vocab_size}")
    ids = {}
    for split, docs in corpus.splits.items():
        path = cache / f"{split}.npy"
        if path.is_file():
            ids[split] = np.load(path)
            continue
        encoded = tokenizer.encode_batch([t for _, t in docs])
        joined: list[int] = []
        for seq in encoded:
            joined.append(tokenizer.eos_id)
            joined.extend(seq)
        arr = np.asarray(joined, dtype=np.int32)
        import io

        buf = io.BytesIO()
        np.save(buf, arr)
        write_bytes_atomic(path, buf.getvalue())
        ids[split] = arr
    manifest = cache / "manifest.json"
    if not manifest.is_file():
        info = {s: {"documents": corpus.names(s), "tokens": int(len(ids[s]))} for s in ids}
        write_bytes_atomic(manifest, json.dumps(info, indent=1).encode())
    return TokenizedCorpus(tokenizer, ids, key)


def train_dataset(ids: np.ndarray, seq_len: int, batch_size: int, seed: int, start_step: int = 0,
                  steps: int | None = None):
    """Batches of (inputs, targets) int32 [B, L] at random offsets.

    The offsets of step ``s`` are a pure function of (seed, s) (stateless RNG), so a resumed run
    sees exactly the batches the interrupted one would have seen, without replaying the stream.
    """
    import tensorflow as tf

    n = int(len(ids)) - seq_len - 1
    if n <= 0:
        raise DataError(f"training split has {len(ids)} tokens, fewer than data.seq_len + 1; add text")
    tokens = tf.constant(ids, dtype=tf.int32)
    window = tf.range(seq_len + 1, dtype=tf.int32)

    def batch_at(step):
        offsets = tf.random.stateless_uniform([batch_size], seed=tf.stack([tf.cast(seed, tf.int64), step]),
                                              maxval=n + 1, dtype=tf.int32)
        win = tf.gather(tokens, offsets[:, None] + window[None, :])  # (B, L+1)
        return win[:, :-1], win[:, 1:]

    stop = None if steps is None else steps
    ds = tf.data.Dataset.range(start_step, stop if stop is not None else 2**62)
    return ds.map(batch_at, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def eval_windows(ids: np.ndarray, seq_len: int, stride: int | None = None):
    """Sliding windows that score every token of ``ids[1:]`` exactly once.

    Window w covers ``ids[w*stride : w*stride + seq_len + 1]``; its targets that an earlier
    window already scored are masked out, so each target after the first window is predicted
    with at least ``seq_len - stride`` tokens of context. Returns (inputs [W, L], targets [W, L],
    mask [W, L] float32), the last window padded with mask 0.
    """
    stride = stride or max(1, seq_len // 2)
    if stride > seq_len:
        raise DataError(f"eval.stride {stride} is longer than data.seq_len {seq_len}; lower it")
    n_targets = len(ids) - 1
    if n_targets < 1:
        raise DataError("held-out split has fewer than 2 tokens; add text")
    starts = np.arange(0, max(1, n_targets - seq_len + stride), stride)
    starts = starts[starts < n_targets]
    pad = np.zeros(int(starts[-1]) + seq_len + 1, dtype=np.int32)
    pad[: len(ids)] = ids
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    win = pad[idx]
    pos = starts[:, None] + np.arange(seq_len)[None, :]  # index of the input token
    first_new = np.concatenate([[0], starts[:-1] + seq_len])  # first target not yet scored
    mask = (pos >= first_new[:, None]) & (pos < n_targets)
    return win[:, :-1], win[:, 1:], mask.astype(np.float32)
