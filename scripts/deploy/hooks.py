"""The app's deploy hooks: executable files in its `deploy-hooks/` folder, like Capistrano's
before/after tasks and Kamal's .kamal/hooks.

pre-build, post-build     here, in APP_DIR, around `doit build`
pre-migrate, post-migrate on each server, around the backup and migrations
pre-switch                on each server, once the new release passed its preflight
post-switch               on each server, once it serves the new release

Server hooks run in the NEW release (releases/<id>) as the app user, with the app's environment
and venv, in the service's own sandbox: root's runner starts them (conf/app-run.py), as it does
`doit run`. Each hook is a step line; a failing hook before the switch stops the deploy with the
old release serving. What happens after a failed post-switch hook is the caller's (go_live)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from scripts.deploy.report import Reporter
from scripts.deploy.server import Server
from scripts.errors import ToolkitError
from scripts.settings import Settings

FOLDER = "deploy-hooks"
LOCAL = ("pre-build", "post-build")
ON_SERVER = ("pre-migrate", "post-migrate", "pre-switch", "post-switch")
SHOWN_LINES = 20  # of a hook's output, in the step's report

# The hooks each release ships, read from its package once per run (go_live has no package).
_shipped: dict[str, frozenset[str]] = {}


def runner(settings: Settings) -> str:
    """Root's runner (server_setup.sh installs it; sudoers lets the deploy user run it)."""
    return f"/usr/local/sbin/{settings.service_name}-run"


def shipped(package: Path, release: str) -> frozenset[str]:
    """The server hooks in a package: `deploy-hooks/<name>` files with an executable bit."""
    import tarfile  # here: a rollback (which imports this module) reads no package

    try:
        with tarfile.open(package, "r:gz") as tar:
            names = frozenset(member.name.split("/", 1)[1] for member in tar.getmembers()
                              if member.isfile() and member.mode & 0o111
                              and member.name.startswith(f"{FOLDER}/")
                              and member.name.split("/", 1)[1] in ON_SERVER)
    except (OSError, tarfile.TarError):  # `check` verified the package: no hooks to find
        names = frozenset()
    _shipped[release] = names
    return names


def never_run(app_dir: Path) -> list[str]:
    """Files of deploy-hooks/ that look meant as hooks but would never run: a hook's name
    without the executable bit, or an executable file under a name that is no hook's."""
    folder = app_dir / FOLDER
    if not folder.is_dir():
        return []
    problems = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        executable = os.access(path, os.X_OK)
        if path.name in LOCAL + ON_SERVER and not executable:
            problems.append(f"{FOLDER}/{path.name} is not executable, so it never runs; "
                            f"`chmod +x` it (and commit that)")
        elif executable and path.name not in LOCAL + ON_SERVER:
            problems.append(f"{FOLDER}/{path.name} is no hook's name, so it never runs; hooks "
                            f"are {', '.join(LOCAL + ON_SERVER)}")
    return problems


def _show(reporter: Reporter, output: str) -> None:
    lines = output.rstrip().splitlines()
    for line in lines[-SHOWN_LINES:]:
        reporter.line(f"    | {line}")


def _failure(name: str, status: int, output: str) -> str:
    last = next((line for line in reversed(output.strip().splitlines()) if line.strip()), "")
    return f"hook {FOLDER}/{name} failed (exit {status}{': ' + last if last else ''})"


def run_local(settings: Settings, name: str, reporter: Reporter, **env: str) -> None:
    """pre-build / post-build in APP_DIR, if the app has it; a failure stops the build."""
    hook = settings.app_dir / FOLDER / name
    if not (hook.is_file() and os.access(hook, os.X_OK)):
        return
    with reporter.step(name) as outcome:
        if settings.dry_run:
            outcome.changed = True
            outcome.detail = f"{FOLDER}/{name} (not run: DRY_RUN=1)"
            return
        started = time.monotonic()
        result = subprocess.run([str(hook)], cwd=settings.app_dir, capture_output=True,
                                text=True, env={**os.environ, "DEPLOY_HOOK": name, **env})
        _show(reporter, result.stdout + result.stderr)
        if result.returncode != 0:
            raise ToolkitError(f"{_failure(name, result.returncode, result.stdout + result.stderr)}"
                               f"; nothing was built")
        outcome.changed = True
        outcome.seconds = time.monotonic() - started
        outcome.detail = f"{FOLDER}/{name}"


def on_server(server: Server, settings: Settings, name: str, release: str,
              reporter: Reporter) -> None:
    """Run a server hook of `release` if it ships one; a ToolkitError when it fails."""
    names = _shipped.get(release)
    if names is None:  # not deployed by this run (none of its steps read the package)
        hook = f"{server.deploy_path}/releases/{release}/{FOLDER}/{name}"
        if server.run(["test", "-x", hook], check=False, reads=True).status != 0:
            return
    elif name not in names:
        return
    with reporter.step(name) as outcome:
        # stdin from /dev/null: the hook must not read the commands of this shell session.
        result = server.run(["sh", "-c", 'exec sudo -n "$@" </dev/null', "sh", runner(settings),
                             "--pipe", release, "--", f"{FOLDER}/{name}", release], check=False,
                            what=f"hook {name}")
        output = result.stdout + result.stderr
        if not server.dry_run:
            _show(reporter, output)
        if result.status != 0:
            hint = ("; is the server set up for hooks? run `doit setup`"
                    if "sudo:" in output else "")
            raise ToolkitError(f"{server.name}: {_failure(name, result.status, output)}{hint}")
        outcome.changed = True
        outcome.detail = f"{FOLDER}/{name} in releases/{release} as the app user"
