"""Run by tests/test_compile_cache.py in a fresh process with its own
TORCHINDUCTOR_CACHE_DIR: compiles one graph calling a torch-backend op four times (the
second and fourth should be cache hits; the third, with another op-layer fingerprint in
Inductor's config, a miss) and prints the hit/miss counts as JSON."""
import json
import torch
import resnet_fused  # noqa: F401  (keys the caches)
from resnet_fused import compile_cache
from resnet_fused.backends import get
import torch._inductor.config as cfg
from torch._dynamo.utils import counters

get("torch", torch.device("cpu"))
op = torch.ops.resnet_fused_torch.conv_bias_relu

def f(x, w, b):
    return op(x, w, b, 1, 1, 1, 1)

x, w, b = torch.randn(1, 2, 4, 4), torch.randn(2, 2, 3, 3), torch.randn(2)
def compile_once():
    torch._dynamo.reset()
    counters.clear()
    torch.compile(f, fullgraph=True)(x, w, b)
    inductor, aot = counters["inductor"], counters["aot_autograd"]
    return {"hit": inductor["fxgraph_cache_hit"] + aot["autograd_cache_hit"],
            "miss": inductor["fxgraph_cache_miss"] + aot["autograd_cache_miss"]}

out = {"entry": cfg.unsafe_marked_cacheable_functions.get(compile_cache.KEY)}
out["first"] = compile_once()
out["again"] = compile_once()
cfg.unsafe_marked_cacheable_functions = {**cfg.unsafe_marked_cacheable_functions, compile_cache.KEY: "another version"}
out["other_code"] = compile_once()
compile_cache.key_compile_caches()
out["back"] = compile_once()
print(json.dumps(out))
