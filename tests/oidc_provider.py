"""A small OpenID Connect provider for the single sign-on tests, served on localhost by
the test itself: discovery, an authorization endpoint with a login form, the token
endpoint (authorization code + PKCE S256, client secret in the body), userinfo, and a
JWKS with the RSA key that signs its ID tokens (RS256, real JWTs).

Users are set by the test (`provider.users[name] = {"password": ..., "claims": {...}}`)
and can be changed between sign-ins (e.g. their groups). `tamper` makes the next ID
tokens wrong in one way, for the tests of what the client refuses."""
from __future__ import annotations

import base64
import hashlib
import html
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm


class Provider:
    def __init__(self, client_id: str = "neurondeck", client_secret: str = "s3cret") -> None:
        self.client_id, self.client_secret = client_id, client_secret
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # signs forged tokens
        self.kid = "key-1"
        self.users: dict[str, dict] = {}
        self.codes: dict[str, dict] = {}
        self.access_tokens: dict[str, str] = {}
        self.tamper: str | None = None  # "audience", "issuer", "signature", "expired", "nonce"
        self.requests: list[str] = []  # "METHOD /path" of each request, for the tests
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.issuer = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Provider:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    # --- what the endpoints answer ---------------------------------------------------

    def discovery(self) -> dict:
        return {"issuer": self.issuer, "authorization_endpoint": f"{self.issuer}/authorize",
                "token_endpoint": f"{self.issuer}/token", "userinfo_endpoint": f"{self.issuer}/userinfo",
                "jwks_uri": f"{self.issuer}/jwks", "response_types_supported": ["code"],
                "subject_types_supported": ["public"], "id_token_signing_alg_values_supported": ["RS256"],
                "code_challenge_methods_supported": ["S256"]}

    def jwks(self) -> dict:
        key = json.loads(RSAAlgorithm.to_jwk(self.key.public_key()))
        return {"keys": [{**key, "kid": self.kid, "alg": "RS256", "use": "sig"}]}

    def login_form(self, query: dict, error: str = "") -> str:
        hidden = "".join(f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
                         for k, v in query.items())
        return (f"<!doctype html><title>Test IdP</title><h1>Test IdP sign-in</h1><p class=error>{html.escape(error)}</p>"
                f'<form method="post" action="/authorize">{hidden}'
                '<input name="username" id="username"><input name="password" id="password" type="password">'
                '<button type="submit" id="signin">Sign in</button></form>')

    def authorize(self, query: dict, form: dict | None) -> tuple[int, dict, str]:
        if query.get("client_id") != self.client_id or query.get("response_type") != "code":
            return 400, {}, "unknown client or response type"
        if query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
            return 400, {}, "PKCE S256 required"
        if form is None:
            return 200, {}, self.login_form(query)
        user = self.users.get(form.get("username", ""))
        if user is None or user["password"] != form.get("password"):
            return 200, {}, self.login_form(query, "wrong username or password")
        code = secrets.token_urlsafe(16)
        self.codes[code] = {"user": form["username"], "redirect_uri": query["redirect_uri"],
                            "nonce": query.get("nonce"), "challenge": query["code_challenge"]}
        location = query["redirect_uri"] + "?" + urlencode({"code": code, "state": query["state"]})
        return 302, {"Location": location}, ""

    def token(self, form: dict) -> tuple[int, dict]:
        grant = self.codes.pop(form.get("code", ""), None)  # a code works once
        if form.get("client_id") != self.client_id or form.get("client_secret") != self.client_secret:
            return 401, {"error": "invalid_client"}
        if grant is None or form.get("grant_type") != "authorization_code" \
                or form.get("redirect_uri") != grant["redirect_uri"]:
            return 400, {"error": "invalid_grant"}
        verifier = form.get("code_verifier", "").encode()
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest()).rstrip(b"=").decode()
        if challenge != grant["challenge"]:
            return 400, {"error": "invalid_grant", "error_description": "PKCE verifier does not match"}
        claims = self.users[grant["user"]]["claims"]
        access = secrets.token_urlsafe(24)
        self.access_tokens[access] = grant["user"]
        return 200, {"access_token": access, "token_type": "Bearer", "expires_in": 300,
                     "id_token": self.id_token(claims, grant["nonce"])}

    def id_token(self, claims: dict, nonce: str | None) -> str:
        now = int(time.time())
        payload = {"iss": self.issuer, "aud": self.client_id, "iat": now, "exp": now + 300, "nonce": nonce, **claims}
        key = self.key
        if self.tamper == "audience":
            payload["aud"] = "another-client"
        elif self.tamper == "issuer":
            payload["iss"] = "http://127.0.0.1:1"
        elif self.tamper == "expired":
            payload["iat"], payload["exp"] = now - 900, now - 600
        elif self.tamper == "nonce":
            payload["nonce"] = "replayed"
        elif self.tamper == "signature":
            key = self.other_key
        return jwt.encode(payload, key, algorithm="RS256", headers={"kid": self.kid})

    def userinfo(self, authorization: str) -> tuple[int, dict]:
        scheme, _, token = authorization.partition(" ")
        name = self.access_tokens.get(token) if scheme.lower() == "bearer" else None
        if name is None:
            return 401, {"error": "invalid_token"}
        claims = self.users[name]["claims"]
        return 200, {key: claims[key] for key in ("sub", "email", "preferred_username", "groups", "given_name",
                                                  "family_name") if key in claims}

    # --- HTTP ------------------------------------------------------------------------------

    def _handler(self):
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _send(self, status: int, body: str | dict, headers: dict | None = None) -> None:
                data = json.dumps(body) if isinstance(body, dict) else body
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if isinstance(body, dict) else "text/html")
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data.encode())))
                self.end_headers()
                self.wfile.write(data.encode())

            def _form(self) -> dict:
                length = int(self.headers.get("Content-Length") or 0)
                return {k: v[-1] for k, v in parse_qs(self.rfile.read(length).decode()).items()}

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                provider.requests.append(f"GET {parts.path}")
                query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                if parts.path == "/.well-known/openid-configuration":
                    self._send(200, provider.discovery())
                elif parts.path == "/jwks":
                    self._send(200, provider.jwks())
                elif parts.path == "/authorize":
                    status, headers, body = provider.authorize(query, None)
                    self._send(status, body, headers)
                elif parts.path == "/userinfo":
                    self._send(*provider.userinfo(self.headers.get("Authorization", "")))
                else:
                    self._send(404, {"error": "not_found"})

            def do_POST(self) -> None:
                parts = urlsplit(self.path)
                provider.requests.append(f"POST {parts.path}")
                form = self._form()
                if parts.path == "/authorize":
                    query = {k: v for k, v in form.items() if k not in ("username", "password")}
                    status, headers, body = provider.authorize(query, form)
                    self._send(status, body, headers)
                elif parts.path == "/token":
                    self._send(*provider.token(form))
                else:
                    self._send(404, {"error": "not_found"})

        return Handler
