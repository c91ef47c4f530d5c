"""Data-parallel training under torchrun (gloo on CPU): N processes follow the 1-process trajectory at the
same global batch, only rank 0 writes, and a checkpoint written by 2 processes resumes on 1.

The tiny model here has dropout 0: with dropout each rank draws its own masks, so N processes are
statistically, not numerically, equivalent to 1 (see :func:`lmloop.train.train_loop`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmloop.netutil import free_port

MAX_STEPS = 40
BATCH = 30  # 384 train rows: 12 full batches + one of 24 per epoch; 15 examples per rank


def _cmd(nproc: int, *args: str) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "lmloop", *args]
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_port", str(free_port()), "-m", "lmloop", *args,
    ]  # fmt: skip


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1")


def _run(nproc: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    t = time.perf_counter()
    done = subprocess.run(_cmd(nproc, *args), capture_output=True, text=True, timeout=timeout, env=_env())
    done.seconds = time.perf_counter() - t
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _kill_tree(pid: int) -> None:
    """SIGKILL torchrun and its workers (they run in sessions of their own, so killpg would miss them)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # field 4 of /proc/PID/stat: the parent pid
            kids.append(int(stat.parent.name))
    for p in [*kids, pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def _losses(out: Path) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in json.loads((out / "history.json").read_text()) if "loss" in h}


def _assert_same_run(a: Path, b: Path, rtol: float) -> float:
    """Same steps, losses within ``rtol``, weights close; returns the largest relative loss difference."""
    import numpy as np

    la, lb = _losses(a), _losses(b)
    assert la.keys() == lb.keys() and len(la) >= 3
    rel = max(abs(la[s] - lb[s]) / abs(lb[s]) for s in la)
    assert rel < rtol, (la, lb)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wa[k].numpy(), wb[k].numpy(), rtol=1e-3, atol=1e-4, err_msg=k)
    ma, mb = (json.loads((p / "metrics.json").read_text()) for p in (a, b))
    assert ma["train"]["steps"] == mb["train"]["steps"]
    for key in ("examples", "tokens"):  # counted over all ranks
        assert ma["train"].get(key) == mb["train"].get(key), key
    return rel


@pytest.fixture(scope="module")
def nodrop_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny BERT with dropout 0, so 1 and 2 processes compute the same function."""
    out = tmp_path_factory.mktemp("tiny-bert-nodrop")
    for f in tiny_model_dir.iterdir():
        shutil.copy(f, out / f.name)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, nodrop_model_dir, write_toy_csv) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    data = write_toy_csv(root / "data.csv", n=480)
    path = root / "recipe.yaml"
    path.write_text(
        f"""\
name: ddp
out: unused
data:
  path: {data}
  domain_column: domain
model:
  base: {nodrop_model_dir}
  max_length: 32
train:
  max_steps: {MAX_STEPS}
  batch_size: {BATCH}
  lr: 5.0e-3
  patience: 0
  evals_per_epoch: 2
  checkpoint_every: 3
  precision: fp32
  freeze_embeddings: false
  seed: 1
tracking:
  enabled: false
