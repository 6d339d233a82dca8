import pytest

from appliance.config import DispositionConfig
from appliance.disposition import Disposer
from appliance.errors import UserError
from appliance.inference import HeadPrediction
from appliance.model_package import CardHead, ModelCard, ModelInput

RULES = [
    {"name": "clean", "when": {"type": ["none"]}, "disposition": "pass"},
    {"name": "scratch-minor", "when": {"type": ["scratch"], "severity": ["low"]}, "disposition": "rework"},
    {"name": "any-crack", "when": {"type": ["crack"]}, "disposition": "reject"},
    {"name": "scratch-major", "when": {"type": ["scratch"], "severity": ["high"]}, "disposition": "reject"},
]


def pred(type_: str, severity: str, c_type: float = 0.95, c_sev: float = 0.95) -> dict[str, HeadPrediction]:
    return {"type": HeadPrediction(type_, 0, c_type, (c_type,)),
            "severity": HeadPrediction(severity, 0, c_sev, (c_sev,))}


def disposer(**kw) -> Disposer:
    return Disposer(DispositionConfig.model_validate({"rules": RULES, "audit_rate": 0.0, **kw}), seed=1)


def test_first_matching_rule_decides_and_is_recorded() -> None:
    d = disposer()
    clean = d.decide(pred("none", "low"))
    assert (clean.disposition, clean.rule) == ("pass", "clean")
    assert d.decide(pred("scratch", "low")).rule == "scratch-minor"
    assert d.decide(pred("scratch", "high")).disposition == "reject"
    assert d.decide(pred("crack", "low")).rule == "any-crack"  # severity not named: any matches


def test_unsure_is_held_with_the_head_that_was_unsure() -> None:
    decision = disposer(min_confidence=0.8).decide(pred("crack", "high", c_type=0.7))
    assert decision.disposition == "hold"
    assert decision.rule == "low_confidence:type=crack"
    assert decision.review == "hold"


def test_per_class_threshold_overrides_default() -> None:
    d = disposer(min_confidence=0.5, class_min_confidence={"type": {"none": 0.99}})
    assert d.decide(pred("none", "low", c_type=0.97)).rule == "low_confidence:type=none"
    assert d.decide(pred("crack", "low", c_type=0.6)).rule == "any-crack"


def test_only_configured_heads_can_hold() -> None:
    d = disposer(min_confidence=0.9, heads=["type"])
    assert d.decide(pred("none", "low", c_sev=0.3)).disposition == "pass"


def test_gap_in_table_holds_instead_of_passing() -> None:
    decision = disposer().decide(pred("dent", "low"))
    assert (decision.disposition, decision.rule) == ("hold", "no_rule")


def test_audit_sample_of_confident_passes() -> None:
    d = disposer(audit_rate=0.25)
    reviews = [d.decide(pred("none", "low")).review for _ in range(2000)]
    share = reviews.count("audit") / len(reviews)
    assert 0.2 < share < 0.3
    assert all(d.decide(pred("crack", "low")).review is None for _ in range(100))


def test_table_checked_against_model() -> None:
    card = ModelCard(version="v", input=ModelInput(layout="NHW", channels=1, height=8, width=8),
                     heads=[CardHead(name="type", classes=["none", "scratch"]),
                            CardHead(name="severity", classes=["low", "high"])], onnx_sha256="x")
    with pytest.raises(UserError) as err:
        disposer().check_against(card)
    assert "rule 'any-crack': head 'type' has no class ['crack']" in str(err.value)
