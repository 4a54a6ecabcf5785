"""Quickstart: prune MiniLM (real weights) with bevel, check the report, save, reload and export to ONNX."""

import torch

import bevel
from bevel.models import minilm

model = minilm.load_minilm()
ids, mask = minilm.example_inputs(batch_size=4)
cm = bevel.compile(model, passes="cleanup | prune.magnitude(sparsity=0.3)",
                   example_inputs=(ids, mask), calibration=minilm.calibration_batches())
print(cm.report)

out = cm(ids, mask)                                 # same call and output structure as the model
cm.save("out/minilm")                               # manifest + safetensors + program
again = bevel.load("out/minilm")                    # no model class needed
assert torch.equal(again(ids, mask).last_hidden_state, out.last_hidden_state)
print("ONNX written to", cm.export_onnx("out/minilm.onnx"))
