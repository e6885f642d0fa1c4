"""HTTP client for a running arenahost (its /v1 API), as the node pack sees it.

The pack is a client of the host: it loads models, applies and removes LoRAs
through the host's HTTP API and maps the arena's tensors zero-copy through
the descriptors ``GET /v1/models/{name}/tensors`` answers (the same read-only
descriptors a plugin's Host-service ``LookupTensors`` gets). It uses only the
standard library's urllib and the SDK's protobuf classes.

Errors: :class:`ArenahostError` carries the host's JSON ``code`` and
``detail`` (which name the file, key or setting) or says that nothing answers
at the address.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from arenahost.plugin.v1 import plugin_pb2 as pb
from arenahost.tensor import Mapper, default_mapper

__all__ = ["ArenahostError", "HostHTTP", "ENV_URL", "ENV_TOKEN", "DEFAULT_URL"]

ENV_URL = "ARENAHOST_URL"
ENV_TOKEN = "ARENAHOST_TOKEN"
DEFAULT_URL = "http://127.0.0.1:7860"


class ArenahostError(RuntimeError):
    """A host call failed: status (0 when nothing answered), code and detail from the host."""

    def __init__(self, what: str, status: int, code: str, detail: str):
        self.what, self.status, self.code, self.detail = what, status, code, detail
        where = f"HTTP {status} {code}" if status else code
        super().__init__(f"arenahost {what}: {where}: {detail}")


class HostHTTP:
    """One arenahost at url (``http://HOST:PORT``); token for mutating routes."""

    def __init__(self, url: str = "", token: str = "", *, timeout: float = 120.0, mapper: Mapper | None = None):
        url = (url or os.environ.get(ENV_URL) or DEFAULT_URL).strip().rstrip("/")
        p = urllib.parse.urlparse(url)
        if p.scheme not in ("http", "https") or not p.netloc:
            raise ArenahostError("connect", 0, "bad_url", f"host url {url!r}: want http://HOST:PORT (setting host_url or ${ENV_URL})")
        self.url = url
        self.token = token if token else os.environ.get(ENV_TOKEN, "")
        self.timeout = timeout
        self.mapper = mapper if mapper is not None else default_mapper()

    def __repr__(self) -> str:
        return f"HostHTTP({self.url!r})"

    # --- transport --------------------------------------------------------

    def _request(self, method: str, path: str, body: Any = None, *, raw: bool = False, timeout: float | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token and method not in ("GET", "HEAD"):
            req.add_header("Authorization", "Bearer " + self.token)
        what = f"{method} {path.split('?')[0]}"
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                b = resp.read()
        except urllib.error.HTTPError as e:
            b = e.read()
            try:
                j = json.loads(b)
                code, detail = j.get("code", "error"), j.get("detail") or j.get("error") or ""
            except (ValueError, AttributeError):
                code, detail = "error", b[:300].decode("utf-8", "replace")
            raise ArenahostError(what, e.code, code, detail) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ArenahostError(what, 0, "unreachable",
                                 f"no arenahost answers at {self.url} ({reason}); start one with `arenahost serve` "
                                 f"or set host_url / ${ENV_URL}") from None
        if raw:
            return b
        return json.loads(b) if b else None

    # --- routes -----------------------------------------------------------

    def health(self) -> dict:
        return self._request("GET", "/v1/health", timeout=5)

    def models(self) -> list[dict]:
        return self._request("GET", "/v1/models")

    def model(self, name: str) -> dict | None:
        for m in self.models():
            if m.get("name") == name:
                return m
        return None

    def load_model(self, path: str, name: str = "") -> dict:
        body = {"path": path}
        if name:
            body["name"] = name
        return self._request("POST", "/v1/models", body)

    def loras(self) -> list[dict]:
        return self._request("GET", "/v1/loras")

    def apply_loras(self, model: str, mode: str, loras: list[tuple[str, float]], factor_dtype: str = "") -> dict:
        """POST /v1/loras/apply; factor_dtype "f32" or "bf16" (side mode), omitted when empty: the host keeps
        the dtype bound now, or takes its --lora-factor-dtype."""
        body = {"model": model, "mode": mode, "loras": [{"name": n, "strength": float(s)} for n, s in loras]}
        if factor_dtype:
            body["factor_dtype"] = factor_dtype
        return self._request("POST", "/v1/loras/apply", body)

    def remove_loras(self, model: str) -> dict:
        return self._request("DELETE", "/v1/loras?model=" + urllib.parse.quote(model))

    def lora_state(self, model: str) -> dict:
        return self._request("GET", "/v1/loras/state?model=" + urllib.parse.quote(model))

    def digest(self, model: str, prefix: str = "", detail: bool = False) -> dict:
        q = {"prefix": prefix} if prefix else {}
        if detail:
            q["detail"] = "1"
        return self._request("GET", f"/v1/models/{urllib.parse.quote(model)}/digest?" + urllib.parse.urlencode(q))

    def lookup_tensors(self, model: str = "", names=(), prefix: str = "", include_factors: bool = False) -> pb.LookupTensorsResponse:
        """The host's descriptors for model (every tensor, or the prefix); filtered to names when given.

        The same answer as the Host service's LookupTensors (FactorWatcher
        polls this once per sampling step).
        """
        q = {"format": "proto"}
        if prefix:
            q["prefix"] = prefix
        if include_factors:
            q["factors"] = "1"
        b = self._request("GET", f"/v1/models/{urllib.parse.quote(model or 'sample')}/tensors?" + urllib.parse.urlencode(q),
                          raw=True, timeout=30)
        resp = pb.LookupTensorsResponse()
        resp.ParseFromString(b)
        names = set(n for n in names if n)
        if names:
            keep = [d for d in resp.tensors if d.name in names]
            del resp.tensors[:]
            resp.tensors.extend(keep)
        return resp
