#!/usr/bin/env bash
# Sourced first by every GitLab job (see .gitlab-ci.yml): the toolkit's virtualenv in the job's
# own working directory, first on PATH. A job starts in its checkout on every runner, while
# CI_PROJECT_DIR names another folder under some (gitlab-ci-local's shell isolation), so
# everything here hangs off PWD and nothing depends on what the runner had installed before.

ci_toolkit_setup() {
  local checkout="${PWD}"
  export PIP_CACHE_DIR="${checkout}/.cache/pip"
  export WHEEL_CACHE="${checkout}/.cache/wheels"
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  python3 -m venv "${checkout}/.venv" || return 1
  "${checkout}/.venv/bin/pip" install --quiet -r "${checkout}/requirements.txt" || return 1
  export PATH="${checkout}/.venv/bin:${PATH}"
}

ci_toolkit_setup
