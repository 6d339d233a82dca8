"""Review: held parts first, then the audit sample of confident passes, most informative first.

One key confirms the prediction (Enter); a correction is one click on the right class, then Enter.
Every label is stored with who and when; with the two-person rule on, a label counts for training
only after someone else verifies it (the API refuses self-verification).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pandas as pd
import streamlit as st

from dashboard import charts, ui

QUEUE = 50


def heads_of(card: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": h["name"], "classes": h["classes"], "ordinal": h.get("ordinal", False)}
            for h in card.get("heads", [])]


def save(result_id: str, heads: list[str], predicted: dict[str, str]) -> None:
    """Button callback: bound to the part that was on screen when the button was drawn, so a queue
    that changed meanwhile (new held parts arrive all the time) never gets the label of another part."""
    labels = {h: st.session_state.get(f"pick_{result_id}_{h}") for h in heads}
    if not all(labels.values()):
        st.session_state["review_error"] = "Choose a class for every head first."
        return
    comment = st.session_state.get(f"comment_{result_id}") or None
    try:
        done = ui.api().post(f"/results/{result_id}/labels", {"labels": labels, "comment": comment})
    except ui.ApiError as exc:
        st.session_state["review_error"] = f"Could not save the label ({exc.status}): {ui.esc(exc.message)}"
        return
    what = "confirmed" if labels == predicted else "corrected"
    extra = "" if done["verified"] else " · waits for a second person to verify it"
    st.session_state["review_notice"] = (f"Part {what}: " + ", ".join(f"{ui.esc(h)} = {ui.esc(v)}"
                                                                    for h, v in labels.items())
                                         + extra)
    st.session_state.pop("review_current", None)


def skip(result_id: str) -> None:
    st.session_state["review_skipped"] = [*st.session_state.get("review_skipped", []), result_id][-100:]
    st.session_state.pop("review_current", None)


def show_part(part: dict[str, Any], heads: list[dict[str, Any]]) -> None:
    predicted = {p["head"]: p for p in part["predictions"]}
    left, right = st.columns([1.15, 1])
    with left:
        image = None
        if part.get("image_ref"):
            try:
                image = ui.api().content(f"/results/{part['result_id']}/image")
            except ui.ApiError as exc:
                st.warning(f"Image not available: {ui.esc(exc.message)}")
        if image:
            st.image(image, width="stretch")
        else:
            st.info("No archived image for this part.")
    with right:
        reason = (f"held: {ui.rule_in_words(part['rule'])}" if part["review"] == "hold"
                  else f"audit sample of a confident {part['disposition']} ({ui.rule_in_words(part['rule'])})")
        st.markdown(f"{ui.badge(part['disposition'])} &nbsp; <span class='big-label'>"
                    f"{ui.esc(part.get('part_id') or '')}</span><br><span class='muted' title='rule "
                    f"{ui.esc(part['rule'])}'>{ui.esc(reason)} · {ui.esc(ui.when(part['acquired_at']))} · batch "
                    f"{ui.esc(part.get('batch') or '—')} · {ui.esc(part['camera_view'])} · priority "
                    f"{part.get('priority', 0):.2f}</span>",
                    unsafe_allow_html=True)
        if part.get("error"):
            st.error(f"Image error: {ui.esc(part['error'])}")
        choices: dict[str, str] = {}
        for head in heads:
            p = predicted.get(head["name"])
            name = ui.esc(head["name"])
            st.markdown(f"**{name}** — model says **{ui.esc(p['label'])}** ({p['confidence']:.0%})" if p
                        else f"**{name}** — no prediction")
            if p:
                st.altair_chart(charts.probabilities(head["classes"], p["probs"], p["label"]), width="stretch")
            pick = st.segmented_control(
                f"What is the {name}?", head["classes"], default=p["label"] if p else None, format_func=ui.esc,
                key=f"pick_{part['result_id']}_{head['name']}", required=True)
            if pick:
                choices[head["name"]] = pick
        st.text_input("Comment (optional)", key=f"comment_{part['result_id']}")
        unchanged = all(predicted.get(h) and choices.get(h) == predicted[h]["label"] for h in choices)
        complete = len(choices) == len(heads)
        b1, b2 = st.columns([2, 1])
        b1.button("Confirm prediction" if unchanged else "Save correction", type="primary", shortcut="Enter",
                  disabled=not complete, width="stretch", icon=":material/check:", key="review_save", help="Enter",
                  on_click=save, args=(part["result_id"], [h["name"] for h in heads],
                                       {h: p["label"] for h, p in predicted.items()}))
        b2.button("Skip", shortcut="N", width="stretch", key="review_skip", help="N", on_click=skip,
                  args=(part["result_id"],))


def pick_part(items: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The part on screen stays on screen until it is labelled or skipped, whatever arrives meanwhile."""
    current = st.session_state.get("review_current")
    for item in items:
        if item["result_id"] == current:
            return item
    skipped = set(st.session_state.get("review_skipped", []))
    fresh = [item for item in items if item["result_id"] not in skipped] or items
    if not fresh:
        return None
    st.session_state["review_current"] = fresh[0]["result_id"]
    return fresh[0]


