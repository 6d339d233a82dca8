"""Every dashboard page, run by Streamlit's AppTest against a real daemon on a replay line.

The dashboard runs in this process and talks to the daemon over HTTP exactly as in production;
what a page shows is checked against what the API says.
"""

from __future__ import annotations

import html
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.dashboard.line import HELD, PASSWORDS, USERS, Line

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"


def app(line: Line, role: str | None = None) -> AppTest:
    """The dashboard, logged in as ``role`` (by token, as the log-in page would leave it)."""
    at = AppTest.from_file(str(APP), default_timeout=60)
    if role is not None:
        at.session_state["token"] = line.token(role)
        at.session_state["user"] = USERS[role]
        at.session_state["role"] = role
    return at.run()


def open_page(at: AppTest, page: str) -> AppTest:
    at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


IFRAME = '<iframe srcdoc="<script>document.title=\'pwned\'</script>">'
SCRIPT = "<script>document.title='pwned'</script>"


def sources(at: AppTest) -> str:
    """The Markdown the page sends to the browser."""
    return " ".join(str(m.value) for m in [*at.markdown, *at.caption, *at.info, *at.success, *at.error,
                                             *at.warning, *at.subheader])


def texts(at: AppTest) -> str:
    """What a reader sees of it: API text is sent as character references (ui.esc), read here as text."""
    return html.unescape(sources(at))


def charts(at: AppTest) -> int:
    return len(at.get("vega_lite_chart"))


def test_login_wrong_password_then_right_then_logout(line: Line, api_url: str) -> None:
    at = app(line)
    assert [t.value for t in at.title] == ["Defect appliance"]
    at.text_input(key="login_user").input("olga")
    at.text_input(key="login_password").input("not-the-password")
    at.button[0].click().run()
    assert "Wrong user name or password." in [e.value for e in at.error]
    assert "token" not in at.session_state

    at.text_input(key="login_password").input(PASSWORDS["operator"])
    at.button[0].click().run()
    assert at.session_state["role"] == "operator" and at.session_state["user"] == "olga"
    assert [t.value for t in at.title] == ["Live"]
    assert "**olga** · operator" in [m.value for m in at.sidebar.markdown]

    at.button(key="logout").click().run()
    assert "token" not in at.session_state
    assert [t.value for t in at.title] == ["Defect appliance"]


def test_live_shows_the_line(line: Line, api_url: str) -> None:
    at = app(line, "operator")
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Holds waiting"] == str(HELD)
    assert metrics["Audit samples"] == "0"
    assert "brightness-v1" in texts(at) and "operational" in texts(at)
    assert metrics["Parts, 15 min"] == str(line.daemon.stats.judged)
    assert charts(at) == 2, "disposition mix and parts per minute"
    assert len(at.get("image")) == 8, "the last eight parts with thumbnails"
    assert "camera 'top'" in texts(at).lower()
    with line.api("operator") as api:
        newest = api.get("/results", params={"limit": 1}).json()["results"][0]
        card_order = [h["name"] for h in api.get("/model").json()["heads"]]
    by_head = {p["head"]: p for p in newest["predictions"]}
    assert len(by_head) == 2 and list(by_head) != card_order, "the API lists heads by name, the card does not"
    caption = "<br>".join(f"<span title='{h}'>{by_head[h]['label']} · {by_head[h]['confidence']:.0%}</span>"
                          for h in card_order)
    assert caption in texts(at), "a part's caption: every head's label and confidence, in the card's order"


def test_hostile_part_text_arrives_as_text(line: Line, api_url: str) -> None:
    """A part id and batch with markup, stored before the wire refused such text, reach Live and Review
    only as character references: no tag in what the page sends, the text itself in what it shows."""
    with line.api("operator") as api:  # every stored part: whichever the pages pick (newest, top of the queue)
        ids = [r["result_id"] for r in api.get("/results", params={"limit": 1000}).json()["results"]]
    saved = {rid: line.rewrite(rid, part_id=IFRAME, batch=SCRIPT) for rid in ids}
    try:
        pages = [app(line, "operator"), open_page(app(line, "operator"), "review")]
    finally:
        for rid, old in saved.items():
            line.rewrite(rid, **old)
    for at in pages:
        assert not at.exception
        assert "<iframe" not in sources(at) and "<script" not in sources(at)
        assert IFRAME in texts(at)
    assert f"batch {SCRIPT}" in texts(pages[1])


