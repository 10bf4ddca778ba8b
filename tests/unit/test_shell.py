"""Every shell file is ShellCheck clean with no blanket disables; the bats suite passes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.settings import REPO_ROOT

TOOLS = Path(sys.executable).parent


def tool(name: str) -> str:
    found = TOOLS / name if (TOOLS / name).exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed; run .ci/install")
    return str(found)


def shell_files() -> list[Path]:
    tracked = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files"], capture_output=True,
                             text=True, check=True).stdout.split()
    untracked = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files", "--others",
                                "--exclude-standard"], capture_output=True, text=True,
                               check=True).stdout.split()
    names = [n for n in tracked + untracked
             if n.endswith((".sh", ".bats")) or n in (".ci/run", ".ci/install")]
    return [REPO_ROOT / n for n in sorted(set(names)) if (REPO_ROOT / n).exists()]


def test_the_shell_files_are_found():
    names = {p.relative_to(REPO_ROOT).as_posix() for p in shell_files()}
    assert {"server_setup.sh", ".ci/run", ".ci/install", "tests/shell/server_setup.bats"} <= names


def test_shellcheck_is_clean():
    result = subprocess.run([tool("shellcheck"), "-x", *map(str, shell_files())],
                            capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_blanket_shellcheck_disables():
    assert not (REPO_ROOT / ".shellcheckrc").exists()
    for path in shell_files():
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if "shellcheck disable" in line:
                assert re.search(r"disable=SC\d{4}\s+#\s*\S", line), \
                    f"{path.name}:{number}: a disable names one check and says why"


def test_bats_unit_tests_pass():
    result = subprocess.run([tool("bats"), str(REPO_ROOT / "tests" / "shell")],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^1\.\.\d+", result.stdout, re.M) and " not ok " not in result.stdout


@pytest.mark.parametrize("as_file", [True, False])
def test_ci_ssh_gives_the_toolkit_ssh_config_as_a_file_whether_a_file_variable_or_text(
        tmp_path, as_file):
    config_text = "Host prod\n  HostName 10.0.0.5\n  ProxyJump bastion"
    key = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    if as_file:  # a GitLab File variable holds the path of a file with the text
        (tmp_path / "config_variable").write_text(config_text + "\n")
    env = {"PATH": "/usr/bin:/bin", "SSH_KNOWN_HOSTS": "bastion ssh-ed25519 AAAA",
           "SSH_PRIVATE_KEY": key.read_text(),
           "SSH_CONFIG": str(tmp_path / "config_variable") if as_file else config_text}
    script = f'source {REPO_ROOT / "scripts/ci-ssh.sh"} && cat -- "$SSH_CONFIG"'
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == config_text + "\n"


def test_setup_output_leaves_out_apts_debconf_noise_and_keeps_the_steps():
    from scripts.provision import shown
    assert not shown("debconf: delaying package configuration, since apt-utils is not installed")
    assert not shown("debconf: unable to initialize frontend: Dialog")
    assert shown("changed: install nginx ufw")
    assert shown("error: apt-get install failed")
