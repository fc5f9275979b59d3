"""Static assets of the feature browser: one stylesheet and one script, written next to the pages.

Plain strings (no template engine, no network, no CDN): `build_browser` writes them as
`<out_dir>/style.css` and `<out_dir>/browser.js`.
"""

STYLE_CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg2: #f6f8fa; --accent: #0969da; }
* { box-sizing: border-box; }
body { font: 14px/1.45 -apple-system, "Segoe UI", "Helvetica Neue", Arial, sans-serif; color: var(--fg);
       margin: 0; padding: 18px 28px 40px; max-width: 1400px; }
a { color: var(--accent); text-decoration: none; } a:hover { text-decoration: underline; }
h1 { font-size: 22px; margin: 4px 0 6px; } h2 { font-size: 16px; margin: 22px 0 8px;
     border-bottom: 1px solid var(--line); padding-bottom: 4px; }
.muted { color: var(--muted); }
.meta { color: var(--muted); margin-bottom: 10px; }
.meta b { color: var(--fg); font-weight: 600; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 10px 0 4px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 6px 12px; background: var(--bg2);
        min-width: 110px; }
.card .v { font-size: 17px; font-weight: 600; } .card .k { color: var(--muted); font-size: 12px; }
.row { display: flex; flex-wrap: wrap; gap: 28px; align-items: flex-start; }
table { border-collapse: collapse; }
table.index { width: 100%; font-size: 13px; }
table.index th, table.index td { padding: 4px 8px; border-bottom: 1px solid var(--line); text-align: left;
                                 vertical-align: top; }
table.index th { position: sticky; top: 0; background: #fff; border-bottom: 2px solid var(--line);
                 white-space: nowrap; }
table.index th.sortable { cursor: pointer; user-select: none; }
table.index th.sortable::after { content: " \\2195"; color: #aab; }
table.index th.sorted-desc::after { content: " \\25BC"; color: var(--fg); }
table.index th.sorted-asc::after { content: " \\25B2"; color: var(--fg); }
table.index td.lg { white-space: nowrap; }
table.index td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.index tr:hover td { background: #f3f7fd; }
.expl { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; }
table.logits td { padding: 2px 8px; font-size: 13px; }
table.logits td.v { text-align: right; font-variant-numeric: tabular-nums; }
table.logits th { text-align: left; padding: 2px 8px; font-size: 12px; color: var(--muted); }
td.pos { color: #1a7f37; } td.neg { color: #cf222e; }
.chip { display: inline-block; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px;
        background: var(--bg2); border: 1px solid var(--line); border-radius: 4px; padding: 0 4px; margin: 1px;
        white-space: pre; }
.chip.wild { color: var(--muted); border-style: dashed; }
.ngram { margin: 3px 0; }
.ctx { display: flex; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px;
       line-height: 1.9; padding: 2px 8px; border-bottom: 1px solid #eef1f4; white-space: nowrap; }
.ctx:hover { background: #fafbfc; }
.ctx .a { flex: 0 0 56px; align-self: center; color: var(--muted); font-size: 11px; text-align: right;
          margin-right: 10px; }
.ctx .l { flex: 0 0 58%; overflow: hidden; direction: rtl; text-align: right; }
.ctx .l .in { direction: ltr; unicode-bidi: isolate; }
.ctx .r { flex: 1 1 auto; overflow: hidden; }
.sep { color: #aab; margin: 0 4px; }
.tok { white-space: pre; border-radius: 2px; }
.tok.max { outline: 1.5px solid #9a3412; }
.hist text { font: 10px sans-serif; fill: var(--muted); }
.hist rect.bar { fill: #f08c3a; } .hist rect.bar.hl { fill: #9a3412; }
.nav { float: right; font-size: 13px; }
"""

BROWSER_JS = r"""
// Client-side sorting of the latent index. The sort comes from the URL hash, e.g.
// index.html#sort=density&dir=desc ; clicking a column header sets the hash.
(function () {
  function table() { return document.getElementById('latents'); }
  function sortBy(key, dir) {
    var t = table(); if (!t) return;
    var body = t.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var sign = dir === 'asc' ? 1 : -1;
    rows.sort(function (a, b) {
      var x = parseFloat(a.getAttribute('data-' + key)), y = parseFloat(b.getAttribute('data-' + key));
      var nx = isNaN(x), ny = isNaN(y);
      if (nx || ny) { return nx === ny ? 0 : (nx ? 1 : -1); }   // missing values last
      if (x !== y) return sign * (x - y);
      return parseFloat(a.getAttribute('data-latent')) - parseFloat(b.getAttribute('data-latent'));
    });
    rows.forEach(function (r) { body.appendChild(r); });
    var ths = t.tHead.rows[0].cells;
    for (var i = 0; i < ths.length; i++) {
      ths[i].classList.remove('sorted-asc', 'sorted-desc');
      if (ths[i].getAttribute('data-key') === key) ths[i].classList.add('sorted-' + (dir === 'asc' ? 'asc' : 'desc'));
    }
    t.setAttribute('data-sorted', key + ':' + (dir === 'asc' ? 'asc' : 'desc'));
  }
  function fromHash() {
    var p = new URLSearchParams(location.hash.replace(/^#/, ''));
    var key = p.get('sort');
    if (key) sortBy(key, p.get('dir') || (key === 'latent' ? 'asc' : 'desc'));
  }
  function init() {
    var t = table(); if (!t) return;
    var ths = t.tHead.rows[0].cells;
    for (var i = 0; i < ths.length; i++) {
      (function (th) {
        var key = th.getAttribute('data-key'); if (!key) return;
        th.classList.add('sortable');
        th.addEventListener('click', function () {
          var cur = (t.getAttribute('data-sorted') || '').split(':');
          var dir = (cur[0] === key && cur[1] === 'desc') ? 'asc' : 'desc';
          location.hash = 'sort=' + key + '&dir=' + dir;
        });
      })(ths[i]);
    }
    window.addEventListener('hashchange', fromHash);
    fromHash();
  }
  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init); else init();
})();
"""
