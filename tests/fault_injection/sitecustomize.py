"""Test-only fault injection for tests/test_launch.py; on PYTHONPATH only there.

SLIPSTREAM_TEST_CRASH="RANK:STEP" makes that rank die like a crashed or OOM-killed
process (os._exit, no cleanup) as it starts optimizer step STEP of a fresh run, on
torchrun's first attempt only (TORCHELASTIC_RESTART_COUNT=0), so the restarted
group runs through.
"""
import os

_spec = os.environ.get("SLIPSTREAM_TEST_CRASH", "")
if _spec and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and os.environ.get("RANK") == _spec.split(":")[0]:
    import launcher.loop

    _crash_at = int(_spec.split(":")[1])
    _real_train_step = launcher.loop.train_step
    _started = 0

    def _crashing_train_step(*args, **kwargs):
        global _started
        _started += 1
        if _started == _crash_at:
            os._exit(17)
        return _real_train_step(*args, **kwargs)

    launcher.loop.train_step = _crashing_train_step
