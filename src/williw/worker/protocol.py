"""uvicorn's HTTP protocol with the worker's error shape: a request httptools cannot parse (a Content-Length that
is not a number, a broken request line or header) is answered ``{"detail": "<one line>"}`` with 400, like every
other error of the worker, instead of uvicorn's plain-text "Invalid HTTP request received."."""

from __future__ import annotations

import json
from typing import Any

BAD_REQUEST = ("the request is not valid HTTP/1.1 (check the request line, the headers and that Content-Length "
               "is a non-negative integer)")


def http_protocol() -> Any:
    """The protocol class for ``uvicorn.Config(http=...)``; uvicorn's default ("auto") without httptools."""
    try:
        from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools comes with uvicorn[standard]
        return "auto"

    class JsonErrorsProtocol(HttpToolsProtocol):
        def send_400_response(self, msg: str) -> None:
            body = json.dumps({"detail": BAD_REQUEST}).encode()
            head = [STATUS_LINE[400]]
            for name, value in self.server_state.default_headers:
                head.extend([name, b": ", value, b"\r\n"])
            head.extend([b"content-type: application/json\r\n", b"content-length: " + str(len(body)).encode() +
                         b"\r\n", b"connection: close\r\n", b"\r\n", body])
            self.transport.write(b"".join(head))
            self.transport.close()

    return JsonErrorsProtocol
