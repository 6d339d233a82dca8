"""Run every benchmark, then render bench/results/README.md: one table of the figures and goals,
and the figures of bench/plots.py.

    python -m bench.run_all                 # all of them (about 60 min: ELPV training ~6 min, the
                                            # pooled-features recipe ~8 min, the SVM study of three trunks ~20 min, the
                                            # learning curve ~15 min, active learning ~5 min, the
                                            # taxonomy suite, three sets × three seeds, ~25 min)
    python -m bench.run_all --skip elpv     # leave one out
    python -m bench.run_all --render-only   # re-render from the JSON files already there

Each benchmark is run as its own process (``python -m bench.<name>``) and writes its JSON; this
script only reads those files, so a table row always shows what that benchmark measured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.attack_replay import table as attack_table
from bench.common import RESULTS, machine
from bench.plots import FIGURES
from bench.taxonomy_suite import readme_rows as taxonomy_rows

BENCHMARKS = ("pipeline", "plc", "swap", "retrain_load", "query_load", "login_attack", "attack_replay", "analytics",
              "elpv", "elpv_pooled", "elpv_svm", "learning_curve", "active_learning", "taxonomy_suite")
COMMANDS = {"elpv_pooled": ["bench.elpv", "--recipe", "configs/recipes/elpv-pooled-300.yaml",
                            "--out", str(RESULTS / "elpv_pooled.json")]}
"""Benchmarks that are another one run with other arguments; the rest are ``python -m bench.<name>``."""


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def ms(d: dict[str, Any] | None, key: str = "p99") -> str:
    return "–" if not d or d.get(key) is None else f"{d[key]:.1f} ms"


def rows() -> list[tuple[str, str, str, str]]:
    """(benchmark, figure, measured, goal)."""
    out: list[tuple[str, str, str, str]] = []
    if p := load("pipeline"):
        paced, bare = p["paced"], p["bare_model_ms"]
        out += [("pipeline", "bare model p50 / p99", f"{bare['p50']:.1f} / {bare['p99']:.1f} ms", "–"),
                ("pipeline", f"frame → stored p99 at {paced['rate_hz']:.0f} parts/s", ms(paced["stored_ms"]),
                 "≤ 10 ms"),
                ("pipeline", "stored p99 / bare-model p99", f"{p['ratio_stored_p99_to_bare_p99']}", "≤ 1.5"),
                ("pipeline", f"sustained: camera at {p['sustained']['rate_hz']:.0f}/s, judged",
                 f"{p['sustained']['parts_per_s']} parts/s ({p['sustained']['dropped']} dropped)", "≥ 100, 0 dropped")]
        if read := p.get("replay_read_ms"):
            out += [("pipeline", "replay camera: file read + PNG decode p50 / p99 (before a frame counts as acquired)",
                     f"{ms(read, 'p50')} / {ms(read)}", "–")]
        if (cap := p.get("capacity")) and (one := p.get("capacity_one_worker_two_threads")):
            workers = p["inference"]
            out += [("pipeline", f"capacity, the most judged: {workers['workers']}×{workers['intra_op_threads']} "
                                 "/ 1×2 (inference workers × threads)",
                     f"{cap['parts_per_s']} / {one['parts_per_s']} parts/s", "–")]
        if line := p.get("line_rate"):
            out += [("pipeline", f"at {line['rate_hz']:.0f} parts/s: bare model paced alike p50 / p99",
                     f"{ms(line['bare_model_ms'], 'p50')} / {ms(line['bare_model_ms'])}", "–"),
                    ("pipeline", f"at {line['rate_hz']:.0f} parts/s: frame → stored p50 / p99",
                     f"{ms(line['run']['stored_ms'], 'p50')} / {ms(line['run']['stored_ms'])} "
                     f"({line['run']['dropped']} dropped)", "–"),
                    ("pipeline", f"at {line['rate_hz']:.0f} parts/s: stored p99 / paced bare-model p99",
                     f"{line['ratio_stored_p99_to_bare_p99']}", "≤ 1.5")]
    if p := load("plc"):
        for r in p["runs"]:
            out += [("plc", f"OPC UA event p50 / p99 at {r['rate_hz']:.0f} parts/s",
                     f"{ms(r['opcua_event_ms'], 'p50')} / {ms(r['opcua_event_ms'])}", "p99 ≤ 10 ms at 100/s"),
                    ("plc", f"Modbus poll p50 / p99 at {r['rate_hz']:.0f} parts/s",
                     f"{ms(r['modbus_poll_ms'], 'p50')} / {ms(r['modbus_poll_ms'])}", "p99 ≤ 10 ms at 100/s")]
    if p := load("swap"):
        out += [("swap", f"dropped frames in {p['swaps']} swaps at {p['rate_hz']:.0f} parts/s",
                 str(p["dropped"]), "0"),
                ("swap", "stored p99 during swaps / steady",
                 f"{ms(p['stored_ms_during_swaps'])} / {ms(p['stored_ms_steady'])}", "–")]
    if p := load("query_load"):
        stored, ratio, idle = p["stored_ms"], p["p99_ratio"], ms(p["stored_ms"]["idle"])
        out += [("query_load", "stored p99 while a heavy DuckDB query loops / idle",
                 f"{ms(stored['querying'])} / {idle} (×{ratio['querying']})", "≤ 1.5 ×"),
                ("query_load", f"stored p99 with the review queue asked {p['review_rate_hz']:g}/s "
                               f"(ranks the newest {p['ranked_from']:,} of {p['stored_before_start']:,} "
                               "waiting) / idle",
                 f"{ms(stored['reviewing'])} / {idle} (×{ratio['reviewing']})", "≤ 1.5 ×"),
                ("query_load", "the same, ranked on every request",
                 f"{ms(stored['reviewing, ranked every time'])} / {idle} "
                 f"(×{ratio['reviewing, ranked every time']})", "–"),
                *[("query_load", f"stored p99 with {name} (GET /results) / idle",
                   f"{ms(stored[name])} / {idle} (×{ratio[name]})", "≤ 1.5 ×")
                  for name in ("results pages of 1,000, 1/s", "results pages of 10,000, every 5 s")]]
    if p := load("retrain_load"):
        out += [("retrain_load", "stored p99 while retraining / idle",
                 f"{ms(p['stored_ms_while_retraining'])} / {ms(p['stored_ms_idle'])} (×{p['p99_ratio']})",
                 "≤ 1.5 ×")]
    if p := load("login_attack"):
        api, opc, stored = p["api"], p["opcua"], p["stored_ms"]
        out += [("login_attack", f"stored p99 while {api['attempts']:,} API password guesses arrive / idle",
                 f"{ms(stored['api_attack'])} / {ms(stored['idle'])} (×{p['p99_ratio']['api']})", "≤ 1.5 ×"),
                ("login_attack", f"stored p99 while the same HTTP requests arrive without a log-in "
                                 f"({p['http_no_login']['attempts']:,}) / idle",
                 f"{ms(stored['http_no_login'])} / {ms(stored['idle'])} (×{p['p99_ratio']['http']})", "–"),
                ("login_attack", f"stored p99 while {opc['attempts']} OPC UA password guesses arrive / idle",
                 f"{ms(stored['opcua_attack'])} / {ms(stored['idle'])} (×{p['p99_ratio']['opcua']})", "≤ 1.5 ×"),
                ("login_attack", "API guesses whose password was checked / refused unchecked (lockout, backoff, "
                                 "queue full)", f"{api['password_checked']:,} / {sum(api['refused'].values()):,}", "–")]
    if p := load("attack_replay"):
        failed = [f"{o['finding']}: {o['attack']}" for o in p["attacks"] if o["verdict"] != "PASS"]
        out += [("attack_replay", "attacks of the security review (issue F) replayed on a running appliance: "
                                  "answered as expected (table below)",
                 f"{p['passed']} of {len(p['attacks'])}" + (f" (FAIL: {'; '.join(failed)})" if failed else ""),
                 "all")]
    if p := load("analytics"):
        out.append(("analytics", f"slowest dashboard query at {p['results']:,} results",
                    f"{p['worst_dashboard_query_max_ms']} ms (max of runs)", f"≤ {p['goal_ms']} ms"))
    for name in ("elpv", "elpv_pooled"):
        if p := load(name):
            out += elpv_rows(name, p)
    if p := load("elpv_svm"):
        for trunk, t in p["trunks"].items():
            out += [("elpv_svm", f"variant study, not shipped: frozen {trunk} 300 px features + RBF SVM, "
                                 "4-level accuracy (flip views averaged / identity only)",
                     f"{t['accuracy_4level']} / {t['identity_view_only']['accuracy_4level']}", "≥ 0.90"),
                    ("elpv_svm", f"{trunk}: training time (2 cores) / feature net bs1 p50",
                     f"{t['training_seconds']} s / {t['feature_latency_bs1_2thr']['p50_ms']} ms", "≤ 600 s / –")]
        e = p["ensemble"]
        out += [("elpv_svm", f"ensemble of the {len(e['trunks'])} trunks' SVMs: 4-level accuracy / training time",
                 f"{e['accuracy_4level']} / {e['training_seconds']} s", "≥ 0.90 / ≤ 600 s")]
    if p := load("learning_curve"):
        out += [("learning_curve", f"4-level accuracy with {s['per_class']} labels per grade ({setting})",
                 f"{s['accuracy_4level_mean']} (min {s['accuracy_4level_min']}, {s['runs']} seeds); "
                 f"balanced {s['balanced_accuracy_mean']}", "–")
                for setting, run in p["settings"].items() for s in run["summary"]]
    if p := load("active_learning"):
        out += [("active_learning", f"labels to reach {p['target']} (median of seeds), {order} order",
                 str(p["summary"][order]["labels_to_target_median"]), "active < random")
                for order in ("random", "active")]
    if p := load("taxonomy_suite"):
        out += taxonomy_rows(p)
    return out


def elpv_rows(name: str, p: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The ELPV protocol's figures for one recipe (``variant``: the default or a recipe file)."""
    rows = [(f"4-level test accuracy ({p['variant']} recipe)", f"{p['accuracy_4level']}", "≥ 0.90 (VGG-19: 0.8842)"),
            ("binary accuracy / macro-F1", f"{p['binary_accuracy']} / {p.get('macro_f1')}", "–")]
    if held := p.get("accuracy_4level_when_holding"):
        rows.append(("4-level accuracy of the parts decided, least confident 10/20/30 % held",
                     " / ".join(str(v) for v in held.values()), "–"))
    if (before := p.get("ece_test_uncalibrated")) is not None:
        rows.append(("test ECE before / after calibration", f"{before} / {p['ece_test']}", "after < before"))
    rows += [("training time (2 cores)", f"{p['training_seconds']} s", "≤ 600 s"),
             ("model latency bs1, 2 threads, p50 / p99", f"{p['latency']['p50_ms']} / {p['latency']['p99_ms']} ms",
              "–")]
    return [(name, *row) for row in rows]


