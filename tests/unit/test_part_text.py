import pytest

from appliance.part_text import UnsafeText, check_part_text, loggable


@pytest.mark.parametrize("good", ["P-0001", "A17/3 #2", "lot:2026.12", "x+y", "  trimmed  ", ""])
def test_plain_part_ids_pass(good):
    assert check_part_text(good, "PartId") == good.strip()


@pytest.mark.parametrize("bad", ["<script>alert(1)</script>", '<iframe srcdoc="x">', "a\nb", "=HYPERLINK(1)",
                                 "@SUM(A1)", "-2+3", "+cmd", "naïve", "a\x00b", "tab\there", "'quote", '"dq"'])
def test_markup_formulas_and_controls_are_refused(bad):
    with pytest.raises(UnsafeText, match="PartId"):
        check_part_text(bad, "PartId")


def test_length_limit_names_the_limit():
    with pytest.raises(UnsafeText, match="longer than 8"):
        check_part_text("A" * 9, "Batch", max_length=8)


def test_loggable_escapes_newlines_and_cuts():
    line = loggable("admin\nWARNING forged line")
    assert "\n" not in line and "\\n" in line
    assert loggable("x" * 100, 10) == "x" * 10 + "…"
