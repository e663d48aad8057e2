"""`llamacpu convert` interrupted by SIGINT or SIGKILL never leaves a partial OUT.

The converter writes `.OUT.tmp-PID-XXXXXXXX` beside OUT and renames it over OUT at the
end. Ctrl-C (SIGINT) deletes the temporary file and exits 130 with one line on stderr;
a killed process (SIGKILL) cannot clean up, so its temporary file stays until the
next conversion to the same OUT removes it. An existing OUT (--force) is untouched
until the new file is complete.
"""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import default_sigint
from llamacpu.format import read_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, assets):
    """A random tiny64 checkpoint with 48 layers: 150 MB of BF16 that take about a second to
    convert to q8_0 on a busy 2-core machine (the temporary file is written for most of it)."""
    from make_checkpoint import write_checkpoint
    return write_checkpoint(tmp_path_factory.mktemp("ckpt48"), preset="tiny64", layers=48, seed=3,
                            tokenizer_json=assets["llama3.2-tokenizer.json"],
                            tokenizer_config=assets["llama3.2-tokenizer_config.json"])


def temps(out):
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-"))


def start_convert(ckpt, out, *flags):
    return subprocess.Popen([sys.executable, "-m", "llamacpu", "convert", str(ckpt), str(out), "--type", "q8_0",
                             *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)


def wait_until_writing(proc, out, min_bytes=1 << 20, timeout=120):
    """Wait until the temporary file holds tensor data (the converter is writing)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for p in temps(out):
            try:
                if p.stat().st_size >= min_bytes:
                    return p
            except FileNotFoundError:
                pass
        if proc.poll() is not None:
            pytest.fail(f"convert finished (rc {proc.returncode}) before it was interrupted: "
                        f"{proc.stderr.read()}")
        time.sleep(0.002)
    proc.kill()
    pytest.fail("the converter never started writing")


def test_sigint_while_writing(ckpt, tmp_path):
    out = tmp_path / "m.lcpu"
    proc = start_convert(ckpt, out)
    tmp = wait_until_writing(proc, out)
    assert tmp.parent == out.parent and tmp.name.startswith(f".m.lcpu.tmp-{proc.pid}-")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "llamacpu convert: interrupted" and "Traceback" not in err
    assert not out.exists()
    assert temps(out) == []  # Ctrl-C cleans up after itself


@pytest.mark.slow
def test_sigint_with_force_keeps_the_old_file(ckpt, tmp_path):
    out = tmp_path / "m.lcpu"
    out.write_bytes(b"the previous model")
    proc = start_convert(ckpt, out, "--force")
    wait_until_writing(proc, out)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert out.read_bytes() == b"the previous model"
    assert temps(out) == []


@pytest.mark.slow
def test_sigkill_leaves_no_partial_out_and_the_next_run_cleans_up(ckpt, tmp_path):
    out = tmp_path / "m.lcpu"
    proc = start_convert(ckpt, out)
    wait_until_writing(proc, out)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    left = temps(out)  # a killed process cannot delete its file: it has a recognisable name
    assert [p.name.split("-")[1] for p in left] == [str(proc.pid)]
    # a live conversion's temporary file must never be touched by another conversion
    live = out.parent / f".m.lcpu.tmp-{os.getpid()}-keepme"
    live.write_bytes(b"busy")
    r = subprocess.run([sys.executable, "-m", "llamacpu", "convert", str(ckpt), str(out), "--type", "q8_0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "left by an interrupted conversion" in r.stderr
    assert temps(out) == [live]
    with read_model(out) as m:
        assert m.meta["provenance"]["type"] == "q8_0"


@pytest.mark.slow
def test_sigkill_with_force_keeps_the_old_file(ckpt, tmp_path):
    out = tmp_path / "m.lcpu"
    out.write_bytes(b"the previous model")
    proc = start_convert(ckpt, out, "--force", "--quiet")
    wait_until_writing(proc, out)
    proc.kill()
    proc.communicate(timeout=60)
    assert out.read_bytes() == b"the previous model"
