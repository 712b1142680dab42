"""torch.compile's on-disk caches keyed by this package's code.

Inductor's FX graph cache and the AOTAutograd cache key a compiled graph by its
traced graph, configs and versions, but a custom op enters that graph by name only:
its fake (output shapes and strides), its registered autograd (the backward formula
AOTAutograd traces into the backward graph) and the Python around it are not in the
key. After an upgrade of this package, a cache left on disk (by default under
/tmp/torchinductor_<user>) would serve graphs compiled against the old op layer: a
backward traced from the old formula, buffers planned from the old fakes.

So the package puts a fingerprint of its code into Inductor's config (at the import of
the op layer, ops.py, before any op exists), which both cache keys include: torch._inductor.config.unsafe_marked_cacheable_functions, the documented
"function name -> cache key" map whose value "changes the resulting FXGraphCache key"
(torch 2.11 to 2.14). The entry's name is no function, so it marks nothing cacheable;
entries of the user's are kept. The fingerprint hashes the source of every Python file
of the package (op bodies, fakes, autograd, Triton kernels, schemas; __init__.py holds
the version) and the size and modification time of the compiled extension (hashing its 10
MB would cost ~20 ms at every import; a rebuild changes its time).
"""
from __future__ import annotations

import functools
import hashlib
import os

KEY = "resnet_fused.op_layer"
_ROOT = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=None)
def fingerprint(root: str = _ROOT) -> str:
    """sha256 of the package's code under `root` (see the module docstring)."""
    h = hashlib.sha256(b"resnet_fused\n")
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root).encode()
            if name.endswith(".py"):
                with open(path, "rb") as f:
                    h.update(b"py " + rel + b"\n" + f.read())
            elif name.endswith((".so", ".pyd")):
                st = os.stat(path)
                h.update(b"ext " + rel + f" {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def key_compile_caches() -> None:
    """Put the fingerprint into torch.compile's cache keys (idempotent)."""
    import torch._inductor.config as inductor_config

    current = dict(getattr(inductor_config, "unsafe_marked_cacheable_functions", None) or {})
    fp = fingerprint()
    if current.get(KEY) != fp:
        current[KEY] = fp
        inductor_config.unsafe_marked_cacheable_functions = current
