"""Image references: ``[registry[:port]/]name[:tag][@digest]``, checked against the grammar.

The grammar is the one of the distribution project's ``reference`` package (what Docker
and every OCI registry accept)::

    reference        := name [ ":" tag ] [ "@" digest ]
    name             := [domain "/"] remote-name
    domain           := host [":" port]
    host             := domain-name | IPv4 | "[" IPv6 "]"
    domain-component := [a-zA-Z0-9] | [a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]
    remote-name      := path-component ("/" path-component)*
    path-component   := [a-z0-9]+ (separator [a-z0-9]+)*
    separator        := [_.] | "__" | "-"+
    tag              := [\\w][\\w.-]{0,127}
    digest           := algorithm ":" hex      (sha256: exactly 64 lowercase hex digits)

As Docker does, the first component is a registry only when it holds a ``.`` or a ``:``,
or is ``localhost``; ``baai:v5`` is the repository ``baai`` with the tag ``v5``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from flagrelease.errors import ConfigError

__all__ = ["ImageReference", "check_repository", "check_tag", "parse_reference", "parse_registry"]

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_IPV6 = r"\[[a-fA-F0-9:]+\]"
_HOST = rf"(?:{_DOMAIN_NAME}|{_IPV6})"
_DOMAIN = re.compile(rf"^{_HOST}(?::[0-9]+)?$")
_PATH_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[_.]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$", re.ASCII)
_DIGEST = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}$")
_NAME_MAX = 255


@dataclass(frozen=True)
class ImageReference:
    """A parsed image reference.

    Attributes:
        registry: ``host[:port]``, or None for Docker Hub.
        path: the repository path below the registry, e.g. ``flagrelease/flagrelease``.
        tag: the tag, or None.
        digest: ``algorithm:hex``, or None.
    """

    registry: str | None
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def repository(self) -> str:
        """``[registry/]path``: what ``docker push`` takes, without tag or digest."""
        return f"{self.registry}/{self.path}" if self.registry else self.path

    @property
    def port(self) -> int | None:
        """The registry's port, if it names one."""
        if not self.registry or self.registry.endswith("]"):
            return None
        _, sep, port = self.registry.rpartition(":")
        return int(port) if sep else None

    def with_tag(self, tag: str) -> ImageReference:
        """The same repository with ``tag`` and no digest."""
        if not _TAG.fullmatch(tag):
            raise ConfigError(f"image tag {tag!r} is not valid: use letters, digits, '_', '.' and '-' (128 at most)")
        return replace(self, tag=tag, digest=None)

    def __str__(self) -> str:
        out = self.repository
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def _bad(text: str, what: str, why: str) -> ConfigError:
    return ConfigError(
        f"{what} {text!r} is not a valid image reference: {why}. The form is "
        "[registry[:port]/]name[:tag][@digest], e.g. registry.example.com:5000/team/flagrelease:v1",
        errors=[(what, why)],
    )


def _split_domain(name: str) -> tuple[str | None, str]:
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        return first, rest
    return None, name


def parse_reference(text: str, *, what: str = "image reference") -> ImageReference:
    """Parse and check an image reference.

    Args:
        text: the reference, e.g. ``nvcr.io/nvidia/pytorch:25.01-py3``.
        what: how error messages name the value (e.g. ``image.base``).

    Returns:
        The parsed reference.

    Raises:
        ConfigError: the text does not follow the reference grammar.
    """
    if not isinstance(text, str) or not text:
        raise _bad(str(text), what, "it is empty")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in text) or not text.isascii():
        raise _bad(text, what, "it holds spaces, control or non-ASCII characters")
    rest, at, digest = text.partition("@")
    if at:
        if not _DIGEST.fullmatch(digest):
            raise _bad(text, what, f"digest {digest!r} is not algorithm:hex")
        algo, _, hexpart = digest.partition(":")
        if algo == "sha256" and not re.fullmatch(r"[0-9a-f]{64}", hexpart):
            raise _bad(text, what, "a sha256 digest has exactly 64 lowercase hex digits")
    registry, remainder = _split_domain(rest)
    name, tag = remainder, None
    last = remainder.rsplit("/", 1)[-1]
    if ":" in last:
        name, _, tag = remainder.rpartition(":")
        if not _TAG.fullmatch(tag):
            raise _bad(text, what, f"tag {tag!r} must be letters, digits, '_', '.' or '-' (128 at most)")
    if registry is not None and not _DOMAIN.fullmatch(registry):
        raise _bad(text, what, f"registry {registry!r} is not host[:port]")
    if not name:
        raise _bad(text, what, "the repository name is empty")
    for part in name.split("/"):
        if not _PATH_COMPONENT.fullmatch(part):
            raise _bad(
                text, what, f"path component {part!r} must be lowercase letters and digits joined by '.', '_' or '-'"
            )
    full = f"{registry}/{name}" if registry else name
    if len(full) > _NAME_MAX:
        raise _bad(text, what, f"the repository name is longer than {_NAME_MAX} characters")
    return ImageReference(registry=registry, path=name, tag=tag, digest=digest or None)


def check_tag(text: str, *, what: str = "image.tag") -> str:
    """Check an image tag: ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``.

    Raises:
        ConfigError: it is not a tag.
    """
    if not isinstance(text, str) or not _TAG.fullmatch(text) or not text.isascii():
        raise ConfigError(
            f"{what} {text!r} is not a valid image tag: use letters, digits, '_', '.' and '-', "
            "not starting with '.' or '-', 128 at most",
            errors=[(what, "not an image tag")],
        )
    return text


def check_repository(text: str, *, what: str = "image.name") -> str:
    """Check a repository path with no registry, tag or digest (``team/flagrelease``).

    Raises:
        ConfigError: it is not one.
    """
    ref = parse_reference(text, what=what)
    if ref.registry is not None or ref.tag is not None or ref.digest is not None:
        raise ConfigError(
            f"{what} {text!r} must be a repository name alone (lowercase path components); give the registry "
            "in image.registry and the tag in image.tag",
            errors=[(what, "not a bare repository name")],
        )
    return text


def parse_registry(text: str, *, what: str = "image.registry") -> tuple[str | None, str]:
    """Split ``host[:port][/namespace]`` (or a bare Docker Hub namespace) and check it.

    Returns:
        ``(registry host or None, namespace path or "")``.

    Raises:
        ConfigError: it is not a registry with an optional namespace.
    """
    clean = text.strip().rstrip("/")
    if not clean or "@" in clean:
        raise ConfigError(f"{what} {text!r} must be host[:port][/namespace]", errors=[(what, "not a registry")])
    first, _, rest = clean.partition("/")
    # Parse with a placeholder repository so the namespace is checked by the same grammar.
    ref = parse_reference(f"{clean}/x", what=what)
    if ref.tag is not None:
        raise ConfigError(f"{what} {text!r} must not carry a tag", errors=[(what, "has a tag")])
    if ref.registry is None:
        return None, clean
    return first, rest
