"""The once-per-(job, round) record: its file format (known answer) and its refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fedseal.client import once

FMT = "fedseal.test-once"


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_file_format_known_answer() -> None:
    assert once.encode(FMT, {("job-b", 2), ("job-a", 10), ("job-a", 3)}) == (
        b'{"format": "fedseal.test-once", "version": 1, '
        b'"rounds": [["job-a", 3], ["job-a", 10], ["job-b", 2]]}'
    )
    assert (
        once.record_path(Path("/var/site/alpha.json"), ".x.json").as_posix() == "/var/site/alpha.json.x.json"
    )


@pytest.mark.parametrize("on_disk", [True, False])
def test_recorded_rounds_survive_a_fresh_context_only_on_disk(tmp_path, on_disk) -> None:
    path = tmp_path / "ledger.json.once" if on_disk else None
    first = _context()
    assert once.done(first, FMT, path) == set()
    once.remember(first, FMT, path, {("job", 1)})
    assert once.done(first, FMT, path) == {("job", 1)}
    assert once.done(_context(), FMT, path) == ({("job", 1)} if on_disk else set())


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        '{"format": "other", "rounds": []}',
        '{"format": "fedseal.test-once"}',
        "[1, 2]",
        '{"format": "fedseal.test-once", "rounds": [["job", "x"]]}',
    ],
)
def test_an_unreadable_record_refuses_rather_than_forgets(tmp_path, text) -> None:
    path = tmp_path / "record.json"
    path.write_text(text)
    with pytest.raises(once.OnceError, match="unreadable.*restore it"):
        once.done(_context(), FMT, path)


def test_an_unwritable_record_is_an_error(tmp_path) -> None:
    path = tmp_path / "record.json"
    path.mkdir()
    with pytest.raises(once.OnceError, match="cannot write"):
        once.remember(_context(), FMT, path, {("job", 1)})
