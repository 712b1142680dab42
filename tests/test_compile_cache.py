"""torch.compile's on-disk caches are keyed by the package's code (compile_cache.py), so
an upgraded package never runs graphs compiled against its old op layer."""
import json
import os
import shutil
import subprocess
import sys

import torch._inductor.config as inductor_config

from resnet_fused import compile_cache

HERE = os.path.dirname(os.path.abspath(__file__))


def test_a_cached_graph_is_not_served_to_other_package_code(tmp_path):
    """Fresh process and cache: compile, recompile (hit), recompile with another
    fingerprint (miss: the op layer's code is in the key), back to ours (hit)."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    env.pop("TORCHINDUCTOR_FX_GRAPH_CACHE", None)
    env.pop("TORCHINDUCTOR_AUTOGRAD_CACHE", None)
    res = subprocess.run([sys.executable, os.path.join(HERE, "compile_cache_child.py")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["entry"] == compile_cache.fingerprint()
    assert out["first"]["miss"] > 0 and out["first"]["hit"] == 0, out
    assert out["again"]["hit"] > 0 and out["again"]["miss"] == 0, out
    assert out["other_code"]["miss"] > 0 and out["other_code"]["hit"] == 0, out
    assert out["back"]["hit"] > 0 and out["back"]["miss"] == 0, out


def test_the_fingerprint_follows_every_python_file_and_the_extension(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "backends").mkdir(parents=True)
    (pkg / "__init__.py").write_text('__version__ = "1"\n')
    (pkg / "backends" / "ops.py").write_text("def f(): return 1\n")
    (pkg / "_C.abi3.so").write_bytes(b"\0" * 16)
    (pkg / "__pycache__").mkdir()
    fp = compile_cache.fingerprint.__wrapped__
    base = fp(str(pkg))
    assert fp(str(pkg)) == base
    (pkg / "__pycache__" / "x.pyc").write_bytes(b"compiled")
    (pkg / "notes.txt").write_text("not code")
    assert fp(str(pkg)) == base, "byte code and other files are not the package's code"
    (pkg / "backends" / "ops.py").write_text("def f(): return 2\n")
    edited = fp(str(pkg))
    assert edited != base
    (pkg / "__init__.py").write_text('__version__ = "2"\n')
    assert fp(str(pkg)) != edited
    before = fp(str(pkg))
    st = os.stat(pkg / "_C.abi3.so")
    os.utime(pkg / "_C.abi3.so", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a rebuild
    assert fp(str(pkg)) != before
    shutil.rmtree(pkg)


def test_the_users_entries_stay():
    # Saved and restored by hand: pytest's monkeypatch undoes a torch config module's
    # attribute with delattr, which hides the entry from Inductor for the rest of the
    # process ("... does not exist" in every later compile).
    saved = inductor_config.unsafe_marked_cacheable_functions
    try:
        inductor_config.unsafe_marked_cacheable_functions = {"torch.ops.mine.op": "v3"}
        compile_cache.key_compile_caches()
        assert inductor_config.unsafe_marked_cacheable_functions == {
            "torch.ops.mine.op": "v3", compile_cache.KEY: compile_cache.fingerprint()}
        compile_cache.key_compile_caches()  # idempotent
        assert len(inductor_config.unsafe_marked_cacheable_functions) == 2
    finally:
        inductor_config.unsafe_marked_cacheable_functions = saved
    assert inductor_config.unsafe_marked_cacheable_functions[compile_cache.KEY] == \
        compile_cache.fingerprint()
