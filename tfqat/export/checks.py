"""What a ``.tflite`` holds and whether it is the export it must be, read from the flatbuffer
alone (no TensorFlow): :func:`inspect_tflite` (ops, signatures, tensor types, constant sizes,
each TFQAT_QLINEAR's weights) and :func:`check_export` against the :class:`ModelSpec` it came
from.
"""

from __future__ import annotations

from tfqat.export.spec import ExportError, ModelSpec, QLinearSpec
from tfqat.tflite_schema import builtin_op_names, is_tflite, op_name, tensor_type_names


def inspect_tflite(data: bytes) -> dict:
    """Op list, signatures, tensor types and constant sizes of a .tflite (no TensorFlow needed).

    Returns a dict: ``signatures`` {key: {"inputs": {name: [type, shape]}, "outputs": ...,
    "ops": {op: count}}}, ``ops`` (all subgraphs), ``tensor_types`` {type: count},
    ``const_bytes`` {type: bytes}, ``qlinear`` (one entry per TFQAT_QLINEAR: attrs, weight
    type/shape, whether the weights are a constant buffer).
    """
    from ai_edge_litert import schema_py_generated as schema
    from flatbuffers import flexbuffers

    if not is_tflite(data):
        raise ExportError("not a TFLite flatbuffer (file identifier TFL3 missing)")
    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    tnames = tensor_type_names()
    codes = [op_name(oc.builtinCode, oc.deprecatedBuiltinCode, oc.customCode) for oc in model.operatorCodes]
    buf_len = [0 if b.data is None else len(b.data) for b in model.buffers]
    info: dict = {"signatures": {}, "ops": {}, "tensor_types": {}, "const_bytes": {}, "qlinear": []}
    sub_ops = []
    for sg in model.subgraphs:
        ops: dict = {}
        for op in sg.operators or []:
            name = codes[op.opcodeIndex]
            ops[name] = ops.get(name, 0) + 1
            info["ops"][name] = info["ops"].get(name, 0) + 1
            if name == "TFQAT_QLINEAR":
                attrs = flexbuffers.Loads(bytes(op.customOptions)) if op.customOptions is not None else {}
                w = sg.tensors[op.inputs[3]]
                info["qlinear"].append({
                    "attrs": {k: attrs.get(k) for k in ("w_bits", "k", "act_mode")},
                    "w_type": tnames[w.type], "w_shape": [int(d) for d in w.shape],
                    "w_const": bool(w.buffer and buf_len[w.buffer]),
                    "w_bytes": buf_len[w.buffer] if w.buffer else 0})
        sub_ops.append(ops)
        for t in sg.tensors or []:
            tn = tnames[t.type]
            info["tensor_types"][tn] = info["tensor_types"].get(tn, 0) + 1
    seen = set()
    for sg in model.subgraphs:
        for t in sg.tensors or []:
            if t.buffer and buf_len[t.buffer] and t.buffer not in seen:
                seen.add(t.buffer)
                tn = tnames[t.type]
                info["const_bytes"][tn] = info["const_bytes"].get(tn, 0) + buf_len[t.buffer]
    for sd in model.signatureDefs or []:
        sg = model.subgraphs[sd.subgraphIndex]

        def desc(maps):
            return {m.name.decode(): [tnames[sg.tensors[m.tensorIndex].type],
                                      [int(d) for d in (sg.tensors[m.tensorIndex].shapeSignature
                                                        if sg.tensors[m.tensorIndex].shapeSignature is not None
                                                        else sg.tensors[m.tensorIndex].shape)]]
                    for m in maps or []}

        info["signatures"][sd.signatureKey.decode()] = {
            "inputs": desc(sd.inputs), "outputs": desc(sd.outputs), "ops": sub_ops[sd.subgraphIndex]}
    return info


def expected_ops(spec: ModelSpec) -> dict:
    """TFQAT op counts per signature that a correct export of ``spec`` must contain."""
    per_layer = {"TFQAT_ATTN_QK": 1, "TFQAT_ATTN_PV": 1, "TFQAT_QUANTIZE": 3, "TFQAT_QLINEAR": 0}
    total = {k: 0 for k in per_layer}
    for ls in spec.layers:
        n_lin = sum(1 for g, p in ls.linears.items() if isinstance(p, QLinearSpec))
        for k, v in per_layer.items():
            total[k] += v
        total["TFQAT_QLINEAR"] += n_lin
    if spec.head == "int8":
        total["TFQAT_QLINEAR"] += 1
    if spec.rho is not None:
        total["TFQAT_SELECT_BITS"] = spec.cfg.layers
    return total


