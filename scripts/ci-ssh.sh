#!/usr/bin/env bash
# Sourced by every GitLab job that reaches the server (see .gitlab-ci.yml): loads
# SSH_PRIVATE_KEY into an ssh-agent that ends with the job, and writes SSH_KNOWN_HOSTS to a
# known_hosts file the toolkit uses. Both may be plain variables or GitLab "file" variables, and
# so may SSH_CONFIG (the `Host` entries of a server behind a bastion), which the toolkit reads
# as a file.
# Nothing here echoes a key; a missing SSH_KNOWN_HOSTS stops the job instead of trusting any key.

# The value of a variable, or the content of the file it names (a GitLab file variable).
ci_variable_value() {
  local value="$1"
  if [[ -f "${value}" ]]; then
    cat -- "${value}"
  else
    printf '%s\n' "${value}"
  fi
}

ci_ssh_setup() {
  if [[ -z "${SSH_KNOWN_HOSTS:-}" ]]; then
    echo "error: CI/CD variable SSH_KNOWN_HOSTS is not set: add the server's host key line" \
      "(ssh-keyscan -p PORT YOUR_SERVER, after checking its fingerprint); refusing to trust" \
      "any key" >&2
    return 1
  fi
  if [[ -z "${SSH_PRIVATE_KEY:-}" ]]; then
    echo "error: CI/CD variable SSH_PRIVATE_KEY is not set: add the deploy key's private half" >&2
    return 1
  fi
  # Outside the checkout, so neither the cache nor an artifact can carry it; gone with the job.
  local ssh_dir
  ssh_dir="$(mktemp -d)" || return 1
  ci_variable_value "${SSH_KNOWN_HOSTS}" > "${ssh_dir}/known_hosts"
  export SSH_KNOWN_HOSTS_FILE="${ssh_dir}/known_hosts"
  if [[ -n "${SSH_CONFIG:-}" && ! -f "${SSH_CONFIG}" ]]; then
    printf '%s\n' "${SSH_CONFIG}" > "${ssh_dir}/config"
    export SSH_CONFIG="${ssh_dir}/config"
  fi
  eval "$(ssh-agent -s)" >/dev/null
  # The agent and the folder are ours: end them with the job's shell.
  # shellcheck disable=SC2064  # expand ssh_dir now: it is local to this function
  trap "ssh-agent -k >/dev/null 2>&1; rm -rf -- '${ssh_dir}'" EXIT
  if ! ci_variable_value "${SSH_PRIVATE_KEY}" | tr -d '\r' | ssh-add - >/dev/null 2>&1; then
    echo "error: CI/CD variable SSH_PRIVATE_KEY does not hold a usable private key (the whole" \
      "file, BEGIN and END lines included, without a passphrase)" >&2
    return 1
  fi
}

ci_ssh_setup
