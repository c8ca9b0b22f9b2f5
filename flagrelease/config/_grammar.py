"""The grammar of every string a release config holds, checked when the config loads.

Each check takes the value and returns it (possibly normalised) or raises ``ValueError``
with a message that says what the value must look like; pydantic turns that into an
error naming the field.  Free text (display names, licenses, labels, descriptions) may
hold anything printable but no control characters, line separators or bidirectional
overrides; everything else has a grammar.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from flagrelease._redact import find_secret

__all__ = [
    "DTYPES",
    "check_bucket",
    "check_cron",
    "check_env_name",
    "check_free_text",
    "check_host",
    "check_ignore_pattern",
    "check_path_text",
    "check_repo_id",
    "check_s3_prefix",
    "check_served_model_name",
    "check_url",
    "looks_secret_name",
]

#: The ``dtype`` values vLLM accepts (the same in every recorded vLLM version).
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")

# C0 and C1 controls, DEL, line/paragraph separators, bidirectional embeddings, overrides
# and isolates (the "Trojan Source" characters), and the byte-order mark.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]")
_CONTROL_BUT_NEWLINE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]")
_REPO_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_DNS_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_SERVED_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/+-]{0,127}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_S3_KEY_CHARS = re.compile(r"^[A-Za-z0-9!_.*'()/-]*$")
_URL = re.compile(r"^https?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?(?:[/?#][A-Za-z0-9._~:/?#\[\]@!&()*+,;=%-]*)?$")
_SECRET_PARTS = frozenset(
    {
        "TOKEN",
        "SECRET",
        "SECRETS",
        "PASSWORD",
        "PASSWD",
        "PASSPHRASE",
        "KEY",
        "APIKEY",
        "ACCESSKEY",
        "SECRETKEY",
        "PRIVATEKEY",
        "CREDENTIAL",
        "CREDENTIALS",
    }
)


def check_free_text(value: str, *, what: str, max_len: int = 512, newlines: bool = False) -> str:
    """Printable text of at most ``max_len`` characters, with no control characters."""
    pattern = _CONTROL_BUT_NEWLINE if newlines else _CONTROL
    bad = pattern.search(value)
    if bad:
        raise ValueError(
            f"{what} holds the control character {bad.group()!r} at position {bad.start()}; "
            + ("give it without control characters" if newlines else "give it as one line of plain text")
        )
    if len(value) > max_len:
        raise ValueError(f"{what} is {len(value)} characters long; {max_len} at most")
    return value


def check_path_text(value: Any, *, what: str) -> Any:
    """A path given as text: one line, no control characters, at most 4096 characters."""
    if isinstance(value, str):
        check_free_text(value, what=what, max_len=4096)
    return value


def check_repo_id(value: str, *, what: str = "repo id") -> str:
    """A Hugging Face Hub or ModelScope repo id: ``owner/name``, the hubs' own rules."""
    owner, sep, name = value.partition("/")
    if (
        not sep
        or not _REPO_PART.match(owner)
        or not _REPO_PART.match(name)
        or any(bad in value for bad in ("--", ".."))
        or name.endswith(".git")
    ):
        raise ValueError(
            f"{value!r} is not a {what} of the form 'owner/name': letters, digits, '-', '_' and '.', "
            "96 at most each, not starting or ending with '-' or '.', no '--' or '..'"
        )
    return value


def check_env_name(value: Any, *, what: str = "environment variable name") -> str:
    """A POSIX environment variable name."""
    if not isinstance(value, str) or not _ENV_NAME.match(value):
        raise ValueError(f"{what} {value!r} is not valid: use letters, digits and '_', not starting with a digit")
    return value


def looks_secret_name(name: str) -> bool:
    """Whether an environment variable name says it holds a secret (``HF_TOKEN``, ``DB_PASSWORD``, ``API_KEY``)."""
    parts = [p for p in name.upper().split("_") if p]
    return any(p in _SECRET_PARTS for p in parts) or "".join(parts[-2:]) in _SECRET_PARTS


