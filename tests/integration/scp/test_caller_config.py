"""``caller_ips`` without an allowlist would accept any other AE title from anywhere: ``itvnode serve``
refuses to start with that configuration (issue 9 item 11); the working one is in test_serve_peers.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from scp_helpers import REPO

from tests.support.net import free_port


def _serve(tmp_path: Path, **env_extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ITVNODE_")}
    env.update({"ITVNODE_PORT": str(free_port()), "ITVNODE_HOST": "127.0.0.1",
                "ITVNODE_DATA_DIR": str(tmp_path / "data"), "ITVNODE_MIN_FREE_BYTES": "0", **env_extra})
    return subprocess.run([sys.executable, "-m", "itvnode.cli", "serve"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("env", "message"), [
    ({"ITVNODE_CALLER_IPS": '{"PACS1": ["10.1.2.3"]}'},
     "caller_ips is set but allowed_callers is empty, so any other calling AE title would be accepted from "
     "any address; list the callers in allowed_callers (ITVNODE_ALLOWED_CALLERS=PACS1)"),
    ({"ITVNODE_ALLOWED_CALLERS": "PACS1", "ITVNODE_CALLER_IPS": '{"PACS_1": ["10.1.2.3"]}'},
     "caller_ips names PACS_1, not in allowed_callers"),
    ({"ITVNODE_ALLOWED_CALLERS": "PACS1", "ITVNODE_CALLER_IPS": '{"PACS1": ["10.1.2"]}'},
     "caller_ips['PACS1']: '10.1.2' is not an IP address"),
])
def test_serve_refuses_caller_ips_that_would_not_bind(tmp_path: Path, env: dict[str, str],
                                                      message: str) -> None:
    res = _serve(tmp_path, **env)
    assert res.returncode == 2, res.stdout + res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "data").exists()  # refused before touching anything
