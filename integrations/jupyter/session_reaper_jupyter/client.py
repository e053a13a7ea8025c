"""A small session-reaper API client over the daemon's unix socket, standard library only.

It mirrors the routes the provisioner needs (register, add ports/paths, heartbeat, close,
get): JSON over HTTP/1.1, one connection per request. Errors come back as
``{"error": {"code": "SR_…", "message": "…"}}`` and are raised as :class:`ReaperApiError`;
a daemon that cannot be reached (no socket, refused, reset, timeout) as
:class:`ReaperUnreachable`.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from typing import Any, Dict, List, Optional
from urllib.parse import quote

#: Where the shipped systemd socket unit puts the API.
SYSTEM_SOCKET = "/run/session-reaper/reaper.sock"


def default_socket(env: Optional[Dict[str, str]] = None) -> str:
    """The daemon's socket as ``reaperctl`` finds it: ``$REAPER_SOCKET``, else the system
    socket if present, else ``./reaper.sock``."""
    env = os.environ if env is None else env
    if env.get("REAPER_SOCKET"):
        return env["REAPER_SOCKET"]
    if os.path.exists(SYSTEM_SOCKET):
        return SYSTEM_SOCKET
    return os.path.abspath("reaper.sock")


class ReaperUnreachable(Exception):
    """The daemon could not be reached or did not answer in time."""


class ReaperApiError(Exception):
    """The daemon answered with an error; ``code`` is its stable ``SR_…`` code."""

    def __init__(self, status: int, code: str, message: str, detail: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.status = status
        self.code = code
        self.message = message
        self.detail: Dict[str, Any] = detail or {}  # e.g. a fence's or a tombstone's {state, reason}

    @property
    def retryable(self) -> bool:
        """Worth trying again later: the daemon is busy, shutting down or its store is
        unavailable (5xx), a request timed out (408), or a uid's quota is full (429)."""
        return self.status >= 500 or self.status in (408, 429)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class ReaperClient:
    """One call per method; nothing is kept between calls (thread-safe)."""

    def __init__(self, socket_path: Optional[str] = None, timeout: float = 5.0) -> None:
        self.socket_path = socket_path or default_socket()
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """Sends one request; returns the decoded JSON answer of a 2xx, raises otherwise."""
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            headers = {"Accept": "application/json"}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            try:
                conn.request(method, path, body=data, headers=headers)
                res = conn.getresponse()
                raw = res.read()
            except (OSError, http.client.HTTPException) as e:
                raise ReaperUnreachable(f"{self.socket_path}: {e.__class__.__name__}: {e}") from e
        finally:
            conn.close()
        try:
            answer = json.loads(raw) if raw else None
        except ValueError:
            answer = None
        if 200 <= res.status < 300:
            return answer
        err = answer.get("error") if isinstance(answer, dict) else None
        if isinstance(err, dict):
            detail = err.get("detail")
            raise ReaperApiError(
                res.status,
                str(err.get("code")),
                str(err.get("message", "")),
                detail if isinstance(detail, dict) else None,
            )
        raise ReaperApiError(res.status, f"HTTP_{res.status}", raw[:200].decode("utf-8", "replace"))

    @staticmethod
    def _session_path(session_id: str) -> str:
        return "/v1/sessions/" + quote(session_id, safe="")

    def register(self, body: Dict[str, Any]) -> Dict[str, Any]:
        """POST /v1/sessions: 201 with the session."""
        return self.request("POST", "/v1/sessions", body)

    def update(
        self,
        session_id: str,
        ports: Optional[List[int]] = None,
        paths: Optional[List[str]] = None,
        labels: Optional[Dict[str, str]] = None,
    ) -> Dict[str, Any]:
        """PATCH /v1/sessions/{id}: adds ports (held by the engine's tree now) and paths,
        merges labels; 200 with the session."""
        body: Dict[str, Any] = {}
        if ports:
            body["ports"] = list(ports)
        if paths:
            body["paths"] = list(paths)
        if labels:
            body["labels"] = dict(labels)
        return self.request("PATCH", self._session_path(session_id), body)

    def heartbeat(self, session_id: str, activity: Optional[str] = None) -> Dict[str, Any]:
        """POST /v1/sessions/{id}/heartbeat: 200 ``{id, state, deadline, expiresBy, warning}``
        (``warning``: ``{reason, deadline, at}`` while one stands, else None); 409
        ``SR_SESSION_FENCED`` once it is being reaped, 410 ``SR_SESSION_GONE`` once purged."""
        body = None if activity is None else {"activity": activity}
        return self.request("POST", self._session_path(session_id) + "/heartbeat", body)

    def extend(self, session_id: str, sec: int) -> Dict[str, Any]:
        """POST /v1/sessions/{id}/extend: keeps the session at least ``sec`` seconds from now
        however idle, up to the profile's max_extend_sec (400 ``SR_EXTEND_ABOVE_MAX`` beyond) and
        never past its max lifetime; 200 ``{extendedUntil, keptUntil, cappedBy, deadline, expiresBy}``."""
        return self.request("POST", self._session_path(session_id) + "/extend", {"sec": int(sec)})

    def close(self, session_id: str) -> Dict[str, Any]:
        """DELETE /v1/sessions/{id}: 202, the daemon runs the full cleanup (reason ``closed``)."""
        return self.request("DELETE", self._session_path(session_id))

    def get(self, session_id: str) -> Dict[str, Any]:
        """GET /v1/sessions/{id}."""
        return self.request("GET", self._session_path(session_id))
