"""The review dashboard on the node's HTTP port: a study list, a study page with the QA report's pages and
history, and admin actions behind a token. Server-rendered HTML from the standard library, no JavaScript.

Routes (the study key, 16 hex digits, is the only study identifier in a URL):

* ``GET /`` the study list: state, phases, QA warnings, age, destinations and delivery state;
* ``GET /studies/<key>`` the study page: phases, report pages, history, deliveries, actions;
* ``GET /studies/<key>/report/<page-N.png|report.pdf>`` the report files (no patient data in them);
* ``GET /login``, ``POST /login`` (form field ``token``), ``POST /logout``;
* ``POST /studies/<key>/actions/<action>`` release, retry, resend, delete (service.ops.admin).

Access: without a token configured (``http_token``, env ``ITVNODE_HTTP_TOKEN``) the actions are off and no
page shows patient identifiers. With one, ``POST /login`` with the token opens a session: a random id in an
``HttpOnly; SameSite=Strict`` cookie, held in memory (a restart logs everyone out). Only a session's pages
show the patient's name and ID. An action needs the session cookie **and** the session's CSRF token in the
form (or ``Authorization: Bearer <token>`` for scripts, which carries no cookie), and a request whose
``Origin`` names another host is refused. Every value on a page is HTML-escaped; pages send a strict
Content-Security-Policy (no scripts at all). Logs name the study key and the action, never the patient.

One class: its pages and its access checks share the session state, so it stays whole (just over 400 lines).
"""

from __future__ import annotations

import hmac
import html
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from service.store.layout import DataLayout
from service.store.state import StudyState

log = logging.getLogger(__name__)

KEY_RE = re.compile(r"[0-9a-f]{16}")
REPORT_FILE_RE = re.compile(r"page-[1-9][0-9]?\.png|report\.pdf")
#: the dashboard's admin actions, each one of service.ops.admin's commands (the same as the CLI's)
ACTIONS: tuple[str, ...] = ("release", "retry", "resend", "delete")
SESSION_COOKIE = "itvnode_session"
COOKIE_FLAGS = "HttpOnly; SameSite=Strict; Path=/"
SESSION_TTL = 8 * 3600.0
MAX_BODY = 4096
CSP = ("default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
STATE_COLORS: dict[str, str] = {
    StudyState.HELD: "#b26b00", StudyState.FAILED: "#b00000", StudyState.DONE: "#1a7f37",
    StudyState.EXPORTING: "#0b5cad", StudyState.PROCESSING: "#0b5cad", StudyState.QUEUED: "#555",
    StudyState.COMPLETE: "#555", StudyState.COLLECTING: "#555"}


@dataclass
class Response:
    code: int
    body: bytes
    ctype: str = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Session:
    csrf: str
    expires: float


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _age(iso: str | None, now: float) -> str:
    if not iso:
        return ""
    try:
        t = datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return ""
    s = max(0.0, now - t)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.0f} h"
    return f"{s / 86400:.0f} d"


def run_action(action: str, data_dir: Path, study_key: str,
               destinations: Sequence[Any] = ()) -> list[Any]:
    """Run ``action`` (one of :data:`ACTIONS`) on one study key through service.ops.admin, as the CLI does;
    ``resend`` goes to the configured destinations (delivered by the outbox sweep)."""
    from service.ops import admin
    if action == "release":
        return admin.release_study(data_dir, study_key)
    if action == "retry":
        return admin.retry_study(data_dir, study_key)
    if action == "resend":
        return admin.resend_study(data_dir, study_key, list(destinations))
    if action == "delete":
        return admin.delete_study(data_dir, study_key)
    return [admin.AdminResult(study_key, False, False, f"unknown action {action!r}")]


