"""Raw HTTP requests for attack tests: the path, header spellings and repeats go on the wire as written."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


def send(
    base_url: str,
    method: str,
    path: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes | dict[str, Any] | None = None,
) -> Answer:
    """One request with `path` sent verbatim (no client-side normalisation of `//`, `..` or `%xx`)
    and every header sent as given, repeats included."""
    parts = urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        connection.putrequest(method, path, skip_accept_encoding=True)
        sent = {name.lower() for name, _ in headers or []}
        for name, value in headers or []:
            connection.putheader(name, value)
        if data is not None:
            if "content-type" not in sent:
                connection.putheader("Content-Type", "application/json")
            connection.putheader("Content-Length", str(len(data)))
        connection.endheaders(data)
        response = connection.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        connection.close()
