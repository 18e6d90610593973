"""Issue 10 probe: rotated W4A4 RTN (dynamic per-token A4, no clip), normquant's weight grid absmax/7 vs
compressed-tensors' absmax/7.5 (+absmax clipped to 7), first 4 WikiText-2 windows, same model and rotation.

    python scripts/probe_weight_grid.py ../shared/data > eval/outliers_weight_grid_probe.json   # last line
"""
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import normquant.quant.primitives as prim  # noqa: E402
from normquant.data.text import tokenize_eval  # noqa: E402
from normquant.evaluation.perplexity import evaluate_perplexity  # noqa: E402
from normquant.evaluation.records import environment  # noqa: E402
from normquant.models.loading import load_model  # noqa: E402
from normquant.pipeline.run import quantize  # noqa: E402
from normquant.recipe import parse_recipe  # noqa: E402

orig = prim.qparams_from_range
def ct_grid(xmin, xmax, spec):
    s, z = orig(xmin, xmax, spec)
    if spec.symmetric and not spec.dynamic:  # weights (and static symmetric inputs: none in this recipe)
        s = s * spec.qmax / ((2 ** spec.bits - 1) / 2)
    return s, z

model, tok = load_model("smollm2-135m")
ids = tokenize_eval(tok, "wikitext2", "test", sys.argv[1])
r = parse_recipe({"scheme": {"ignore": ["lm_head"], "weights": {"bits": 4, "symmetric": True, "granularity": "channel"},
                  "input_activations": {"bits": 4, "symmetric": True, "granularity": "token", "dynamic": True}},
                  "steps": [{"rotate": {"seed": 0}}, "rtn"]})
out = {"environment": environment(), "windows": 4, "rows": {}}
for name, fn in (("absmax/7 (normquant)", orig), ("absmax/7.5 (compressed-tensors)", ct_grid)):
    prim.qparams_from_range = fn
    m = quantize(copy.deepcopy(model), r, None, progress=False)
    ppl = evaluate_perplexity(m, ids, seqlen=2048, windows=4, progress=False).ppl
    out["rows"][name] = ppl
    print(name, ppl, file=sys.stderr, flush=True)
prim.qparams_from_range = orig
print(json.dumps(out))
