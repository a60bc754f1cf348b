"""Import litert-torch for the CPU backend, without TensorFlow.

litert-torch's LoRA module (`litert_torch.generative.layers.lora`, imported by its model
builders) imports `tensorflow.lite.python.schema_py_generated` at import time, only for its own
LoRA flatbuffer writer, which we do not use. `ai_edge_litert.schema_py_generated` is the same
generated TFLite schema module, so while that one import runs, `sys.modules` maps the TensorFlow
names to it; afterwards the stand-ins are removed again, so no other library sees a fake
`tensorflow` package.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from ..errors import ConversionError

INSTALL_HINT = "--backend cpu needs litert-torch: pip install 'lora-convert[cpu]'"
_TF_PACKAGES = ("tensorflow", "tensorflow.lite", "tensorflow.lite.python")
_TF_SCHEMA = "tensorflow.lite.python.schema_py_generated"


def _import_lora_module() -> Any:
    import torch._dynamo  # noqa: F401  (imported before the stand-ins: it probes installed packages)
    from ai_edge_litert import schema_py_generated

    stand_ins: dict[str, Any] = {}
    for name in _TF_PACKAGES:
        stand_ins[name] = types.ModuleType(name)
        stand_ins[name].__path__ = []
    stand_ins[_TF_SCHEMA] = schema_py_generated
    added = [name for name in stand_ins if name not in sys.modules]
    sys.modules.update({name: stand_ins[name] for name in added})
    try:
        return importlib.import_module("litert_torch.generative.layers.lora")
    finally:
        for name in added:
            sys.modules.pop(name, None)


def litert_torch() -> types.SimpleNamespace:
    """The litert-torch modules the CPU backend uses, or a ConversionError saying how to install it."""
    try:
        import litert_torch  # noqa: F401
        from litert_torch.generative.layers import model_config
    except ImportError as error:
        raise ConversionError(f"{INSTALL_HINT} ({error})") from None
    from litert_torch import _config

    _config.config.show_progress = False  # its step-by-step log; lora-convert reports progress itself
    lora = _import_lora_module()
    from litert_torch._convert import interface
    from litert_torch.generative.layers import kv_cache
    from litert_torch.generative.utilities import converter, export_config

    return types.SimpleNamespace(cfg=model_config, lora=lora, kv_cache=kv_cache, converter=converter,
                                 export_config=export_config, interface=interface)


def example(module: str) -> Any:
    """A module of `litert_torch.generative.examples`, e.g. "gemma.gemma1"."""
    litert_torch()
    return importlib.import_module(f"litert_torch.generative.examples.{module}")
