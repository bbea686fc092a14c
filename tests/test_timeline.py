"""The failover timeline picture (bench/timeline.py): well-formed SVG with one band per step
and one mark per probe, the lost ones red."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from bench.timeline import timeline_svg

SVG = "{http://www.w3.org/2000/svg}"


def test_steps_are_bands_and_lost_probes_are_red_marks() -> None:
    steps = [{"step": s, "duration_s": d} for s, d in
             (("plan", 0.1), ("reserve", 0.05), ("unplug", 1.2), ("migrate", 2.0),
              ("replug", 0.8), ("verify", 0.2))]  # fmt: skip
    stock = [{"t": i * 0.05, "ok": not 3.4 < i * 0.05 < 4.5} for i in range(100)]
    fixed = [{"t": i * 0.05, "ok": i != 70} for i in range(100)]
    svg = timeline_svg([{"label": "stock guest", "steps": steps, "probes": stock},
                        {"label": "standby-rx guest", "steps": steps, "probes": fixed}],
                       "migrate_with_failover")  # fmt: skip
    root = ET.fromstring(svg)
    assert len(root.findall(f"{SVG}rect[@class='step']")) == 12
    lost = root.findall(f"{SVG}line[@class='probe lost']")
    assert len(lost) == sum(not p["ok"] for p in stock + fixed)
    assert all(el.get("stroke") == "#d62728" for el in lost)
    assert len(root.findall(f"{SVG}line[@class='probe ok']")) == 200 - len(lost)
    texts = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert "22 of 100 probes lost" in texts
    assert "1 of 100 probes lost" in texts
