# %% [markdown]
# # normquant walkthrough: the README's "Python API" section, cell by cell
#
# Run from the checkout's root: `python scripts/walkthrough.py` (about a minute on a laptop CPU).
# `tests/test_walkthrough.py` runs it in the suite and checks that every line of the README's Python API code
# blocks is here, in order, so the README cannot drift from code that runs.

# %% load, quantize (W8A8, no calibration needed), evaluate
import os

import normquant as nq

DATA = "../shared/data"  # offline WikiText-2 / PTB / C4 copies; None reads them through `datasets`
model, tokenizer = nq.load("smollm2-135m")  # a packaged name, a local folder, a hub id or an export
nq.quantize(model, "recipes/w8a8_rtn.yaml", tokenizer=tokenizer)  # a Recipe, a YAML path or a dict
result = nq.evaluate(model, tokenizer, windows=2, seqlen=512, data_dir=DATA)  # WikiText-2 test
print(f"W8A8: ppl {result.ppl:.3f} on the first {result.windows} windows of {result.seqlen} tokens")

# %% export, and the same model in normquant and in transformers + compressed-tensors
path = nq.export(model, "out/walkthrough-w8a8", tokenizer=tokenizer, force=True)
model, tokenizer = nq.load(path)  # what `normquant eval --model out/walkthrough-w8a8` runs
from transformers import AutoModelForCausalLM  # noqa: E402  (the notebook reads top to bottom)

served = AutoModelForCausalLM.from_pretrained(path)  # needs `pip install compressed-tensors`
ids = tokenizer("Quantization keeps the model small.", return_tensors="pt").input_ids
print("same logits:", bool((model(ids).logits == served(ids).logits).all()))

# %% a recipe as a dict, static activations calibrated on data normquant builds from the tokenizer
recipe = {
    "name": "w4a8-static",
    "scheme": {"ignore": ["lm_head"],
               "weights": {"bits": 4, "granularity": "group", "group_size": 64},
               "input_activations": {"bits": 8, "granularity": "tensor"}},  # static per-tensor
    "steps": ["rtn"],
}
model, tokenizer = nq.load("smollm2-135m")
nq.quantize(model, recipe, tokenizer=tokenizer, calibration={"samples": 8, "seqlen": 512}, data_dir=DATA)
print(f"W4A8 static: ppl {nq.evaluate(model, tokenizer, windows=2, seqlen=512, data_dir=DATA).ppl:.3f}")
model.save_pretrained("out/walkthrough-w4a8")  # writes the quantized checkpoint (the same as nq.export)
print("saved:", sorted(os.listdir("out/walkthrough-w4a8")))