class Dashboard:
    """The dashboard's request handling, independent of the HTTP server (service.ops.health serves it)."""

    def __init__(self, data_dir: Path, token: str | None = None, destinations: Sequence[Any] = (),
                 action: Callable[..., list[Any]] = run_action) -> None:
        self.data_dir = Path(data_dir)
        self.layout = DataLayout(self.data_dir)
        self.token = token or None
        self.destinations = tuple(destinations)  # where "resend" sends (the node's ITVNODE_DESTINATIONS)
        self._action = action
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------- routing

    def handle(self, method: str, raw_path: str, headers: Mapping[str, str], body: bytes = b"") -> Response:
        path = urlsplit(raw_path).path
        session = self._session(headers)
        try:
            if method == "GET":
                if path in ("/", "/studies", "/studies/"):
                    return self._list(session)
                if path == "/login":
                    return self._login_page("")
                m = re.fullmatch(r"/studies/([0-9a-f]{16})", path)
                if m:
                    return self._study(m.group(1), session, "")
                m = re.fullmatch(r"/studies/([0-9a-f]{16})/report/([^/]+)", path)
                if m:
                    return self._report_file(m.group(1), m.group(2))
                return self._text(404, "not found")
            if method == "POST":
                if len(body) > MAX_BODY:
                    return self._text(413, "request too large")
                if not self._same_origin(headers):
                    return self._text(403, "cross-origin request refused")
                form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
                if path == "/login":
                    return self._login(form)
                if path == "/logout":
                    return self._logout(headers)
                m = re.fullmatch(r"/studies/([0-9a-f]{16})/actions/([a-z]+)", path)
                if m:
                    return self._post_action(m.group(1), m.group(2), form, headers, session)
                return self._text(404, "not found")
            return self._text(405, "method not allowed")
        except Exception:
            log.exception("dashboard: %s %s failed", method, path)
            return self._text(500, "internal error (see the node's log)")

    # ------------------------------------------------------------------------------------------- access

    def _session(self, headers: Mapping[str, str]) -> _Session | None:
        if not self.token:
            return None
        cookie = headers.get("Cookie") or headers.get("cookie") or ""
        sid = next((c.split("=", 1)[1].strip() for c in cookie.split(";")
                    if c.strip().startswith(SESSION_COOKIE + "=")), "")
        now = time.time()
        with self._lock:
            for k in [k for k, s in self._sessions.items() if s.expires < now]:
                del self._sessions[k]
            return self._sessions.get(sid) if sid else None

    def _bearer(self, headers: Mapping[str, str]) -> bool:
        auth = headers.get("Authorization") or headers.get("authorization") or ""
        return bool(self.token) and auth.startswith("Bearer ") and hmac.compare_digest(
            auth[7:].strip().encode(), str(self.token).encode())

    @staticmethod
    def _same_origin(headers: Mapping[str, str]) -> bool:
        origin = headers.get("Origin") or headers.get("origin")
        if not origin or origin == "null":
            return origin != "null"
        host = headers.get("Host") or headers.get("host") or ""
        return urlsplit(origin).netloc == host

    def _login(self, form: Mapping[str, str]) -> Response:
        if not self.token:
            return self._login_page("actions are off: no ITVNODE_HTTP_TOKEN configured", 403)
        if not hmac.compare_digest(form.get("token", "").encode(), str(self.token).encode()):
            log.warning("dashboard: login refused (wrong token)")
            return self._login_page("wrong token", 403)
        sid = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[sid] = _Session(secrets.token_urlsafe(24), time.time() + SESSION_TTL)
        log.info("dashboard: admin session opened")
        return Response(303, b"", headers={
            "Location": "/",
            "Set-Cookie": f"{SESSION_COOKIE}={sid}; {COOKIE_FLAGS}; Max-Age={int(SESSION_TTL)}",
        })

    def _logout(self, headers: Mapping[str, str]) -> Response:
        cookie = headers.get("Cookie") or headers.get("cookie") or ""
        for c in cookie.split(";"):
            if c.strip().startswith(SESSION_COOKIE + "="):
                with self._lock:
                    self._sessions.pop(c.split("=", 1)[1].strip(), None)
        return Response(303, b"", headers={
            "Location": "/", "Set-Cookie": f"{SESSION_COOKIE}=; {COOKIE_FLAGS}; Max-Age=0"})

    def _post_action(self, key: str, action: str, form: Mapping[str, str], headers: Mapping[str, str],
                     session: _Session | None) -> Response:
        if not self.token:
            return self._text(403, "actions are off: no ITVNODE_HTTP_TOKEN configured")
        allowed = self._bearer(headers) or (
            session is not None and hmac.compare_digest(form.get("csrf", "").encode(), session.csrf.encode()))
        if not allowed:
            log.warning("dashboard: %s on study %s refused (no session or CSRF token)", action, key)
            return self._text(403, "refused: log in with the node's token (and use the page's form)")
        if action not in ACTIONS:
            return self._text(404, f"unknown action {action}")
        results = self._action(action, self.data_dir, key, self.destinations)
        ok = bool(results) and all(getattr(r, "ok", False) for r in results)
        message = "; ".join(str(getattr(r, "message", r)) for r in results) or "nothing done"
        log.info("dashboard: %s on study %s: %s", action, key, "ok" if ok else "not applied")
        if self._bearer(headers) and session is None:
            body = json.dumps({"ok": ok, "message": message}).encode()
            return Response(200 if ok else 409, body, "application/json")
        return self._study(key, session, ("" if ok else "not done: ") + message, 200 if ok else 409)

    # ------------------------------------------------------------------------------------------- pages

    def _page(self, title: str, body: str, session: _Session | None, code: int = 200) -> Response:
        who = ""
        if self.token and session is not None:
            who = ('<form method="post" action="/logout" class="inline">admin session '
                   '<button type="submit">log out</button></form>')
        elif self.token:
            who = '<a href="/login">admin login</a>'
        else:
            who = '<span class="muted">actions off (no ITVNODE_HTTP_TOKEN)</span>'
        doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)} - itvnode</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: sans-serif; margin: 1.2em 2em; color: #222; }}
