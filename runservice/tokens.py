"""The tokens file: bearer tokens stored as SHA-256 digests, never in clear."""

from __future__ import annotations

import hashlib
import os
import secrets
import string
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tomli_w

from runservice.domain.model import Principal


class TokensFileError(ValueError):
    """The tokens file cannot be read or is not valid; the message names it and the problem."""


SHA256_HEX_LEN = 64


def hash_token(token: str) -> str:
    """The SHA-256 hex digest under which a token is stored (the only form ever kept)."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random bearer token."""
    return "rs_" + secrets.token_urlsafe(32)


def add_token(path: Path, user: str, roles: list[str], token: str | None = None) -> str:
    """Adds a token for `user` to the tokens file (created mode 600) and returns the token."""
    token = token or new_token()
    doc: dict[str, Any] = {"tokens": []}
    if path.exists():
        doc = _read_valid(path)  # TokensFileError for a file that is not valid: left as it is
        doc.setdefault("tokens", [])
    entry: dict[str, Any] = {"user": user, "sha256": hash_token(token)}
    if roles:
        entry["roles"] = roles
    entry["created"] = datetime.now(UTC).replace(microsecond=0)  # a TOML date-time
    doc["tokens"].append(entry)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_doc(path, doc)
    return token


def has_token(path: Path, token: str) -> bool:
    """True when the tokens file holds `token`'s digest; TokensFileError if it cannot be
    read as one."""
    if not path.exists():
        return False
    digest = hash_token(token)
    tokens = _read_document(path).get("tokens", [])
    return isinstance(tokens, list) and any(
        isinstance(item, dict) and str(item.get("sha256", "")).lower() == digest for item in tokens
    )


def ensure_dev_token(data_dir: Path, tokens_file: Path) -> str:
    """The development token in DATA_DIR/dev-token (mode 600), registered as admin `dev`."""
    token_path = data_dir / "dev-token"
    if token_path.exists():
        token = token_path.read_text().strip()
    else:
        token = new_token()
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
    if not has_token(tokens_file, token):
        add_token(tokens_file, "dev", ["admin"], token)
    return token


def load_tokens(path: Path) -> dict[str, Principal]:
    """Token digests → principals; TokensFileError names the file and its first problem
    (for TOML that does not parse, its line and column)."""
    return _principals(path, _read_document(path))


def _principals(path: Path, doc: dict[str, Any]) -> dict[str, Principal]:
    """The digests → principals of a parsed tokens file; TokensFileError as load_tokens."""
    items = doc.get("tokens", [])
    if not isinstance(items, list):
        raise TokensFileError(
            f"{path}: tokens must be an array of [[tokens]] tables, each with user and sha256"
        )
    entries: dict[str, Principal] = {}
    for i, item in enumerate(items):
        digest, principal = _token_entry(path, i, item)
        entries[digest] = principal
    return entries


def _read_document(path: Path) -> dict[str, Any]:
    """The tokens file as TOML; TokensFileError if it cannot be read or does not parse."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise TokensFileError(f"cannot read {path}: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TokensFileError(f"{path} is not valid TOML: {exc}") from exc


def _token_entry(path: Path, i: int, item: object) -> tuple[str, Principal]:
    """One [[tokens]] table as (digest, principal); TokensFileError names what is wrong."""
    if not isinstance(item, dict):
        raise TokensFileError(f"{path}: tokens[{i}] must be a table with user and sha256")
    user, digest, roles = item.get("user"), item.get("sha256"), item.get("roles", [])
    if not isinstance(user, str) or not user:
        raise TokensFileError(f"{path}: tokens[{i}] needs a non-empty user")
    if not isinstance(digest, str) or not _is_sha256_hex(digest):
        raise TokensFileError(f"{path}: tokens[{i}] needs sha256, a 64-character hex digest")
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise TokensFileError(f"{path}: tokens[{i}].roles must be a list of strings")
    return digest.lower(), Principal(user, frozenset(roles))


def _is_sha256_hex(text: str) -> bool:
    return len(text) == SHA256_HEX_LEN and all(c in string.hexdigits for c in text)


FINGERPRINT_LEN = 12
"""Hex digits of a token's stored digest that name it in `tokens list` and `tokens revoke`."""


@dataclass(frozen=True)
class TokenEntry:
    """One [[tokens]] table as `tokens list` shows it: never the token, a digest prefix."""

    user: str
    roles: tuple[str, ...]
    fingerprint: str
    created: str | None
    """The entry's `created` value as written in the file, if it has one."""


def list_tokens(path: Path) -> list[TokenEntry]:
    """The file's entries in file order; TokensFileError if it cannot be read or is not valid."""
    doc = _read_valid(path)
    return [_entry(item) for item in doc.get("tokens", [])]


def revoke_tokens(path: Path, *, user: str = "", fingerprint: str = "") -> list[TokenEntry]:
    """Removes every entry of `user`, or the one entry whose fingerprint starts with
    `fingerprint`, rewriting the file atomically (mode 600); returns what was removed.

    Raises TokensFileError when the file is not valid, TokenNotFoundError when nothing
    matches, and TokenAmbiguousError when a fingerprint prefix matches several entries
    (the file is left as it is in all three cases).
    """
    doc = _read_valid(path)
    items: list[dict[str, Any]] = doc.get("tokens", [])
    prefix = fingerprint.lower()
    if user:
        matches = [i for i, item in enumerate(items) if item["user"] == user]
        what = f"user {user}"
    else:
        matches = [i for i, item in enumerate(items) if item["sha256"].lower().startswith(prefix)]
        what = f"fingerprint {fingerprint}"
    if not matches:
        raise TokenNotFoundError(f"no token in {path} matches {what}")
    if not user and len(matches) > 1:
        raise TokenAmbiguousError(
            f"{what} matches {len(matches)} tokens in {path}; give more of the fingerprint"
        )
    removed = [_entry(items[i]) for i in matches]
    doc["tokens"] = [item for i, item in enumerate(items) if i not in matches]
    _write_doc(path, doc)
    return removed


class TokenNotFoundError(LookupError):
    """No entry of the tokens file matches; the message names the file and the criterion."""


class TokenAmbiguousError(LookupError):
    """A fingerprint prefix matches several entries; the message says how many."""


def _read_valid(path: Path) -> dict[str, Any]:
    """The tokens file as TOML, read once; TokensFileError if it is missing or not valid."""
    doc = _read_document(path)
    _principals(path, doc)
    return doc


def _entry(item: dict[str, Any]) -> TokenEntry:
    created = item.get("created")
    return TokenEntry(
        user=item["user"],
        roles=tuple(item.get("roles", [])),
        fingerprint=item["sha256"].lower()[:FINGERPRINT_LEN],
        created=_moment(created),
    )


def _moment(value: Any) -> str | None:
    """A `created` value as text: a TOML date-time in RFC 3339 (UTC as `Z`), else as written."""
    if value is None:
        return None
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return str(value)


def _write_doc(path: Path, doc: dict[str, Any]) -> None:
    """Replaces the file in one step, so the server's reload never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        tomli_w.dump(doc, f)
    os.replace(tmp, path)
