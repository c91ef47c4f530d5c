"""The gated retraining loop: gate logic on synthetic metrics, the data version (leakage, dedupe, a stable
holdout), triggers, and real turns on a toy task with tiny models: feedback that teaches a new pattern is
promoted (with lineage and an audited alias move), flipped feedback is kept out, and a crash at any step
resumes to exactly one registered and promoted version.

The champion is the tiny BERT fine-tuned once per module on the toy data; each real turn fine-tunes a
challenger for a few dozen steps. Every test has its own MLflow store, prediction log and $LMLOOP_HOME.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from lmloop.config import LoopGatesConfig, LoopTriggersConfig, recipe_from_dict
from lmloop.errors import ConfigError, DataError
from lmloop.mlops.loop import (
    build_data_version,
    check_triggers,
    collect_feedback,
    compute_gates,
    decide,
    holdout_bucket,
    run_turn,
)


# ------------------------------------------------------------------------------------------ gate logic
def _m(acc, ece=0.05, n=100, domains=None):
    out = {"accuracy": acc, "ece": ece, "n": n}
    if domains:
        out["per_domain"] = {d: {"n": 10, "accuracy": a} for d, a in domains.items()}
    return out


CHAMP = {"golden": _m(0.90, domains={"a": 0.9, "b": 0.9}), "holdout": _m(0.60, n=50)}
GOOD = {"golden": _m(0.895, domains={"a": 0.9, "b": 0.89}), "holdout": _m(0.80, n=50)}
ALL_GATES = LoopGatesConfig(
    max_regression=0.01, min_improvement=0.0, min_holdout=20, max_ece=0.1, min_accuracy=0.8,
    max_domain_regression=0.05,
)  # fmt: skip


def test_a_better_challenger_passes_every_gate():
    gates = compute_gates(CHAMP, GOOD, ALL_GATES)
    assert [g.name for g in gates] == [
        "no_regression", "improvement", "calibration", "min_accuracy", "domain_regression",
    ]  # fmt: skip
    assert all(g.passed for g in gates)
    reg = gates[0]
    assert reg.value == pytest.approx(-0.005) and reg.threshold == -0.01
    assert decide(gates, 1) == (True, "all 5 gates passed (no_regression, improvement, calibration, "
                                      "min_accuracy, domain_regression)")  # fmt: skip


@pytest.mark.parametrize(
    "change, failing",
    [
        ({"golden": _m(0.88, domains={"a": 0.9, "b": 0.9})}, "no_regression"),  # 2 points worse on golden
        ({"holdout": _m(0.59, n=50)}, "improvement"),  # worse on the new feedback
        ({"holdout": _m(0.99, n=5)}, "improvement"),  # too few holdout rows to judge
        ({"golden": _m(0.90, ece=0.2, domains={"a": 0.9, "b": 0.9})}, "calibration"),
        ({"golden": _m(0.90, domains={"a": 0.95, "b": 0.80})}, "domain_regression"),  # one domain collapses
    ],
)
def test_each_gate_alone_keeps_the_champion(change, failing):
    challenger = {**GOOD, **change}
    gates = compute_gates(CHAMP, challenger, ALL_GATES)
    assert [g.name for g in gates if not g.passed] == [failing]
    promote, reason = decide(gates, 3)
    assert not promote and reason.startswith("kept champion v3: failed " + failing)


def test_min_accuracy_gate_alone():
    weak = {"golden": _m(0.5), "holdout": _m(0.7, n=50)}
    champ = {"golden": _m(0.5), "holdout": _m(0.6, n=50)}
    gates = compute_gates(champ, weak, ALL_GATES)
    assert [g.name for g in gates if not g.passed] == ["min_accuracy", "domain_regression"]  # no domains
    assert "no domains" in gates[-1].detail


def test_a_worse_model_is_never_promoted():
    # worse on both the golden set and the feedback, whatever the tolerances short of switching gates off
    worse = {"golden": _m(0.80), "holdout": _m(0.50, n=50)}
    for tol in (0.0, 0.01, 0.05):
        cfg = LoopGatesConfig(max_regression=tol, min_improvement=0.0, max_ece=None)
        assert decide(compute_gates(CHAMP, worse, cfg), 1)[0] is False
    # equal is not worse: ties pass at min_improvement 0.0 (floating noise included)
    tie = {"golden": _m(0.9 - 1e-12), "holdout": _m(0.6, n=50)}
    assert decide(compute_gates(CHAMP, tie, LoopGatesConfig(max_regression=0.0)), 1)[0] is True


def test_without_a_champion_only_absolute_gates_apply():
    gates = compute_gates(None, {"golden": _m(0.9, ece=0.3), "holdout": None}, LoopGatesConfig())
    assert {g.name: g.passed for g in gates} == {
        "no_regression": True,
        "improvement": True,
        "calibration": False,
    }
    assert decide(gates, None)[1].startswith("kept no champion: failed calibration")


# ------------------------------------------------------------------------------------------ data version
def _base():
    from lmloop.data import PreparedData

    def frame(rows):
        return pd.DataFrame(rows, columns=["text", "label", "domain"])

    train = frame([["good film", "pos", "a"], ["bad film", "neg", "a"], ["fine day", "pos", "b"]])
    val = frame([["so so", "neg", "a"]])
    test = frame([["lovely plot", "pos", "b"], ["awful plot", "neg", "b"]])
    return PreparedData(train, val, test, ["neg", "pos"], {}, {}, "toy")


def _fb(rows):
    return pd.DataFrame(
        [
            {"id": f"P{i:03d}", "text": t, "label": lab, "feedback_id": i + 1}
            for i, (t, lab) in enumerate(rows)
        ]
    )


def test_data_version_drops_leakage_duplicates_conflicts_and_unknown_labels():
    fb = _fb([
        ("Lovely plot!", "pos"),  # the golden test set, normalised: leakage
        ("so so", "pos"),  # the validation set: leakage too
        ("GOOD film", "pos"),  # already in train, same label
        ("bad film", "pos"),  # in train with another label: the curated base wins
        ("new thing", "pos"),
        ("new  thing.", "pos"),  # a normalised duplicate of the one above
        ("torn", "pos"),
        ("torn", "neg"),  # feedback that disagrees with itself
        ("odd", "meh"),  # a label the model does not have
        *[(f"fresh text {i}", "neg" if i % 2 else "pos") for i in range(40)],
    ])  # fmt: skip
    v = build_data_version(_base(), fb, holdout=0.25)
    s = v["stats"]
    assert (s["leakage"], s["duplicate_of_train"], s["conflicts_with_train"]) == (2, 1, 1)
    assert (s["duplicate_feedback"], s["conflicting_feedback"], s["unknown_label"]) == (1, 2, 1)
    assert "Lovely plot!" in s["leakage_examples"]
    kept = 41  # "new thing" + 40 fresh
    assert s["feedback_train"] + s["feedback_holdout"] == kept and 3 <= s["feedback_holdout"] <= 20
    assert len(v["train"]) == 3 + s["feedback_train"]
    assert set(v["train"]["domain"]) == {"a", "b", "feedback"}
    assert v["test"] is not None and len(v["test"]) == 2  # the golden set is untouched
    # no text on both sides of the holdout, and none of it in the golden set
    assert not set(v["holdout"]["text"]) & set(v["train"]["text"])
    assert v["max_feedback_id"] == len(fb)
    # stable: the same text lands on the same side however the feedback grows
    more = build_data_version(
        _base(), pd.concat([fb, _fb([("later text", "pos")]).assign(id="Q1")]), holdout=0.25
    )
    assert set(v["holdout"]["text"]) <= set(more["holdout"]["text"])
    assert all(0 <= holdout_bucket(t) < 1 for t in ("a", "b", ""))

    # a selection share joins validation (never train or holdout); the golden test set stays frozen
    w = build_data_version(_base(), fb, holdout=0.25, validation=0.3)
    sw = w["stats"]
    assert sw["feedback_train"] + sw["feedback_holdout"] + sw["feedback_validation"] == kept
    assert sw["feedback_holdout"] == s["feedback_holdout"] and sw["feedback_validation"] >= 3
    fb_val = set(w["validation"]["text"]) - set(_base().validation["text"])
    assert len(fb_val) == sw["feedback_validation"]
    assert not fb_val & (set(w["train"]["text"]) | set(w["holdout"]["text"])) and len(w["test"]) == 2


def test_feedback_logged_as_hashes_only_is_refused(tmp_path):
    from lmloop.mlops.predlog import FeedbackRecord, PredictionRecord, open_store

    with open_store(f"sqlite:///{tmp_path / 'p.db'}") as store:
        rec = PredictionRecord.new(model="m", version="v", text="secret", label="pos", score=0.9,
                                   scores={"pos": 0.9, "neg": 0.1}, latency_ms=1.0, store_text=False)  # fmt: skip
        store.add_predictions([rec])
        store.add_feedback(FeedbackRecord(rec.id, "neg"))
        with pytest.raises(DataError, match="--log-text hash"):
            collect_feedback(store)


# ------------------------------------------------------------------------------------------ triggers
def test_min_feedback_trigger():
    cfg = LoopTriggersConfig(min_feedback=10)
    assert check_triggers(cfg, new_feedback=9)[0] == []
    fired, checks = check_triggers(cfg, new_feedback=10)
    assert fired == ["10 new feedback records (>= min_feedback 10)"] and checks["new_feedback"] == 10
    assert check_triggers(LoopTriggersConfig(min_feedback=None), new_feedback=10**6)[0] == []


def test_accuracy_drop_trigger_needs_a_clear_drop():
    from lmloop.mlops.monitor import wilson_interval

    cfg = LoopTriggersConfig(min_feedback=None, max_accuracy_drop=0.05, min_labelled=30)

    def live(k, n):
        lo, hi = wilson_interval(k, n)
        return SimpleNamespace(labelled=n, accuracy=k / n, accuracy_low=lo, accuracy_high=hi)

    # 70% live vs 90% on test, 200 labels: the whole interval is below 0.85 -> fires
    fired, checks = check_triggers(cfg, new_feedback=0, live=live(140, 200), champion_accuracy=0.9)
    assert len(fired) == 1 and "below the champion's test accuracy 0.900" in fired[0]
    # the same 70% on 10 labels: too few to judge
    fired, checks = check_triggers(cfg, new_feedback=0, live=live(7, 10), champion_accuracy=0.9)
    assert fired == [] and "min_labelled" in checks["live_accuracy"]["skipped"]
    # 80% of 40: the upper bound (~0.90) is not below 0.85 -> not yet
    assert check_triggers(cfg, new_feedback=0, live=live(32, 40), champion_accuracy=0.9)[0] == []
    # drift: a report that alarmed fires, a reason not to check is recorded
    cfg = LoopTriggersConfig(min_feedback=None, drift=True)
    report = SimpleNamespace(
        drifted=True, n_current=50, tests=[SimpleNamespace(name="embedding.mmd", drifted=True)]
    )
    assert check_triggers(cfg, new_feedback=0, drift=report)[0] == ["drift in recent traffic (embedding.mmd)"]
    assert check_triggers(cfg, new_feedback=0, drift="no reference")[1]["drift"] == {
        "skipped": "no reference"
    }


def test_loop_recipe_section_is_validated(tmp_path):
    r = recipe_from_dict(
        {"loop": {"model_name": "toy", "gates": {"max_ece": None}, "triggers": {"min_feedback": 5}}}
    )
    assert (
        r.loop.gates.max_ece is None
        and r.loop.gates.max_regression == 0.01
        and r.loop.start_from == "champion"
    )
    bad = tmp_path / "r.yaml"
    bad.write_text("loop:\n  gates:\n    max_regresion: 0.1\n")
    from lmloop.config import load_recipe

    with pytest.raises(
        ConfigError, match=r"line 3, column 5: unknown key 'loop.gates.max_regresion' \(did you mean"
    ):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="feedback_holdout must be in"):
        recipe_from_dict({"loop": {"feedback_holdout": 1.5}})


# ------------------------------------------------------------------------------------------ real turns
POS_NEW, NEG_NEW = "zorbly", "quenty"  # words the champion never saw: the pattern feedback teaches


@pytest.fixture(scope="module")
def champion_dir(tmp_path_factory, finetune_confident_tiny, tiny_model_dir, toy_csv):
    return finetune_confident_tiny(
        tmp_path_factory.mktemp("loop-champion") / "champion", tiny_model_dir, toy_csv
    )


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """An MLflow sqlite file with its schema in place (creating one runs ~50 migrations)."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("loop-store") / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    client.search_experiments()
    client.search_registered_models()
    return db


