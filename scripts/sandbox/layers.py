"""A provisioned layer: a sandbox server that `doit setup` provisioned, saved so that more
servers boot already provisioned (tests and benchmarks skip a ~30 s setup per server).
Cached until server_setup.sh, conf/, the image or the deploy key change."""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
from pathlib import Path

from scripts.errors import ToolkitError
from scripts.sandbox.image import DEFAULT_SUITE, image_name
from scripts.sandbox.servers import Sandbox
from scripts.settings import REPO_ROOT


def layer_fingerprint(sandbox: Sandbox) -> str:
    digest = hashlib.sha256(image_name(sandbox.mirror, sandbox.suite).encode())
    for path in [REPO_ROOT / "server_setup.sh", *sorted((REPO_ROOT / "conf").iterdir())]:
        digest.update(path.name.encode() + path.read_bytes())
    digest.update(Path(f"{sandbox.deploy_key_file}.pub").read_bytes())
    return digest.hexdigest()[:16]


def ensure_provisioned_layer(cache_dir: Path, mirror: str, work: Path,
                             suite: str = DEFAULT_SUITE) -> Path:
    builder = Sandbox(work / "layer-sandbox", cache_dir, mirror, log=lambda *_: None, suite=suite)
    builder.state_dir.mkdir(parents=True, exist_ok=True)
    builder._ensure_key()
    layer = cache_dir / "layers" / f"provisioned-{layer_fingerprint(builder)}"
    layer.parent.mkdir(parents=True, exist_ok=True)
    with open(layer.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if layer.exists():
            return layer
        (server,) = builder.up(1)
        try:
            env = {key: value for key, value in os.environ.items() if key != "DEPLOY_SERVER"}
            env.update(ENV_FILE=os.devnull, SANDBOX_DIR=str(builder.state_dir),
                       SANDBOX_CACHE=str(cache_dir), SANDBOX_MIRROR=mirror, SANDBOX_SUITE=suite,
                       PYTHONPATH=str(REPO_ROOT))
            result = subprocess.run([sys.executable, "-m", "doit", "-f",
                                     str(REPO_ROOT / "dodo.py"), "--dir", str(work), "setup"],
                                    capture_output=True, text=True, env=env, timeout=900)
            if result.returncode != 0:
                raise ToolkitError(f"sandbox: provisioning the layer failed:\n{result.stdout}"
                                   f"{result.stderr}")
            builder.save_layer(server, layer)
        finally:
            builder.down()
    return layer
