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


def test_the_checks_fail_on_a_broken_rendering(harness: Harness, tmp_path) -> None:
    """Each check reports what an unquoted value would do: the suite can fail."""
    import copy

    import yaml

    from flagrelease.config import load_release
    from tests.hostile._harness import BASE

    config = tmp_path / "hostile.yaml"
    config.write_text(yaml.safe_dump(copy.deepcopy(BASE)), encoding="utf-8")
    cfg = load_release(config)
    work = tmp_path / "work"
    work.mkdir()
    files = harness._render(cfg, config, work)
    # A value written raw into the serve script runs.
    raw_script = dict(files)
    raw_script["conf/vllm_serve.sh"] = files["conf/vllm_serve.sh"].replace(
        "export EXTRA=value", f"export EXTRA=$(>{CANARY})"
    )
    counted = harness.tally.copy()
    assert any("canary" in p for p in harness._run_shells(cfg, raw_script, work, contract=False))
    harness.tally = counted  # a control, not a case of the suite
    # A newline written raw into the experiment config adds a key FlagScale reads.
    raw_yaml = dict(files)
    name = next(r for r in files if r.startswith("conf/config_"))
    raw_yaml[name] = files[name] + "flagscale_extra_key: injected\n"
    assert any("top-level keys" in p for p in harness._check_yaml(cfg, raw_yaml))
    # An unescaped OmegaConf interpolation is read as one.
    raw_oc = dict(files)
    raw_oc[name] = files[name].replace("EXTRA: value", "EXTRA: ${oc.env:HOME}")
    assert any("FlagScale reads envs" in p for p in harness._check_yaml(cfg, raw_oc))
    # A table cell with a raw '|' or a line starting with '#' changes the card's shape.
    from tests.hostile._harness import _card_shape

    card = files["README.md"]
    assert _card_shape(card.replace("| Metrics", "| Met | rics", 1)) != _card_shape(card)
    assert _card_shape(card.replace("\n\n", "\n\n# injected\n\n", 1)) != _card_shape(card)