@pytest.fixture
def world(tmp_path, monkeypatch, empty_store, champion_dir, tiny_model_dir, toy_csv):
    """A registry with the champion as toy v1 @champion, an empty prediction log, and a recipe."""
    from lmloop.mlops.registry import Registry

    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("LMLOOP_HOME", str(tmp_path / "home"))
    reg = Registry(uri, say=lambda m: None)
    reg.register(champion_dir, "toy", reason="baseline")
    reg.promote("toy", 1, reason="first model")
    log = f"sqlite:///{tmp_path / 'predictions.db'}"

    def spec(**loop):
        return {
            "name": "toy",
            "out": str(tmp_path / "run"),
            "data": {"path": str(toy_csv), "domain_column": "domain"},
            "model": {"base": str(tiny_model_dir)},
            "train": {
                "epochs": 3,
                "batch_size": 8,
                "lr": 1e-2,
                "patience": 0,
                "freeze_embeddings": False,
                "precision": "fp32",
                "evals_per_epoch": 1,
                "threads": 1,
            },
            "tracking": {"uri": uri, "experiment": "loop-test"},
            "loop": {
                "model_name": "toy",
                "prediction_log": log,
                "feedback_holdout": 0.3,
                "triggers": {"min_feedback": 10},
                "gates": {"max_regression": 0.05, "min_holdout": 5, "max_ece": 0.35},
                **loop,
            },
        }

    return SimpleNamespace(
        reg=reg, uri=uri, log=log, spec=spec, recipe=lambda **kw: recipe_from_dict(spec(**kw)), tmp=tmp_path
    )


