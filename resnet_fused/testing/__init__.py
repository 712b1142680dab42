"""Check that the fused version of *your* model computes what your model computes.

    from resnet_fused.testing import assert_model_matches
    assert_model_matches(my_model, torch.randn(8, 3, 64, 64))   # pytest: fails with the table

`check_model` returns the report instead (`print(report)`, `report.to_dict()`,
`report.ok`). The rule is the package's own (tolerance.py, README.md, Numerics).
Importing this module queries no CUDA, loads neither the C++ extension nor Triton.
"""
from .model_check import assert_model_matches, check_model, unfused
from .report import ModelReport
from .tolerance import (FLOOR, Comparison, assert_near_zero, assert_within, compare,
                        compare_near_zero, errors)

__all__ = ["check_model", "assert_model_matches", "ModelReport", "unfused", "FLOOR",
           "Comparison", "compare", "compare_near_zero", "assert_within",
           "assert_near_zero", "errors"]
