"""litert-torch's generative layers without TensorFlow.

litert-torch 0.10.0's LoRA layer imports TensorFlow's TFLite flatbuffer schema at import time (to
read LoRA tensors back from a .tflite file); ai_edge_litert ships the same generated schema, so it
stands in for it when TensorFlow is not installed. Call `allow_import()` before importing
`litert_torch.generative`.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

SCHEMA = "tensorflow.lite.python.schema_py_generated"


def allow_import() -> None:
    """Make `from tensorflow.lite.python import schema_py_generated` give ai_edge_litert's schema."""
    if SCHEMA in sys.modules or importlib.util.find_spec("tensorflow") is not None:
        return
    from ai_edge_litert import schema_py_generated

    names = ("tensorflow", "tensorflow.lite", "tensorflow.lite.python")
    for name in names:
        package = types.ModuleType(name)
        package.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        package.__path__ = []
        sys.modules[name] = package
    for parent, child in zip((*names, SCHEMA)[:-1], (*names[1:], SCHEMA)):
        sys.modules[parent].__dict__[child.rsplit(".", 1)[1]] = sys.modules.get(child, schema_py_generated)
    sys.modules[SCHEMA] = schema_py_generated