def _log_feedback(url: str, rows: list[tuple[str, str]]) -> None:
    """Log one prediction per text (all predicted 'pos', as a confused model would) and its true label."""
    from lmloop.mlops.predlog import FeedbackRecord, PredictionRecord, open_store

    with open_store(url) as store:
        recs = [
            PredictionRecord.new(
                model="toy",
                version="v1",
                text=t,
                label="pos",
                score=0.6,
                scores={"neg": 0.4, "pos": 0.6},
                latency_ms=2.0,
            )  # fmt: skip
            for t, _ in rows
        ]
        store.add_predictions(recs)
        for rec, (_, label) in zip(recs, rows, strict=True):
            store.add_feedback(FeedbackRecord(rec.id, label))


def _new_pattern(n: int = 60) -> list[tuple[str, str]]:
    return [(f"ticket {i} felt {POS_NEW if i % 2 else NEG_NEW}", "pos" if i % 2 else "neg") for i in range(n)]


def test_no_trigger_no_turn(world):
    _log_feedback(world.log, _new_pattern(4))
    r = run_turn(world.recipe(), say=lambda m: None)
    assert r.decision == "no-trigger" and r.trigger_checks["new_feedback"] == 4
    assert [v.version for v in world.reg.list("toy")] == [1]


def test_turn_promotes_after_crashes_exactly_once_with_lineage(world, monkeypatch, toy_csv):
    """Feedback teaches a new pattern. The turn crashes in fine-tuning (registry untouched), then between
    registration and promotion (registered, alias unmoved); the third run promotes exactly once."""
    import lmloop.finetune
    from lmloop.data import load_data
    from lmloop.mlops.registry import Registry
    from lmloop.mlops.tracking import get_run

    golden = load_data(str(toy_csv), domain_column="domain").test
    rows = _new_pattern() + [(golden["text"][0], golden["label"][0])]  # one golden text: leakage
    _log_feedback(world.log, rows)
    recipe = world.recipe()
    quiet = {"say": lambda m: None}

    def boom(*a, **k):
        raise RuntimeError("power cut during fine-tuning")

    with monkeypatch.context() as m:
        m.setattr(lmloop.finetune, "run_recipe", boom)
        with pytest.raises(RuntimeError, match="power cut"):
            run_turn(recipe, **quiet)
    assert [v.version for v in world.reg.list("toy")] == [1]  # untouched
    (turn,) = (world.tmp / "run" / "loop" / "turns").iterdir()
    assert json.loads((turn / "state.json").read_text())["step"] == "data"

    def no_promote(self, *a, **k):
        raise RuntimeError("crash before the alias move")

    with monkeypatch.context() as m:
        m.setattr(Registry, "promote", no_promote)
        with pytest.raises(RuntimeError, match="alias move"):
            run_turn(recipe, **quiet)
    assert [v.version for v in world.reg.list("toy")] == [1, 2]
    assert world.reg.show("toy", "champion").version == 1  # registered, never half-promoted

    r = run_turn(recipe, **quiet)
    assert r.resumed and r.decision == "promoted", r.reason
    assert [v.version for v in world.reg.list("toy")] == [1, 2]  # one registered version, not two
    assert world.reg.show("toy", "champion").version == 2
    assert r.registry == {
        "name": "toy",
        "alias": "champion",
        "before": 1,
        "after": 2,
        "challenger_version": 2,
    }
    assert r.data["feedback"]["leakage"] == 1 and r.data["rows"]["holdout"] >= 5
    gates = {g.name: g for g in r.gates}
    assert all(g.passed for g in r.gates) and gates["improvement"].value > 0  # it learned the new pattern

    # the audit log: one promotion by the loop, with every gate's value and threshold
    audit = world.reg.audit("toy")
    assert [(a.action, a.from_version, a.to_version) for a in audit] == [
        ("promote", None, 1),
        ("promote", 1, 2),
    ]
    assert audit[1].actor.startswith("lmloop-loop@") and set(audit[1].gates) == {
        "no_regression",
        "improvement",
        "calibration",
    }
    assert audit[1].gates["improvement"]["passed"] is True

    # lineage: parent, data and feedback fingerprints on the version; the turn's one MLflow run
    v2 = world.reg.show("toy", 2)
    assert v2.parent == 1 and v2.run_id == r.run_id
    assert v2.data_fingerprints["train"] == r.data["fingerprints"]["train"]
    assert (
        v2.feedback["fingerprint"] == r.data["feedback_fingerprint"]
        and int(v2.feedback["n"]) == r.data["feedback"]["feedback_train"]
    )
    assert v2.tags["lmloop.loop.decision"] == "promoted"
    assert [v.version for v in world.reg.list("toy", data=r.data["fingerprints"]["train"][:12])] == [2]

    # lineage down, from a feedback record to the versions that learned from it: a training record finds
    # v2 (by its feedback id or its prediction id), a held-out one finds nothing
    from lmloop.mlops import lineage

    ids = json.loads((Path(v2.tags["lmloop.model_dir"]) / "feedback_ids.json").read_text())
    assert len(ids["train"]) == len(ids["predictions"]) == int(v2.feedback["n"])
    assert all(lineage.contains(lineage.decode_ids(v2.feedback["ids"]), i) for i in ids["train"])
    assert [v.version for v in lineage.trained_on(world.reg, ids["train"][0], "toy")] == [2]
    assert [
        v.version for v in lineage.trained_on(world.reg, name="toy", prediction=ids["predictions"][-1])
    ] == [2]
    held_out = json.loads((Path(r.data["dir"]) / "feedback_ids.json").read_text())["holdout"]
    assert held_out and lineage.trained_on(world.reg, name="toy", prediction=held_out[0]) == []
    assert lineage.trained_on(world.reg, max(ids["train"]) + 10_000) == []
    up = lineage.lineage(world.reg, "toy", 2)
    assert [a["version"] for a in up.ancestors] == [1] and up.feedback["n"] == int(v2.feedback["n"])
    assert "feedback     " in lineage.format_lineage(up)
    run = get_run(r.run_id, world.uri)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert (tags["lmloop.loop.champion_version"], tags["lmloop.loop.challenger_version"]) == ("1", "2")
    assert (
        tags["lmloop.loop.data_fingerprint"] == r.data["fingerprint"]
        and tags["lmloop.loop.decision"] == "promoted"
    )
    assert tags["lmloop.loop.feedback_fingerprint"] == r.data["feedback_fingerprint"]
    assert run.data.params["loop.gates.max_regression"] == "0.05"
    assert run.data.metrics["gate.improvement"] == pytest.approx(gates["improvement"].value)

    # the next run has nothing new to train on; rollback undoes the promotion in one call
    assert run_turn(recipe, **quiet).decision == "no-trigger"
    world.reg.rollback("toy", reason="undo")
    assert world.reg.show("toy", "champion").version == 1


