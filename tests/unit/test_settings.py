"""Settings: YAML + ITVNODE_* environment, and errors that name the bad key."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from models.post.temporal import TemporalParams
from service.setting_values import Destination
from service.settings import SettingsError, TemporalSettings, load_settings
from worker.engine_settings import engine_config, temporal_params


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("ITVNODE_"):
            monkeypatch.delenv(key)


def test_defaults_and_derived_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ITVNODE_DATA_DIR", str(tmp_path))
    s = load_settings()
    assert s.ae_title == "ITVNODE" and s.port == 11112 and s.broker_url is None
    assert s.spool_dir == tmp_path / "spool" and s.outbox_dir == tmp_path / "outbox"
    assert [x.name for x in s.structures] == ["External", "Lung", "Heart", "GTVp"]


def test_comma_separated_env_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ITVNODE_ALLOWED_CALLERS", "PACS, CT_SIM,")
    monkeypatch.setenv("ITVNODE_DESTINATIONS", "ECLIPSE@10.1.2.20:104,PACS@pacs.local:11112")
    monkeypatch.setenv("ITVNODE_QUIET_PERIOD", "12.5")
    s = load_settings()
    assert s.allowed_callers == ["PACS", "CT_SIM"]
    assert s.destinations == [Destination(ae_title="ECLIPSE", host="10.1.2.20", port=104),
                              Destination(ae_title="PACS", host="pacs.local", port=11112)]
    assert str(s.destinations[0]) == "ECLIPSE@10.1.2.20:104"
    assert s.quiet_period == 12.5


def test_yaml_file_and_env_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "itvnode.yaml"
    cfg.write_text("ae_title: NODE_A\nport: 4242\nphase_rules:\n  - pattern: 'Ph(?P<pct>\\d+)'\n"
                   "allowed_callers: [PACS]\ncaller_ips: {PACS: [10.0.0.1]}\n")
    monkeypatch.setenv("ITVNODE_PORT", "5000")
    s = load_settings(cfg)
    assert s.ae_title == "NODE_A" and s.port == 5000  # environment wins over the file
    assert s.phase_rules[0].pattern == "Ph(?P<pct>\\d+)"
    assert s.caller_ips == {"PACS": ["10.0.0.1"]}


@pytest.mark.parametrize(
    ("env", "value", "named"),
    [
        ("ITVNODE_PORT", "eleven", "port"),
        ("ITVNODE_PORT", "70000", "port"),
        ("ITVNODE_AE_TITLE", "A_TITLE_THAT_IS_TOO_LONG", "ae_title"),
        ("ITVNODE_DESTINATIONS", "PACS@host", "destinations"),
        ("ITVNODE_ALLOWED_CALLERS", "OK,BAD\\AE", "allowed_callers"),
        ("ITVNODE_QUIET_PERIOD", "-1", "quiet_period"),
        ("ITVNODE_LAYOUT", "single", "layout"),
        ("ITVNODE_CALLER_IPS", "not-json", "caller_ips"),
    ],
)
def test_bad_values_name_the_key(monkeypatch: pytest.MonkeyPatch, env: str, value: str, named: str) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError, match=named):
        load_settings()


def test_bad_yaml_keys_and_structures(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("unknown_knob: 1\n")
    with pytest.raises(SettingsError, match="unknown_knob"):
        load_settings(cfg)
    cfg.write_text("structures:\n  - {name: GTVp_with_a_long_name, prompt: tumour}\n")
    with pytest.raises(SettingsError, match="structures.0.name"):
        load_settings(cfg)
    cfg.write_text("phase_rules:\n  - pattern: 'no group'\n")
    with pytest.raises(SettingsError, match="pct"):
        load_settings(cfg)


def test_cli_reports_bad_setting_without_traceback(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "ITVNODE_DATA_DIR": str(tmp_path), "ITVNODE_PORT": "not-a-port"}
    out = subprocess.run([sys.executable, "-m", "itvnode.cli", "status", "--json"], env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2
    assert "setting 'port'" in out.stderr and "Traceback" not in out.stderr


def test_caller_ips_need_the_allowlist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ITVNODE_CALLER_IPS", '{"PACS": ["10.0.0.1"]}')
    with pytest.raises(SettingsError, match="caller_ips is set but allowed_callers is empty"):
        load_settings()
    monkeypatch.setenv("ITVNODE_ALLOWED_CALLERS", "PACS,CT_SIM")
    s = load_settings()
    assert s.caller_ips == {"PACS": ["10.0.0.1"]} and s.allowed_callers == ["PACS", "CT_SIM"]
    monkeypatch.setenv("ITVNODE_CALLER_IPS", '{"PACS": [" 0:0::1 "]}')
    assert load_settings().caller_ips == {"PACS": ["::1"]}  # compared as the server prints peer addresses


def test_yaml_groups_read_as_their_flat_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "itvnode.yaml"
    cfg.write_text("temporal: {motion_mm: 12, min_phases: 4}\nnetwork: {port: 104}\n"
                   "export: {retry_base: 5}\n")
    s = load_settings(cfg)
    assert (s.temporal_motion_mm, s.temporal_min_phases, s.port, s.export_retry_base) == (12.0, 4, 104, 5.0)
    monkeypatch.setenv("ITVNODE_TEMPORAL_MOTION_MM", "20")  # the environment still wins
    assert load_settings(cfg).temporal_motion_mm == 20.0
    cfg.write_text("temporal: {motion_mm: 12}\ntemporal_motion_mm: 10\n")
    with pytest.raises(SettingsError, match="given twice"):
        load_settings(cfg)
    cfg.write_text("temporal: {nope: 1}\n")
    with pytest.raises(SettingsError, match="temporal.nope"):
        load_settings(cfg)


def test_every_temporal_param_is_a_setting_with_its_default() -> None:
    """One hop from the ``temporal`` group to the engine's rule: setting ``temporal_<f>`` is field ``f``."""
    assert {f.name for f in fields(TemporalParams)} == {
        n.removeprefix("temporal_") for n in TemporalSettings.model_fields}
    assert temporal_params(TemporalSettings()) == TemporalParams()
    s = load_settings(temporal_circular=False, temporal_connectivity=1, temporal_centroid_volume_ratio=0.25)
    assert engine_config(s).temporal == TemporalParams(circular=False, connectivity=1,
                                                       centroid_volume_ratio=0.25)
    with pytest.raises(SettingsError):
        load_settings(temporal_connectivity=4)
