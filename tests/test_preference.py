"""backend="auto": measured winners per card and shape, defaults elsewhere."""
import json

import torch

from resnet_fused.backends import preference


def _measured_on_h200(monkeypatch, tmp_path, entry):
    """measured.json holding `entry` (an H200 winner), read on a pretended H200."""
    path = tmp_path / "measured.json"
    path.write_text(json.dumps({"format": 1, "entries": [dict(entry, gpu="H200")]}))
    monkeypatch.setattr(preference, "MEASURED_PATH", str(path))
    preference.measured.cache_clear()
    monkeypatch.setattr(preference, "_device_name", lambda i: "NVIDIA H200")


def test_measured_winner_first_then_defaults(monkeypatch, tmp_path):
    _measured_on_h200(monkeypatch, tmp_path, {"mode": "eval", "dtype": "bfloat16",
                                              "shape": "64-64-56-56-1", "backend": "triton"})
    cuda = torch.device("cuda", 0)
    key = preference.shape_key((128, 64, 56, 56), 64, 1)
    assert key == "64-64-56-56-1"
    assert preference.preferred_order(cuda, torch.bfloat16, False, key)[0] == "triton"
    # Another mode, dtype, shape or card: the default order.
    default_eval = preference.CUDA_DEFAULT["eval"]
    assert preference.preferred_order(cuda, torch.bfloat16, True, key) == preference.CUDA_DEFAULT["train"]
    assert preference.preferred_order(cuda, torch.float16, False, key) == default_eval
    assert preference.preferred_order(cuda, torch.bfloat16, False, "1-2-3-4-1") == default_eval
    monkeypatch.setattr(preference, "_device_name", lambda i: "NVIDIA A100")
    assert preference.preferred_order(cuda, torch.bfloat16, False, key) == default_eval
    preference.measured.cache_clear()


def test_cpu_order_and_missing_table(monkeypatch, tmp_path):
    monkeypatch.setattr(preference, "MEASURED_PATH", str(tmp_path / "absent.json"))
    preference.measured.cache_clear()
    assert preference.measured() == {}
    assert preference.preferred_order(torch.device("cpu"), torch.float32, True) == ("eager",)
    preference.measured.cache_clear()


def test_compiled_choice_matches_eager(monkeypatch, tmp_path):
    """auto decides the same under torch.compile as in eager (the measured table is read
    at trace time, not skipped)."""
    _measured_on_h200(monkeypatch, tmp_path, {"mode": "train", "dtype": "float16",
                                              "shape": "128-128-28-28-1", "backend": "triton"})
    cuda = torch.device("cuda", 0)
    key = "128-128-28-28-1"

    def pick(x):
        order = preference.preferred_order(cuda, torch.float16, True, key)
        return x + 1 if order[0] == "triton" else x - 1

    eager = preference.preferred_order(cuda, torch.float16, True, key)
    assert eager[0] == "triton"
    torch._dynamo.reset()
    out = torch.compile(pick, fullgraph=True, backend="eager")(torch.zeros(2))
    assert out.tolist() == [1.0, 1.0]
    preference.measured.cache_clear()
