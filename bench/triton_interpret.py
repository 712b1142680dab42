"""Whether bench/run.py runs Triton through its interpreter, decided before anything
imports triton.

Triton binds its own jit helpers (tl.sum, tl.max, tl.cdiv: triton.language.standard) to
the interpreter or to the compiler once, when triton.language is first imported, reading
TRITON_INTERPRET at that moment; torch imports it on the way (torch._dynamo does, and
`import resnet_fused` imports torch._dynamo). Switching the variable on after that
leaves those helpers compiled-only, and every interpreted kernel then fails with
"Cannot call @triton.jit'd outside of the scope of a kernel". Hence two steps:

- early(argv): before `import torch`, from argv and the environment alone (no torch),
  set TRITON_INTERPRET=1 when it is unset and the run is certain to be on the CPU;
- settle(on_gpu, ...): once torch has said whether CUDA is usable, correct a wrong
  guess; with triton already imported the only correction is to start the script
  again (os.execv) with the variable set or unset.

A TRITON_INTERPRET the user set is left as it is (the backend then reports itself
unavailable with the reason, resnet_fused/backends/triton/__init__.py).
"""
from __future__ import annotations

import glob
import os
import sys

VAR = "TRITON_INTERPRET"
# Set in the environment of the re-executed process ("set" / "unset": what the parent did
# to TRITON_INTERPRET): its early() guesses no more, so a re-execution never repeats;
# early() removes it, so processes the benchmark starts do not inherit it.
REEXEC_MARK = "RESNET_FUSED_BENCH_REEXEC"


def requested_device(argv) -> str:
    """--device's value in argv (`--device X` or `--device=X`, the last one wins as in
    argparse); "auto" when absent. An abbreviation argparse would accept (`--dev cpu`)
    reads as "auto" here: settle() corrects that guess."""
    dev = "auto"
    for i, a in enumerate(argv):
        if a == "--device" and i + 1 < len(argv):
            dev = argv[i + 1]
        elif a.startswith("--device="):
            dev = a.split("=", 1)[1]
    return dev


def no_gpu_visible(environ=os.environ, platform: str = sys.platform,
                   device_nodes=lambda: glob.glob("/dev/nvidia[0-9]*") + glob.glob("/dev/dxg")
                   ) -> bool:
    """True only when no CUDA device can be usable, judged without torch (asking
    torch.cuda would mean importing torch first): CUDA_VISIBLE_DEVICES hides every
    device ("" or "-1"), macOS (no CUDA), or Linux without an NVIDIA device node
    (/dev/nvidiaN; WSL's /dev/dxg). Elsewhere it cannot tell and says False."""
    cvd = environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None and cvd.strip() in ("", "-1"):
        return True
    if platform == "darwin":
        return True
    if platform.startswith("linux"):
        return not device_nodes()
    return False


def early(argv, environ=os.environ, **visible_kw) -> bool:
    """Set TRITON_INTERPRET=1 when it is unset and the run will be on the CPU (--device
    cpu, or --device auto with no GPU visible). Returns whether it set it. Call before
    importing torch."""
    mark = environ.pop(REEXEC_MARK, None)
    if mark is not None:
        return mark == "set"  # the parent set it (for the banner); nothing to guess
    if VAR in environ:
        return False
    dev = requested_device(argv)
    if dev == "cpu" or (dev == "auto" and no_gpu_visible(environ, **visible_kw)):
        environ[VAR] = "1"
        return True
    return False


def settle(on_gpu: bool, set_here: bool, may_reexec: bool, environ=os.environ,
           modules=sys.modules, execv=os.execv) -> bool:
    """Make TRITON_INTERPRET match the device torch chose: on for the CPU unless the user
    set it, off for a GPU when early() switched it on. When triton is already imported
    and the setting changes, start this script again with it (when may_reexec: run as a
    script, never inside a test process). Returns whether this run set the variable."""
    if not on_gpu and VAR not in environ:
        environ[VAR] = "1"
        set_here = True
    elif on_gpu and set_here:
        del environ[VAR]
        set_here = False
    else:
        return set_here
    if may_reexec and "triton" in modules:
        environ[REEXEC_MARK] = "set" if set_here else "unset"
        print(f"bench/run.py: triton was imported before {VAR} could be "
              f"{'set' if set_here else 'unset'} for the {'CPU' if set_here else 'GPU'}; "
              "starting again with it", file=sys.stderr, flush=True)
        sys.stdout.flush()
        execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    return set_here