"""
    )
    return path


@pytest.fixture(scope="module")
def one_process(recipe, tmp_path_factory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("one") / "out"
    done = _run(1, "run", str(recipe), "--out", str(out), "--quiet")
    return out, done.seconds


def test_without_nproc_strips_only_the_flag():
    from lmloop.cli import _without_nproc

    assert _without_nproc(["finetune", "--nproc", "2", "--out", "x"]) == ["finetune", "--out", "x"]
    assert _without_nproc(["run", "r.yaml", "--nproc=4", "--quiet"]) == ["run", "r.yaml", "--quiet"]


def test_dist_is_a_noop_in_one_process(monkeypatch):
    import torch

    from lmloop import dist

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist.init() is False
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    t = torch.tensor([3.0])
    assert float(dist.all_reduce_mean(t)) == 3.0 and dist.broadcast_object("x") == "x"
    dist.barrier()
    dist.cleanup()


@pytest.mark.slow
def test_two_processes_follow_one_process(recipe, one_process, tmp_path):
    one, t1 = one_process
    two = tmp_path / "two"
    done = _run(2, "run", str(recipe), "--out", str(two), "--quiet")
    rel = _assert_same_run(two, one, rtol=1e-4)
    s1, s2 = (json.loads((p / "metrics.json").read_text())["train"]["seconds"] for p in (one, two))
    print(
        f"\n1 vs 2 processes: max relative loss difference {rel:.2e}; "
        f"command {t1:.1f} s vs {done.seconds:.1f} s, training {s1:.1f} s vs {s2:.1f} s"
    )
    # rank 0 alone talks and reports
    assert done.stderr.count("[lmloop] data:") == 1
    assert done.stdout.count("test accuracy") == 1
    assert not (two / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_checkpoint_resumes_under_another_world_size(recipe, one_process, tmp_path, before, after):
    one, _ = one_process
    killed = tmp_path / "killed"
    victim = subprocess.Popen(
        _cmd(before, "run", str(recipe), "--out", str(killed), "--quiet"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    state = killed / "checkpoints" / "last" / "state.json"
    deadline = time.monotonic() + 180
    try:
        while True:
            try:
                step = json.loads(state.read_text())["step"]
            except (OSError, ValueError, KeyError):
                step = -1
            if step >= 6:
                break
            if victim.poll() is not None:
                pytest.fail(f"the run ended (rc {victim.returncode}) early: {victim.stderr.read()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint at step >= 6 within 180 s")
            time.sleep(0.005)
        _kill_tree(victim.pid)  # both ranks die mid-run, as on a lost node
        victim.wait(30)
    finally:
        if victim.poll() is None:
            _kill_tree(victim.pid)
            victim.wait()
        victim.stderr.close()
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"
    assert json.loads(state.read_text())["world_size"] == before

    done = _run(after, "run", str(recipe), "--out", str(killed), "--resume", "--quiet")
    at = int(done.stderr.split("resumed from ", 1)[1].split(" at step ", 1)[1].split("/", 1)[0])
    assert 6 <= at < MAX_STEPS
    # no dropout, no masking: the resumed run is the 1-process run up to float summation order
    _assert_same_run(killed, one, rtol=1e-4)


def test_nproc_flag_runs_torchrun_end_to_end(toy_csv, nodrop_model_dir, tmp_path):
    # not marked slow (about 15 s): the one real 2-process run in the quick suite
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmloop",
            "finetune",
            "--nproc",
            "2",
            "--data",
            str(toy_csv),
            "--model",
            str(nodrop_model_dir),
            "--out",
            str(out),
            "--max-steps",
            "4",
            "--batch-size",
            "16",
            "--patience",
            "0",
            "--precision",
            "fp32",
            "--no-freeze-embeddings",
            "--no-track",
            "--quiet",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "torch.distributed.run" in done.stderr
    assert done.stdout.count("test accuracy") == 1  # rank 0 reports once
    for name in ("model.safetensors", "metrics.json", "history.json", "lmloop.json", "report.html"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] == 4


@pytest.mark.slow
def test_clm_pretraining_two_processes_follow_one(tmp_path):
    """The pretraining stage through the same loop: a from-scratch gpt-tiny (dropout 0) on a toy corpus."""
    import random

    rng = random.Random(0)
    words = ["the", "a", "king", "queen", "sword", "river", "night", "day", "old", "young", "runs"]
    paras = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 30))) + "." for _ in range(300)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(paras), encoding="utf-8")
    args = (
        "pretrain", "--corpus", str(corpus), "--preset", "gpt-tiny", "--vocab-size", "300",
        "--seq-len", "32", "--batch-size", "7", "--max-steps", "20", "--eval-every", "10",
        "--eval-blocks", "8", "--precision", "fp32", "--no-track", "--quiet",
    )  # fmt: skip
    _run(1, *args, "--out", str(tmp_path / "one"))
    two = _run(2, *args, "--out", str(tmp_path / "two"))
    assert two.stderr.count("[lmloop] data:") == 1
    rel = _assert_same_run(tmp_path / "two", tmp_path / "one", rtol=1e-4)
    print(f"\npretrain 1 vs 2 processes: max relative loss difference {rel:.2e}")
