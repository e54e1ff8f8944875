"""bloodcell.promote's settings (core.settings.PromoteSettings): conf/promote.yaml and conf/gate/ checked
once, in the command, each bad value one line, before any tracking store is asked anything."""

from __future__ import annotations

import pytest

from bloodcell.core.cli import compose
from bloodcell.core.errors import UserError
from bloodcell.serving.settings import promote_settings


def test_the_shipped_config_gives_the_yaml_values():
    settings = promote_settings(compose([], "promote"))
    assert (settings.metric, settings.alias, settings.force) == ("best_val_accuracy", "champion", False)
    assert (settings.gate.name, settings.gate.alpha, settings.gate.max_class_drop) == ("mcnemar", 0.05, 0.02)
    assert settings.recorded() == {
        "metric": "best_val_accuracy",
        "force": False,
        "alpha": 0.05,
        "max_class_drop": 0.02,
        "eval": "",
    }
    metric = promote_settings(compose(["gate=metric", "tracking.experiment=x"], "promote"))
    assert metric.gate.name == "metric" and metric.gate.alpha is None
    assert metric.tracking.experiment == "x"
    assert metric.recorded() == {"metric": "best_val_accuracy", "force": False}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("gate.alpha=1", "gate.alpha=1.0 must be in (0, 1) and gate.max_class_drop=0.02 in [0, 1]"),
        ("gate.alpha=0", "gate.alpha=0.0 must be in (0, 1)"),
        ("gate.max_class_drop=-0.01", "gate.max_class_drop=-0.01 in [0, 1] (a recall fraction"),
        ("gate.name=vote", "gate='vote' is unknown; use gate=mcnemar (statistical) or gate=metric"),
        ("alias=latest", "alias='latest' is not a valid alias"),
        ("alias=v2", "('latest' and 'v<number>' are reserved)"),
        ("model_name=a/b", "model_name='a/b' is not a valid registered model name"),
        ("eval=no/such.npz", "eval=no/such.npz not found; give a labelled .npz or a folder of class folders"),
        ("force=maybe", "force='maybe' must be a valid boolean"),
    ],
)
def test_a_bad_value_is_one_line(override, message):
    with pytest.raises(UserError) as caught:
        promote_settings(compose([override], "promote"))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_every_gate_option_is_a_gate_promote_knows():
    from bloodcell import PROJECT_ROOT
    from bloodcell.serving.gates import GATES

    names = sorted(path.stem for path in (PROJECT_ROOT / "conf" / "gate").glob("*.yaml"))
    assert names == sorted(GATES)
    for name in names:
        assert promote_settings(compose([f"gate={name}"], "promote")).gate.name == name
