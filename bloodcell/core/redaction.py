"""Secrets out of every record: passwords and tokens in URLs masked before a value is logged, saved or
printed (MLflow params, tags and artifacts, console lines, the sweep's own files).

    mask_url("postgresql://u:secret@host/db")            -> "postgresql://u:***@host/db"
    mask_url("https://host/x?token=abc&page=2")           -> "https://host/x?token=***&page=2"
    mask_text("cannot reach postgresql://u:pw@h/db: ...")  -> "cannot reach postgresql://u:***@h/db: ..."
    mask_secrets({"tracking": {"uri": "mysql://u:pw@h/db"}}) -> the same structure, every string masked

The processes themselves still get the real value: users pass it as ``${oc.env:VAR}`` (which Hydra saves
unresolved), and the sweeper hands a trial the storage URL as such a reference
(docs/configuration.md, Secrets).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"

# "scheme://" then anything up to whitespace or a quote: URLs inside log lines, YAML and override lists
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"`<>]+")
# query parameters that carry credentials: password, pwd, token, access_token, api_key, secret, and the
# signatures and credentials of pre-signed cloud URLs (X-Amz-Signature, sig, X-Amz-Credential)
_SECRET_PARAM = re.compile(r"pass|pwd|token|secret|key|sig|credential", re.IGNORECASE)


def mask_url(url: str) -> str:
    """``url`` with the password of its user info and the values of credential query parameters replaced
    by ``***``; the user name, host, path and other parameters stay (they say where, not how to get in).
    Anything that is not a ``scheme://`` URL comes back unchanged."""
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # e.g. a port that is not a number: keep nothing of the user info
        head, _, rest = url.partition("://")
        return f"{head}://{MASK}@{rest.rpartition('@')[2]}" if "@" in rest else url
    netloc = parts.netloc
    if password:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:{MASK}@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_PARAM.search(key) for key, _ in pairs):
            masked = [(key, MASK if _SECRET_PARAM.search(key) else value) for key, value in pairs]
            query = urlencode(masked, safe="*")
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def mask_text(text: str) -> str:
    """Every URL inside ``text`` (a log line, an error message, an override ``key=url``) masked."""
    return _URL.sub(lambda match: _mask_match(match.group(0)), text) if "://" in text else text


def _mask_match(url: str) -> str:
    """One `_URL` match masked, and any URL further inside it: a URL runs to the next space, so in an
    override list joined by commas (Hydra's ``override_dirname``: ``a=x://u:pw@h,b=y://v:pw@h``) the first
    match holds the others in its path."""
    scheme, separator, rest = url.partition("://")
    inner = _URL.search(rest)
    if inner is None:
        return mask_url(url)
    return mask_url(scheme + separator + rest[: inner.start()]) + mask_text(rest[inner.start() :])


def has_secret(text: str) -> bool:
    """Whether ``text`` (a URL, or text with URLs in it) holds a password or a credential parameter."""
    return mask_url(text) != text or mask_text(text) != text  # a whole URL may have quotes in its password


def mask_secrets(value: Any) -> Any:
    """A copy of a plain structure (dicts, lists, tuples, scalars, e.g. a resolved config) with every
    string masked by `mask_text`."""
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, dict):
        return {key: mask_secrets(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(mask_secrets(item) for item in value)
    return value
