"""The numerics rule, re-exported for the tests and bench/run.py: it lives in the
package (resnet_fused/testing/tolerance.py), where users' CI checks use it too."""
from resnet_fused.testing.tolerance import *  # noqa: F401,F403
from resnet_fused.testing.tolerance import __all__  # noqa: F401