def test_operator_sees_no_audit_or_users_page(line: Line, api_url: str) -> None:
    at = app(line, "operator")
    with pytest.raises(Exception):  # noqa: B017 - AppTest raises its own error type for unknown pages
        at.switch_page("views/audit.py").run()
        assert at.exception  # pragma: no cover


def test_review_confirm_correct_and_label_record(line: Line, api_url: str) -> None:
    at = open_page(app(line, "operator"), "review")
    with line.api("operator") as api:
        before = api.get("/review/queue", params={"limit": 50}).json()
    first = before["results"][0]
    assert first["review"] == "hold"
    assert first["rule"].startswith("low_confidence:")
    head, label = first["rule"].removeprefix("low_confidence:").split("=", 1)
    assert f"held: the model was unsure of {head} = {label}" in texts(at), "why it is held, in words"
    assert "second person" not in texts(at), "no verification section without review.two_person"
    assert f"{before['waiting']} parts waiting" in texts(at)
    assert charts(at) == 2, "per-class probabilities for both heads"
    assert at.button(key="review_save").label == "Confirm prediction"

    at.button(key="review_save").click().run()  # one key/click: confirm the prediction
    assert "Part confirmed" in texts(at)
    with line.api("operator") as api:
        labels = api.get("/labels", params={"result_id": first["result_id"]}).json()["labels"]
        after = api.get("/review/queue", params={"limit": 50}).json()
    predicted = {p["head"]: p["label"] for p in first["predictions"]}
    assert {label["head"]: label["label"] for label in labels} == predicted
    assert {label["labelled_by"] for label in labels} == {"olga"}
    assert after["waiting"] == before["waiting"] - 1

    # a correction: pick another grade, and the button says so
    second = after["results"][0]
    grade = next(p for p in second["predictions"] if p["head"] == "defect_grade")
    other = next(c for c in ("0", "1/3", "2/3", "1") if c != grade["label"])
    at.segmented_control(key=f"pick_{second['result_id']}_defect_grade").set_value(other).run()
    assert at.button(key="review_save").label == "Save correction"
    at.button(key="review_save").click().run()
    with line.api("operator") as api:
        stored = api.get("/labels", params={"result_id": second["result_id"]}).json()["labels"]
    assert {label["head"]: label["label"] for label in stored}["defect_grade"] == other
    recent = at.dataframe[0].value
    assert {"labelled_by", "labelled_at", "verified_by"} <= set(recent.columns)
    assert second["result_id"] in set(recent["result_id"])


def test_root_cause_charts_filters_and_export_by_role(line: Line, api_url: str) -> None:
    at = open_page(app(line, "operator"), "root_cause")
    assert charts(at) == 6, "p-chart, Pareto, severity, trend, breakdown, rate by process value"
    body = texts(at)
    assert "Defect rate · p-chart" in body and "Pareto of defective parts by cell_type" in body
    assert "defect_grade per cell_type" in body, "the severity chart names its two heads"
    assert not at.get("download_button"), "operators do not export"
    assert at.dataframe[0].value.iloc[0]["process value"] == "oven_temp_c", "the hot oven is the top suspect"

    at.selectbox(key="rc_batch").set_value("B-002").run()
    assert not at.exception and charts(at) == 6
    at.segmented_control(key="rc_by").set_value("shift").run()
    assert not at.exception

    eng = open_page(app(line, "engineer"), "root_cause")
    assert [b.label for b in eng.get("download_button")] == ["Export CSV", "Export PARQUET"]