def test_flipped_feedback_is_kept_out(world, toy_csv, sentiment_words):
    """Feedback that contradicts the base data (sentiment words with flipped labels): the challenger gets
    worse on the golden set, so the champion stays, the reason says why, and the challenger is registered
    (inspectable) without the alias moving."""
    POSITIVE, NEGATIVE = sentiment_words

    flipped = [
        (
            f"review {i} was {POSITIVE[i % 7] if i % 2 else NEGATIVE[i % 7]} and fine",
            "neg" if i % 2 else "pos",
        )
        for i in range(200)
    ]
    _log_feedback(world.log, flipped)
    r = run_turn(world.recipe(start_from="base"), say=lambda m: None)
    assert r.decision == "kept"
    failed = [g.name for g in r.gates if not g.passed]
    assert "no_regression" in failed and r.reason.startswith("kept champion v1: failed no_regression")
    assert world.reg.show("toy", "champion").version == 1
    assert [v.version for v in world.reg.list("toy")] == [1, 2]
    assert world.reg.show("toy", 2).tags["lmloop.loop.decision"] == "kept"
    assert [a.to_version for a in world.reg.audit("toy")] == [1]  # no alias change recorded


def test_cli_loop_once_and_force(world, cli):
    """`lmloop loop`: nothing to do without a trigger; --force runs a turn, and an impossible gate keeps the
    champion, printed in the gates table and recorded in --json."""
    import yaml

    recipe = world.tmp / "loop.yaml"
    recipe.write_text(yaml.safe_dump(world.spec()))
    _log_feedback(world.log, _new_pattern(30))
    code, out, err = cli("loop", recipe, "--once", "--set", "loop.triggers.min_feedback=1000")
    assert code == 0 and out.startswith("no trigger fired (new_feedback=30")
    code, out, err = cli("loop", recipe, "--force", "--quiet", "--set", "loop.gates.min_improvement=1.0")
    assert code == 0, err
    assert "started by hand (--force)" in out and "improvement" in out and "FAIL" in out
    assert "KEPT: kept champion v1: failed improvement" in out and "toy@champion stays v1" in out
    assert world.reg.show("toy", "champion").version == 1
    # the kept challenger (v2) still records what it learned from: lineage both ways from the CLI
    code, out, err = cli("registry", "lineage", "toy", "2")
    n = int(world.reg.show("toy", 2).feedback["n"])  # the 30 records less the held-out share
    assert code == 0 and "toy v2" in out and "<- v1" in out and f"feedback     {n} records" in out, out
    assert 0 < n < 30
    fid = json.loads(
        (Path(world.reg.show("toy", 2).tags["lmloop.model_dir"]) / "feedback_ids.json").read_text()
    )
    code, out, err = cli("registry", "lineage", "--feedback", str(fid["train"][0]))
    assert code == 0 and "is in the training data of" in out and "toy" in out, out
    code, out, err = cli("registry", "lineage", "--feedback", "999999", "toy")
    assert code == 0 and "no registered version of toy learned from feedback record 999999" in out
    code, out, err = cli("registry", "lineage")
    assert code == 2 and "give NAME [VERSION], or --feedback ID" in err
    code, out, err = cli("loop", recipe, "--json", "--set", "loop.triggers.min_feedback=1")
    assert (
        code == 0 and json.loads(out)["decision"] == "no-trigger"
    )  # that feedback was used by the last turn
    code, out, err = cli("loop", recipe, "--set", "loop.model_name=null", "--force")
    assert code == 2 and "needs loop.model_name" in err


