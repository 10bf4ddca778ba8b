"""post_deploy_verification: the service is up, answers directly and through nginx with the
expected release, and the user's guide's step 5 and monitoring commands work as written."""

from __future__ import annotations

import json

from scripts.deploy import commands, https, maintenance
from scripts.deploy.server import Result, Server
from scripts.settings import Settings


# The guide's check that `nginx_checked` stands for: the very command check ran.
NGINX_TEST = "sudo nginx -t"


def verify_server(server: Server, settings: Settings, expected: str, public_url: str,
                  nginx_checked: bool = False) -> list[tuple[bool, str]]:
    """Every check on the server in one call of its tool (side by side, one round trip), then
    the app from here. `nginx_checked`: this `doit deploy`'s check passed `sudo nginx -t` here
    and ship changes no nginx file, so it is not run again (a sudo and a parse of nginx's
    configuration, ~11 ms of the server's CPU)."""
    health = [(f"app on 127.0.0.1:{settings.app_port}",
               commands.health_url(settings.app_port, settings.health_path)),
              ("nginx on port 80", commands.health_url(80, settings.health_path))]
    optional_logs = commands.app_log_files()
    checks = [(label, argv, optional_logs.get(label, ""))
              for label, argv in commands.guide_checks(settings)]
    skipped = {NGINX_TEST} if nginx_checked else set()
    spec = {"active": settings.service_name, "expected": expected, "timeout": 10,
            "health": health, "commands": [check for check in checks if check[0] not in skipped]}
    answers = server.tool_call("verify", json.dumps(spec))["answers"]
    _, state = answers[0]
    results = [(state == "active", f"{settings.service_name} is {state or 'unknown'}")]
    for (label, _), (verdict, said) in zip(health, answers[1:]):
        results.append((True, f"{label} answers {_release_said(said)}") if verdict == "healthy"
                       else (False, f"{label}: {server.name}: health failed: {said}"))
    results += _https_results(server, settings, expected)
    if maintenance.state(server) is None:
        results.append(_from_outside(public_url, settings.health_path, expected))
    else:  # the public gets the 503 page on purpose: no reason to roll back
        results.append((True, f"{public_url} from here: not checked, maintenance mode is on "
                              f"(`doit maintenance off` ends it)"))
    guide_answers = iter(answers[1 + len(health):])
    for label, _, log_file in checks:
        if label in skipped:
            results.append((True, f"guide: {label}: passed in this deploy's check (ship "
                                  f"changes no nginx file)"))
            continue
        answer = next(guide_answers)
        if answer[0] == "empty":
            # setup creates the files (root's folder, the app's files); empty means the app
            # logs elsewhere, which is fine: the journal has it.
            results.append((True, f"guide: {label}: {log_file} is empty; the app logs to the "
                                  f"journal (`journalctl -u {settings.service_name}`)"))
            continue
        _, status, stderr = answer
        results.append((status == 0, f"guide: {label}" if status == 0 else
                        f"guide: {label} fails: {Result(status, '', stderr).error_line}"))
    return results


def _https_results(server: Server, settings: Settings, expected: str) -> list[tuple[bool, str]]:
    """HTTPS=1: nginx answers on port 443 with the release, with a certificate not expired."""
    if not settings.https:
        return []
    name = https.primary_name(settings)
    days = https.certificate_days(server, settings)
    results = [(days is not None and days >= 0, https.expiry_text(settings, days))]
    answer = server.run(https.health_argv(name, settings.health_path), check=False, reads=True)
    release = reported_release(answer.stdout) if answer.status == 0 else None
    if answer.status != 0:
        results.append((False, f"nginx on port 443 for {name}: {answer.error_line}"))
    elif release in (None, expected):
        results.append((True, f"nginx on port 443 for {name} answers {_release_said(release)}"))
    else:
        results.append((False, f"nginx on port 443 for {name} answers release {release}, not "
                               f"{expected}"))
    return results


def _release_said(release) -> str:
    return f"with release {release}" if release else "2xx (it reports no release)"


def reported_release(body: str) -> str | None:
    """A health answer's `release`: JSON with one is a bonus check; plain text is fine too."""
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    return answer.get("release") if isinstance(answer, dict) else None


def _from_outside(public_url: str, health_path: str, expected: str) -> tuple[bool, str]:
    import requests  # here: a deploy that ships nothing never verifies (~0.1 s of start-up)

    url = public_url.rstrip("/") + health_path
    try:
        response = requests.get(url, timeout=10)
    except requests.RequestException as error:
        return False, f"{url} from here: {type(error).__name__}"
    release = reported_release(response.text) if response.ok else None
    if response.ok and release in (None, expected):
        return True, f"{url} from here answers {_release_said(release)}"
    if response.ok:
        return False, f"{url} from here answers release {release}, not {expected}"
    return False, f"{url} from here: HTTP {response.status_code}"
