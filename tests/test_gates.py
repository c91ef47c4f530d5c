"""The loop's audit gates (bias, calibration, membership, memorization): the recipe keys (dotted or nested,
unknown keys named with the valid ones), and the gate verdicts from audit summaries: a failing or
unmeasured gate blocks the promotion and says why, memorization is skipped for classifiers with the reason.
A real loop turn blocked by these gates is in tests/test_loop.py (test_audit_gates_block_a_real_turn)."""

from __future__ import annotations

import pytest

from lmloop.config import LoopGatesConfig, load_recipe, recipe_from_dict
from lmloop.errors import ConfigError
from lmloop.mlops.loop import compute_gates, decide


def _gates(yaml_text: str, tmp_path) -> LoopGatesConfig:
    p = tmp_path / "r.yaml"
    p.write_text(yaml_text)
    return load_recipe(p).loop.gates


def test_dotted_and_nested_gate_keys_parse_to_the_same_config(tmp_path):
    dotted = _gates(
        "loop:\n  gates:\n    bias.max_flip_rate: 0.02\n    bias.max_gap: 0.1\n    calibration.max_ece: 0.05\n"
        "    membership.max_auc: 0.6\n    memorization.max_exposure: 12\n",
        tmp_path,
    )
    nested = recipe_from_dict(
        {
            "loop": {
                "gates": {
                    "bias": {"max_flip_rate": 0.02, "max_gap": 0.1},
                    "calibration": {"max_ece": 0.05},
                    "membership": {"max_auc": 0.6},
                    "memorization": {"max_exposure": 12},
                }
            }
        }
    ).loop.gates
    assert dotted == nested
    assert dotted.bias.max_flip_rate == 0.02 and dotted.membership.max_auc == 0.6
    # calibration.max_ece is the existing max_ece by another name
    assert (
        dotted.max_ece == 0.05 and LoopGatesConfig().calibration.max_ece == LoopGatesConfig().max_ece == 0.1
    )
    # dotted keys merge with a nested section of the same name; --set reaches them too
    both = _gates("loop:\n  gates:\n    bias:\n      max_gap: 0.2\n    bias.max_flip_rate: 0.03\n", tmp_path)
    assert (both.bias.max_flip_rate, both.bias.max_gap) == (0.03, 0.2)
    p = tmp_path / "r.yaml"
    assert load_recipe(p, {"loop.gates.membership.max_auc": 0.55}).loop.gates.membership.max_auc == 0.55


@pytest.mark.parametrize(
    "text, match",
    [
        # an unknown dotted key: named in full, with every valid key (dotted) listed
        (
            "    fairness.max_gap: 0.1\n",
            r"line 3, column 5: unknown key 'loop.gates.fairness.max_gap' \(did you "
            r"mean 'bias.max_gap'\?\); expected one of: .*max_ece, .*bias.max_flip_rate, bias.max_gap, "
            r"calibration.max_ece, membership.max_auc, memorization.max_exposure",
        ),
        (
            "    max_flip_rate: 0.1\n",
            r"unknown key 'loop.gates.max_flip_rate' \(did you mean 'bias.max_flip_rate'",
        ),
        (
            "    bias.max_flip: 0.1\n",
            r"unknown key 'loop.gates.bias.max_flip' \(did you mean 'max_flip_rate'\?\); "
            r"expected one of: max_flip_rate, max_gap",
        ),
        (
            "    membership.max_auc: 1.5\n",
            r"line 3, column 25: 'loop.gates.membership.max_auc': max_auc must be in",
        ),
        (
            "    bias:\n      max_gap: 0.1\n    bias.max_gap: 0.2\n",
            r"'loop.gates.bias.max_gap' is given twice",
        ),
    ],
)
def test_bad_gate_keys_are_refused_with_the_valid_ones(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        _gates("loop:\n  gates:\n" + text, tmp_path)


GOLDEN = {"accuracy": 0.9, "ece": 0.04, "n": 100}
CHAMP = {"golden": GOLDEN, "holdout": {"accuracy": 0.6, "n": 50}}
BIAS = {
    "max_flip_rate": 0.05,
    "max_gap": 0.01,
    "families": {"gender": {"flip_rate": 0.05, "gap": 0.01}, "religion": {"flip_rate": 0.0, "gap": 0.0}},
}


def _challenger(**audits):
    return {"golden": GOLDEN, "holdout": {"accuracy": 0.8, "n": 50}, "audits": audits}


def test_audit_gates_pass_fail_and_say_why():
    cfg = recipe_from_dict(
        {
            "loop": {
                "gates": {
                    "bias.max_flip_rate": 0.1,
                    "bias.max_gap": 0.05,
                    "membership.max_auc": 0.6,
                    "memorization.max_exposure": 10,
                }
            }
        }
    ).loop.gates
    skipped = {"skipped": "a classifier: no text generated"}
    ok = _challenger(bias=BIAS, membership={"auc": 0.52, "auc_ci": [0.47, 0.57]}, memorization=skipped)
    gates = {g.name: g for g in compute_gates(CHAMP, ok, cfg)}
    assert [n for n in gates if "." in n] == [
        "bias.flip_rate",
        "bias.gap",
        "membership.auc",
        "memorization.exposure",
    ]
    assert all(g.passed for g in gates.values())
    assert gates["bias.flip_rate"].value == 0.05 and "worst family: gender" in gates["bias.flip_rate"].detail
    mem = gates["memorization.exposure"]
    assert mem.value is None and mem.detail == "skipped: a classifier: no text generated"
    assert decide(list(gates.values()), 1)[0] is True

    # a biased challenger is kept, and the reason names the gate and the numbers
    biased = _challenger(bias={**BIAS, "max_flip_rate": 0.2}, membership={"auc": 0.52}, memorization=skipped)
    promote, reason = decide(compute_gates(CHAMP, biased, cfg), 1)
    assert not promote and reason.startswith("kept champion v1: failed bias.flip_rate (0.2000 vs 0.1000")

    # an audit that failed or never ran fails its gate (an unmeasured risk is not a passed one)
    broken = _challenger(bias=BIAS, membership={"error": "DataError: too few examples"}, memorization=skipped)
    failed = [g for g in compute_gates(CHAMP, broken, cfg) if not g.passed]
    assert [(g.name, g.detail) for g in failed] == [
        ("membership.auc", "the membership audit failed: DataError: too few examples")
    ]
    missing = [g for g in compute_gates(CHAMP, _challenger(bias=BIAS), cfg) if not g.passed]
    assert {g.name: g.detail for g in missing} == {
        "membership.auc": "the membership audit was not run",
        "memorization.exposure": "the memorization audit was not run",
    }


def test_unset_audit_gates_add_nothing():
    names = [g.name for g in compute_gates(CHAMP, _challenger(), LoopGatesConfig())]
    assert names == ["no_regression", "improvement", "calibration"]


def test_calibration_gate_reads_the_calibrated_ece():
    cfg = recipe_from_dict({"loop": {"gates": {"calibration.max_ece": 0.03}}}).loop.gates
    c = _challenger()
    c["golden"] = {**GOLDEN, "ece": 0.02, "temperature": 1.8}
    (cal,) = [g for g in compute_gates(CHAMP, c, cfg) if g.name == "calibration"]
    assert cal.passed and cal.threshold == 0.03 and "temperature 1.800" in cal.detail
    c["golden"] = {**GOLDEN, "ece": 0.04}
    assert decide(compute_gates(CHAMP, c, cfg), 1)[1].startswith(
        "kept champion v1: failed calibration (0.0400"
    )
