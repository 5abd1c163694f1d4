import json

from kvfree.report.tables import fmt, markdown_table, update_readme_section


def test_markdown_table_and_fmt():
    md = markdown_table([{"a": 1, "b": 0.5}, {"a": 12345, "b": float("nan")}], ["a", "b"])
    assert md.splitlines()[0] == "| a | b |"
    assert "| 12,345 | — |" in md
    assert fmt(None) == "—" and fmt(2.5e-7) == "2.5e-07"


def test_update_readme_section_replaces_only_its_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nintro\n")
    update_readme_section(readme, "recall", "| x |\n")
    update_readme_section(readme, "decode", "D1")
    update_readme_section(readme, "recall", "| y |")
    text = readme.read_text()
    assert text.startswith("# title\n\nintro\n")
    assert "| y |" in text and "| x |" not in text and "D1" in text
    assert text.count("<!-- BEGIN recall -->") == 1


def test_write_json_compact_round_trips_without_whitespace(tmp_path):
    from kvfree.report.tables import write_json

    obj = {"curve": [{"epoch": 1, "acc": 0.5}, {"epoch": 2, "acc": 0.75}], "name": "a b"}
    text = write_json(tmp_path / "c.json", obj, compact=True).read_text()
    assert json.loads(text) == obj and text.count("\n") == 1 and ", " not in text
    assert len(write_json(tmp_path / "i.json", obj).read_text().splitlines()) > 5
