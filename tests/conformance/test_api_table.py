"""docs/api.md's "what works with which SDK" table is generated from the catalogue and the route table;
this fails when it is stale. Regenerate it with `python tests/conformance/sdk_table.py --write`."""

from __future__ import annotations

from sdk_table import DOC, render, section


def test_api_table_in_docs_is_current() -> None:
    assert section(DOC.read_text(encoding="utf-8")) == render(), (
        "docs/api.md is stale: run `python tests/conformance/sdk_table.py --write`"
    )


def test_table_lists_both_statuses() -> None:
    table = render()
    assert "| supported" in table and "**not yet**" in table