def attack_section() -> list[str]:
    """bench/attack_replay.py's table: each attack, what it got, and the audit rows it left."""
    if not (p := load("attack_replay")):
        return []
    return ["## The security review's attacks, replayed", "",
            f"`python -m bench.attack_replay`: one running appliance ({p['seconds']} s, machine load "
            f"{p['load_average_1m_at_start']}); login settings the defaults except "
            f"{p['login_changed_from_defaults']}. Finding numbers as in issue F.", "",
            *attack_table(p["attacks"]), ""]


def render() -> Path:
    lines = [
        "# Benchmark results",
        "",
        f"Rendered {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `python -m bench.run_all` on "
        f"{machine()['cpus']} CPU cores ({machine()['cpu']}). Each row is read from "
        "`bench/results/<benchmark>.json`; see each file for the full figures and the machine load "
        "when it ran.",
        "",
        "| benchmark | figure | measured | goal |",
        "|---|---|---|---|",
        *(f"| {b} | {f} | {m} | {g} |" for b, f, m, g in rows()),
        "",
        *attack_section(),
        *(f"![{fig.stem}]({fig.name})\n" for fig in (draw(load, RESULTS) for draw in FIGURES) if fig),
    ]
    path = RESULTS / "README.md"
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip", nargs="*", default=[], choices=BENCHMARKS)
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    if not args.render_only:
        for name in BENCHMARKS:
            if name in args.skip:
                continue
            print(f"== {name}", flush=True)
            subprocess.run([sys.executable, "-m", *COMMANDS.get(name, [f"bench.{name}"])], check=False)
    print(f"wrote {render()}")


if __name__ == "__main__":
    main()
