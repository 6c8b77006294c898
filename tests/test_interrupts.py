"""Ctrl-C during an estimate: the command line exits 130 with one line, never aborts or goes on.

A SIGINT delivered inside the fake-tensor trace used to land in a ``weakref.finalize``
callback (Python drops the ``KeyboardInterrupt``: the estimate went on and exited 0) or in
Python code called back from C++ that cannot unwind (the interpreter aborted with "terminate
called after throwing an instance of 'python_error'", exit -6). The child processes below send
the signal at chosen points of the real trace, so each case is hit every time, not by timing.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from layerscope.process import deferred_interrupts

CONFIG = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
              max_position_embeddings=64, architectures=["LlamaForCausalLM"])

# Runs the command line's main() (what the `layerscope` script calls); at the Nth storage
# finalizer, forward or backward operator of the trace it says "here" on stdout and waits, so
# that the parent's SIGINT lands at that point of the real trace.
CHILD = textwrap.dedent("""
    import sys, time
    from layerscope import cli
    from layerscope.estimate import trace

    where, n = sys.argv[1], int(sys.argv[2])
    calls = [0]

    def wait_at_n():
        calls[0] += 1
        if calls[0] == n:
            print("here", flush=True)
            time.sleep(3)  # the signal arrives now; its handler runs in this frame

    if where == "finalizer":
        free = trace._Tracker._free
        def _free(self, info):
            wait_at_n()
            free(self, info)
        trace._Tracker._free = _free
    else:
        dispatch = trace._Tracker.__torch_dispatch__
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if self.current[1] == where[:3].replace("for", "fwd").replace("bac", "bwd"):
                wait_at_n()
            return dispatch(self, func, types, args, kwargs)
        trace._Tracker.__torch_dispatch__ = __torch_dispatch__
    sys.exit(cli.main(sys.argv[3:]))
""")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "config.json"
    path.write_text(json.dumps(CONFIG))
    return path


@pytest.mark.parametrize("where, n", [("finalizer", 3)])
def test_sigint_during_the_trace_exits_130_with_one_line(config_file: Path, where: str, n: int):
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, where, str(n), "estimate", str(config_file), "--seq-len", "16"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "here\n", proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, (proc.returncode, stderr[-2000:])
    assert stderr.splitlines() == ["layerscope estimate: interrupted"]
    assert stdout == ""


def test_deferred_interrupt_is_delivered_after_the_block_and_the_handler_restored():
    before = signal.getsignal(signal.SIGINT)
    reached = []
    with pytest.raises(KeyboardInterrupt), deferred_interrupts():
        signal.raise_signal(signal.SIGINT)
        reached.append("after the signal")  # the block goes on to its end
    assert reached == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is before


def test_deferred_interrupt_calls_a_custom_handler_once():
    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with deferred_interrupts():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
            assert seen == []
        assert seen == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)
