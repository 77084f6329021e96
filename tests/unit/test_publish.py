"""Turning a campaign file and a recipients CSV into commands, and refusing bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.pipeline.publish import PublishError, campaign_messages, read_recipients
from tests.support.campaigns import campaign, recipients


def test_campaign_becomes_start_then_chunks_of_at_most_chunk_size() -> None:
    messages = list(campaign_messages(campaign("c"), recipients(2501), chunk_size=1000))
    assert [m["kind"] for m in messages] == ["campaign.start"] + ["campaign.recipients"] * 3
    assert messages[0]["total_recipients"] == 2501 and messages[0]["total_chunks"] == 3
    assert [len(m["recipients"]) for m in messages[1:]] == [1000, 1000, 501]
    assert [m["chunk_index"] for m in messages[1:]] == [0, 1, 2]


def test_bad_address_error_names_the_recipient() -> None:
    people = recipients(1500)
    people[1203]["email"] = "not-an-address"
    with pytest.raises(PublishError, match=r"recipient 1204 of 1500 \('not-an-address'\)"):
        list(campaign_messages(campaign("c"), people))


@pytest.mark.parametrize(("content", "error"), [
    ("mail,name\nx@example.com,X\n", "must have an 'email' column"),
    ("email,name\n,X\n", ":2: empty email"),
])
def test_bad_csv_is_refused_with_file_and_line(tmp_path: Path, content: str, error: str) -> None:
    path = tmp_path / "r.csv"
    path.write_text(content)
    with pytest.raises(PublishError, match=error):
        read_recipients(path)


def test_csv_columns_become_variables(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("email,name,code\na@example.com,Anna,A1\n")
    assert read_recipients(path) == [
        {"email": "a@example.com", "name": "Anna", "variables": {"code": "A1"}}]


def test_campaign_without_template_is_refused() -> None:
    definition = campaign("c")
    del definition["template"]
    with pytest.raises(PublishError, match="template"):
        list(campaign_messages(definition, recipients(1)))
