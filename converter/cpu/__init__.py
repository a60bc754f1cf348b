"""`--backend cpu`: LiteRT-LM CPU models built with litert-torch, from the same intake as the GPU path.

The plan (converter/plan.py: checkpoint, config.json, tokenizer, adapter, merges) is made exactly
as for the GPU; then:

- `litert.py` imports litert-torch (and says how to install it when it is missing);
- `graph.py` builds the family's litert-torch model from `ModelFamily.cpu` resized to the
  checkpoint's config.json, and loads the planned tensors into it;
- `rules.py` says which LoRA the graph takes (q/k/v/o, rank 16 or 32), `lora.py` writes its file;
- `export.py` exports the prefill/decode signatures (mask and KV cache as inputs, transposed KV
  layout, LoRA tensors as inputs when an adapter is given) quantized as asked;
- `convert.py` runs these for a `ConversionConfig` with `backend="cpu"`.

A family plugs in with data only: a `CpuGraph` in its family file (`cpu=CpuGraph(...)`, see
converter/models/base.py) naming the litert-torch example config and model class, where slots the
common table in `graph.py` does not cover go, whether the class takes LoRA inputs, and a hook for
config.json settings beyond the sizes; and "cpu" in its `backends`.
"""
