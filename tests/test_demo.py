"""``lmloop demo``: the data slicing (no evaluation text in the replayed stream, domains as the recipe says),
the shipped recipe, the drift reference fine-tuning writes, and (slow) ``lmloop demo --quick`` end to end:
the loop promoted and the server swapped to the new version, which then answered requests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lmloop.config import DemoConfig, load_recipe
from lmloop.data import PreparedData
from lmloop.demo import QUICK, build_domain_data

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "domain-shift.yaml"


def _prepared(n: int = 30) -> PreparedData:
    def frame(split: str) -> pd.DataFrame:
        rows = [
            [f"{split} {dom} text {i}", "pos" if i % 2 else "neg", dom]
            for dom in ("movies", "amazon", "tweets", "nyt")
            for i in range(n)
        ]
        return pd.DataFrame(rows, columns=["text", "label", "domain"])

    return PreparedData(frame("train"), frame("validation"), frame("test"), ["neg", "pos"], {}, {}, "toy")


def test_domain_slices_keep_evaluation_text_out_of_the_stream():
    p = _prepared()
    cfg = DemoConfig(baseline=10, eval_limit=20)
    f = build_domain_data(p, cfg, seed=1)
    assert set(f["champion_train"]["domain"]) == {"movies"} and len(f["champion_train"]) == 30
    assert set(f["champion_validation"]["domain"]) == {"movies"} and len(f["champion_validation"]) == 20
    assert set(f["golden_test"]["domain"]) == {"movies"}
    assert set(f["stream"]["domain"]) == {"amazon", "tweets"} and len(f["stream"]) == 60
    assert set(f["eval_test"]["domain"]) == {"movies", "amazon", "tweets"}  # nyt: neither source nor shift
    assert f["eval_test"].groupby("domain").size().max() == 20
    assert set(f["oracle_train"]["domain"]) == {"movies", "amazon", "tweets"}
    # the stream is shift-domain *training* text, shuffled; no validation/test text is ever replayed
    held_out = set(p.validation["text"]) | set(p.test["text"])
    assert not set(f["stream"]["text"]) & held_out
    assert set(f["stream"]["text"]) <= set(p.train["text"])
    assert list(f["stream"]["text"]) != sorted(f["stream"]["text"])
    # the baseline is held-out source text the champion's validation did not take; after_swap is shift text
    assert set(f["baseline"]["domain"]) == {"movies"} and len(f["baseline"]) == 10
    assert not set(f["baseline"]["text"]) & set(f["champion_validation"]["text"])
    assert not set(f["baseline"]["text"]) & set(p.train["text"])
    assert set(f["after_swap"]["domain"]) == {"amazon", "tweets"}
    assert not set(f["after_swap"]["text"]) & (set(f["stream"]["text"]) | set(p.test["text"]))
    # seeded: the same slices every time
    g = build_domain_data(p, cfg, seed=1)
    assert all(f[k].equals(g[k]) for k in f)


def test_limits_and_unknown_domains():
    f = build_domain_data(_prepared(), DemoConfig(train_limit=20, stream_limit=25, baseline=0), seed=0)
    assert len(f["champion_train"]) == 20 and len(f["stream"]) == 25 and f["baseline"].empty
    with pytest.raises(Exception, match="not in the data"):
        build_domain_data(_prepared(), DemoConfig(shift_domains=["reddit"]))
    with pytest.raises(ValueError, match="overlap"):
        DemoConfig(source_domains=["movies"], shift_domains=["movies"])


def test_shipped_recipe_and_quick_overrides_validate():
    r = load_recipe(RECIPE)
    assert r.demo.source_domains == ["movies"] and r.demo.shift_domains == ["amazon", "tweets"]
    assert r.loop.triggers.drift and r.drift.reference and r.loop.model_name
    q = load_recipe(RECIPE, QUICK)
    assert q.demo.oracle is False and q.demo.train_limit == 400


def test_finetune_writes_a_drift_reference(tmp_path, tiny_model_dir, toy_csv):
    from lmloop.cli import main
    from lmloop.mlops.drift import Reference, detect

    out = tmp_path / "m"
    code = main(["finetune", "--data", str(toy_csv), "--model", str(tiny_model_dir), "--epochs", "1",
                 "--out", str(out), "--no-track", "--quiet"])  # fmt: skip
    assert code == 0
    ref = Reference.load(out / "drift_reference.npz")
    # a local base model: the fine-tuned model's own encoder (cheap), recorded by its path
    assert ref.embedder == str(out.resolve()) and ref.embeddings is not None
    assert sum(ref.label_counts.values()) == len(
        [ln for ln in (out / "validation.jsonl").open() if ln.strip()]
    )
    rep = detect(ref, [f"text number {i}" for i in range(30)])
    assert {t.group for t in rep.tests} >= {"text", "embedding"}
    # drift.reference: false writes none
    off = tmp_path / "off"
    code = main(["run", str(_recipe(tmp_path, toy_csv, tiny_model_dir, off)), "--quiet"])
    assert code == 0 and (off / "metrics.json").is_file() and not (off / "drift_reference.npz").exists()


def _recipe(tmp_path: Path, toy_csv: Path, model: Path, out: Path) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(
        f"out: {out}\ndata: {{path: {toy_csv}}}\nmodel: {{base: {model}}}\n"
        "train: {epochs: 1}\ntracking: {enabled: false}\ndrift: {reference: false}\n"
    )
    return p


@pytest.mark.slow
def test_quick_demo_promotes_and_the_server_swaps(tmp_path, minilm_dir):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "lmloop", "demo", "--quick", "--out", str(out), "--recipe", str(RECIPE)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads((out / "demo.json").read_text())
    assert r["promoted"] and r["swapped"]
    turn = r["turn"]
    assert turn["decision"] == "promoted" and turn["registry"]["after"] == turn["registry"]["before"] + 1
    assert turn["triggers"] and not turn["forced"]  # started by its own triggers
    new = f"v{turn['registry']['after']}"
    assert r["swap"]["version"] == new and r["swap"]["probe_versions"] == [new] * 3
    assert new in r["timeline"][-1]["versions"]  # the traffic after the swap was answered by it
    assert any((s.get("drift") or {}).get("drifted") for s in r["timeline"])
    assert r["server"]["exit_code"] == 0
    assert [v["parent"] for v in r["lineage"]["versions"]] == [None, 1]
    assert (out / "demo.html").stat().st_size > 10_000 and "Lineage" in (out / "demo.html").read_text()
    assert not (out / "champion").exists()  # without --keep only the reports stay
