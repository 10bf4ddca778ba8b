"""pre_deploy_checks: everything a deploy needs, checked before anything changes. One line per
check; a failure says what is wrong and what to do."""

from __future__ import annotations

import math
import re

from scripts.deploy import commands, https
from scripts.deploy.deploy import already_live, live_state
from scripts.deploy.lock import describe, holder_is_dead
from scripts.deploy.server import Server
from scripts.settings import Settings


def required_sudo(settings: Settings) -> list[str]:
    unit = commands.units(settings)
    return [f"/usr/bin/systemctl restart {unit['app']}",
            f"/usr/bin/systemctl start {unit['migrate']}",
            f"/usr/bin/systemctl start {unit['preflight']}",
            f"/usr/bin/systemctl stop {unit['preflight']}",
            "/usr/sbin/nginx -t"]


# check's line when `sudo nginx -t` passed: `doit deploy` hands the servers that said it to
# verify, whose guide check would run the same command again (ship changes no nginx file).
NGINX_VALID = "nginx configuration valid"

REBUILD = ("run `doit deploy` (it builds for what the servers report) or `doit target build`, "
           "or set TARGET_PYTHON and TARGET_PLATFORM and rebuild")


def python_results(state: dict, target: dict) -> list[tuple[bool, str]]:
    """The server's Python, venv support, architecture and glibc against the package's wheels."""
    results = []
    wanted = target["python"]
    if state["python"] == wanted:
        results.append((True, f"server Python {state['python']} matches the wheels"))
    else:
        results.append((False, f"server Python is {state['python']} but the package's wheels are "
                               f"for {wanted}; {REBUILD}"))
    if state.get("venv", True):
        results.append((True, "server Python can create virtualenvs"))
    else:
        results.append((False, f"server Python {state['python']} cannot create virtualenvs "
                               f"(ensurepip is missing); install the python3-venv package "
                               f"(`apt-get install python3-venv`) or run `doit setup`"))
    platform = target["platform"]
    if not platform.endswith(state["machine"]):
        results.append((False, f"server is {state['machine']}, the wheels are for {platform}; "
                               f"{REBUILD}"))
    elif _glibc_too_new(platform, state.get("glibc", "")):
        results.append((False, f"server has glibc {state['glibc']}, the wheels need {platform}; "
                               f"{REBUILD}"))
    else:
        results.append((True, f"server architecture {state['machine']}"))
    return results


def _glibc_too_new(platform: str, server_glibc: str) -> bool:
    match = re.fullmatch(r"manylinux_(\d+)_(\d+)_\w+", platform)
    have = re.fullmatch(r"(\d+)\.(\d+)", server_glibc)
    if not (match and have):
        return False
    return tuple(map(int, match.groups())) > tuple(map(int, have.groups()))


def needed_mb(manifest: dict, settings: Settings) -> int:
    unpacked = sum(entry["size"] for entry in manifest["files"] + manifest["wheels"])
    return math.ceil(unpacked * 3 / 1e6) + settings.min_free_mb  # package + release + venv


def check_server(server: Server, settings: Settings, manifest: dict,
                 stop_if_live: bool = False) -> list[tuple[bool, str]]:
    """Every pre-deploy check; with stop_if_live (`doit deploy`), a server that already serves
    the release and went live with it before needs none: ship will change nothing there."""
    results: list[tuple[bool, str]] = [(True, f"SSH as {server.target.reached()}, host key "
                                                 f"verified")]
    path = str(server.deploy_path)
    if not server.ensure_tool():
        return results + [(False, f"{path} is not set up for deploys; run `doit setup`")]
    state = live_state(server, settings, manifest["release_id"])
    if stop_if_live and already_live(state, manifest["release_id"]):
        # Nothing will be shipped here, so nothing needs checking: a same-package deploy
        # costs one probe.
        return results + [(True, f"release {manifest['release_id']} is already live and good "
                                 f"here; ship will change nothing")]
    results += python_results(state, manifest["target"])
    listing = server.sudo(["-l"], check=False, reads=True).stdout
    missing = [command for command in required_sudo(settings) if command not in listing]
    if missing:
        results.append((False, f"{server.target.user} may not run `sudo {missing[0]}`; run `doit "
                               f"setup` (it installs the sudoers rules)"))
    else:
        results.append((True, f"{server.target.user} has the sudo rights deploys need"))
    nginx = server.sudo(["nginx", "-t"], check=False, reads=True)
    results.append((nginx.status == 0, NGINX_VALID if nginx.status == 0 else
                    f"`nginx -t` fails: {nginx.error_line}; fix nginx before deploying"))
    results += https.check_results(server, settings)
    need = needed_mb(manifest, settings)
    free = server.tool_call("disk", path, str(settings.backup_path))["free_mb"]
    for folder, free_mb in free.items():
        if free_mb >= need:
            results.append((True, f"{folder}: {free_mb} MB free (needs {need})"))
        else:
            results.append((False, f"{folder} has {free_mb} MB free, a deploy needs {need} MB "
                                   f"(release, venv and backup, plus MIN_FREE_MB); free some "
                                   f"space first"))
    lock = state.get("lock")
    if not lock:
        results.append((True, "no deploy lock held"))
    elif holder_is_dead(lock):
        results.append((True, f"stale lock of a dead deploy ({describe(lock)}); the next deploy "
                              f"breaks it"))
    else:
        results.append((False, f"a deploy lock is held by {describe(lock)}; wait, or if that "
                               f"deploy died run `doit unlock`"))
    return results
