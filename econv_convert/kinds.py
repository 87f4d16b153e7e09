"""What kind of model an object is, told without importing either backend (a leaf: it imports
nothing of the package, so every module may ask)."""

from __future__ import annotations

from typing import Any


def is_onnx_model(model: Any) -> bool:
    """Whether ``model`` is an ONNX graph (an ``onnx.ModelProto``; ONNX is not imported)."""
    return hasattr(model, "graph") and hasattr(model, "opset_import")