def test_models_buttons_follow_the_role(line: Line, api_url: str) -> None:
    op = open_page(app(line, "operator"), "models")
    assert "Serving **brightness-v1**" in texts(op)
    assert list(op.dataframe[0].value["version"]) == ["brightness-v2", "brightness-v1"]
    for key in ("rollback", "retrain", "gate_brightness-v1", "promote_brightness-v2", "shadow_brightness-v2"):
        assert op.button(key=key).disabled, key
    eng = open_page(app(line, "engineer"), "models")
    for key in ("gate_brightness-v1", "promote_brightness-v2", "shadow_brightness-v2"):
        assert not eng.button(key=key).disabled, key
    assert eng.button(key="rollback").disabled, "nothing to roll back to"
    assert not [b for b in eng.button if b.key == "force_brightness-v2"], "skipping the gate is for admins"
    admin = open_page(app(line, "admin"), "models")
    assert admin.button(key="force_brightness-v2").label == "Promote without gate"


def test_models_page_shows_the_gates_held_out_metrics(line: Line, api_url: str) -> None:
    eng = open_page(app(line, "engineer"), "models")
    assert "This model card carries no held-out metrics." in texts(eng), "the test models have none yet"
    tables, matrices = len(eng.dataframe), charts(eng)
    eng.button(key="gate_brightness-v2").click().run()
    assert not eng.exception
    with line.api("engineer") as api:
        gate = api.get("/models/brightness-v2").json()["gate"]
    assert gate["passed"] and "Validation gate passed against brightness-v1" in texts(eng)
    table = eng.dataframe[1].value  # brightness-v2's card, the newest first
    assert len(eng.dataframe) == tables + 1 and charts(eng) == matrices + 3, \
        "a table and a matrix per head, a hold curve for the one head that can hold a part"
    curve = gate["candidate_metrics"]["defect_grade"]["hold_curve"]
    held, right = curve["held"][60], curve["accuracy"][60]  # the test line's min_confidence: 0.6
    assert (f"**defect_grade** at 0.60: {held * 100:.0f} % of these parts held, {right * 100:.1f} % of those decided "
            "right") in texts(eng)
    assert "**cell_type** at" not in texts(eng), "disposition.heads leaves cell type out: it never holds a part"
    assert list(table["head"]) == ["defect_grade", "cell_type"] and set(table["measured on"]) == {"held-out test"}
    for _, row in table.iterrows():
        measured = gate["candidate_metrics"][row["head"]]
        assert row["accuracy"] == pytest.approx(100 * measured["accuracy"]) and row["parts"] == measured["n"] == 12
        first = measured["classes"][0]
        assert row["recall per class"].split(" · ")[0] == f"{first}: {measured['recall'][first] * 100:.0f} %"
    overview = eng.dataframe[0].value.set_index("version")
    assert overview.loc["brightness-v2", "acc defect_grade"] == f"{table['accuracy'].iloc[0]:.1f} %"
    assert overview.loc["brightness-v1", "acc defect_grade"] == "—", "no metrics: nothing made up"
    assert overview.loc["brightness-v2", "measured on"] == "held-out test"


def test_audit_page_for_engineers(line: Line, api_url: str) -> None:
    with line.api("operator") as api:
        top = api.get("/review/queue").json()["results"][0]
        rid, part = top["result_id"], top["part_id"]
        api.post(f"/results/{rid}/labels", json={"labels": {"defect_grade": "1"}})
    at = open_page(app(line, "engineer"), "audit")
    table = at.dataframe[0].value
    mine = table[(table["action"] == "label") & (table["target"] == rid) & (table["user"] == "olga")]
    assert part and list(mine["detail"]) == [f"part: {part} · labels: defect_grade=1"], \
        "the part by its name, read as a person would; no empty comment"
    at.text_input(key="audit_target").input(part.upper()).run()
    assert list(at.dataframe[0].value["target"]) == [rid], "found by its part name"


def test_users_page_for_admins(line: Line, api_url: str) -> None:
    eng = app(line, "engineer")
    with pytest.raises(Exception):  # noqa: B017 - not in an engineer's navigation
        eng.switch_page("views/users.py").run()
        assert eng.exception  # pragma: no cover
    at = open_page(app(line, "admin"), "users")
    at.text_input(key="user_name").input("nina")
    at.selectbox(key="user_role").set_value("engineer")
    at.text_input(key="user_password").input("nina-password-1")
    next(b for b in at.button if b.label == "Save user").click().run()
    with line.api("admin") as api:
        users = {u["user"]: u["role"] for u in api.get("/users").json()}
    assert users.get("nina") == "engineer"
    assert "Saved nina as engineer." in texts(at)
