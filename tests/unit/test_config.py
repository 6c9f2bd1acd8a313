"""``[ray] secret_key``: a key that is short or not random is refused by name, before anything is signed."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from airflow_ray_provider.config import _secret
from airflow_ray_provider.exceptions import SigningError


@pytest.mark.parametrize(("configured", "says"), [
    ("x" * 16, r"secret_key is 16 bytes long; use at least 32"),
    (" " * 32, r"secret_key has 1 distinct character\(s\) in its 32: it is not random"),
    ("ab" * 40, r"secret_key has 2 distinct character\(s\) in its 80"),
])
def test_a_weak_secret_key_is_refused_naming_the_setting(configured: str, says: str, tmp_path: Path) -> None:
    with pytest.raises(SigningError, match=rf"\[ray\] {says}.*secrets.token_hex"):
        _secret(configured, str(tmp_path))


def test_a_random_secret_key_is_taken_as_given(tmp_path: Path) -> None:
    key = secrets.token_hex(32)
    assert _secret(key, str(tmp_path)) == key.encode()
    assert not (tmp_path / "ray").exists()  # no key file is generated when one is configured
