"""Fixtures of the publish tests: S3 credentials for moto, and the two hub fakes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._publish_fakes import FakeHF, FakeModelScope, running

HF_TEST_TOKEN = "hf_test_token_for_the_fake_hub"
MS_TEST_TOKEN = "ms-test-token-for-the-fake"


@pytest.fixture(autouse=True)
def _aws_test_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto accepts any credentials; boto3 only needs some."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[FakeHF, FakeModelScope]]:
    """The two hub fakes, each demanding its token, with the clients pointed at them."""
    import huggingface_hub.constants

    # Xet storage cannot be faked here; the Hub also takes uploads through its LFS batch API.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")  # for subprocesses
    with running(FakeHF(token=HF_TEST_TOKEN)) as hf, running(FakeModelScope(token=MS_TEST_TOKEN)) as ms:
        monkeypatch.setenv("HF_ENDPOINT", hf.url)
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", ms.url)
        monkeypatch.setenv("HF_TOKEN", HF_TEST_TOKEN)
        monkeypatch.setenv("MODELSCOPE_API_TOKEN", MS_TEST_TOKEN)
        monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "modelscope-cache"))
        yield hf, ms  # type: ignore[misc]
