"""HTTP to the NeuronDeck API and the stored login.

The login is a server URL and an API token, kept in the user's config directory
(`click.get_app_dir("neurondeck")/config.json`, mode 0600). NEURONDECK_URL and
NEURONDECK_TOKEN override it, for CI runners that keep the token in a secret."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import requests
from requests_toolbelt import MultipartEncoder, MultipartEncoderMonitor

from neuron_workers import config

TIMEOUT_S = 30
CONFIG_NAME = "config.json"


class ApiError(click.ClickException):
    """An answer the caller must see: the API's own sentence (`detail`) and, for a
    bad field, the field's messages. Exit status 1, or 2 for a usage error."""

    def __init__(self, message: str, status: int | None = None, body: dict | None = None):
        super().__init__(message)
        self.status, self.body = status, body or {}


def config_path() -> Path:
    return Path(click.get_app_dir("neurondeck")) / CONFIG_NAME


def save_login(url: str, token: str) -> Path:
    """Store the login readable by its owner only (the token is a credential)."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "token": token}, f)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_CREAT
    return path


def load_login() -> tuple[str, str]:
    stored: dict[str, str] = {}
    path = config_path()
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ApiError(f"cannot read {path}: {exc}; run `neurondeck login URL` again") from exc
    try:
        url = config.api_url() or stored.get("url")
        token = config.api_token() or stored.get("token")
    except config.ConfigError as exc:
        raise ApiError(str(exc)) from exc
    if not url or not token:
        raise ApiError("not logged in: run `neurondeck login URL` (or set NEURONDECK_URL and NEURONDECK_TOKEN)")
    return url, token


def normalize_url(url: str) -> str:
    """The console's address as typed, with http:// when no scheme is given; another
    scheme (ftp://, file://) is a usage error rather than a host named "ftp"."""
    url = url.strip().rstrip("/")
    scheme, sep, _ = url.partition("://")
    if sep and scheme.lower() not in ("http", "https"):
        raise click.BadParameter(f"{url!r} is not an http:// or https:// address", param_hint="URL")
    if not sep:
        url = "http://" + url
    return url


def _error_message(response: requests.Response) -> tuple[str, dict]:
    """The API's sentence for a refusal, with each bad field's messages."""
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    detail = body.get("detail") or response.reason or "error"
    if response.status_code == 401:
        detail = f"{detail} (log in again with `neurondeck login URL`)"
    lines = [f"{detail} [HTTP {response.status_code}]"]
    for field, messages in (body.get("errors") or {}).items():
        if isinstance(messages, list) and f"{field}:" not in detail:
            lines.append(f"  {field}: {'; '.join(map(str, messages))}")
    return "\n".join(lines), body


@dataclass
class Api:
    url: str
    token: str

    @classmethod
    def from_login(cls) -> Api:
        return cls(*load_login())

    def _send(self, method: str, path: str, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.token}", **kwargs.pop("headers", {})}
        try:
            response = requests.request(method, f"{self.url}/api/v1{path}", headers=headers,
                                        timeout=kwargs.pop("timeout", TIMEOUT_S), **kwargs)
        except requests.RequestException as exc:
            raise ApiError(f"cannot reach {self.url}: {exc}") from exc
        if response.status_code >= 400:
            message, body = _error_message(response)
            raise ApiError(message, status=response.status_code, body=body)
        return response

    def _json(self, response: requests.Response) -> Any:
        """The answer's document; an answer that is not JSON (another server at this
        address, a proxy's page) is an error naming the address, not a traceback."""
        try:
            return response.json()
        except ValueError as exc:
            kind = response.headers.get("Content-Type") or "no content type"
            raise ApiError(f"{self.url} answered {response.request.method} {response.request.path_url} with "
                           f"{kind}, not the NeuronDeck API's JSON: check the URL") from exc

    def get(self, path: str, **params) -> Any:
        return self._json(self._send("GET", path, params={k: v for k, v in params.items() if v is not None}))

    def post(self, path: str, body: dict | None = None) -> Any:
        return self._json(self._send("POST", path, json=body))

    def patch(self, path: str, body: dict) -> Any:
        return self._json(self._send("PATCH", path, json=body))

    def delete(self, path: str) -> Any:
        response = self._send("DELETE", path)
        return self._json(response) if response.content else None

    def post_multipart(self, path: str, fields: dict[str, Any], file_field: str, file_path: Path,
                       on_progress: Callable[[int, int], None] | None = None) -> Any:
        """A multipart POST streamed from disk, reporting (bytes sent, total)."""
        with open(file_path, "rb") as f:
            encoder = MultipartEncoder({**{k: str(v) for k, v in fields.items() if v is not None},
                                        file_field: (file_path.name, f, "application/octet-stream")})
            monitor = MultipartEncoderMonitor(
                encoder, (lambda m: on_progress(m.bytes_read, m.len)) if on_progress else None)
            return self._json(self._send("POST", path, data=monitor, headers={"Content-Type": monitor.content_type},
                                         timeout=None))

    def download(self, path: str, dest: Path) -> int:
        response = self._send("GET", path, stream=True)
        size = 0
        with open(dest, "wb") as f:
            for chunk in response.iter_content(1 << 16):
                f.write(chunk)
                size += len(chunk)
        return size