def check_export(data: bytes, spec: ModelSpec) -> dict:
    """Fail loudly (:class:`ExportError`) unless the flatbuffer is what ``spec`` must produce.

    Checks: the prefill and decode signatures (and prefill_last when present: the same TFQAT
    ops as prefill, its outputs those of prefill with one row of logits); no FAKE_QUANT, no Flex (Select TF) or other foreign custom ops;
    the float model has no custom op at all; the quantized one has exactly the expected
    TFQAT op counts in each signature (a composite the converter inlined instead of fusing
    shows up as missing ops), no integer BATCH_MATMUL / FULLY_CONNECTED (an inlined body),
    every TFQAT_QLINEAR's weights a constant buffer of the right type and packed size
    (uint8 [N, ceil(K/2)] for 4-bit), and no float32 constant as large as a projection.
    """
    info = inspect_tflite(data)
    sigs = info["signatures"]
    for key in ("prefill", "decode"):
        if key not in sigs:
            raise ExportError(f"export check: signature {key!r} missing (got {sorted(sigs)})")
    if "prefill_last" in sigs:
        pre, last = sigs["prefill"], sigs["prefill_last"]
        if set(last["outputs"]) != set(pre["outputs"]) or last["outputs"]["logits"][1][0] != 1:
            raise ExportError("export check: signature prefill_last must return prefill's outputs with "
                              f"logits [1, V], got {last['outputs'].get('logits')}")
    ops = info["ops"]
    if "FAKE_QUANT" in ops:
        raise ExportError("export check: FAKE_QUANT ops in the model (training graph leaked in)")
    foreign = [o for o in ops if o not in builtin_op_names().values() and not o.startswith("TFQAT_")]
    if foreign:
        raise ExportError(f"export check: unexpected custom/Flex ops {sorted(foreign)}")
    custom = [o for o in ops if o.startswith("TFQAT_")]
    if not spec.quantized:
        if custom:
            raise ExportError(f"export check: the float model contains custom ops {custom}")
        return info
    want = expected_ops(spec)
    for key in ("prefill", "decode", "prefill_last"):
        if key not in sigs:  # prefill_last: absent from a pruned-prefill export
            continue
        got = {k: v for k, v in sigs[key]["ops"].items() if k.startswith("TFQAT_")}
        for name, n in want.items():
            if got.get(name, 0) != n:
                raise ExportError(f"export check: signature {key} has {got.get(name, 0)} {name} "
                                  f"ops, expected {n} (a composite was inlined instead of fused?)")
    for q in info["qlinear"]:
        a = q["attrs"]
        n, k = q["w_shape"][0], a["k"]
        if a["w_bits"] == 4:
            ok = q["w_type"] == "uint8" and q["w_shape"] == [n, (k + 1) // 2]
        else:
            ok = q["w_type"] == "int8" and q["w_shape"] == [n, k]
        if not ok or not q["w_const"] or q["w_bytes"] != n * (q["w_shape"][1]):
            raise ExportError(f"export check: TFQAT_QLINEAR weights are {q['w_type']} {q['w_shape']} "
                              f"(constant: {q['w_const']}) for w_bits={a['w_bits']} k={k}; "
                              "int4 weights must be packed uint8 constants")
    # float constants: embeddings, lm_head, norms, scales, RoPE tables, (o_float); no projection
    cfg = spec.cfg
    if spec.head == "int8":
        allowed = spec.head_q.n * (1 if spec.head_q is spec.embed_q else 2) + 2
        allowed += 0 if spec.head_q.bias is None else spec.head_q.n
    else:
        # A tied float table is stored twice: the GATHER table and the head's FULLY_CONNECTED
        # weights (the converter does not share constant buffers between ops).
        allowed = spec.embed.size * (2 if spec.lm_head is None else 1)
        allowed += 0 if spec.lm_head is None else spec.lm_head.size
    allowed += 0 if spec.positions is None else spec.positions.size
    allowed += 2 * cfg.max_positions * cfg.head_dim  # RoPE
    for ls in spec.layers:
        for g, p in ls.linears.items():
            if isinstance(p, QLinearSpec):
                allowed += p.scales.size + (0 if p.bias is None else p.n)
            elif p is not None:
                allowed += p.size
        allowed += 8 * 2 + 4 * cfg.hidden
    allowed += 2 * cfg.hidden + 4096  # final norm, small constants
    got_f32 = info["const_bytes"].get("float32", 0)
    if got_f32 > 4 * allowed * 1.05:
        raise ExportError(f"export check: {got_f32} bytes of float32 constants, expected at most "
                          f"{4 * allowed}; a projection was stored in float")
    return info
