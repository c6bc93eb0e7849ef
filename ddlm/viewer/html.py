"""`ddlm sample --show-html FILE.html`: one self-contained page (no network, no CDN) that replays a
draw: a slider and a play button over the frames, the samples side by side, each token coloured by
the frame at which it was fixed, masked positions shaded, and the run's settings with NFE and
seconds. `#frame=N` (or `#frame=last`) in the address opens it at frame N."""
from __future__ import annotations

import html
import json
from pathlib import Path

from ddlm.viewer.frames import Timeline, token_pieces, used_ids

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; background: #fafafa; color: #222; }
h1 { font-size: 1.25em; margin: 0 0 .3em; }
.meta { color: #555; font-size: .9em; margin-bottom: 1em; }
.controls { display: flex; gap: 1em; align-items: center; margin-bottom: 1em; }
#slider { flex: 1; }
#label { font-variant-numeric: tabular-nums; min-width: 16em; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(24em, 1fr)); gap: 1em; }
.card { background: white; border: 1px solid #ddd; border-radius: 6px; padding: .6em; }
.card h2 { font-size: .85em; color: #666; margin: 0 0 .4em; font-weight: normal; }
pre.sample { white-space: pre-wrap; word-break: break-word; margin: 0; font-size: .95em; line-height: 1.45; }
pre.sample span.mask { color: #bbb; }
.legend { font-size: .8em; color: #666; margin-top: 1em; }
.swatch { display: inline-block; width: 8em; height: .8em; vertical-align: middle;
          background: linear-gradient(to right, hsl(220,80%,85%), hsl(130,70%,80%), hsl(40,95%,75%)); }
"""

SCRIPT = """
const data = JSON.parse(document.getElementById('ddlm-data').textContent);
const F = data.nfe.length, n = data.start.length;
const states = [data.start.map(r => r.slice())];
for (let f = 1; f < F; f++) {
  const rows = states[f - 1].map(r => r.slice());
  for (const [i, p, t] of data.changes[f]) rows[i][p] = t;
  states.push(rows);
}
function colour(f) {
  const x = F > 1 ? f / (F - 1) : 1;
  const hue = 220 - 180 * x;
  return 'hsl(' + hue + ',80%,85%)';
}
const slider = document.getElementById('slider'), label = document.getElementById('label');
slider.max = F - 1;
function show(f) {
  f = Math.max(0, Math.min(F - 1, f));
  slider.value = f;
  label.textContent = 'frame ' + f + ' / ' + (F - 1) + '  ·  NFE ' + data.nfe[f];
  for (let i = 0; i < n; i++) {
    const pre = document.getElementById('sample-' + i);
    pre.textContent = '';
    const row = states[f][i];
    for (let p = 0; p < row.length; p++) {
      const piece = data.pieces[row[p]];
      if (piece === '') continue;
      const span = document.createElement('span');
      span.textContent = piece;
      if (row[p] === data.mask) span.className = 'mask';
      else if (data.fixed[i][p] <= f) span.style.background = colour(data.fixed[i][p]);
      span.title = 'fixed at frame ' + data.fixed[i][p];
      pre.appendChild(span);
    }
  }
}
let timer = null;
const play = document.getElementById('play');
play.onclick = () => {
  if (timer) { clearInterval(timer); timer = null; play.textContent = 'play'; return; }
  if (+slider.value >= F - 1) show(0);
  play.textContent = 'pause';
  timer = setInterval(() => {
    if (+slider.value >= F - 1) { clearInterval(timer); timer = null; play.textContent = 'play'; return; }
    show(+slider.value + 1);
  }, Math.max(15, 4000 / F));
};
slider.oninput = () => show(+slider.value);
function fromHash() {
  const m = /frame=(last|\\d+)/.exec(location.hash);
  show(m ? (m[1] === 'last' ? F - 1 : +m[1]) : F - 1);
}
window.addEventListener('hashchange', fromHash);
fromHash();
"""


def page(line: Timeline, tokenizer, *, title: str, meta: dict) -> str:
    """The page's HTML: the timeline as JSON in the page, the script that replays it."""
    pieces = token_pieces(tokenizer, used_ids(line))
    data = {"start": line.start, "changes": line.changes, "nfe": line.nfe, "fixed": line.fixed_at,
            "pieces": {str(k): v for k, v in pieces.items()}, "mask": tokenizer.mask_id}
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")  # no early </script>
    details = " · ".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in meta.items())
    cards = "\n".join(f'<div class="card"><h2>sample {i + 1}</h2><pre class="sample" id="sample-{i}"></pre></div>'
                      for i in range(len(line.start)))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<div class="meta">{details}</div>
<div class="controls"><button id="play">play</button><input id="slider" type="range" min="0" value="0" step="1">
<span id="label"></span></div>
<div class="grid">
{cards}
</div>
<div class="legend">token colour = frame at which it was fixed: early <span class="swatch"></span> late;
{html.escape('░')} = still masked. Frames are the sampler's own steps (same seed, same sample).</div>
<script type="application/json" id="ddlm-data">{payload}</script>
<script>{SCRIPT}</script>
</body></html>
"""


def write_page(path: str | Path, line: Timeline, tokenizer, *, title: str, meta: dict) -> Path:
    from ddlm.commands.sample import write_output

    write_output(path, page(line, tokenizer, title=title, meta=meta))
    return Path(path)
