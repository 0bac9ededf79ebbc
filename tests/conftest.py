"""Test-session setup for the Triton kernels on machines without a GPU.

Without CUDA, Triton kernels run in its CPU interpreter. TRITON_INTERPRET=1 must be
set before triton is first imported, so it is set here (conftest runs before the
test modules import kernels.ops); an explicit value in the environment wins.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _fix_interpreter_index() -> None:
    """Apply the upstream fix of triton-lang/triton#9171 to the interpreter.

    With numpy >= 2.4, Triton 3.6's interpreter turns a scalar into a Python int with
    int() on a 1-element array, which numpy now refuses: every loop whose bound is a
    runtime value (`for i in range(pid, n, step)`) raises TypeError. Compiled Triton
    is unaffected. The fix is the one merged upstream: squeeze before int().
    """
    try:
        from triton.runtime import interpreter
    except ImportError:  # triton missing: the kernel tests skip themselves
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_index_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        # scope restores in LIFO order, so this second patch unwinds cleanly.
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._index_fixed = True
    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_interpreter_index()
