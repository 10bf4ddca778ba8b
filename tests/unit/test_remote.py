"""How a failed SSH connection is reported, whichever way plumbum happens to see it fail."""

from __future__ import annotations

import socket

import pytest

from scripts import remote
from scripts.errors import ToolkitError
from scripts.remote import Target


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("failure", [BrokenPipeError(32, "Broken pipe"), EOFError()])
def test_a_connection_that_dies_before_the_first_command_is_explained_by_ssh(monkeypatch, failure):
    # ssh to a closed port can exit before plumbum writes to it; the user must still read why.
    def dies(*_args, **_kwargs):
        raise failure

    import plumbum  # connect() imports SshMachine from it when it connects

    monkeypatch.setattr(plumbum, "SshMachine", dies)
    target = Target(host="127.0.0.1", port=closed_port(), user="deploy")
    with pytest.raises(ToolkitError) as raised:
        remote.connect(target)
    assert str(raised.value) == (f"SSH to deploy@127.0.0.1:{target.port}: connection refused; is "
                                 f"the server up, with SSH on port {target.port} (SSH_PORT)?")


@pytest.mark.parametrize("opener", [remote.connect, remote.open_session])
def test_a_closed_port_is_reported_as_refused(opener):
    target = Target(host="127.0.0.1", port=closed_port(), user="deploy")
    with pytest.raises(ToolkitError, match=r"connection refused; is the server up"):
        opener(target)
