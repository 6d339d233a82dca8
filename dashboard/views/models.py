"""Models: versions with their metrics, confusion matrices and gate verdicts; shadow agreement;
retraining with live progress; promote and roll back.

Operators see everything but the buttons are disabled (the API would answer 403 anyway); skipping
the validation gate is for admins only.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from dashboard import charts, ui

ENGINEER_ONLY = "needs the engineer role"


SPLIT_NAMES = {"val": "validation", "test": "test"}


def evaluations(m: dict[str, Any]) -> list[tuple[str, dict[str, dict[str, Any]]]]:
    """The model's per-head metrics, by where they were measured: the card's split (written at
    training), then the held-out test set (written by the validation gate, once it has run)."""
    found: list[tuple[str, dict[str, dict[str, Any]]]] = []
    metrics = m.get("metrics") or {}
    if isinstance(metrics.get("heads"), dict):
        split = str(metrics.get("split") or "held-out")
        found.append((SPLIT_NAMES.get(split, split), metrics["heads"]))
    if m.get("gate") and m["gate"].get("candidate_metrics"):
        found.append(("held-out test", m["gate"]["candidate_metrics"]))
    return found


def recall_text(recall: dict[str, float | None] | None) -> str:
    return " · ".join(f"{c}: {ui.pct(r, 0)}" for c, r in (recall or {}).items())


def metrics_table(m: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for where, heads in evaluations(m):
        for head, h in heads.items():
            ece = (f"{h['ece_uncalibrated']:.3f} → {h['ece']:.3f}"
                   if isinstance(h.get("ece_uncalibrated"), float) and isinstance(h.get("ece"), float) else "")
            accuracy = h.get("accuracy")
            rows.append({"head": head, "measured on": where, "parts": h.get("n"),
                         "accuracy": None if accuracy is None else 100 * accuracy,  # shown as "76.8 %", as elsewhere
                         "macro-F1": h.get("macro_f1"), "recall per class": recall_text(h.get("recall")),
                         "ECE before → after calibration": ece})
    return pd.DataFrame(rows)


def training_text(m: dict[str, Any]) -> str:
    t = m.get("training") or {}
    counts, seconds, recipe = t.get("counts") or {}, t.get("seconds") or {}, t.get("recipe") or {}
    parts = []
    if seconds.get("total") is not None:
        parts.append(f"trained in {seconds['total']:.0f} s")
    if counts.get("train") is not None:
        parts.append(f"{counts['train']:,} training + {counts.get('val', 0):,} validation images"
                     + (f" ({counts['views']} views each)" if counts.get("views") else ""))
    if t.get("best_epoch") is not None:
        parts.append(f"best epoch {t['best_epoch']} of {t.get('epochs_run', '?')}")
    if recipe.get("image_size"):
        parts.append(f"{recipe['image_size']} px")
    if (counts.get("inference_views") or 1) > 1:
        parts.append(f"judges {counts['inference_views']} mirror images per part")
    return " · ".join(parts)


def hold_advice(m: dict[str, Any], policy: dict[str, Any]) -> None:
    """How ``disposition.min_confidence`` trades parts held for review against the accuracy of the
    parts decided automatically, on the held-out test set (from the gate): the numbers an engineer
    sets the threshold with."""
    measured = (m.get("gate") or {}).get("candidate_metrics") or {}
    watched = policy.get("heads") or list(measured)
    curves = {head: h for head, h in measured.items() if head in watched and h.get("hold_curve")}
    if not curves:
        return
    setting = float(policy.get("min_confidence", 0.0))
    st.markdown("Hold threshold on the held-out test set (dashed: the line's `disposition.min_confidence`)")
    for col, (head, h) in zip(st.columns(len(curves)), curves.items(), strict=True):
        curve = h["hold_curve"]
        i = min(round(setting * 100), len(curve["threshold"]) - 1)
        held, right = curve["held"][i], curve["accuracy"][i]
        with col:
            st.altair_chart(charts.hold_curve(curve, setting, len(h.get("classes") or [0, 0])), width="stretch")
            own = sorted((policy.get("class_min_confidence") or {}).get(head, {}))
            st.caption(f"**{ui.esc(head)}** at {curve['threshold'][i]:.2f}: {ui.pct(held, 0)} of these parts held, "
                       + (f"{ui.pct(right)} of those decided right" if right is not None else "none decided")
                       + (f" (classes {ui.esc(', '.join(own))} have their own thresholds, not drawn)" if own else ""))


def act(what: str, fn: Any) -> None:
    result = ui.call(fn, what)
    if result is not None:
        st.session_state["models_notice"] = f"Done: {ui.esc(what)}."
        st.rerun()


def overview(models: dict[str, Any]) -> None:
    rows = []
    for m in models["models"]:
        gate = m.get("gate")
        measured = evaluations(m)
        latest = measured[-1] if measured else None  # the held-out test set once the gate has run
        rows.append({
            "version": m["version"],
            "serving": "● serving" if m["serving"] else ("shadow" if m["shadow"] else ""),
            "created": ui.when(m.get("created_at")),
            "parent": m.get("parent_version") or "",
            "gate": "—" if not gate else "evaluated" if not gate.get("champion")
            else "passed" if gate["passed"] else "failed",
            **({f"acc {head}": ui.pct(h.get("accuracy")) for head, h in latest[1].items()} if latest else {}),
            "measured on": latest[0] if latest else "—",
        })
    st.dataframe(pd.DataFrame(rows).fillna("—"), hide_index=True, width="stretch")


def detail(m: dict[str, Any], policy: dict[str, Any]) -> None:
    api = ui.api()
    engineer = ui.at_least("engineer")
    tag = " · serving" if m["serving"] else " · shadow" if m["shadow"] else ""
    with st.expander(f"{ui.esc(m['version'])}{tag}", expanded=m["serving"]):
        st.caption(f"{ui.esc(m.get('architecture', ''))} · heads: {ui.esc(', '.join(m.get('heads', [])))} · created "
                   f"{ui.esc(ui.when(m.get('created_at')))} · parent {ui.esc(m.get('parent_version') or '—')}")
        gate = m.get("gate")
        if gate and not gate.get("champion"):
            st.info(f"Evaluated on the held-out set {ui.esc(gate.get('holdout', '?'))}, "
                    f"{ui.esc(ui.when(gate.get('evaluated_at')))}: there was no champion to compare with.")
        elif gate:
            verdict = "passed" if gate["passed"] else "failed"
            (st.success if gate["passed"] else st.error)(
                f"Validation gate {verdict} against {ui.esc(gate['champion'])} on {ui.esc(gate.get('holdout', '?'))} "
                f"(margin {gate.get('margin', 0):.0%}), {ui.esc(ui.when(gate.get('evaluated_at')))}"
                + "".join(f"\n- {ui.esc(r)}" for r in gate.get("reasons") or []))
        table = metrics_table(m)
        if table.empty:
            st.caption("This model card carries no held-out metrics.")
        else:
            st.dataframe(table, hide_index=True, width="stretch", column_config={
                "accuracy": st.column_config.NumberColumn(format="%.1f %%"),
                "macro-F1": st.column_config.NumberColumn(format="%.3f")})
        blocks = [(f"{head} · {where}", h) for where, heads in evaluations(m) for head, h in heads.items()
                  if isinstance(h.get("confusion"), list)]
        if blocks:
            st.markdown("Confusion matrices (rows: true class, columns: predicted)")
            cols = st.columns(min(4, len(blocks)))
            for col, (title, block) in zip(cols * 4, blocks, strict=False):
                classes = block.get("classes") or [str(i) for i in range(len(block["confusion"]))]
                with col:
                    st.markdown(f"**{ui.esc(title)}**")
                    st.altair_chart(charts.confusion(block["confusion"], classes), width="stretch")
        hold_advice(m, policy)
        if facts := training_text(m):
            st.caption(ui.esc(facts))
        if m.get("onnx_sha256"):
            st.caption(f"ONNX sha256 {ui.esc(m['onnx_sha256'][:16])}… (checked on every load) · training data "
                       f"fingerprint {ui.esc((m.get('training_data_fingerprint') or '—')[:16])}…")
        row = st.container(horizontal=True)
        if row.button("Run gate", key=f"gate_{m['version']}", disabled=not engineer,
                      help=None if engineer else ENGINEER_ONLY):
            act(f"gate {m['version']}", lambda: api.post(f"/models/{m['version']}/gate"))
        if not m["serving"]:
            gated_out = bool(m.get("gate")) and not m["gate"].get("passed")
            if row.button("Promote", key=f"promote_{m['version']}", type="secondary" if gated_out else "primary",
                          disabled=not engineer, help=ENGINEER_ONLY if not engineer else
                          "The gate failed: promoting runs it again, and it refuses unless the champion "
                          "changed" if gated_out else "Gate, then switch between two frames"):
                act(f"promote {m['version']}", lambda: api.post(f"/models/{m['version']}/promote", {"force": False}))
            if ui.at_least("admin") and row.button("Promote without gate", key=f"force_{m['version']}"):
                act(f"promote {m['version']} without the gate",
                    lambda: api.post(f"/models/{m['version']}/promote", {"force": True}))
            if not m["shadow"] and row.button("Run as shadow", key=f"shadow_{m['version']}",
                                              disabled=not engineer, help=None if engineer else ENGINEER_ONLY):
                act(f"start shadow {m['version']}", lambda: api.put(f"/models/{m['version']}/shadow"))


def shadow() -> None:
    api = ui.api()
    try:
        data = api.get("/models/shadow")
    except ui.ApiError as exc:
        if exc.status == 404:
            st.caption("No shadow (challenger) model is running.")
            return
        st.error(f"Cannot read the shadow agreement: {ui.esc(exc.message)}")
        return
    st.markdown(f"Shadow model **{ui.esc(data['shadow_version'])}** judges the same frames; its answers are stored, "
                "never published.")
    rows = [{"head": head, "class (champion)": cls, "parts": v["n"], "agreement": v["agreement"]}
            for head, h in data["heads"].items() for cls, v in h["per_class"].items()]
    cols = st.columns(max(1, len(data["heads"])))
    for col, (head, h) in zip(cols, data["heads"].items(), strict=False):
        col.metric(f"Agreement · {ui.esc(head)}", ui.pct(h["agreement"]), f"{h['n']} parts", delta_color="off")
    if rows:
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", column_config={
            "agreement": st.column_config.ProgressColumn(format="percent", min_value=0, max_value=1)})
    if st.button("Stop shadow", key="stop_shadow", disabled=not ui.at_least("engineer"),
                 help=None if ui.at_least("engineer") else ENGINEER_ONLY):
        act("stop the shadow model", lambda: api.delete("/models/shadow"))


def training_set_text(counts: dict[str, int]) -> str:
    """What the last retraining trained on, and which verified labels it could not use, and why."""
    skipped = [f"{n} without an archived image" for n in [counts.get("skipped_no_image", 0)] if n]
    skipped += [f"{n} whose image is in the gate's held-out set" for n in [counts.get("skipped_in_holdout", 0)] if n]
    return (f"Trained on {counts.get('verified_parts', 0)} verified part(s) + {counts.get('base_rows', 0):,} base "
            "rows" + (f"; left out: {', '.join(skipped)}" if skipped else ""))


@st.fragment(run_every=2)
def retrain_progress() -> None:
    try:
        job = ui.api().get("/retrain")
    except ui.ApiError as exc:
        if exc.unavailable or exc.status == 404:
            st.info("Retraining is not available on this appliance yet (its API has no /retrain).")
        else:
            st.error(f"Cannot read the retraining state: {ui.esc(exc.message)}")
        return
    state = job.get("state", "idle")
    if state == "running":
        phase, message = job.get("phase") or "", job.get("message") or ""
        st.progress(float(job.get("progress") or 0.0), text=f"Retraining · {ui.esc(phase)}"
                    + (f" · {ui.esc(message)}" if message and message != phase else ""))
    elif state == "done":
        gate = job.get("gate") or {}
        text = (f"Last retraining finished: candidate {ui.esc(job.get('candidate_version') or '?')}"
                + (f" · gate {'passed' if gate.get('passed') else 'failed'}" if gate else ""))
        reasons = "".join(f"\n- {ui.esc(r)}" for r in gate.get("reasons") or [])
        (st.warning if gate and not gate.get("passed") else st.success)(text + reasons)
    elif state == "failed":
        st.error(f"Last retraining failed: {ui.esc(job.get('message') or '')}")
    else:
        st.caption("No retraining running.")
    if used := job.get("training_set"):
        st.caption(ui.esc(training_set_text(used)))
    engineer = ui.at_least("engineer")
    if st.button("Start retraining", key="retrain", type="primary", disabled=not engineer or state == "running",
                 help="Trains a candidate on the verified labels, in its own process" if engineer
                 else ENGINEER_ONLY):
        started = ui.call(lambda: ui.api().post("/retrain"), "start retraining")
        if started is not None:
            st.toast(f"Retraining started (job {ui.esc(started.get('job_id', '?'))})")


st.title("Models")
if notice := st.session_state.pop("models_notice", None):
    st.success(notice)
models = ui.call(lambda: ui.api().get("/models"), "read the model registry")
if models is not None:
    top = st.columns([3, 1])
    top[0].markdown(f"Serving **{ui.esc(models['champion'] or '—')}** · roll back to "
                    f"**{ui.esc(models['rollback_to'] or '—')}**")
    engineer = ui.at_least("engineer")
    if top[1].button("Roll back", key="rollback", disabled=not engineer or not models["rollback_to"],
                     help=f"Serve {ui.esc(models['rollback_to'])} again" if engineer else ENGINEER_ONLY):
        act("roll back", lambda: ui.api().post("/models/rollback"))
    if not engineer:
        st.caption("You are logged in as an operator: promoting, rolling back and retraining need an engineer.")
    overview(models)
    st.subheader("Retraining")
    retrain_progress()
    st.subheader("Shadow model")
    shadow()
    st.subheader("Versions")
    for m in models["models"]:
        detail(m, models.get("hold_policy") or {})
