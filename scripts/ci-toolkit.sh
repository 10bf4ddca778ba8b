#!/usr/bin/env bash
# Sourced first by every GitLab job (see .gitlab-ci.yml): the toolkit's virtualenv in the job's
# own working directory, first on PATH. A job starts in its checkout on every runner, while
# CI_PROJECT_DIR names another folder under some (gitlab-ci-local's shell isolation), so
# everything here hangs off PWD and nothing depends on what the runner had installed before.
# The venv is built anew in every job, from requirements.txt with every sha256 checked: the
# pipeline caches only pip's downloads (.cache/pip), and a poisoned cache fails the hash check
# instead of running in a job that holds the deploy key (README, GitLab CI/CD).

ci_toolkit_setup() {
  local checkout="${PWD}"
  export PIP_CACHE_DIR="${checkout}/.cache/pip"
  # Not cached by the pipeline: the app's wheels are code that ships to the servers.
  export WHEEL_CACHE="${checkout}/.cache/wheels"
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  python3 -m venv "${checkout}/.venv" || return 1
  "${checkout}/.venv/bin/pip" install --quiet --require-hashes --only-binary=:all: \
    -r "${checkout}/requirements.txt" || return 1
  # doit.cfg names the toolkit's `run` command: the checkout is on the venv's import path.
  "${checkout}/.venv/bin/python" -c 'import sys, sysconfig; open(sysconfig.get_paths()["purelib"]
    + "/flask-deploy-toolkit.pth", "w").write(sys.argv[1] + "\n")' "${checkout}" || return 1
  export PATH="${checkout}/.venv/bin:${PATH}"
}

ci_toolkit_setup
