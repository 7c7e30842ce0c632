"""``report.html``: the report for a person, one self-contained file (``write_report`` calls it).

Built from the same markdown as ``report.md`` (so every number is the markdown's), by
Python-Markdown: a navigation bar by section, filters by epsilon, site and label, the
primary endpoint first and open, every other table collapsed below its section's text, and
the figures inline as data URIs. Nothing is fetched at view time: no script, style or image
comes from the network, so the file can be mailed or archived as it is.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from pathlib import Path

import markdown

from privdom_ray import atomic
from privdom_ray import folder as sweep_folder

_TABLE = re.compile(r"<table>.*?</table>", re.S)
_IMG = re.compile(r'<img alt="([^"]*)" src="([^"]+\.png)"\s*/?>')
_H2 = re.compile(r'(<h2 id="[^"]*">)')


def render_html(
    text: str,
    folder: Path,
    *,
    epsilons: Sequence[str] = (),
    sites: Sequence[str] = (),
    labels: Sequence[str] = (),
) -> str:
    """The HTML page of the markdown report ``text`` (figures resolved against ``folder``);
    the filters offer ``epsilons``, ``sites`` and ``labels``."""
    md = markdown.Markdown(extensions=["tables", "toc"], extension_configs={
        "toc": {"toc_depth": "2-3"}})  # fmt: skip
    body = md.convert(text)
    body = _IMG.sub(lambda m: _inline_image(m, folder), body)
    body = _collapse_tables(body)
    title = html.escape(text.splitlines()[0].lstrip("# ").strip() if text else "Sweep report")
    return _PAGE.format(
        title=title,
        style=_STYLE,
        nav=md.toc,  # type: ignore[attr-defined]
        filters=_filters(epsilons, sites, labels),
        body=body,
        script=_SCRIPT,
    )


def write_html(output: Path, text: str, **choices: Sequence[str]) -> Path:
    """Write ``<output>/report.html`` (atomically) next to ``report.md``."""
    page = render_html(text, Path(output), **choices)
    path = Path(output) / sweep_folder.HTML
    atomic.atomic_write(path, lambda p: p.write_text(page, encoding="utf-8"))
    return path


def _inline_image(match: re.Match[str], folder: Path) -> str:
    path = folder / match.group(2)
    if not path.is_file():
        return f"<p><em>(figure {html.escape(match.group(2))} not found)</em></p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{match.group(1)}" src="data:image/png;base64,{data}">'


def _collapse_tables(body: str) -> str:
    """Section 1 (the primary endpoint and its verdicts) stays open; every other table folds
    under a summary line with its row count, below the text that reads it."""
    parts = _H2.split(body)
    out = [parts[0]]
    for i in range(1, len(parts), 2):
        head, section = parts[i], parts[i + 1] if i + 1 < len(parts) else ""
        primary = section.lstrip().startswith("1.")
        if not primary:
            section = _TABLE.sub(_folded, section)
        out += [head, section]
    return "".join(out)


def _folded(match: re.Match[str]) -> str:
    rows = match.group(0).count("<tr>") - 1
    return f"<details><summary>table ({rows} rows)</summary>{match.group(0)}</details>"


def _filters(epsilons: Sequence[str], sites: Sequence[str], labels: Sequence[str]) -> str:
    def select(name: str, values: Sequence[str]) -> str:
        options = "".join(f'<option value="{html.escape(v)}">{html.escape(v)}</option>'
                          for v in values)  # fmt: skip
        return (f'<label>{name} <select id="f-{name}" data-filter="{name}">'
                f'<option value="">all</option>{options}</select></label>')  # fmt: skip

    return select("epsilon", epsilons) + select("site", sites) + select("label", labels)


_STYLE = """
body{font-family:system-ui,sans-serif;margin:0;display:flex}
nav{position:sticky;top:0;height:100vh;overflow:auto;min-width:16rem;max-width:20rem;
padding:1rem;background:#f4f4f6;font-size:.85rem}
nav ul{padding-left:1rem}main{padding:1rem 2rem;max-width:75rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
td,th{border:1px solid #ccc;padding:.2rem .4rem}th{background:#eee}
summary{cursor:pointer;color:#225}img{max-width:100%}
.filters label{display:block;margin:.3rem 0}.hidden{display:none}
"""

# Filters: an epsilon hides the h3 subsections (and table rows) about other epsilons; a site
# or label hides the rows of a table that names it in some row but not in this one (tables
# about other things stay whole). "#epsilon=8&site=b" in the address preselects them.
_SCRIPT = r"""
(function(){
const sel=[...document.querySelectorAll('select[data-filter]')];
function esc(v){return v.replace(/[.*+?^${}()|[\]\\]/g,'\\$&');}
function has(text,name,value){
  if(name==='epsilon'){return new RegExp('ε = '+esc(value)+'(?![0-9.])').test(text);}
  return new RegExp('(^|[^A-Za-z0-9_])'+esc(value)+'([^A-Za-z0-9_]|$)').test(text);}
function apply(){
  const chosen=sel.filter(s=>s.value).map(s=>[s.dataset.filter,s.value]);
  const eps=chosen.find(c=>c[0]==='epsilon');
  document.querySelectorAll('main h3').forEach(h=>{
    const hide=!!eps&&/ε = /.test(h.textContent)&&!has(h.textContent,'epsilon',eps[1]);
    h.classList.toggle('hidden',hide);
    let n=h.nextElementSibling;
    while(n&&!/^H[23]$/.test(n.tagName)){n.classList.toggle('hidden',hide);n=n.nextElementSibling;}
  });
  document.querySelectorAll('main table').forEach(t=>{
    const rows=[...t.querySelectorAll('tbody tr')];
    rows.forEach(r=>r.classList.remove('hidden'));
    chosen.forEach(([name,value])=>{
      if(!rows.some(r=>has(r.textContent,name,value)))return;
      rows.forEach(r=>{if(!has(r.textContent,name,value))r.classList.add('hidden');});
    });
  });
  const hash=chosen.map(c=>c[0]+'='+encodeURIComponent(c[1])).join('&');
  history.replaceState(null,'',hash?'#'+hash:location.pathname);
  document.body.dataset.filtered=hash;
}
new URLSearchParams(location.hash.slice(1)).forEach((v,k)=>{
  const s=document.getElementById('f-'+k);if(s)s.value=v;});
sel.forEach(s=>s.addEventListener('change',apply));
apply();document.body.dataset.ready='1';
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{style}</style></head>
<body><nav><div class="filters"><strong>Show only</strong>{filters}</div>{nav}</nav>
<main>{body}</main>
<script>{script}</script></body></html>
"""
