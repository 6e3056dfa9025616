"""report.json -> one static HTML page (inline CSS, pictures beside it; no script, server or internet)."""

from __future__ import annotations

import html
import os

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1300px;color:#222;padding:0 16px}
h1{font-size:1.5em;margin-bottom:4px}h2{font-size:1.2em;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}tr.fail td{background:#fde8e8}tr.base td{background:#eef4ff}
tr.ref td{background:#f6f6f6}.pass{color:#17803d;font-weight:600}.FAIL{color:#c0262d;font-weight:700}
.note{color:#666;font-size:12px;max-width:1000px}.kv td{text-align:left}.figs img{max-width:48%;margin-right:1%;border:1px solid #eee}
.grid td{border:none;padding:3px;text-align:center;font-size:11px;vertical-align:top}
.grid img{display:block;width:112px;height:112px;object-fit:cover;border:4px solid #999}
.grid img.ok{border-color:#1f9d3a}.grid img.bad{border-color:#d32f2f}.grid img.q{border-color:#333}
.banner{padding:8px 12px;border-radius:4px;margin:8px 0}.banner.warn{background:#fff4e5;border:1px solid #f0b35a}
.banner.good{background:#e9f7ee;border:1px solid #7cc79a}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _num(v, fmt="{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _kv(d: dict) -> str:
    rows = "".join(f"<tr><th class=l>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in d.items()
                   if v not in (None, "", []))
    return f"<table class=kv>{rows}</table>"


def _metrics(table: dict) -> str:
    ks = table["ks"]
    head = (["variant"] + [f"R@{k}" for k in ks] + ["MAP@R", "NMI", "drop R@1 (pts)", "tolerance", "cosine",
                                                     "size MB", "images/s", "gate"])
    out = ["<table><tr>" + "".join(f"<th{' class=l' if i in (0, len(head) - 1) else ''}>{_e(h)}</th>"
                                   for i, h in enumerate(head))
           + "</tr>"]
    for r in table["rows"]:
        m = r.get("metrics") or {}
        cls = {"baseline": "base", "reference": "ref"}.get(r["kind"], "fail" if r.get("status") == "FAIL" else "")
        status = r.get("status", "")
        gate = f"<span class={_e(status)}>{_e(status)}</span>"
        if r.get("reason"):
            gate += f"<br><span class=note>{_e(r['reason'])}</span>"
        if r["kind"] == "variant" and status == "FAIL":
            gate += "<br><span class=note>left out of the bundle</span>" if not r.get("in_bundle") else ""
        cells = ([f"<td class=l>{_e(r['name'])}</td>"] + [f"<td>{_pct(m.get(f'recall@{k}'))}</td>" for k in ks]
                 + [f"<td>{_pct(m.get('map@r'))}</td>", f"<td>{_pct(m.get('nmi'))}</td>",
                    f"<td>{_num(r.get('recall1_drop'), '{:+.2f}')}</td>", f"<td>{_num(r.get('tolerance'), '{:g}')}</td>",
                    f"<td>{_num(r.get('cosine_mean'), '{:.4f}')}</td>", f"<td>{_num(r.get('size_mb'))}</td>",
                    f"<td>{_num(r.get('images_per_s'))}</td>", f"<td class=l>{gate}</td>"])
        out.append(f"<tr class='{cls}'>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _grid(grid: list[dict]) -> str:
    if not grid:
        return "<p class=note>no queries to show</p>"
    rows = []
    for g in grid:
        cells = [f"<td><img class=q src='{_e(g['thumb'])}' alt='query'>query<br>[{_e(g['label'])}]</td>"
                 if g.get("thumb") else "<td>(no image)</td>"]
        for h in g["hits"]:
            mark = "ok" if h["correct"] else "bad"
            img = f"<img class={mark} src='{_e(h['thumb'])}' alt='hit {h['rank']}'>" if h.get("thumb") else "(no image)"
            cells.append(f"<td>{img}#{h['rank']} {h['score']:.3f}<br>[{_e(h['label'])}]</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return "<table class=grid>" + "".join(rows) + "</table>"


def render(report: dict, path: str) -> str:
    st = report["status"]
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(report['title'])}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>{_e(report['title'])}</h1><p class=note>generated {_e(report['generated_at'])} from "
             f"{_e(report['run_folder'])}; every number on this page is in report.json beside it</p>"]
    if st["variants_failed"]:
        parts.append(f"<div class='banner warn'><b>{len(st['variants_failed'])} variant(s) failed the parity gate:"
                     f"</b> {_e(', '.join(st['variants_failed']))}. "
                     + (f"The bundle was written with the passing variants: {_e(', '.join(st['variants_passed']))}."
                        if st["variants_passed"] else "No variant passed: no bundle, nothing indexed.") + "</div>")
    else:
        parts.append(f"<div class='banner good'>Every exported variant passed its gate: "
                     f"{_e(', '.join(st['variants_passed']))}.</div>")
    parts.append("<h2>Configuration and machine</h2><div style='display:flex;gap:24px;flex-wrap:wrap'>"
                 + _kv(report["config"]) + _kv({**report["machine"], **report.get("env", {})}) + "</div>")
    if report.get("stages"):
        parts.append("<table><tr><th class=l>stage</th><th>seconds</th><th class=l>status</th></tr>" + "".join(
            f"<tr><td class=l>{_e(s['stage'])}</td><td>{_num(s.get('seconds'))}</td><td class=l>{_e(s['status'])}"
            "</td></tr>" for s in report["stages"]) + "</table>")
    t = report["metrics"]
    parts.append(f"<h2>Retrieval on the held-out classes ({_e(t.get('parity_images'))} images)</h2>"
                 + _metrics(t) + f"<p class=note>{_e(t['note'])}</p>")
    tr = report["training"]
    parts.append(f"<h2>Training</h2><p class=note>{_e(tr.get('protocol') or '')}; reported model: "
                 f"{_e(tr.get('model') or '-')}; {_e(tr.get('epochs'))} epochs, {_e(tr.get('steps'))} steps, "
                 f"{_num(tr.get('train_time_s'))} s of training</p><div class=figs>"
                 f"<img src='{_e(tr['curves']['loss'])}' alt='training loss per epoch'>"
                 f"<img src='{_e(tr['curves']['recall'])}' alt='validation Recall@1 per epoch'></div>")
    if report.get("tsne"):
        ts = report["tsne"]
        parts.append(f"<h2>Map of the test embeddings</h2><div class=figs><img src='{_e(ts['image'])}' "
                     f"alt='t-SNE map'></div><p class=note>t-SNE (scikit-learn, perplexity {ts['perplexity']:g}, "
                     f"seed {ts['seed']}) of {ts['points']} {_e(ts['embeddings'])} embeddings, "
                     f"{ts['classes']} classes</p>")
    q = report["queries"]
    if q.get("skipped"):
        parts.append(f"<h2>Queries</h2><p>not run: {_e(q['skipped'])}</p>")
    else:
        cr = q.get("catalogue_recall") or {}
        parts.append(f"<h2>Queries: held-out images searched in the catalogue</h2><p class=note>{_e(q['count'])} "
                     f"queries (never in the catalogue) against {_e(q['gallery'])} gallery images, model "
                     f"{_e(q['variant'])}: " + ", ".join(f"{_e(k.replace('recall@', 'R@'))} {_pct(v)}"
                                                         for k, v in cr.items())
                     + ". Top-5 hits framed green when of the query's class, red otherwise.</p>" + _grid(q["grid"]))
    th = report["throughput"]
    idx = th.get("indexing") or {}
    parts.append("<h2>Throughput</h2><div class=figs><img src='" + _e(th["image"]) + "' alt='throughput'></div>")
    if idx:
        parts.append(_kv({"gallery images indexed": idx.get("images"),
                          "index, end to end (images/s)": _num(idx.get("index_images_per_s")),
                          "decode + preprocess alone (images/s)": _num(idx.get("decode_images_per_s")),
                          "model alone (images/s)": _num(idx.get("model_images_per_s")),
                          "index / model": _num(idx.get("index_vs_model"), "{:.0%}"),
                          "decode workers": idx.get("decode_workers")}))
    parts.append(f"<p class=note>{_e(th['note'])}</p></body></html>")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return path


__all__ = ["render"]