def check_host(value: str, *, what: str = "host") -> str:
    """A host name (RFC 1123), an IPv4 address, or an IPv6 address (bare or in brackets)."""
    text = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        ipaddress.ip_address(text)
        return value
    except ValueError:
        pass
    labels = value.rstrip(".").split(".")
    if (
        0 < len(value) <= 253
        and all(_DNS_LABEL.match(label) for label in labels)
        and not re.fullmatch(r"[0-9.]+", value)
    ):
        return value
    raise ValueError(f"{what} {value!r} is not a host name, an IPv4 address or an IPv6 address")


def check_served_model_name(value: str) -> str:
    """The name the OpenAI endpoint serves the model under: ``org/model-name`` style, no spaces."""
    if not _SERVED_NAME.match(value):
        raise ValueError(
            f"served model name {value!r} must start with a letter or digit and hold only letters, digits "
            "and '.', '_', ':', '/', '+', '-' (128 at most)"
        )
    return value


def check_bucket(value: str) -> str:
    """An S3 bucket name (AWS's rules)."""
    if (
        not _BUCKET.match(value)
        or ".." in value
        or ".-" in value
        or "-." in value
        or re.fullmatch(r"\d+\.\d+\.\d+\.\d+", value)
        or value.startswith(("xn--", "sthree-"))
        or value.endswith(("-s3alias", "--ol-s3"))
    ):
        raise ValueError(
            f"bucket {value!r} is not a valid S3 bucket name: 3-63 lowercase letters, digits, '.' and '-', "
            "starting and ending with a letter or digit"
        )
    return value


def check_s3_prefix(value: str) -> str:
    """An S3 key prefix: S3's safe characters, no empty or ``..`` segments; slashes at the ends dropped."""
    value = value.strip("/")
    parts = value.split("/")
    if not _S3_KEY_CHARS.match(value) or (value and any(p in ("", ".", "..") for p in parts)) or len(value) > 512:
        raise ValueError(
            f"prefix {value!r} must be a plain key prefix: letters, digits and !_.*'()/- only, "
            "no empty, '.' or '..' segments, 512 characters at most"
        )
    return value


def check_url(value: str, *, what: str = "URL") -> str:
    """An http(s) URL with no spaces, quotes or credentials."""
    _scheme, sep, rest = value.partition("://")
    netloc = re.split(r"[/?#]", rest, maxsplit=1)[0] if sep else ""
    if "@" in netloc or find_secret(value) == "a URL with a user name and password":
        raise ValueError(f"{what} holds a user name or password; give the credentials another way")
    if not _URL.match(value) or len(value) > 2048:
        raise ValueError(f"{what} {value!r} is not an http(s) URL without spaces or quotes")
    return value


def check_cron(value: str) -> str:
    """A cron string, checked with the parser Prefect's ``CronSchedule`` uses (croniter).

    Prefect vendors croniter and refuses its random and hashed (``R``, ``H``) extensions;
    flagrelease never imports Prefect, so it checks with croniter itself, the same way.
    """
    from croniter import croniter

    check_free_text(value, what="schedule", max_len=128)
    if not croniter.is_valid(value):
        raise ValueError(
            f"{value!r} is not a cron string (minute hour day-of-month month day-of-week), e.g. '0 2 * * 1'"
        )
    if any(part.casefold() in ("r", "h") for part in value.split()):
        raise ValueError(f"{value!r} uses random or hashed cron fields, which Prefect does not support")
    return value


def check_ignore_pattern(value: str) -> str:
    """A ``convert.ignore`` entry: a name fragment, or ``re:REGEX`` with a regex that compiles."""
    check_free_text(value, what="an ignore pattern", max_len=256)
    if value.startswith("re:"):
        try:
            re.compile(value[3:])
        except re.error as err:
            raise ValueError(f"ignore pattern {value!r} is not a valid regular expression: {err}") from None
    elif not value.strip("."):
        raise ValueError(f"ignore pattern {value!r} is empty")
    return value
