"""Which Python and platform the build targets, and how check compares a server with the wheels."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.build.target import ServerFacts, build_target, record_fleet_target
from scripts.deploy.check import python_results
from scripts.errors import ToolkitError
from scripts.settings import load_settings


def settings_in(tmp_path: Path, **values: str):
    return load_settings(env_file=Path("/nonexistent"),
                         environ={"DIST_DIR": str(tmp_path), **values})


def test_server_facts_give_a_manylinux_tag_of_their_glibc():
    assert ServerFacts("web-1", "3.13", "x86_64", "2.41").platform == "manylinux_2_41_x86_64"
    assert ServerFacts("web-1", "3.11", "aarch64", "2.36").platform == "manylinux_2_36_aarch64"
    assert ServerFacts("web-1", "3.12", "x86_64", "").platform == "linux_x86_64"


def test_the_servers_report_wins_over_the_fallback_and_the_settings_win_over_both(tmp_path):
    assert (build_target(settings_in(tmp_path)).target_python) == "3.11"
    target, changed = record_fleet_target(settings_in(tmp_path),
                                          [ServerFacts("web-1", "3.13", "aarch64", "2.41")])
    assert changed and target == {"python": "3.13", "platform": "manylinux_2_41_aarch64"}
    built = build_target(settings_in(tmp_path))
    assert (built.target_python, built.target_platform) == ("3.13", "manylinux_2_41_aarch64")
    chosen = build_target(settings_in(tmp_path, TARGET_PYTHON="3.12",
                                      TARGET_PLATFORM="manylinux_2_28_x86_64"))
    assert (chosen.target_python, chosen.target_platform) == ("3.12", "manylinux_2_28_x86_64")


def test_recording_the_same_target_again_changes_nothing(tmp_path):
    facts = [ServerFacts("web-1", "3.13", "x86_64", "2.41")]
    record_fleet_target(settings_in(tmp_path), facts)
    assert record_fleet_target(settings_in(tmp_path), facts)[1] is False


def test_a_fleet_takes_the_oldest_glibc_and_refuses_mixed_pythons(tmp_path):
    target, _ = record_fleet_target(settings_in(tmp_path), [
        ServerFacts("web-1", "3.11", "x86_64", "2.41"), ServerFacts("web-2", "3.11", "x86_64",
                                                                    "2.36")])
    assert target["platform"] == "manylinux_2_36_x86_64"
    with pytest.raises(ToolkitError, match=r"servers differ \(web-1 Python 3.11 x86_64, web-2 "
                                           r"Python 3.13 x86_64\).*deploy them separately"):
        record_fleet_target(settings_in(tmp_path), [
            ServerFacts("web-1", "3.11", "x86_64", "2.36"),
            ServerFacts("web-2", "3.13", "x86_64", "2.41")])


TRIXIE = {"python": "3.13", "machine": "x86_64", "glibc": "2.41", "venv": True}


def failures(state, target):
    return [text for ok, text in python_results(state, target) if not ok]


def test_check_passes_a_server_that_matches_the_wheels():
    assert failures(TRIXIE, {"python": "3.13", "platform": "manylinux_2_41_x86_64"}) == []
    assert failures(TRIXIE, {"python": "3.13", "platform": "manylinux_2_36_x86_64"}) == []


@pytest.mark.parametrize("state, target, message", [
    ({**TRIXIE, "python": "3.11"}, {"python": "3.13", "platform": "manylinux_2_41_x86_64"},
     "server Python is 3.11 but the package's wheels are for 3.13; run `doit deploy`"),
    ({**TRIXIE, "venv": False}, {"python": "3.13", "platform": "manylinux_2_41_x86_64"},
     "cannot create virtualenvs (ensurepip is missing); install the python3-venv package"),
    (TRIXIE, {"python": "3.13", "platform": "manylinux_2_41_aarch64"},
     "server is x86_64, the wheels are for manylinux_2_41_aarch64"),
    ({**TRIXIE, "glibc": "2.36"}, {"python": "3.13", "platform": "manylinux_2_41_x86_64"},
     "server has glibc 2.36, the wheels need manylinux_2_41_x86_64"),
])
def test_check_says_what_does_not_match(state, target, message):
    assert [text for text in failures(state, target) if message in text], failures(state, target)
