"""Set-up shared by the tests and the docstrings' examples."""

from __future__ import annotations

import tempfile

import pytest


@pytest.fixture(autouse=True)
def _doctest_tempdir(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    # The examples make their run directories with tempfile.mkdtemp(), as a
    # reader would; pointing tempfile at pytest's own folder keeps them from
    # piling up in the system's temporary directory.
    if isinstance(request.node, pytest.DoctestItem):
        monkeypatch.setattr(tempfile, "tempdir", str(request.getfixturevalue("tmp_path")))
