"""Every string field x every hostile payload, rendered everywhere it lands and attacked.

Issue 12, item 2: a value is refused when the config loads, or it reaches the FlagScale
configs, ``vllm_serve.sh``, the Dockerfile and the card quoted for each of them: no shell
block runs a payload, every YAML reads back as the config says, the card keeps its shape.
"""

from __future__ import annotations

import pytest

from tests.hostile._harness import CANARY, PAYLOADS, STRING_FIELDS, Harness


def _report(cases: list) -> str:
    return "\n".join(f"  {c.field} = {c.payload[:60]!r}: {c.outcome}: {'; '.join(c.problems)[:400]}" for c in cases)


@pytest.mark.parametrize("field", STRING_FIELDS)
def test_every_payload_in_every_string_field(harness: Harness, field: str) -> None:
    cases = [harness.case(field, p, suffix=s) for p in PAYLOADS.values() for s in (False, True)]
    bad = [c for c in cases if c.outcome not in ("refused", "escaped")]
    assert not bad, f"{len(bad)} of {len(cases)} cases of {field} went wrong:\n{_report(bad)}"


def test_the_harness_sees_an_executed_payload(harness: Harness, tmp_path) -> None:
    """The canary check can fail: an unquoted payload run the same way leaves its file."""
    assert harness.shell(f"echo $(>{CANARY})", tmp_path) == 0
    assert (tmp_path / CANARY).exists()
