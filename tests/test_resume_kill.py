"""``kill -9`` in the middle of ``lmloop run``, then ``--resume``: the run finishes at the planned step and
ends exactly where an uninterrupted run of the same recipe ends (same weights, same test metrics)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

MAX_STEPS = 60


def _recipe(path: Path, data: Path, model: Path) -> Path:
    path.write_text(
        f"""\
name: resume-kill
out: unused
data:
  path: {data}
  domain_column: domain
model:
  base: {model}
  max_length: 32
train:
  max_steps: {MAX_STEPS}
  batch_size: 32
  lr: 5.0e-3
  patience: 0
  evals_per_epoch: 2
  checkpoint_every: 5
  precision: fp32
  seed: 1
tracking:
  enabled: false
"""
    )
    return path


def _step(state: Path) -> int:
    try:
        return json.loads(state.read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1  # not there yet, or mid-swap


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


@pytest.mark.slow
def test_kill_9_then_resume_is_exact(
    tmp_path, toy_csv, write_toy_csv, tiny_model_dir, lmloop_cmd, run_lmloop
):
    data = write_toy_csv(tmp_path / "data.csv", n=480)  # 384 train rows: 12 steps of 32 per epoch
    recipe = _recipe(tmp_path / "recipe.yaml", data, tiny_model_dir)
    killed, straight = tmp_path / "killed", tmp_path / "straight"

    # the uninterrupted reference runs alongside (one thread each)
    ref = subprocess.Popen(
        lmloop_cmd("run", str(recipe), "--out", str(straight), "--quiet"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    victim = subprocess.Popen(
        lmloop_cmd("run", str(recipe), "--out", str(killed), "--quiet"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    state = killed / "checkpoints" / "last" / "state.json"
    deadline = time.monotonic() + 180
    try:
        while _step(state) < 10:
            if victim.poll() is not None:
                pytest.fail(
                    f"the run ended (rc {victim.returncode}) before step 10: {victim.stderr.read()[-2000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint at step >= 10 within 180 s")
            time.sleep(0.005)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(30)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
        victim.stderr.close()
    assert victim.returncode == -signal.SIGKILL
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"

    done = run_lmloop("run", str(recipe), "--out", str(killed), "--resume", "--quiet", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from " in done.stderr
    at = int(done.stderr.split("resumed from ", 1)[1].split(" at step ", 1)[1].split("/", 1)[0])
    assert 10 <= at < MAX_STEPS
    assert f"at step {at}/{MAX_STEPS}" in done.stderr

    ref_out, ref_err = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_err[-3000:]

    m_killed = json.loads((killed / "metrics.json").read_text())
    m_straight = json.loads((straight / "metrics.json").read_text())
    assert m_killed["train"]["steps"] == m_straight["train"]["steps"] == MAX_STEPS
    assert m_killed["train"]["examples"] == m_straight["train"]["examples"] == MAX_STEPS * 32
    assert m_killed["train"]["best_step"] == m_straight["train"]["best_step"]
    assert not (killed / "checkpoints").exists()

    # exact resume: same weights and the same test metrics as the uninterrupted run
    wk, ws = _weights(killed), _weights(straight)
    assert wk.keys() == ws.keys()
    worst = max(float((wk[k] - ws[k]).abs().max()) for k in ws)
    assert worst < 1e-6
    for key in ("accuracy", "macro_f1", "nll", "brier", "ece"):
        assert m_killed["test"][key] == pytest.approx(m_straight["test"][key], abs=1e-6), key
    hk = json.loads((killed / "history.json").read_text())
    hs = json.loads((straight / "history.json").read_text())
    assert hk == hs