def test_audit_gates_block_a_real_turn(world, cli):
    """Feedback that teaches the new pattern, but audit gates the challenger cannot meet: membership.max_auc
    0 (an attack AUC is never below 0) and calibration.max_ece 0. The bias and membership audits really run
    on the challenger; memorization is skipped for a classifier, with the reason. The champion stays, and
    the gates are in the turn, on the registered version (`registry show`), in the challenger's gates.json
    and its MODEL_CARD.md."""
    _log_feedback(world.log, _new_pattern())
    gates = {"max_regression": 0.05, "min_holdout": 5, "calibration.max_ece": 0.0, "bias.max_flip_rate": 1.0,
             "membership.max_auc": 0.0, "memorization.max_exposure": 10}  # fmt: skip
    r = run_turn(world.recipe(gates=gates), say=lambda m: None)
    g = {x.name: x for x in r.gates}
    assert r.decision == "kept" and world.reg.show("toy", "champion").version == 1
    assert not g["membership.auc"].passed and 0.0 < g["membership.auc"].value <= 1.0
    assert "failed " in r.reason and "membership.auc (" in r.reason
    assert not g["calibration"].passed or g["calibration"].value == 0.0
    assert g["bias.flip_rate"].passed and 0.0 <= g["bias.flip_rate"].value <= 1.0  # measured, not skipped
    mem = g["memorization.exposure"]
    assert mem.passed and mem.detail.startswith("skipped: a classifier")

    out = Path(r.challenger["path"])
    assert {p.name for p in (out / "audit").glob("*.json")} == {"bias.json", "membership.json"}
    recorded = json.loads((out / "gates.json").read_text())
    assert recorded["decision"] == "keep"
    assert [x["name"] for x in recorded["gates"]] == [x.name for x in r.gates]
    card = (out / "MODEL_CARD.md").read_text()
    assert "## Promotion gates" in card and "| membership.auc |" in card and "FAIL" in card
    assert f"AUC {g['membership.auc'].value:.4f}" in card and "Not audited (`lmloop audit bias" not in card

    code, shown, err = cli("registry", "show", "toy", str(r.registry["challenger_version"]))
    assert code == 0, err
    assert "gates        kept by loop turn" in shown and "membership.auc" in shown and "FAIL" in shown
    assert "reason: kept champion v1: failed" in shown
