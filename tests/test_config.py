"""The typed config tree: defaults, YAML and --set overrides, errors at the door."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from liquid_fed.config import (
    ConfigError,
    RunConfig,
    build_config,
    config_from_yaml_text,
    load_config,
    parse_override,
)

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_defaults_round_trip_through_yaml() -> None:
    cfg = build_config()
    assert isinstance(cfg, RunConfig)
    again = config_from_yaml_text(cfg.to_yaml())
    assert again == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load_and_round_trip(path: Path) -> None:
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    assert cfg.name == raw["name"]
    assert config_from_yaml_text(cfg.to_yaml()) == cfg


def test_overrides_set_nested_values_with_yaml_types() -> None:
    cfg = build_config({}, ["train.epochs=7", "ensemble.solver=sink_many", "optim.lr=0.5",
                            "views.options={grid: [2, 2]}", "baselines.uniform=false"])
    assert cfg.train.epochs == 7 and isinstance(cfg.train.epochs, int)
    assert cfg.ensemble.solver == "sink_many"
    assert cfg.optim.lr == 0.5
    assert cfg.views.options == {"grid": [2, 2]}
    assert cfg.baselines.uniform is False


def test_integral_float_is_accepted_for_int_and_int_for_float() -> None:
    cfg = build_config({"train": {"epochs": 3.0}, "optim": {"lr": 1}})
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize(
    ("data", "overrides", "expected"),
    [
        ({"trian": {}}, [], 'unknown config key "trian"'),
        ({"train": {"epoch": 3}}, [], 'unknown config key "train.epoch"'),
        ({}, ["train.epochs=-1"], "train.epochs: got -1"),
        ({}, ["train.epochs=abc"], "train.epochs: got 'abc'; expected an integer"),
        ({}, ["train.epochs=2.5"], "train.epochs: got 2.5; expected an integer"),
        ({}, ["ensemble.solver=sink_two"], 'ensemble.solver: got "sink_two"; accepted: '),
        ({}, ["ensemble.epsilon=0"], "ensemble.epsilon: got 0.0; must lie in (0, 1)"),
        ({}, ["ensemble.penalty=1"], "ensemble.penalty: got 1.0; must lie in [0, 1)"),
        ({}, ["optim.name=rmsprop"], 'optim.name: got "rmsprop"; accepted: sgd, adam, adamw'),
        ({}, ["train.batch_size=512"], "train.batch_size: got 512; must be <= train.chunk_size"),
        ({}, ["data.val=0.5", "data.test=0.5"], "data.val + data.test"),
        ({}, ["baselines.uniform=maybe"], "baselines.uniform: got 'maybe'; expected true or false"),
        ({}, ["server.device=tpu"], 'server.device: got "tpu"; accepted: auto, cpu'),
        ({"experts": {"per_client": [{"kind": "mlp"}]}}, [],
         "experts.per_client: got 1 entries; needs one per client (views.n_views = 4)"),
        ({"experts": {"per_client": [{"kind": "mlp", "opts": {}}] * 4}}, [],
         'unknown config key "experts.per_client[0].opts"'),
        ({"train": 3}, [], "train: got 3; expected a mapping"),
    ],
)
def test_bad_keys_and_values_name_the_dotted_key(data, overrides, expected) -> None:
    with pytest.raises(ConfigError) as err:
        build_config(data, overrides)
    assert expected in str(err.value)


def test_parse_override_rejects_malformed_text() -> None:
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        parse_override("train.epochs")
    with pytest.raises(ConfigError, match="empty key part"):
        parse_override("train..epochs=3")
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping at the top level"):
        load_config(listy)


def test_ensemble_section_is_the_layer_config() -> None:
    from liquid_fed.ensemble import LiquidConfig

    cfg = build_config({}, ["ensemble.solver=sink_many", "ensemble.load_weight=0.25"])
    assert type(cfg.ensemble) is LiquidConfig  # one class: no copy to keep in step
    assert cfg.ensemble == LiquidConfig(solver="sink_many", load_weight=0.25)
    assert "task" not in cfg.to_dict()["ensemble"]  # filled in from the data
    with pytest.raises(ConfigError, match='unknown config key "ensemble.task"'):
        build_config({"ensemble": {"task": "regression"}})
    with pytest.raises(ConfigError, match=r"ensemble.load_temperature: got 0.0; must lie in "
                                          r"\(0, inf\]"):
        build_config({}, ["ensemble.load_temperature=0"])


FLOAT_KEYS = ["ensemble.epsilon", "ensemble.penalty", "optim.lr", "federation.reply_timeout",
              "views.overlap", "data.val", "data.test", "ensemble.load_weight",
              "optim.weight_decay", "privacy.noise", "server.reply_limit", "views.noise"]


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_numbers_are_refused_everywhere(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}: got -?(nan|inf); expected a finite number"):
        build_config({}, [f"{key}={value}"])


def test_non_finite_numbers_inside_options_are_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"data.options.noise: got nan; numbers in a config "
                                          r"must be finite"):
        build_config({}, ["data.options={noise: .nan}"])
    with pytest.raises(ConfigError, match=r"experts.options.widths\[1\]: got inf"):
        build_config({}, ["experts.options={widths: [1, .inf]}"])


@pytest.mark.parametrize("device", ["cudaXYZ", "cuda:x", "gpu", "cuda:-1", "cpu0"])
def test_device_names_are_checked(device: str) -> None:
    with pytest.raises(ConfigError, match=f'server.device: got "{device}"; accepted: auto, cpu'):
        build_config({}, [f"server.device={device}"])


@pytest.mark.parametrize("name", ["../../x", "a/b", ".hidden", "", "x" * 129, "/abs"])
def test_run_names_stay_inside_out(name: str) -> None:
    with pytest.raises(ConfigError, match="name: got .* a run name is one folder name"):
        build_config({"name": name})


def test_a_key_written_twice_is_refused_naming_it_and_its_lines(tmp_path: Path) -> None:
    # PyYAML keeps the last of two equal keys without a word: the first section would vanish.
    path = tmp_path / "twice.yaml"
    path.write_text("train: {epochs: 1}\nseed: 2\ntrain: {epochs: 3}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"config file {str(path)!r}: key 'train' appears twice in one "
                              "mapping (lines 1 and 3); write it once")
    with pytest.raises(ConfigError, match="key 'epochs' appears twice"):
        build_config({}, ["train={epochs: 1, epochs: 2}"])
    # a << merge may be overridden, as YAML intends
    merged = tmp_path / "merge.yaml"
    merged.write_text("x: &opt {epochs: 1, batch_size: 32}\n"
                      "train: {<<: *opt, epochs: 2}\n".replace("x:", "name: m\n_x:"))
    from liquid_fed.config import safe_yaml

    assert safe_yaml(merged.read_text(), "m")["train"] == {"epochs": 2, "batch_size": 32}


def test_yaml_alias_bombs_are_refused_quickly(tmp_path: Path) -> None:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):  # 9**9 ~ 3.9e8 leaves once expanded, in a ~600-byte file
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [{', '.join(['*' + prev] * 9)}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\nname: bomb\n")
    assert bomb.stat().st_size < 700
    with pytest.raises(ConfigError, match="aliases expand beyond 100000 nodes"):
        load_config(bomb)
    (tmp_path / "loop.yaml").write_text("data: &x {options: {x: *x}}\n")
    with pytest.raises(ConfigError, match="alias bomb or a recursive alias"):
        load_config(tmp_path / "loop.yaml")
    parts = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        parts.append(f"{cur}: &{cur} [{', '.join(['*' + prev] * 9)}]")
    with pytest.raises(ConfigError, match="override .* aliases expand beyond"):
        build_config({}, ["views.options={" + ", ".join(parts) + "}"])


def test_config_files_that_are_no_text_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path)  # a directory
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(binary)
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbfname: bom\n")
    assert load_config(bom).name == "bom"


def _absent(*entries: str) -> list[str]:
    return [f"availability.absent=[{', '.join(entries)}]"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["availability.dropout=1"], "availability.dropout: got 1.0; must lie in [0, 1)"),
        (["availability.dropout=-0.1"], "availability.dropout: got -0.1; must lie in [0, 1)"),
        (["availability.dropout=often"], "availability.dropout: got 'often'; expected a number"),
        (["availability.absent={client: 1}"], "availability.absent: got {'client': 1}; "
                                              "expected a list"),
        (_absent("{client: 4, from_round: 1, to_round: 2}"),
         "availability.absent[0].client: got 4; must lie in [0, 3] (views.n_views = 4)"),
        (_absent("{client: -1, from_round: 1, to_round: 2}"),
         "availability.absent[0].client: got -1; must lie in [0, 3]"),
        (_absent("{client: 0, from_round: 1, to_round: 2}", "{client: 1, from_round: 0, "
                                                            "to_round: 2}"),
         "availability.absent[1].from_round: got 0; rounds are counted from 1"),
        (_absent("{client: 0, from_round: 5, to_round: 4}"),
         "availability.absent[0].to_round: got 4; must be >= from_round (5)"),
        (_absent("{client: 0, from_round: 1}"),
         "availability.absent[0]: got {'client': 0, 'from_round': 1}, which lacks to_round"),
        (_absent("{client: 0, from_round: 1, to_round: 2, until: 3}"),
         'unknown config key "availability.absent[0].until" (accepted: client, from_round, '
         "to_round)"),
        (_absent("{client: 0, from_round: one, to_round: 2}"),
         "availability.absent[0].from_round: got 'one'; expected an integer"),
        (_absent("{client: true, from_round: 1, to_round: 2}"),
         "availability.absent[0].client: got True; expected an integer"),
        (_absent("{client: 0, from_round: 1, to_round: 9}", "{client: 1, from_round: 3, "
                 "to_round: 5}", "{client: 2, from_round: 5, to_round: 7}",
                 "{client: 3, from_round: 4, to_round: 6}"),
         "availability.absent: every client is scheduled absent in round 5; at least one must "
         "answer every round"),
        (["availability.rate=0.1"], 'unknown config key "availability.rate"'),
    ],
)
def test_bad_availability_is_refused_naming_the_key(overrides: list[str],
                                                    expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config({}, overrides)
    assert expected in str(err.value)


def test_availability_round_trips_and_accepts_overlapping_windows() -> None:
    cfg = build_config({}, ["availability.dropout=0.3", *_absent(
        "{client: 0, from_round: 1, to_round: 9}", "{client: 1, from_round: 3, to_round: 5}",
        "{client: 2, from_round: 6, to_round: 7}", "{client: 3, from_round: 4, to_round: 6}",
        "{client: 0, from_round: 12, to_round: 12.0}")])
    assert cfg.availability.dropout == 0.3
    assert cfg.availability.absent[4] == {"client": 0, "from_round": 12, "to_round": 12}
    assert config_from_yaml_text(cfg.to_yaml()) == cfg
    assert build_config().availability.absent == [] and build_config().availability.dropout == 0


def test_overrides_leave_the_callers_dict_alone() -> None:
    base = {"train": {"epochs": 3}, "views": {"options": {"grid": [2, 2]}}}
    cfg = build_config(base, ["train.epochs=5", "views.options.grid=[1, 4]"])
    assert (cfg.train.epochs, cfg.views.options["grid"]) == (5, [1, 4])
    assert base == {"train": {"epochs": 3}, "views": {"options": {"grid": [2, 2]}}}


def test_federation_keys_are_checked_and_the_old_timeout_is_read() -> None:
    # A run folder written before federation.reply_timeout existed still resumes.
    cfg = build_config({"simulation": {"timeout": 42.0}})
    assert cfg.federation.reply_timeout == 42.0 and "timeout" not in cfg.to_dict()["simulation"]
    bad = {
        "federation.min_clients=5": r"federation.min_clients: got 5; must be <= the number of "
                                    r"clients \(views.n_views = 4\)",
        "federation.on_bad_reply=ignore": 'federation.on_bad_reply: got "ignore"; accepted: '
                                          "drop, fail",
        "federation.faults=[{client: 4, round: 1, kind: crash}]":
            r"federation.faults\[0\].client: got 4; must lie in \[0, 3\]",
        "federation.faults=[{client: 0, round: 0, kind: crash}]":
            r"federation.faults\[0\].round: got 0; rounds are counted from 1",
        "federation.faults=[{client: 0, round: 1, kind: explode}]":
            r"federation.faults\[0\].kind: got 'explode'; accepted: crash, hang, nan",
        "federation.faults=[{client: 0, round: 1}]": "which lacks kind",
        "federation.faults=[{client: 0, round: 1, kind: hang, seconds: -1}]":
            r"federation.faults\[0\].seconds: got -1; expected a positive number",
        "federation.faults=[{client: 0, round: 1, kind: nan, when: 3}]":
            r'unknown config key "federation.faults\[0\].when"',
        "federation.faults=[{client: 1, round: 2, kind: nan}, {client: 1, round: 2, kind: crash}]":
            "client 1 already has a fault in round 2",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            build_config({}, [override])


def test_the_seed_is_checked_at_the_door() -> None:
    for seed in (2**63, -1, 2**32):
        with pytest.raises(ConfigError, match=rf"seed: got {seed}; must lie in \[0, 4294967295\]"):
            build_config({"seed": seed})
    assert build_config({"seed": 2**32 - 1}).seed == 2**32 - 1
