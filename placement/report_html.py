"""The report's HTML page: a headline table, the plots and notes on how the numbers were made."""
from __future__ import annotations

import html
from pathlib import Path

CAPTIONS = {
    "goodput_per_device": "Per-GPU goodput: highest rate at which the attainment target is met, divided by GPUs.",
    "attainment_vs_rate": "SLO attainment as the request rate grows (the trace replayed at each rate).",
    "attainment_vs_slo_scale": "Attainment at the reference rate when both targets are scaled by a factor.",
    "ttft_cdf": "Time to first token.",
    "tpot_cdf": "Time per output token: (finish - first token) / (output tokens - 1).",
    "ttft_breakdown": "Mean prefill queue and prefill compute (together TTFT), then KV transfer and decode queue.",
}


def _fmt(v, digits=3):
    return "-" if v is None else f"{v:.{digits}g}" if isinstance(v, float) else html.escape(str(v))


def write_html(report: dict, images: dict[str, str], out: Path) -> Path:
    plan, slo, wl = report["plan"], report["slo"], report["workload"]
    rows = []
    for name, s in report["systems"].items():
        ref = s["at_reference_rate"]["summary"]
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(s['config'])}</td>"
                    f"<td>{s['num_devices']}</td><td>{_fmt(s['goodput_rps'])}</td>"
                    f"<td><b>{_fmt(s['goodput_per_device'])}</b></td><td>{_fmt(ref['attainment'])}</td>"
                    f"<td>{_fmt(ref['ttft_p90_s'])}</td><td>{_fmt(ref['tpot_p90_s'])}</td></tr>")
    pred = plan.get("predicted") or {}
    figures = "\n".join(f'<figure><img src="{html.escape(f)}" alt="{k}"><figcaption>{html.escape(CAPTIONS.get(k, k))}'
                        f"</figcaption></figure>" for k, f in images.items())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>disagg-serve report: {html.escape(plan['model'])} on {html.escape(wl['name'])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
td:first-child,td:nth-child(2),th{{text-align:left}}figure{{display:inline-block;margin:6px;width:420px}}
img{{width:100%}}figcaption{{font-size:80%;color:#555}}</style></head><body>
<h1>{html.escape(plan['model'])}, {html.escape(wl['name'])}: disaggregated vs colocated</h1>
<p>SLO: TTFT &le; {slo['ttft_s']} s and TPOT &le; {slo['tpot_s']} s for {slo['attainment']:.0%} of requests.
Latency model: {html.escape(report['latency_model'])}. Workload: {wl['num_requests']} requests
(trace replayed with its own arrival pattern, time-scaled to each rate; native rate {wl['native_rate']:.3g} req/s).
Reference rate for the CDFs and breakdown: {report['reference_rate']:.4g} req/s.</p>
<table><tr><th>system</th><th>configuration</th><th>GPUs</th><th>goodput (req/s)</th><th>per GPU</th>
<th>attainment at ref.</th><th>TTFT p90 (s)</th><th>TPOT p90 (s)</th></tr>
{''.join(rows)}</table>
<p>The optimizer ({html.escape(str(pred.get('algorithm', '-')))}) searched on a {pred.get('search_requests', '-')}-request
sample and predicted {_fmt(pred.get('goodput_per_device'))} req/s per GPU for the plan; every number on this page comes
from simulating the whole workload above. Numbers: <a href="report.json">report.json</a>.</p>
{figures}
</body></html>
"""
    path = out / "index.html"
    path.write_text(page)
    return path
