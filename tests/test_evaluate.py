import numpy as np
import pytest

from tfqat.data import train_tokenizer
from tfqat.evaluate import blimp_accuracy, load_blimp, perplexity, sentence_logprobs


def uniform(vocab):
    return lambda x, y: np.full(x.shape, -np.log(vocab))


@pytest.mark.parametrize("n, L, stride", [(1000, 32, 16), (77, 16, 16), (5, 8, 4)])
def test_uniform_logits_give_vocab_size(n, L, stride):
    ids = np.random.default_rng(0).integers(0, 100, n).astype(np.int32)
    r = perplexity(uniform(100), ids, L, stride, batch_size=4, progress=False)
    assert r["tokens"] == n - 1
    assert r["perplexity"] == pytest.approx(100.0, rel=1e-12)


def test_perplexity_matches_direct_bigram_computation():
    """A model whose logprob depends on the target only: ppl must equal exp(mean NLL) over ids[1:]."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 7, 300).astype(np.int32)
    table = np.log(rng.dirichlet(np.ones(7)))
    r = perplexity(lambda x, y: table[y], ids, 16, 5, batch_size=3, progress=False)
    assert r["perplexity"] == pytest.approx(np.exp(-table[ids[1:]].mean()), rel=1e-12)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["the cat sat on the mat. the dogs sit on the mats. a cat is here."] * 20, 300)


def test_sentence_logprob_sums_only_real_tokens(tok):
    sents = ["the cat sat", "a cat is here on the mat and the dogs sit", "the"]
    lp = sentence_logprobs(lambda x, y: np.where(y > 0, -1.0, -1000.0), tok, sents, batch_size=2)
    expected = [-len(tok.encode(s)) for s in sents]  # one -1 per token, padding never counted
    assert lp.tolist() == expected


def test_blimp_scorer_on_hand_made_pairs(tok):
    # A "model" that prefers sentences containing the token for " cat": logprob 0 for it, -1 else.
    cat = tok.encode(" cat")[-1]
    fn = lambda x, y: np.where(y == cat, 0.0, -1.0)
    pairs = [
        {"sentence_good": "the cat sat", "sentence_bad": "the dogs sat", "UID": "p1", "linguistics_term": "t1"},
        {"sentence_good": "a cat is here", "sentence_bad": "a dogs is here", "UID": "p1", "linguistics_term": "t1"},
        {"sentence_good": "the mat", "sentence_bad": "the cat", "UID": "p2", "linguistics_term": "t2"},
    ]
    r = blimp_accuracy(fn, tok, pairs, batch_size=2, progress=False)
    assert r["paradigms"] == {"p1": 1.0, "p2": 0.0}
    assert r["phenomena"] == {"t1": 1.0, "t2": 0.0}
    assert r["overall"] == pytest.approx(2 / 3)


def test_shipped_blimp_has_67_paradigms_and_12_phenomena(tok):
    pairs = load_blimp(pairs_per_paradigm=2)
    assert len({p["UID"] for p in pairs}) == 67
    assert len(pairs) == 134
    r = blimp_accuracy(lambda x, y: np.zeros(x.shape), tok, pairs, progress=False)
    assert len(r["phenomena"]) == 12 and "argument_structure" in r["phenomena"]


def test_blimp_buckets_never_exceed_the_model_positions(tok):
    widths = []

    def fn(x, y):
        widths.append(x.shape[1])
        return np.zeros(x.shape)

    sents = ["the cat sat on the mat and the dogs sit on the mats"]  # > 9 tokens
    n = len(tok.encode(sents[0]))
    assert n % 8, "the sentence must not fill a whole bucket"
    sentence_logprobs(fn, tok, sents, max_len=n)  # n is not a multiple of 8
    assert widths and max(widths) <= n
