"""The provisioning stamp: server_setup.sh writes, as root, which script and templates provisioned
the server and with which settings (/etc/<SERVICE_NAME>/server-setup.stamp, no secrets). The
deploy user reads it; this module compares it with the local copy of the script and conf/ and the
settings, and says in one line whether the server is current or behind."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import PurePosixPath

from scripts.settings import Settings

# Flags whose stamp value may rightly differ from what the settings compute here: the port ssh
# reaches from here is not always the one sshd listens on (forwards, NAT, a bastion).
NOT_COMPARED = {"SSH_PORT"}


def stamp_path(service_name: str) -> PurePosixPath:
    return PurePosixPath("/etc") / service_name / "server-setup.stamp"


def parse(text: str) -> dict[str, str]:
    pairs = (line.partition("=") for line in text.splitlines()
             if line.strip() and not line.startswith("#"))
    return {name: value for name, _, value in pairs}


def expected_settings(flags: list[str]) -> dict[str, str]:
    """server_setup.sh's settings as `doit setup` would pass them (setup_flags), by the names
    the stamp uses: --deploy-path /x -> DEPLOY_PATH=/x. The deploy key is no setting here."""
    pairs = zip(flags[::2], flags[1::2])
    named = {flag.removeprefix("--").replace("-", "_").upper(): value for flag, value in pairs}
    return {name: value for name, value in named.items()
            if name not in NOT_COMPARED and name != "DEPLOY_KEY"}


@functools.lru_cache(maxsize=1)  # a `doit deploy` asks twice (setup, check); the files stay
def local_version() -> dict[str, str]:
    from scripts.embed_templates import SETUP_SCRIPT, script_digest, templates, templates_digest
    return {"script": script_digest(SETUP_SCRIPT.read_text()),
            "templates": templates_digest(templates())}


@dataclass(frozen=True)
class Verdict:
    current: bool
    stamped: bool  # a stamp was found: the server was provisioned, maybe by another version
    text: str


def compare(stamp: dict[str, str] | None, expected: dict[str, str],
            local: dict[str, str], where: PurePosixPath) -> Verdict:
    if stamp is None:
        return Verdict(False, False, f"no provisioning stamp ({where}): server_setup.sh never "
                                     f"finished here, or an older one without stamps did")
    if stamp.get("script") != local["script"]:
        return Verdict(False, True, f"provisioned by another server_setup.sh (script "
                                    f"{stamp.get('script', '?')[:12]}, this one is "
                                    f"{local['script'][:12]})")
    if stamp.get("templates") != local["templates"]:
        return Verdict(False, True, f"provisioned with other templates (conf/ "
                                    f"{stamp.get('templates', '?')[:12]}, this one is "
                                    f"{local['templates'][:12]})")
    for name, value in expected.items():
        if name in stamp and stamp[name] != value:
            return Verdict(False, True, f"provisioned with {name}={stamp[name]}, the settings "
                                        f"say {value}")
    if stamp.get("ssh_hardening") == "waiting":
        return Verdict(False, True, "provisioned, but SSH hardening still waits for a run "
                                    "after the deploy key's first login")
    return Verdict(True, True, f"provisioned by this server_setup.sh (script "
                               f"{local['script'][:12]}, templates {local['templates'][:12]})")


def read_stamp(server, settings: Settings) -> dict[str, str] | None:
    """The stamp as the deploy user reads it on a connected scripts.deploy.server.Server."""
    result = server.run(["cat", str(stamp_path(settings.service_name))], check=False,
                        reads=True)
    return parse(result.stdout) if result.status == 0 else None


def server_verdict(server, settings: Settings) -> Verdict:
    """How the connected server's stamp compares with this script, templates and settings."""
    from scripts.provision import setup_flags

    expected = expected_settings(setup_flags(settings, "", settings.ssh_port))
    return compare(read_stamp(server, settings), expected, local_version(),
                   stamp_path(settings.service_name))


def next_step(verdict: Verdict | None, laid_out: bool, setup_reason: str) -> str:
    """What `doit deploy` does about one server: "ok" (its stamp is current), "setup" (missing
    or behind, and SETUP_USER can log in), "warn" (behind, but provisioned: deploy anyway) or
    "stop" (never provisioned, or the deploy user cannot log in). verdict None: no deploy login;
    setup_reason: why SETUP_USER cannot run setup ("" when it can)."""
    if verdict is not None and verdict.current:
        return "ok"
    if not setup_reason:
        return "setup"
    if verdict is not None and (verdict.stamped or laid_out):
        return "warn"
    return "stop"
