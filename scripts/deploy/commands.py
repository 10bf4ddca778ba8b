"""Pure builders of the commands deploy steps run on a server (argv lists, no I/O), so each can
be checked by a unit test with no SSH, Kamal-style."""

from __future__ import annotations

from pathlib import PurePosixPath

from scripts.settings import Settings


def units(settings: Settings) -> dict[str, str]:
    service = settings.service_name
    return {"app": service, "migrate": f"{service}-migrate", "preflight": f"{service}-preflight"}


def preflight_port(settings: Settings) -> int:
    """server_setup.sh's default: the port after APP_PORT."""
    return settings.app_port + 1


def systemctl(action: str, unit: str) -> list[str]:
    """Run with sudo: sudoers allows exactly these forms for the app's units."""
    return ["systemctl", action, unit]


def hand_over(unit: str) -> list[str]:
    """Run with sudo: the one signal sudoers lets deploys send (conf/gunicorn.conf.py)."""
    return ["systemctl", "kill", "--kill-whom=main", "--signal=SIGURG", unit]


def journal(unit: str, lines: int) -> list[str]:
    return ["journalctl", "-u", unit, "--no-pager", "-n", str(lines)]


def env_file(settings: Settings) -> str:
    """The app's environment: server_setup.sh makes it, in a folder only root writes."""
    return f"/etc/{settings.service_name}/app.env"


def health_url(port: int, health_path: str) -> str:
    return f"http://127.0.0.1:{port}{health_path}"


def host_url(host: str) -> str:
    """http://host/ for a name or an address; an IPv6 literal goes in brackets (RFC 3986)."""
    bare = host.strip("[]")
    return f"http://[{bare}]/" if ":" in bare else f"http://{bare}/"


def app_log_files(log_path: str = "/var/log/flask_helpdesk") -> dict[str, str]:
    """The guide's app logs by check label: optional, since an app may log to the journal."""
    return {"tail app.log": f"{log_path}/app.log", "tail error.log": f"{log_path}/error.log"}


def package_path(deploy_path: PurePosixPath, package_name: str) -> PurePosixPath:
    return deploy_path / "packages" / package_name


def guide_checks(settings: Settings, log_path: str = "/var/log/flask_helpdesk") -> list[
        tuple[str, list[str]]]:
    """The user's guide, step 5 and monitoring, as the deploy user types them (tail -f and
    journalctl -f become -n: a check must end)."""
    service = settings.service_name
    venv_python = str(settings.deploy_path / "venv" / "bin" / "python")
    site = settings.deploy_path.name
    return [
        ("sudo systemctl status", ["sudo", "-n", "systemctl", "status", service]),
        ("sudo journalctl -n 50", ["sudo", "-n", "journalctl", "-u", service, "--no-pager",
                                   "-n", "50"]),
        ("curl localhost:port", ["curl", "-fsS", "-o", "/dev/null", f"http://localhost:"
                                 f"{settings.app_port}"]),
        ("curl through nginx", ["curl", "-fsS", "-o", "/dev/null", "http://localhost/"]),
        ("venv python --version", [venv_python, "--version"]),
        ("sudo nginx -t", ["sudo", "-n", "nginx", "-t"]),
        ("sudo systemctl status nginx", ["sudo", "-n", "systemctl", "status", "nginx"]),
        *((label, ["sudo", "-n", "tail", "-n", "100", log_file])
          for label, log_file in app_log_files(log_path).items()),
        ("tail nginx access log", ["sudo", "-n", "tail", "-n", "100",
                                   f"/var/log/nginx/{site}_access.log"]),
        ("tail nginx error log", ["sudo", "-n", "tail", "-n", "100",
                                  f"/var/log/nginx/{site}_error.log"]),
        ("ss -tulpn | grep :port", ["sh", "-c", f"ss -tulpn | grep :{settings.app_port}"]),
        ("df -h", ["df", "-h"]),
    ]
