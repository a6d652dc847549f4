"""The review dashboard (service/ops/dashboard.py) served by the node's HTTP server after a phantom study,
loaded
in headless Chromium (Debian package, tests/peers.sh): the list and the study page render with the report
pages; actions are refused without the token and release works with it; no patient data without a login."""

from __future__ import annotations

import http.client
import re
import shutil
import subprocess
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")

TOKEN = "t0ken-for-tests"
HELD_KEY = "00000000000000aa"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return str(shutil.which(name))
    pytest.skip("chromium not installed (tests/peers.sh)")


def _browser(url: str, *args: str) -> str:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--hide-scrollbars", *args, url]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@pytest.fixture(scope="module")
def node(
    phantom_dicom_factory: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """A data dir with one processed phantom study (report included) and one held study, served on a free
    port with a token; yields (base URL, data_dir, study key, patient name)."""
    from itvnode.commands.offline import intake
    from service.ops.http_server import HealthServer, HealthServerConfig
    from service.settings import load_settings
    from service.store.manifest import load_manifest, manifest_path, save_manifest, set_state
    from worker.engine_settings import LoadedSegmenter, engine_config
    from worker.pipeline import process_study

    series = phantom_dicom_factory("siemens", with_avg=True)
    data_dir = tmp_path_factory.mktemp("dash") / "data"
    settings = load_settings()
    files = sorted(p for p in Path(series.root).rglob("*.dcm") if "ground_truth" not in p.parts)
    ((_, m),) = intake("segment", Path(series.root), files, data_dir, settings)
    process_study(m.study_key, data_dir, engine_config(settings), LoadedSegmenter(None), [])
    done = load_manifest(manifest_path(data_dir, m.study_key))
    held = done.model_copy(deep=True, update={"study_key": HELD_KEY, "results": {}})
    set_state(held, "held", "3 of 4 phases: 75 % missing <script>alert(1)</script>")
    save_manifest(held, manifest_path(data_dir, HELD_KEY))
    server = HealthServer("127.0.0.1", 0, HealthServerConfig(data_dir, None, http_token=TOKEN)).start()
    try:
        yield (f"http://127.0.0.1:{server.port}", data_dir, m.study_key,
               str(done.identifiers.get("PatientName", "")))
    finally:
        server.stop()


def _request(base: str, method: str, path: str, body: dict[str, str] | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    u = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    data = urllib.parse.urlencode(body or {}).encode() if method == "POST" else None
    hdrs = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
    conn.request(method, path, body=data, headers=hdrs)
    r = conn.getresponse()
    out = (r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode("utf-8", "replace"))
    conn.close()
    return out


def _login(base: str) -> str:
    code, headers, _ = _request(base, "POST", "/login", {"token": TOKEN})
    assert code == 303, code
    cookie = headers["set-cookie"].split(";")[0]
    assert "HttpOnly" in headers["set-cookie"] and "SameSite=Strict" in headers["set-cookie"]
    return cookie


def test_list_and_study_page_in_chromium(node: Any, tmp_path: Path) -> None:
    base, data_dir, key, patient = node
    dom = _browser(f"{base}/", "--dump-dom")
    assert "Studies (2)" in dom and f'href="/studies/{key}"' in dom
    assert ">done<" in dom and ">held<" in dom
    assert "<script>alert(1)</script>" not in dom and "&lt;script&gt;" in dom  # escaped
    assert patient and patient not in dom  # no patient data without a login
    page = _browser(f"{base}/studies/{key}", "--dump-dom")
    for n in range(1, 5):
        assert f'src="/studies/{key}/report/page-{n}.png"' in page
    assert "History" in page and "Log in" in page and patient not in page
    shot = tmp_path / "study.png"
    _browser(f"{base}/studies/{key}", f"--screenshot={shot}", "--window-size=1280,1600")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    code, headers, _ = _request(base, "GET", f"/studies/{key}/report/page-3.png")
    assert code == 200 and headers["content-type"] == "image/png"
    assert "script-src" not in headers["content-security-policy"]  # default-src 'none': no script runs
    assert _request(base, "GET", f"/studies/{key}/report/..%2Fmanifest.json")[0] == 404
    assert _request(base, "GET", "/studies/../etc/passwd")[0] == 404


def test_actions_refused_without_token(node: Any) -> None:
    from service.store.manifest import load_manifest, manifest_path

    base, data_dir, _, _ = node
    code, _, body = _request(base, "POST", f"/studies/{HELD_KEY}/actions/release", {"csrf": "x"})
    assert code == 403 and "refused" in body
    cookie = _login(base)
    code, _, _ = _request(base, "POST", f"/studies/{HELD_KEY}/actions/release", {"csrf": "wrong"},
                          {"Cookie": cookie})
    assert code == 403  # a session without its CSRF token (a forged form) is refused
    code, _, _ = _request(base, "POST", f"/studies/{HELD_KEY}/actions/release", {"csrf": "x"},
                          {"Cookie": cookie, "Origin": "http://evil.example"})
    assert code == 403
    assert load_manifest(manifest_path(data_dir, HELD_KEY)).state == "held"


def test_actions_off_without_configured_token(tmp_path: Path) -> None:
    from service.ops.dashboard import Dashboard

    d = Dashboard(tmp_path, token=None)
    assert d.handle("POST", "/login", {}, b"token=").code == 403
    r = d.handle("POST", f"/studies/{HELD_KEY}/actions/release", {"Authorization": "Bearer "}, b"")
    assert r.code == 403 and b"actions are off" in r.body


def test_release_with_token(node: Any) -> None:
    from service.store.manifest import load_manifest, manifest_path

    base, data_dir, _, patient = node
    cookie = _login(base)
    code, _, page = _request(base, "GET", f"/studies/{HELD_KEY}", headers={"Cookie": cookie})
    assert code == 200 and patient in page  # identifiers only on an authenticated page
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    code, _, page = _request(base, "POST", f"/studies/{HELD_KEY}/actions/release", {"csrf": csrf},
                             {"Cookie": cookie, "Origin": base})
    assert code == 200 and "released" in page
    assert load_manifest(manifest_path(data_dir, HELD_KEY)).state == "complete"
    # the same service.ops.admin commands as the CLI: retry applies to failed studies only
    code, _, page = _request(base, "POST", f"/studies/{HELD_KEY}/actions/retry", {"csrf": csrf},
                             {"Cookie": cookie, "Origin": base})
    assert code == 409 and "not done" in page
    # scripts: a bearer token, no cookie
    code, _, body = _request(base, "POST", f"/studies/{HELD_KEY}/actions/release", {},
                             {"Authorization": f"Bearer {TOKEN}"})
    assert code == 200 and '"ok": true' in body  # already released: ok, unchanged
    code, _, body = _request(base, "POST", f"/studies/{HELD_KEY}/actions/delete", {},
                             {"Authorization": f"Bearer {TOKEN}"})
    assert code == 200 and '"ok": true' in body
    assert not manifest_path(data_dir, HELD_KEY).exists()
