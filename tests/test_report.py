"""The study report's tables and the study's pooling axis (``mixes``): labels, configs,
paired differences and overviews against values computed here from the rows."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from liquid_fed import ensemble
from liquid_fed.ensemble import LiquidConfig
from liquid_fed.errors import ConfigError
from liquid_fed.report import (
    LABELS_AT_PARTY,
    display_name,
    interval,
    leakage_text,
    overview,
    paired_difference,
    render,
)
from liquid_fed.study import (
    MIX_METHODS,
    collect,
    load_study,
    method_label,
    method_slug,
    parse_method,
    prepare_study,
    run_cell,
)

ROOT = Path(__file__).resolve().parent.parent
REGIONS = ROOT / "configs" / "regions.yaml"


def study_of(tmp_path: Path, body: str) -> object:
    path = tmp_path / "study.yaml"
    path.write_text(textwrap.dedent(body).replace("BASE", str(REGIONS)))
    return load_study(path)


MIXED = """
    name: mixed
    base: BASE
    set: {data.options.n_samples: 300, train.epochs: 1, train.eval_every: 0}
    seeds: 1
    solvers: [sink_one, sink_many]
    mixes: [probs, logits]
    methods: [liquid, uniform, averaged, splitnn, oracle]
"""


def test_mixes_expand_every_pooling_method_into_labelled_variants(tmp_path: Path) -> None:
    study = study_of(tmp_path, MIXED)
    assert study.methods == [
        "liquid:sink_one/probs", "liquid:sink_one/logits", "liquid:sink_many/probs",
        "liquid:sink_many/logits", "uniform/probs", "uniform/logits", "averaged/probs",
        "averaged/logits", "splitnn", "oracle"]
    setting = study.settings[0]
    for label in study.methods:
        name, solver, mix = parse_method(label)
        assert method_label(name, solver, mix) == label == str(parse_method(label))
        cfg = study.config(setting, 0, label)
        base = study.config(setting, 0)
        assert cfg.ensemble.mix == (mix or base.ensemble.mix)
        assert cfg.ensemble.solver == (solver or base.ensemble.solver)
        assert cfg.train == base.train and cfg.views == base.views  # nothing else moves
    assert method_slug("liquid:sink_many/logits") == "liquid-sink_many-logits"
    assert method_slug("uniform/probs") == "uniform-probs"
    # labels of study folders written before the axis existed carry no pooling
    assert parse_method("liquid:sink_one") == ("liquid", "sink_one", None)
    assert parse_method("uniform") == ("uniform", None, None)
    assert set(MIX_METHODS) == {"liquid", "uniform", "averaged"}
    # without mixes, the labels (and so older folders' study.yaml) are unchanged
    plain = study_of(tmp_path, MIXED.replace("    mixes: [probs, logits]\n", ""))
    assert plain.methods == ["liquid:sink_one", "liquid:sink_many", "uniform", "averaged",
                             "splitnn", "oracle"]
    assert "mixes" not in yaml.safe_load(plain.to_yaml())


def test_any_value_of_ensemble_mixes_is_accepted_and_others_are_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r'mixes: got "geometric"; accepted: '
                       + ", ".join(ensemble.MIXES)):
        study_of(tmp_path, MIXED.replace("[probs, logits]", "[probs, geometric]"))
    # a pooling added to ensemble.MIXES is accepted by the axis without a change here
    monkeypatch.setattr(ensemble, "MIXES", (*ensemble.MIXES, "geometric"))
    monkeypatch.setattr(ensemble.LiquidConfig, "__post_init__", lambda self: None)
    study = study_of(tmp_path, MIXED.replace("[probs, logits]", "[probs, geometric]"))
    assert "uniform/geometric" in study.methods
    assert study.config(study.settings[0], 0, "liquid:sink_one/geometric").ensemble.mix == \
        "geometric"


@pytest.mark.parametrize(("change", "message"), [
    (("[probs, logits]", "[probs, probs]"), "mixes: got ['probs', 'probs']; expected distinct"),
    (("[probs, logits]", "probs"), "mixes: got 'probs'; expected a non-empty list"),
    (("methods: [liquid, uniform, averaged, splitnn, oracle]", "methods: [splitnn]\n"
      "    solvers: null"), "mixes: given, but methods has none that pools"),
    (("seeds: 1", "seeds: 1\n    grid: {ensemble.mix: [probs, logits]}"),
     "mixes: given, but the settings also vary ensemble.mix"),
], ids=["repeated", "not-a-list", "no-pooling-method", "grid-clash"])
def test_bad_mixes_name_the_key_and_what_arrived(tmp_path: Path, change: tuple[str, str],
                                                 message: str) -> None:
    body = MIXED.replace(*change)
    if "solvers: null" in body:
        body = body.replace("    solvers: [sink_one, sink_many]\n", "")
    with pytest.raises(ConfigError, match=None) as info:
        study_of(tmp_path, body)
    assert message in str(info.value)


def test_pooling_variants_train_with_their_pooling_into_their_own_folders(
        tmp_path: Path) -> None:
    study = study_of(tmp_path, MIXED.replace("solvers: [sink_one, sink_many]",
                                             "solvers: [sink_one]"))
    out = tmp_path / "out"
    prepare_study(study, out, resume=False)
    setting = study.settings[0]
    run_cell(study, setting, 0, study.methods, out)
    rows = {r["method"]: r for r in collect(study, out)}
    assert list(rows) == study.methods
    base_mix = yaml.safe_load(REGIONS.read_text())["ensemble"].get("mix", LiquidConfig().mix)
    for label in study.methods:
        folder = out / "cells" / setting.id / "seed-0" / method_slug(label)
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        assert saved["ensemble"]["mix"] == (parse_method(label).mix or base_mix)
        assert yaml.safe_load((folder / "summary.json").read_text())["method"] == label
    # the uniform vote pools through ensemble.mix: the two variants differ in their NLL
    assert rows["uniform/probs"]["nll"] != rows["uniform/logits"]["nll"]
    # the paired table compares every LE variant with every baseline, variants included
    text = render(study, list(rows.values()))
    header = ("| Liquid Ensemble | uniform/probs | uniform/logits | averaged/probs | "
              "averaged/logits | splitnn | oracle (ground-truth routing) |")
    assert header in text
    for le in ("liquid:sink_one/probs", "liquid:sink_one/logits"):
        assert f"| {le} | " in text.split(header)[1]


def rows_of(scores: dict[str, list[float]], nll: dict[str, list[float]],
            leakage: dict[str, list[object]] | None = None) -> list[dict[str, object]]:
    leakage = leakage or {}
    return [{"cell": "c00", "seed": s, "method": m, "metric": "accuracy", "score": v[s],
             "nll": nll[m][s], "label_leakage": leakage.get(m, [None] * 3)[s]}
            for m, v in scores.items() for s in range(3)]


def test_the_nll_overview_stands_next_to_accuracy_and_bolds_the_lowest(
        tmp_path: Path) -> None:
    study = study_of(tmp_path, """
        base: BASE
        set: {data.options.n_samples: 300}
        seeds: 3
        methods: [liquid, averaged, oracle]
    """)
    scores = {"liquid:sink_one": [0.90, 0.92, 0.91], "averaged": [0.80, 0.82, 0.81],
              "oracle": [0.95, 0.97, 0.96]}
    nll = {"liquid:sink_one": [0.30, 0.20, 0.25], "averaged": [0.50, 0.52, 0.51],
           "oracle": [0.40, 0.41, 0.39]}
    rows = rows_of(scores, nll)
    text = render(study, rows)
    means = {m: float(np.mean(v)) for m, v in nll.items()}
    assert means["liquid:sink_one"] == min(means.values())
    expected = (f"| c00: base | **{means['liquid:sink_one']:.3f}** | {means['averaged']:.3f} "
                f"| {means['oracle']:.3f} |")
    nll_table = overview(study, rows, "nll", "NLL")
    assert nll_table[0] == "## Overview: mean test NLL over seeds (lower is better)"
    assert expected in nll_table and expected in text
    assert text.index("mean test accuracy") < text.index("mean test NLL")
    # oracle says that it routes by the ground truth, in both overviews' headers
    assert text.count("| setting | liquid:sink_one | averaged | oracle (ground-truth routing) "
                      "|") == 2
    assert "| oracle (ground-truth routing) | **0.960 ± 0.025** |" in text
    assert display_name("liquid:sink_one/logits") == "liquid:sink_one/logits"
    assert overview(study, [{**r, "nll": None} for r in rows], "nll") == []


def test_label_leakage_renders_each_runs_value_or_a_marker_or_na(tmp_path: Path) -> None:
    leak = [0.97, 1.0, 0.99]
    expected = interval(leak)
    assert leakage_text(leak) == expected.text()
    assert expected.mean == pytest.approx(np.mean(leak))
    assert expected.half == pytest.approx(4.302652729911275 * np.std(leak, ddof=1)
                                          / math.sqrt(3))
    for marker in ("labels_at_party", "labels at every party", "True", True):
        assert leakage_text([marker, marker]) == LABELS_AT_PARTY
    assert leakage_text([None, None]) == "n/a"
    assert leakage_text(["gradients never leave the server"]) == \
        "gradients never leave the server"
    study = study_of(tmp_path, """
        base: BASE
        set: {data.options.n_samples: 300}
        seeds: 3
        methods: [liquid, averaged, local, splitnn]
    """)
    methods = ["liquid:sink_one", "averaged", "local", "splitnn"]
    rows = rows_of({m: [0.9, 0.8, 0.85] for m in methods}, {m: [0.3] * 3 for m in methods},
                   {"liquid:sink_one": leak, "averaged": ["labels_at_party"] * 3,
                    "local": ["labels at every party"] * 3})
    lines = render(study, rows).splitlines()

    def row(method: str) -> list[str]:
        line = next(x for x in lines if x.startswith(f"| {method} | ") and "0.850" in x)
        return [c.strip() for c in line.strip("|").split("|")]

    header = next(x for x in lines if x.startswith("| method |"))
    col = [c.strip() for c in header.strip("|").split("|")].index("label leakage")
    assert row("liquid:sink_one")[col] == expected.text()
    assert row("averaged")[col] == row("local")[col] == LABELS_AT_PARTY
    assert row("splitnn")[col] == "n/a"
    assert paired_difference(rows, "c00", "liquid:sink_one", "splitnn").mean == 0.0


def test_a_pooling_variant_shares_the_experts_trained_alone_and_nothing_else(
        tmp_path: Path) -> None:
    import dataclasses

    from liquid_fed.methods import MethodContext

    study = study_of(tmp_path, MIXED)
    setting = study.settings[0]
    base_cfg = study.config(setting, 0)
    base = MethodContext(base_cfg, data=None)
    trained = object()
    base._solos = trained  # what _train_solos would have returned
    variant = base.for_config(study.config(setting, 0, "averaged/logits"))
    assert variant.cfg.ensemble.mix == "logits" and variant.solos() is trained
    assert base.for_config(base_cfg) is base
    other = dataclasses.replace(base_cfg, train=dataclasses.replace(base_cfg.train, epochs=7))
    with pytest.raises(ValueError, match="differs in more than its ensemble section"):
        base.for_config(other)


def test_regression_rows_carry_the_mse_of_every_method_under_an_mse_header(
        tmp_path: Path) -> None:
    path = tmp_path / "study.yaml"
    path.write_text(textwrap.dedent("""
        name: reg
        base: BASE
        set: {data.options.n_samples: 300, train.epochs: 1, train.eval_every: 0}
        seeds: 1
        methods: [liquid, uniform, splitnn]
    """).replace("BASE", str(ROOT / "configs" / "regression.yaml")))
    study = load_study(path)
    out = tmp_path / "out"
    prepare_study(study, out, resume=False)
    setting, seed = next(iter(study.cells()))
    run_cell(study, setting, seed, study.methods, out, None, lambda *a: None)
    rows = collect(study, out)
    assert {r["metric"] for r in rows} == {"rmse"}
    for row in rows:  # the Liquid Ensemble's summary has no "mse": it is the RMSE squared
        assert row["nll"] == pytest.approx(row["score"] ** 2, rel=1e-5), row["method"]
    text = render(study, rows)
    assert "## Overview: mean test MSE over seeds" in text
    header = next(x for x in text.splitlines() if x.startswith("| method |"))
    assert "| MSE |" in header and "NLL" not in header
