"""Who may do what: one admin token for the operator, one token per registered node.

* No admin token configured (``WILLIW_TOKEN``/``--token`` unset): the service is open; anyone who can reach
  the port may do anything. Node tokens are still issued, so agents work unchanged when a token is set later.
* Admin token configured: every mutating endpoint needs ``Authorization: Bearer <token>``.
  - The admin token may do everything: create requests, process them, register any node (a registration
    by the admin issues a fresh node token and revokes the old one), heartbeat, update or delete any node.
  - A node token may heartbeat, re-register (update) or delete only its own node; re-registering with the node
    token keeps that token. It may not register other nodes, create or process requests.
  - Reads (``GET``, ``POST /api/get-plan``, ``/healthz``) need no token.
  - No header: 401. A token that is not accepted for this action: 403.

Only the sha256 of a node token is stored, so reading the database does not give a node's credentials; tokens
are compared with `hmac.compare_digest`, whose time does not depend on where the strings differ.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable

from williw.errors import WilliwError

NODE_TOKEN_PREFIX = "wn_"


class AuthError(WilliwError, PermissionError):
    """The caller did not send a token (status 401) or its token does not allow the action (403)."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


def hash_token(token: str) -> str:
    """The sha256 hex digest under which a node token is stored."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_node_token() -> str:
    """A fresh node token: 32 random bytes, URL-safe, with a prefix that says what it is."""
    return NODE_TOKEN_PREFIX + secrets.token_urlsafe(32)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None when there is none."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class Auth:
    """The rules above, for one admin token (or none).

    Args:
        admin_token: the operator's token; None or empty leaves the service open.
    """

    def __init__(self, admin_token: str | None) -> None:
        self._admin_hash = hash_token(admin_token) if admin_token else None

    @property
    def enabled(self) -> bool:
        return self._admin_hash is not None

    def is_admin(self, token: str | None) -> bool:
        """Whether ``token`` is the admin token (always true for an open service)."""
        if self._admin_hash is None:
            return True
        return token is not None and hmac.compare_digest(hash_token(token), self._admin_hash)

    def require_admin(self, token: str | None, action: str) -> None:
        """Raises: AuthError: 401 without a token, 403 with any token but the admin one."""
        if self.is_admin(token):
            return
        if token is None:
            raise _missing(action)
        raise AuthError(f"{action} needs the admin token (WILLIW_TOKEN); the token sent is not it", 403)

    def require_node(self, token: str | None, node_id: str, stored_hash: Callable[[], str], action: str) -> str:
        """Allow the admin or the node ``node_id`` itself.

        Args:
            stored_hash: returns the node's stored token hash (raises NotFound for an unknown node).

        Returns:
            ``"admin"`` or ``"node"``: who was let in.

        Raises:
            AuthError: 401 without a token, 403 with a token that is neither the admin's nor this node's.
            NotFound: the node is not registered (only asked when the token is not the admin's).
        """
        if self.is_admin(token):
            return "admin"
        if token is None:
            raise _missing(action)
        if hmac.compare_digest(hash_token(token), stored_hash()):
            return "node"
        raise AuthError(f"{action} needs the admin token or node '{node_id}''s own token; the token sent is "
                        "neither", 403)


def _missing(action: str) -> AuthError:
    return AuthError(f"{action} needs 'Authorization: Bearer <token>' (the admin token, or a node's own token for "
                     "its heartbeat, update and delete)", 401)
