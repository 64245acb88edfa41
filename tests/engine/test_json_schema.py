"""Every command prints one document under --json, on success and on every failure path (usage
errors included), and each validates against the JSON Schema shipped in the package."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from support.cli import TRANSFORMER, cli, run
from support.realpkgs import DIFFUSERS, wheel

SCHEMA = json.loads(resources.files("ernie_patcher.schema").joinpath("report.schema.json").read_text())
VALIDATOR = Draft202012Validator(SCHEMA)


def valid(document: dict) -> dict:
    errors = sorted(VALIDATOR.iter_errors(document), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:5])
    return document


def test_schema_is_a_valid_schema():
    Draft202012Validator.check_schema(SCHEMA)


def test_schema_rejects_what_it_should():
    """The schema is not vacuous: a document missing a key, with an unknown key or a wrong type fails."""
    document = cli("list", "--json").json()
    for broken in ({k: v for k, v in document.items() if k != "series"}, {**document, "extra": 1},
                   {**document, "exit_code": "0"}, {**document, "ok": False}):
        assert list(VALIDATOR.iter_errors(broken)), broken


def test_lifecycle_documents(site: Path):
    steps = [("status",), ("apply", "--dry-run"), ("apply",), ("status",), ("verify",), ("verify", "--reparse"),
             ("revert", "--dry-run"), ("revert",), ("verify",)]
    codes = []
    for step in steps:
        result = cli(*step, "--site", site, "--json")
        document = valid(result.json())
        assert document["command"] == step[0] and document["exit_code"] == result.code
        codes.append(result.code)
    assert codes == [0, 0, 0, 0, 0, 0, 0, 0, 1]


@pytest.mark.parametrize("args,code", [
    (("status", "--site", "/nonexistent-site"), 3),
    (("verify", "--only", "no-such-patch"), 2),
    (("apply", "--python", "/bin/true"), 7),
    (("status", "--bogus-option"), 2),
    (("frobnicate",), 2),
    (("list", "--patches", "/nonexistent-set"), 2),
    (("diff", "no-such-patch"), 2),
    (("create", "torch", "torch/x.py", "--name", "n", "--site", "/tmp"), 3),
], ids=["site-missing", "unknown-id", "bad-python", "usage-option", "usage-command", "list-no-set", "diff-unknown",
        "create-missing"])
def test_error_documents(args: tuple[str, ...], code: int):
    result = run(*args, "--json")
    assert result.code == code, (result.stdout, result.stderr)
    document = valid(json.loads(result.stdout))
    assert document["error"]["code"] == code and not document["ok"]
    assert result.stderr == "", result.stderr


def test_list_diff_create_documents(site: Path, tmp_path: Path):
    listed = valid(cli("list", "--json").json())
    assert [e["id"] for e in listed["series"]][:2] == ["diffusers-rope", "diffusers-attention"]
    shown = valid(cli("diff", "diffusers-rope", "--json").json())
    assert shown["diff"]["text"].startswith(shown["diff"]["text"].split("\n", 1)[0]) and "+++ " in shown["diff"]["text"]
    path = site / TRANSFORMER
    path.write_text(path.read_text().replace("import torch\n", "import torch\nEDITED = 1\n", 1))
    created = cli("create", "diffusers", TRANSFORMER, "--site", site, "--name", "mine", "--patches", tmp_path / "set",
                  "--wheel", wheel(*DIFFUSERS), "--json")
    assert created.code == 0, created.stderr
    assert valid(created.json())["created"]["id"] == "mine"


def test_fast_path_documents(site: Path):
    """verify and status of an applied environment answered from the manifest (no engine, no click)
    print the same schema's document as the engine does."""
    assert cli("apply", "--site", site).code == 0
    for command in ("verify", "status"):
        fast = run(command, "--site", site, "--json")
        engine = cli(command, "--site", site, "--json")
        assert fast.code == 0 and valid(json.loads(fast.stdout))["command"] == command
        assert [p["id"] for p in json.loads(fast.stdout)["patches"]] == [p["id"] for p in engine.json()["patches"]]
