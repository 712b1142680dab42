"""bench/train_ddp.py runs under torchrun: 2 CPU ranks (gloo), synchronized BN in the
fused blocks, a few steps of the D2L ResNet-18 at 32x32."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_ddp_two_cpu_ranks_with_torchrun():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--standalone", os.path.join(ROOT, "bench", "train_ddp.py"),
           "--steps", "2", "--warmup", "1", "--batch", "2", "--image-size", "32"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # CPU and gloo, also on a GPU machine
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "2 ranks on cpu (gloo)" in out, out[-4000:]
    assert "[sync BN] step 2/2" in out and "rank 1:" in out and "overall:" in out, out[-4000:]
