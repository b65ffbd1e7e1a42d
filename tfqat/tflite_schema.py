"""Names from the TFLite flatbuffer schema, without TensorFlow: the file identifier, op names and
tensor type names.

One reading of a ``.tflite``'s op codes for :mod:`tfqat.runtime` (which must not import
TensorFlow) and the export checks (:mod:`tfqat.export.checks`), so both name an op the same way.
"""

from __future__ import annotations

import functools


def is_tflite(data: bytes) -> bool:
    """True when ``data`` carries the TFLite file identifier ``TFL3`` (bytes 4..8)."""
    return len(data) >= 8 and data[4:8] == b"TFL3"


@functools.cache
def builtin_op_names() -> dict:
    """``{BuiltinOperator code: name}`` (``"FULLY_CONNECTED"``, ``"CUSTOM"``, ...)."""
    from ai_edge_litert import schema_py_generated as schema

    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


@functools.cache
def tensor_type_names() -> dict:
    """``{TensorType code: lower-case name}`` (``"float32"``, ``"int8"``, ...)."""
    from ai_edge_litert import schema_py_generated as schema

    return {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}


def op_name(builtin_code: int, deprecated_builtin_code: int, custom_code: bytes | None) -> str:
    """The name of one operator code: its custom code for a CUSTOM op (``"TFQAT_QLINEAR"``), else
    the builtin's name. Old files set only the int8 ``deprecated_builtin_code`` (``builtin_code``
    then reads 0), newer ones both, and codes above 127 only ``builtin_code``: the max is the code."""
    from ai_edge_litert import schema_py_generated as schema

    code = max(builtin_code, deprecated_builtin_code)
    if code == schema.BuiltinOperator.CUSTOM:
        return (custom_code or b"").decode()
    return builtin_op_names().get(code, str(code))
