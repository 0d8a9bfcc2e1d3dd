import json

import pytest

from xenswap.cli import main


def test_unknown_domain_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["list", "--hv", "qemu", "no-such-vm"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("xenswap: error: unknown domain 'no-such-vm'")
    assert len(err.strip().splitlines()) == 1


def test_list_json_empty(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--hv", "qemu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