header {{ display: flex; justify-content: space-between; align-items: baseline;
  border-bottom: 1px solid #ccc; }}
table {{ border-collapse: collapse; margin: .6em 0 1.2em; }}
th, td {{ border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top;
  font-size: 90%; }}
th {{ background: #f2f2f2; }}
.state {{ font-weight: bold; }}
.warn {{ color: #b00000; }}
.muted {{ color: #777; }}
.banner {{ background: #fff3cd; border: 1px solid #e0c060; padding: .5em; margin: .8em 0; }}
.inline {{ display: inline; }}
.pages img {{ width: 48%; border: 1px solid #ccc; margin: .3em; }}
form.action {{ display: inline-block; margin-right: 1em; }}
</style></head><body>
<header><h1><a href="/">itvnode</a> {_e(title)}</h1><div>{who}</div></header>
<p class="warn">Machine-generated contours: review by a qualified person before clinical use.</p>
{body}
</body></html>"""
        headers = {"Cache-Control": "no-store"}
        return Response(code, doc.encode("utf-8"), headers=headers)

    def _manifests(self) -> list[dict[str, Any]]:
        out = []
        for path in self.layout.manifest_paths():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and KEY_RE.fullmatch(str(data.get("study_key", ""))):
                out.append(data)
        return out

    def _deliveries(self, m: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
        """(item, destination, status, detail) of a study's outbox items."""
        from service.store.outbox import Outbox

        res = m.get("results") or {}
        items = list(res.get("items") or [])
        if not items:
            return []
        outbox = Outbox(self.layout.outbox)
        doc_items = set((res.get("report") or {}).get("items") or [])
        out = []
        for item_id in items:
            item = outbox.find(str(item_id))
            what = "QA report" if item_id in doc_items else "RTSTRUCT"
            if item is None:
                out.append((what, "?", "unknown", f"item {item_id} not found"))
                continue
            for dest, st in item.destinations.items():
                detail = f"{st.attempts} attempt(s)"
                if st.last_error and st.status != "delivered":
                    detail += f"; {st.last_error}"
                out.append((what, dest, st.status, detail))
        return out

    def _list(self, session: _Session | None) -> Response:
        now = time.time()
        rows = []
        studies = sorted(self._manifests(), key=lambda d: str(d.get("updated_at") or ""), reverse=True)
        for m in studies:
            key = str(m["study_key"])
            state = str(m.get("state", ""))
            cycle = m.get("cycle") or {}
            n = len(m.get("phases") or [])
            phases = f"{n}" + (f" of {cycle.get('expected')}" if cycle.get("expected") else "")
            qa = (m.get("results") or {}).get("qa") or {}
            warnings = qa.get("warnings") or []
            history = m.get("history") or []
            first = history[0].get("at") if history and isinstance(history[0], dict) else m.get("updated_at")
            deliveries = self._deliveries(m)
            dl = "<br>".join(f"{_e(w)} → {_e(d)}: {_e(s)}" for w, d, s, _ in deliveries) or (
                '<span class="muted">none</span>')
            patient = ""
            if session is not None:
                patient = f"<td>{_e((m.get('identifiers') or {}).get('PatientID', ''))}</td>"
            rows.append(
                f'<tr><td><a href="/studies/{_e(key)}">{_e(key)}</a></td>{patient}'
                f'<td class="state" style="color:{STATE_COLORS.get(state, "#222")}">{_e(state)}</td>'
                f"<td>{_e(phases)}</td>"
                f'<td class="{"warn" if warnings else ""}">{len(warnings)}</td>'
                f"<td>{_e(_age(first, now))}</td><td>{dl}</td><td>{_e(m.get('reason') or '')}</td></tr>")
        head = "<th>study key</th>" + ("<th>patient ID</th>" if session is not None else "")
        table = (f"<table><thead><tr>{head}<th>state</th><th>phases</th><th>QA warnings</th><th>age</th>"
                 f"<th>destinations and delivery</th><th>reason</th></tr></thead><tbody>{''.join(rows)}"
                 "</tbody></table>") if rows else "<p>No studies yet.</p>"
        return self._page("studies", f"<h2>Studies ({len(rows)})</h2>{table}", session)

    def _study(self, key: str, session: _Session | None, message: str, code: int = 200) -> Response:
        path = self.layout.manifest(key)
        if not path.is_file():
            return self._text(404, "no such study")
        m = json.loads(path.read_text())
        res = m.get("results") or {}
        qa = res.get("qa") or {}
        parts: list[str] = []
        if message:
            parts.append(f'<div class="banner">{_e(message)}</div>')
        ident = ""
        if session is not None:
            ids = m.get("identifiers") or {}
            ident = (f"<tr><th>patient</th><td>{_e(ids.get('PatientName', ''))} "
                     f"({_e(ids.get('PatientID', ''))})</td></tr>"
                     f"<tr><th>study</th><td>{_e(ids.get('StudyDescription', ''))} "
                     f"{_e(ids.get('StudyDate', ''))}</td></tr>")
        cycle = m.get("cycle") or {}
        refs = ", ".join(str(r.get("kind", "")) for r in m.get("references") or [])
        parts.append(
            "<table>"
            f'<tr><th>state</th><td class="state" style="color:{STATE_COLORS.get(m.get("state"), "#222")}">'
            f"{_e(m.get('state'))}</td></tr>"
            f"<tr><th>reason</th><td>{_e(m.get('reason') or '')}</td></tr>{ident}"
            f"<tr><th>phases</th><td>{len(m.get('phases') or [])}"
            + (f" of {_e(cycle.get('expected'))}" if cycle.get("expected") else "")
            + ": " + ", ".join(f"{_e(p.get('percent'))} %" for p in m.get("phases") or []) + "</td></tr>"
            f"<tr><th>references</th><td>{_e(refs)}"
            "</td></tr>"
            f"<tr><th>result version</th><td>{_e(res.get('version') or '')}</td></tr>"
            "</table>")
        warnings = qa.get("warnings") or []
        parts.append(f"<h2>QA warnings ({len(warnings)})</h2>")
        parts.append("<ul>" + "".join(f'<li class="warn">{_e(w)}</li>' for w in warnings) + "</ul>"
                     if warnings else '<p class="muted">none</p>')
        skipped = res.get("skipped") or {}
        if skipped:
            parts.append("<h2>Skipped</h2><ul>" + "".join(
                f"<li>{_e(k)}: {_e(v)}</li>" for k, v in skipped.items()) + "</ul>")
        parts.append(self._actions_html(key, session))
        deliveries = self._deliveries(m)
        parts.append("<h2>Deliveries</h2>")
        parts.append("<table><tr><th>what</th><th>destination</th><th>state</th><th>detail</th></tr>"
                     + "".join(
            f"<tr><td>{_e(w)}</td><td>{_e(d)}</td><td>{_e(s)}</td><td>{_e(x)}</td></tr>"
            for w, d, s, x in deliveries) + "</table>" if deliveries else '<p class="muted">none</p>')
        report = res.get("report") or {}
        parts.append("<h2>QA report</h2>")
        if report.get("pages"):
            parts.append(f'<p><a href="/studies/{_e(key)}/report/report.pdf">report.pdf</a> '
                         f'(rendered in {_e(report.get("seconds"))} s)</p><div class="pages">')
            for rel in report["pages"]:
                name = Path(str(rel)).name
                parts.append(f'<a href="/studies/{_e(key)}/report/{_e(name)}">'
                             f'<img src="/studies/{_e(key)}/report/{_e(name)}" alt="report {_e(name)}"></a>')
            parts.append("</div>")
        elif report.get("error"):
            parts.append(f'<p class="warn">report failed: {_e(report["error"])}</p>')
        else:
            parts.append('<p class="muted">no report (yet)</p>')
        history = [h for h in m.get("history") or [] if isinstance(h, dict)]
        parts.append("<h2>History</h2><table><tr><th>at (UTC)</th><th>state</th><th>reason</th></tr>"
                     + "".join(
            f"<tr><td>{_e(h.get('at'))}</td><td>{_e(h.get('state'))}</td><td>{_e(h.get('reason') or '')}"
            "</td></tr>" for h in history) + "</table>")
        return self._page(f"study {key}", "".join(parts), session, code)

    def _actions_html(self, key: str, session: _Session | None) -> str:
        if not self.token:
            return '<h2>Actions</h2><p class="muted">Actions are off: the node has no ITVNODE_HTTP_TOKEN.</p>'
        if session is None:
            return ('<h2>Actions</h2><p class="muted"><a href="/login">Log in</a> to release, retry, '
                    "resend or delete.</p>")
        forms = []
        for action in ACTIONS:
            forms.append(
                f'<form class="action" method="post" action="/studies/{_e(key)}/actions/{_e(action)}">'
                f'<input type="hidden" name="csrf" value="{_e(session.csrf)}">'
                f'<button type="submit" name="action" value="{_e(action)}">{_e(action)}</button>'
                "</form>")
        return "<h2>Actions</h2>" + "".join(forms)

    def _login_page(self, message: str, code: int = 200) -> Response:
        if not self.token:
            body = '<p class="muted">Actions are off: the node has no ITVNODE_HTTP_TOKEN.</p>'
        else:
            body = ('<form method="post" action="/login"><label>token <input type="password" name="token" '
                    'autocomplete="current-password"></label> <button type="submit">log in</button></form>')
        if message:
            body = f'<div class="banner">{_e(message)}</div>' + body
        return self._page("admin login", body, None, code)

    def _report_file(self, key: str, name: str) -> Response:
        if not REPORT_FILE_RE.fullmatch(name):
            return self._text(404, "not found")
        path = self.layout.manifest(key)
        if not path.is_file():
            return self._text(404, "no such study")
        report = (json.loads(path.read_text()).get("results") or {}).get("report") or {}
        # the manifest says where the files are (the worker writes them): serve only those
        files = [str(report.get("pdf") or ""), *(str(p) for p in report.get("pages") or [])]
        rel = next((f for f in files if f and Path(f).name == name), None)
        if rel is None:
            return self._text(404, "no such report file")
        target = (self.data_dir / rel).resolve()
        if not target.is_relative_to(self.data_dir.resolve()) or not target.is_file():
            return self._text(404, "no such report file")
        ctype = "application/pdf" if name.endswith(".pdf") else "image/png"
        return Response(200, target.read_bytes(), ctype, {"Cache-Control": "no-store"})

    @staticmethod
    def _text(code: int, text: str) -> Response:
        return Response(code, (text + "\n").encode(), "text/plain; charset=utf-8")
