"""The GitLab pipeline (.gitlab-ci.yml) run for real by gitlab-ci-local against a sandbox
server: the guide's five jobs, artifacts between them, the manual rollback, a failing
verification, and an untrusted host key."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import json

from scripts.settings import REPO_ROOT

pytestmark = pytest.mark.integration

GITLAB_CI_LOCAL = shutil.which("gitlab-ci-local")


def project_files() -> list[str]:
    listed = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files", "--cached", "--others",
                             "--exclude-standard"], capture_output=True, text=True,
                            check=True).stdout.split()
    return [name for name in listed if (REPO_ROOT / name).is_file()]


def make_project(root: Path) -> Path:
    """This repository as a git project on its default branch, as GitLab would check it out."""
    if GITLAB_CI_LOCAL is None:
        pytest.fail("gitlab-ci-local is not installed; run .ci/install")
    for name in project_files():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, root / name)
    git = ["git", "-C", str(root), "-c", "user.email=ci@example.com", "-c", "user.name=ci"]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "helpdesk"], check=True)
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory, site):
    """The project with the CI/CD variables a user would set, pointing at the module's sandbox
    server as at a real server."""
    root = make_project(tmp_path_factory.mktemp("gitlab") / "project")
    server = site.server
    known_host = f"[127.0.0.1]:{server.ssh_port} {server.host_key}\n"
    # As GitLab advises: the key as a "file" variable (the job sees a path to it).
    variables = {"DEPLOY_SERVER": "127.0.0.1", "SSH_PORT": str(server.ssh_port),
                 "SSH_PRIVATE_KEY": {"type": "file",
                                     "values": {"*": site.sandbox.deploy_key_file.read_text()}},
                 "SSH_KNOWN_HOSTS": known_host, "PUBLIC_URL": site.url}
    # gitlab-ci-local takes `main` as the default branch when the project has no remote.
    # JSON is YAML: gitlab-ci-local reads it as its variables file.
    (root / ".gitlab-ci-local-variables.yml").write_text(json.dumps(variables, indent=2))
    return root


STRAY_DOIT_SAYS = "a doit from outside the job virtualenv ran"


def runner_path(project: Path) -> str:
    """A runner's PATH with no toolkit on it: no doit and no project virtualenv, and a stray
    `doit` that fails, so a job that does not find the doit it installed itself fails."""
    stray = project.parent / "runner-bin"
    stray.mkdir(exist_ok=True)
    (stray / "doit").write_text(f"#!/bin/sh\necho '{STRAY_DOIT_SAYS}' >&2\nexit 97\n")
    (stray / "doit").chmod(0o755)
    kept = [folder for folder in os.environ.get("PATH", "").split(os.pathsep)
            if folder and not (Path(folder) / "doit").exists()
            and not Path(folder).resolve().is_relative_to(REPO_ROOT)]
    return os.pathsep.join([str(stray), *kept])


def run_pipeline(project: Path, *args: str, isolation: bool = True,
                 **variables: str) -> subprocess.CompletedProcess:
    """gitlab-ci-local with the shell executor; with isolation each job runs in a folder of its
    own while CI_PROJECT_DIR names another one, without it in the project itself."""
    argv = [GITLAB_CI_LOCAL, "--force-shell-executor", "--no-color", *args]
    if isolation:
        argv.append("--shell-isolation")
    for name, value in variables.items():
        argv += ["--variable", f"{name}={value}"]
    env = {**os.environ, "PATH": runner_path(project)}
    env.pop("VIRTUAL_ENV", None)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=project,
                            env=env)
    assert STRAY_DOIT_SAYS not in result.stdout + result.stderr, "a job used the runner's doit"
    return result


def change_app(project: Path, marker: str) -> None:
    views = project / "examples" / "helpdesk" / "helpdesk" / "views.py"
    views.write_text(views.read_text() + f"\n# {marker}\n")
    subprocess.run(["git", "-C", str(project), "-c", "user.email=ci@example.com", "-c",
                    "user.name=ci", "commit", "-qam", marker], check=True)


def job_passed(output: str, job: str) -> bool:
    return any(job in line and "PASS" in line for line in output.splitlines())


def test_the_whole_pipeline_deploys_a_release_that_serves(project, site):
    result = run_pipeline(project)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    for job in ("build_deployment_package", "pre_deploy_checks", "deploy_to_server",
                "post_deploy_verification"):
        assert job_passed(output, job), f"{job} did not pass:\n{output[-4000:]}"
    assert "BEGIN OPENSSH PRIVATE KEY" not in output and "b3BlbnNzaC1rZXk" not in output
    built = (project / "dist" / "helpdesk.json").read_text()
    assert site.served_release() in built


def test_the_checks_pass_without_shell_isolation_too(project):
    result = run_pipeline(project, "pre_deploy_checks", "--needs", isolation=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert job_passed(output, "build_deployment_package"), output[-4000:]
    assert job_passed(output, "pre_deploy_checks"), output[-4000:]


def test_the_manual_rollback_job_brings_back_the_previous_release(project, site):
    first = site.served_release()
    change_app(project, "second release")
    assert run_pipeline(project).returncode == 0
    second = site.served_release()
    assert second != first
    # The key as a plain (text) variable this time: both forms must work.
    rollback = run_pipeline(project, "rollback_deployment",
                            SSH_PRIVATE_KEY=site.sandbox.deploy_key_file.read_text())
    assert rollback.returncode == 0, (rollback.stdout + rollback.stderr)[-3000:]
    assert site.served_release() == first


def test_a_release_failing_verification_fails_that_job_and_the_old_release_serves(
        project, site):
    before = site.served_release()
    views = project / "examples" / "helpdesk" / "helpdesk" / "views.py"
    views.write_text(views.read_text().replace(
        '@bp.get("/")\ndef index():\n', '@bp.get("/")\ndef index():\n    abort(500)\n'))
    subprocess.run(["git", "-C", str(project), "-c", "user.email=ci@example.com", "-c",
                    "user.name=ci", "commit", "-qam", "broken home page"], check=True)
    result = run_pipeline(project)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert job_passed(output, "deploy_to_server"), output[-4000:]
    assert not job_passed(output, "post_deploy_verification")
    assert "rolling back by itself" in output
    assert site.served_release() == before
    subprocess.run(["git", "-C", str(project), "revert", "--no-edit", "HEAD"],
                   check=True, capture_output=True)


def test_a_wrong_known_host_fails_the_checks_and_changes_nothing(project, site, tmp_path):
    before = site.doit("status").stdout
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    str(tmp_path / "impostor")], check=True)
    impostor = " ".join((tmp_path / "impostor.pub").read_text().split()[:2])
    change_app(project, "never deployed")
    result = run_pipeline(project, SSH_KNOWN_HOSTS=f"[127.0.0.1]:{site.server.ssh_port} "
                                                  f"{impostor}")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert job_passed(output, "build_deployment_package")
    assert not job_passed(output, "pre_deploy_checks")
    assert "host key CHANGED" in output
    assert not job_passed(output, "deploy_to_server")
    assert site.doit("status").stdout == before


def test_the_pipeline_has_the_guides_five_jobs_and_a_manual_rollback(project):
    listing = subprocess.run([GITLAB_CI_LOCAL, "--list-json"], capture_output=True, text=True,
                             cwd=project, check=True).stdout
    start = listing.find("\n[") + 1  # warnings may come first
    jobs = {job["name"]: job for job in json.loads(listing[start:])}
    assert set(jobs) == {"build_deployment_package", "pre_deploy_checks", "deploy_to_server",
                         "post_deploy_verification", "rollback_deployment"}
    assert jobs["rollback_deployment"]["when"] == "manual"
    ci = (project / ".gitlab-ci.yml").read_text()
    for job, task in (("build_deployment_package", "build"), ("pre_deploy_checks", "check"),
                      ("deploy_to_server", "ship"), ("post_deploy_verification", "verify"),
                      ("rollback_deployment", "rollback")):
        section = ci.split(f"\n{job}:")[1].split("\n\n")[0]
        assert f"- doit -s {task}" in section, job
    assert "resource_group:" in ci and "$CI_DEFAULT_BRANCH" in ci
