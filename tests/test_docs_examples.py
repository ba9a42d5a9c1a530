"""The README's first chat and docs/PROTOCOL.md's examples run as printed (scripts/doc_examples.py):
the commands are taken from the Markdown code blocks themselves, so the documents cannot drift."""

from __future__ import annotations

import shutil

from conftest import REPO, BackendProcess
from scripts import doc_examples
from services import require


def _clients() -> None:
    require(bool(shutil.which("mosquitto_sub") and shutil.which("mosquitto_pub")),
            "mosquitto_sub/mosquitto_pub not installed (Debian/Ubuntu: mosquitto-clients)")


def test_the_readme_first_chat_runs_as_printed():
    """serve, user add, chat.py, then the mosquitto_pub/mosquitto_sub flow on the same database."""
    _clients()
    doc_examples.run([REPO / "README.md"], ready=BackendProcess.ready)


def test_the_protocol_examples_run_as_printed():
    """docs/PROTOCOL.md section 11, in order: its own database and servers (about 35 s: a push is
    retransmitted for 9 s, and messages are let expire)."""
    _clients()
    doc_examples.run([REPO / "docs" / "PROTOCOL.md"], ready=BackendProcess.ready)


def test_a_document_that_drifted_fails(tmp_path, monkeypatch):
    """The README as it was: after chat.py, its by-hand flow acked seq 1, which bob never got."""
    _clients()
    monkeypatch.setattr(doc_examples, "EXPECT_TIMEOUT_S", 3.0)  # the missing receipt never comes
    drifted = (REPO / "README.md").read_text().replace('"seqs":[3]', '"seqs":[1]')
    (tmp_path / "README.md").write_text(drifted)
    try:
        doc_examples.run([tmp_path / "README.md"], ready=BackendProcess.ready)
    except doc_examples.DocError as e:
        assert "alice did not print" in str(e) and '"seq":3,"status":"delivered"' in str(e)
    else:
        raise AssertionError("the drifted README ran without a complaint")
