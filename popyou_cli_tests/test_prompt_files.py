"""Files of prompts (--prompt-file of sample and eval): blank lines are skipped and counted, bad files are one-line
errors."""
import pytest

from popyou_cli.core.errors import PopyouError


def test_blank_lines_inside_a_prompt_file_are_skipped_and_counted(tmp_path):
    from popyou_cli.data.prompts import read_prompt_file

    path = tmp_path / "p.txt"
    path.write_text("a wizard funko pop\n\n   \n  a knight funko pop  \n\n\n", encoding="utf-8")
    got = read_prompt_file(path)
    assert got.prompts == ["a wizard funko pop", "a knight funko pop"]
    assert got.blank_lines == 2  # the two inside; the trailing ones end the file and are not counted


def test_the_blank_line_count_reaches_the_user(tmp_path):
    import io

    from rich.console import Console

    from popyou_cli.infer.options import read_prompts

    path = tmp_path / "p.txt"
    path.write_text("a wizard\n\na knight\n", encoding="utf-8")
    buf = io.StringIO()
    assert read_prompts(["a robot"], path, console=Console(file=buf, width=200)) == ["a robot", "a wizard", "a knight"]
    assert "skipped 1 blank line(s)" in buf.getvalue()


def test_unreadable_prompt_files_are_one_line_errors(tmp_path):
    from popyou_cli.data.prompts import read_prompt_file

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 funko pop\n".encode("latin-1"))
    with pytest.raises(PopyouError, match="not UTF-8"):
        read_prompt_file(latin1)
    with pytest.raises(PopyouError, match="cannot read the prompt file"):
        read_prompt_file(tmp_path / "missing.txt")