def verification(me: str) -> None:
    api = ui.api()
    pending = ui.call(lambda: api.get("/labels", verified=False, limit=200), "read unverified labels")
    if pending is None:
        return
    if not pending["labels"]:  # every label is verified (always so without review.two_person)
        return
    others = [label for label in pending["labels"] if label["labelled_by"] != me]
    mine = len(pending["labels"]) - len(others)
    st.subheader(f"Waiting for a second person · {len(others)}")
    if mine:
        st.caption(f"{mine} of your own labels wait for someone else.")
    if not others:
        st.caption("Nothing for you to verify.")
    for label in others[:20]:
        c = st.columns([3, 2, 2, 1])
        c[0].markdown(f"{ui.esc(label['result_id'])} · **{ui.esc(label['head'])} = {ui.esc(label['label'])}**")
        c[1].markdown(f"by **{ui.esc(label['labelled_by'])}**")
        c[2].markdown(ui.esc(ui.when(label["labelled_at"])))
        verify = c[3].button("Verify", key=f"verify_{label['label_id']}")
        if verify and ui.call(partial(api.post, f"/labels/{label['label_id']}/verify"), "verify the label"):
            st.session_state["review_notice"] = f"Verified {ui.esc(label['head'])} = {ui.esc(label['label'])}"
            st.rerun()


def recent_labels() -> None:
    api = ui.api()
    data = ui.call(lambda: api.get("/labels", limit=100), "read the labels")
    st.subheader("Recent labels")
    if not data or not data["labels"]:
        st.caption("No labels yet.")
        return
    df = pd.DataFrame(data["labels"])
    for column in ("labelled_at", "verified_at"):
        df[column] = df[column].map(ui.when)
    st.dataframe(df[["result_id", "head", "label", "labelled_by", "labelled_at", "verified_by", "verified_at",
                     "comment"]], hide_index=True, width="stretch")


st.title("Review")
if notice := st.session_state.pop("review_notice", None):
    st.success(notice)
if problem := st.session_state.pop("review_error", None):
    st.error(problem)
api = ui.api()
card = ui.call(lambda: api.get("/model"), "read the model card")
queue = ui.call(lambda: api.get("/review/queue", limit=QUEUE), "read the review queue")
if card is not None and queue is not None:
    held = sum(1 for r in queue["results"] if r["review"] == "hold")
    newest = (f" (ranked among the newest {queue['ranked_from']:,})"
              if queue.get("ranked_from", queue["waiting"]) < queue["waiting"] else "")
    st.caption(f"{queue['waiting']:,} parts waiting · {held} held and {queue['count'] - held} audit samples "
               f"in the top {QUEUE}{newest} · most informative first · ranked at "
               f"{ui.esc(ui.when(queue['ranked_at'])[-8:])}")
    part = pick_part(queue["results"])
    if part is None:
        st.success("Nothing waiting for review.")
    else:
        show_part(part, heads_of(card))
st.divider()
verification(st.session_state.get("user", ""))
recent_labels()
