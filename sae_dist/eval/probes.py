"""Probe loss (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", sec. 4.3).

The paper asks whether the SAE has latents for features we hypothesise the LM represents: for a set
of binary token-level tasks it fits, for every latent separately, a 1-D logistic regression
p = sigmoid(a * z_j + b) on that latent's activation z_j, and reports the best latent's binary cross
entropy per task, averaged over tasks ("probe loss"; lower is better). The paper's 61 tasks are not
public; here the tasks are derived from the eval text itself, so they exist for ANY corpus.

Tasks (`TASKS`) and their labelling rules. Every eval token (positions >= skip_positions of each
packed sequence) gets a character span [s, e) in the decoded text of its context (`token_spans`: the
context is the sequence's tokens after BOS, decoded with the tokenizer; a token's span is the text its
decode adds). Its *anchor* is the first non-whitespace character of the span, or the span's first
character if the token is all whitespace. Tokens with an empty span (a byte-level token holding part of
a multi-byte character) are invalid and excluded from every task. Words: a "word" is a maximal run of
characters c with c.isalnum() (camel_case), c.isalnum() or c == "_" (identifier: all_caps,
python_keyword), c.isalpha() (stop_word). A code-state scanner (`char_states`) runs over the context
once, left to right, from its first character (so a context that starts inside a multi-line string is
labelled as if it did not: the rule sees only the context):

* a `"` always opens a string; a `'` opens one unless directly preceded by a letter or digit that is
  not a Python string prefix (r, b, f, u, rb, br, fr, rf; any case) - so "don't" opens nothing; a
  tripled quote opens a triple-quoted string; backslash escapes the next character; a single-quoted
  string also ends at a newline. Quotes are part of the string.
* outside strings, `#` starts a comment that runs to the end of the line (the newline excluded).
* outside strings and comments, ( [ { raise the bracket depth and ) ] } lower it (never below 0);
  a character is inside brackets if the depth is > 0 both before and after it.

    in_string       the anchor is inside a string literal (scanner above)
    in_comment      the anchor is inside a comment
    in_brackets     the anchor is inside ( ), [ ] or { }
    has_digit       the span contains a digit 0-9
    camel_case      the anchor is alphanumeric and its word holds a lowercase letter and an uppercase
                    letter at a position other than the word's first ("camelCase", "OrderedDict",
                    "HTTPServer"; not "Hello", "HTTP", "snake_case")
    all_caps        the anchor's identifier word has >= 2 letters and no lowercase letter
                    ("MAX_SIZE", "HTTP")
    python_keyword  the anchor's identifier word is a Python 3 hard keyword (`PYTHON_KEYWORDS`)
    stop_word       the anchor's letter word, lowercased, is in `STOP_WORDS` (a fixed English list)
    line_start      the anchor is non-whitespace and is the first non-whitespace character of its line
                    (a line starts at the context start or after "\\n")
    space_before    the span has a non-whitespace character and the character just before the anchor
                    exists and is whitespace
    punctuation     the span has a non-whitespace character and none of its non-whitespace
                    characters is alphanumeric or "_"
    attribute       the anchor is a letter or "_", the character before it is ".", and the one before
                    that is alphanumeric, "_", ")" or "]" ("os.path", "self.x", "f().y")
    newline         the span contains "\\n"

Fit (`fit_logistic_1d`). For task labels y_i in {0, 1} on the N valid tokens and each latent j, with
the activation scaled to s_i = z_ij / max_i z_ij (scale-free regularisation), minimise
    sum_i BCE(y_i, sigmoid(a s_i + b)) + (l2 / 2) (a^2 + b^2)
by Newton's method (2x2 per latent, all latents at once, float64) with a backtracking (Armijo) line
search. Only the tokens where latent j fires enter as individual terms: the others all have s = 0 and
contribute through their count and number of positives. The tiny L2 (default 1e-4, on the summed
loss) keeps separable cases (a latent that fires exactly on the positives) finite. The reported loss
is the unpenalised mean BCE (nats per token) of the fitted probe on the same tokens (as in the paper,
no held-out split: with d_sae candidates the best-of-n fit is slightly optimistic).
Baseline: the constant predictor p = mean(y), whose BCE is the label entropy H(mean(y)) (nats).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from sae_dist.eval.metrics import LatentCodes

__all__ = [
    "TASKS",
    "PYTHON_KEYWORDS",
    "STOP_WORDS",
    "char_states",
    "label_spans",
    "token_spans",
    "token_task_labels",
    "fit_logistic_1d",
    "probe_loss",
]

PYTHON_KEYWORDS = frozenset(
    "False None True and as assert async await break class continue def del elif else except finally "
    "for from global if import in is lambda nonlocal not or pass raise return try while with yield".split()
)

STOP_WORDS = frozenset(
    "a an the and or but if of at by for with about to from in on is are was were be been being it its "
    "this that these those as not no so than then there their they we you he she i me my our your his "
    "her them do does did have has had will would can could should may might must which who what when "
    "where how all any each some such only into over also more most other".split()
)

_STRING_PREFIXES = frozenset({"r", "b", "f", "u", "rb", "br", "fr", "rf"})

#: task name -> one-line rule (the module docstring has the full definitions)
TASKS: dict[str, str] = {
    "in_string": "anchor inside a string literal",
    "in_comment": "anchor inside a # comment",
    "in_brackets": "anchor inside (), [] or {}",
    "has_digit": "token text contains a digit 0-9",
    "camel_case": "anchor's alphanumeric word has a lowercase letter and a non-initial uppercase letter",
    "all_caps": "anchor's identifier word has >= 2 letters, none lowercase",
    "python_keyword": "anchor's identifier word is a Python keyword",
    "stop_word": "anchor's letter word is an English stop word",
    "line_start": "anchor is the first non-whitespace character of its line",
    "space_before": "character before the anchor is whitespace",
    "punctuation": "token's non-whitespace characters are all punctuation/symbols",
    "attribute": "anchor follows '.' after an identifier, ')' or ']' (attribute access)",
    "newline": "token text contains a newline",
}


# ------------------------------------------------------------------------------------- labelling
def char_states(text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Code-state scanner over `text` (rules in the module docstring).

    Returns (in_string, in_comment, in_brackets): bool numpy arrays [len(text)], one entry per character.
    """
    scan = _CodeScan(text)
    steps = {"normal": scan.normal, "comment": scan.comment, "string": scan.string}
    i = 0
    while i < len(text):
        scan.depth_before[i] = scan.depth
        nxt = steps[scan.state](i)
        if nxt is None:  # one character scanned in place
            scan.depth_after[i] = scan.depth
            nxt = i + 1
        i = nxt
    return scan.in_str, scan.in_com, (np.minimum(scan.depth_before, scan.depth_after) > 0)


class _CodeScan:
    """The state of `char_states` over one text: per-character in_str / in_com flags and the bracket
    depth before and after each character (int64 [len(text)]), the scanner `state` ("normal",
    "comment" or "string"), the open string's closing delimiter `quote` (', ", ''' or \"\"\") and the
    current bracket `depth`. Each state's method scans character i and returns the index of the next
    character to scan when it consumed more than one (their flags and depths set), else None."""

    def __init__(self, text: str) -> None:
        n = len(text)
        self.text = text
        self.in_str = np.zeros(n, dtype=bool)
        self.in_com = np.zeros(n, dtype=bool)
        self.depth_before = np.zeros(n, dtype=np.int64)
        self.depth_after = np.zeros(n, dtype=np.int64)
        self.state = "normal"
        self.quote = ""
        self.depth = 0

    def _mark_string(self, lo: int, hi: int) -> int:
        """Characters [lo, hi) (clipped to the text) are inside a string, at the current depth; returns hi."""
        for j in range(lo, min(hi, len(self.text))):
            self.in_str[j] = True
            self.depth_before[j] = self.depth
            self.depth_after[j] = self.depth
        return hi

    def normal(self, i: int) -> int | None:
        c = self.text[i]
        if c == "#":
            self.state = "comment"
            self.in_com[i] = True
        elif c in "\"'" and _opens_string(self.text, i):
            q3 = self.text[i : i + 3]
            self.quote = q3 if q3 == c * 3 else c
            self.state = "string"
            return self._mark_string(i, i + len(self.quote))
        elif c in "([{":
            self.depth += 1
        elif c in ")]}":
            self.depth = max(self.depth - 1, 0)
        return None

    def comment(self, i: int) -> int | None:
        if self.text[i] == "\n":
            self.state = "normal"
        else:
            self.in_com[i] = True
        return None

    def string(self, i: int) -> int | None:
        c = self.text[i]
        if c == "\\":  # the escape and the escaped character
            return self._mark_string(i, i + 2)
        if c == "\n" and len(self.quote) == 1:
            self.state = "normal"  # unterminated single-quoted string ends at the newline
        elif self.text.startswith(self.quote, i):
            self.state = "normal"
            return self._mark_string(i, i + len(self.quote))
        else:
            self.in_str[i] = True
        return None


def _opens_string(text: str, i: int) -> bool:
    if text[i] == '"':
        return True
    j = i
    while j > 0 and text[j - 1].isalnum():
        j -= 1
    word = text[j:i]
    if not word:
        return True
    return word.lower() in _STRING_PREFIXES and (j == 0 or not (text[j - 1].isalnum() or text[j - 1] == "_"))


def _word_at(text: str, i: int, ok) -> str:
    if not ok(text[i]):
        return ""
    s = i
    while s > 0 and ok(text[s - 1]):
        s -= 1
    e = i + 1
    while e < len(text) and ok(text[e]):
        e += 1
    return text[s:e]


def _is_ident(c: str) -> bool:
    return c.isalnum() or c == "_"


def label_spans(text: str, spans: list[tuple[int, int]]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Labels of every task (`TASKS`) for tokens with character spans `spans` in `text`.

    Args:
        text: the decoded context.
        spans: one (start, end) character offset pair per token, 0 <= start <= end <= len(text).

    Returns:
        (labels, valid): labels maps task name -> bool numpy array [len(spans)]; valid is bool [len(spans)],
        False for tokens with an empty span (their labels are all False).

    Raises:
        ValueError: a span outside the text or with end < start.
    """
    n_tok = len(spans)
    labels = {t: np.zeros(n_tok, dtype=bool) for t in TASKS}
    valid = np.zeros(n_tok, dtype=bool)
    in_str, in_com, in_br = char_states(text)
    # first non-whitespace character of each line
    line_first = np.zeros(len(text), dtype=bool)
    at_line_start = True
    for i, c in enumerate(text):
        if c == "\n":
            at_line_start = True
        elif at_line_start and not c.isspace():
            line_first[i] = True
            at_line_start = False
    for t, (s, e) in enumerate(spans):
        if not (0 <= s <= e <= len(text)):
            raise ValueError(f"token {t}: span ({s}, {e}) is not inside the text of length {len(text)}")
        if e == s:
            continue
        valid[t] = True
        piece = text[s:e]
        nonws = [k for k, c in enumerate(piece) if not c.isspace()]
        a = s + (nonws[0] if nonws else 0)
        ch = text[a]
        labels["in_string"][t] = in_str[a]
        labels["in_comment"][t] = in_com[a]
        labels["in_brackets"][t] = in_br[a]
        labels["has_digit"][t] = any("0" <= c <= "9" for c in piece)
        w = _word_at(text, a, str.isalnum)
        labels["camel_case"][t] = bool(w) and any(c.islower() for c in w) and any(c.isupper() for c in w[1:])
        ident = _word_at(text, a, _is_ident)
        letters = [c for c in ident if c.isalpha()]
        labels["all_caps"][t] = len(letters) >= 2 and not any(c.islower() for c in letters)
        labels["python_keyword"][t] = ident in PYTHON_KEYWORDS
        labels["stop_word"][t] = _word_at(text, a, str.isalpha).lower() in STOP_WORDS
        labels["line_start"][t] = bool(nonws) and bool(line_first[a])
        labels["space_before"][t] = bool(nonws) and a > 0 and text[a - 1].isspace()
        labels["punctuation"][t] = bool(nonws) and not any(_is_ident(piece[k]) for k in nonws)
        labels["attribute"][t] = (
            (ch.isalpha() or ch == "_") and a >= 2 and text[a - 1] == "."
            and (_is_ident(text[a - 2]) or text[a - 2] in ")]")
        )
        labels["newline"][t] = "\n" in piece
    return labels, valid


def token_spans(ids: Iterable[int], tokenizer, cache: dict | None = None) -> tuple[str, list[tuple[int, int]]]:
    """(text, spans): the decoded text of token ids `ids` and each token's character span in it.

    The text is `tokenizer.decode(ids)` (special tokens kept, no clean-up of spaces). Fast path: when the
    per-token decodes concatenate to that text, spans are their cumulative lengths. Otherwise (e.g.
    SentencePiece decoders that drop a leading space, or bytes of a multi-byte character split over
    tokens) span t ends at len(decode(ids[:t+1])) (made non-decreasing and clipped to the text): a token
    whose decode adds nothing gets an empty span. `cache` maps id -> decoded piece across calls.
    """
    ids = [int(i) for i in ids]
    kw = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    text = tokenizer.decode(ids, **kw)
    cache = {} if cache is None else cache
    pieces = []
    for i in ids:
        p = cache.get(i)
        if p is None:
            p = cache[i] = tokenizer.decode([i], **kw)
        pieces.append(p)
    if "".join(pieces) == text:
        ends = np.cumsum([len(p) for p in pieces]).tolist()
    else:
        ends, last = [], 0
        for t in range(len(ids)):
            last = min(max(last, len(tokenizer.decode(ids[: t + 1], **kw))), len(text))
            ends.append(last)
        ends[-1] = len(text)
    starts = [0, *ends[:-1]]
    return text, [(int(s), int(e)) for s, e in zip(starts, ends, strict=True)]


def token_task_labels(
    sequences: torch.Tensor, tokenizer, skip_positions: int = 1
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Task labels for the eval tokens of packed sequences.

    Args:
        sequences: int64 [n_seq, T] token ids (position 0 = BOS).
        tokenizer: the LM's tokenizer (HF).
        skip_positions: leading positions that are not eval tokens; the context text is the decode of
            positions >= skip_positions.

    Returns:
        (labels, valid): labels maps task -> bool tensor [n_seq * (T - skip_positions)] in row-major
        (sequence, position) order, the order `evaluate` adds tokens to its accumulators; valid bool [same].
    """
    if sequences.ndim != 2:
        raise ValueError(f"sequences must be [n_seq, T], got shape {tuple(sequences.shape)}")
    cache: dict = {}
    all_labels = {t: [] for t in TASKS}
    all_valid = []
    for row in sequences[:, skip_positions:].tolist():
        text, spans = token_spans(row, tokenizer, cache)
        lab, val = label_spans(text, spans)
        for t in TASKS:
            all_labels[t].append(lab[t])
        all_valid.append(val)
    return (
        {t: torch.from_numpy(np.concatenate(v)) for t, v in all_labels.items()},
        torch.from_numpy(np.concatenate(all_valid)),
    )


# ------------------------------------------------------------------------------------- fitting
@torch.no_grad()
def fit_logistic_1d(
    rows: torch.Tensor, latents: torch.Tensor, values: torch.Tensor, y: torch.Tensor, d_sae: int, *,
    l2: float = 1e-4, max_iter: int = 100, tol: float = 1e-10,
) -> dict[str, torch.Tensor]:
    """Per-latent 1-D logistic regression of labels `y` on each latent's activation (probe loss,
    Gao et al. 2024 sec. 4.3), all latents at once (vectorised Newton with line search, float64).

    Args:
        rows: int64 [nnz] token index (0 .. N-1) of each non-zero activation.
        latents: int64 [nnz] latent id (0 .. d_sae-1) of each.
        values: float [nnz] activations (non-zero; their sign is kept).
        y: labels [N] (bool or 0/1); N is the number of tokens, zeros included.
        d_sae: number of latents.
        l2: L2 coefficient on (a, b) with a the coefficient of the activation scaled to max |z| = 1,
            added to the SUMMED loss.
        max_iter: Newton iterations at most; tol: stop once every latent's Newton decrement is below it.

    Returns:
        dict of float64 CPU tensors [d_sae]: `loss` (mean BCE in nats of the fitted probe, unpenalised),
        `a` (coefficient per unit of activation), `b` (intercept), `fired` (tokens with z != 0).

    Raises:
        ValueError: shape mismatch, an index out of range, or y not binary.
    """
    n = int(y.shape[0])
    yd = _check_logistic_inputs(rows, latents, values, y, d_sae)
    rows, lat = rows.cpu().long(), latents.cpu().long()
    v = values.cpu().to(torch.float64)
    scale = torch.zeros(d_sae, dtype=torch.float64).scatter_reduce(0, lat, v.abs(), "amax", include_self=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    prob = _LogisticProblem(lat, v / scale[lat], yd, rows, d_sae, l2)
    p_mean = min(max(float(yd.mean()), 1e-12), 1 - 1e-12) if n else 0.5
    a = torch.zeros(d_sae, dtype=torch.float64)
    b = torch.full((d_sae,), math.log(p_mean / (1 - p_mean)), dtype=torch.float64)
    _, f = prob.objective(a, b)
    for _ in range(max_iter):
        da, db, slope = prob.newton_direction(a, b)
        if float((-slope).max()) < tol:
            break
        step = prob.line_search(a, b, da, db, slope, f)
        a = a + step * da
        b = b + step * db
        _, f = prob.objective(a, b)
    data, _ = prob.objective(a, b)
    return {"loss": data / max(n, 1), "a": a / scale, "b": b, "fired": prob.fired}


def _check_logistic_inputs(rows: torch.Tensor, latents: torch.Tensor, values: torch.Tensor, y: torch.Tensor,
                           d_sae: int) -> torch.Tensor:
    """The labels y as float64 on the CPU; ValueError (`fit_logistic_1d`'s cases) naming the problem."""
    n = int(y.shape[0])
    if not (rows.shape == latents.shape == values.shape) or rows.ndim != 1:
        raise ValueError(
            f"rows, latents, values must be 1-D of one length; got {tuple(rows.shape)}, "
            f"{tuple(latents.shape)}, {tuple(values.shape)}"
        )
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
        raise ValueError(f"token index out of range [0, {n})")
    if latents.numel() and (int(latents.min()) < 0 or int(latents.max()) >= d_sae):
        raise ValueError(f"latent index out of range [0, {d_sae})")
    yd = y.to(torch.float64).cpu()
    if not torch.all((yd == 0) | (yd == 1)):
        raise ValueError("y must be binary (0/1 or bool)")
    return yd


class _LogisticProblem:
    """The d_sae penalised 1-D logistic regressions of `fit_logistic_1d`, float64 on the CPU: the
    scaled activations s [nnz] of latents lat [nnz] at tokens with labels yr [nnz]; per latent,
    `fired` tokens with a non-zero activation, n0 tokens where it is 0 and y0 positives among them
    (the zero tokens enter in closed form: u = b there)."""

    def __init__(self, lat: torch.Tensor, s: torch.Tensor, yd: torch.Tensor, rows: torch.Tensor, d_sae: int,
                 l2: float) -> None:
        self.lat, self.s, self.yr, self.l2, self.d_sae = lat, s, yd[rows], l2, d_sae
        self.zeros = torch.zeros(d_sae, dtype=torch.float64)
        self.fired = self.seg(torch.ones_like(s))
        self.n0 = int(yd.shape[0]) - self.fired  # tokens where the latent is 0
        self.y0 = float(yd.sum()) - self.seg(self.yr)  # positives among them

    def seg(self, x: torch.Tensor) -> torch.Tensor:
        """Per-latent sums [d_sae] of the per-entry values x [nnz]."""
        return self.zeros.index_add(0, self.lat, x)

    def objective(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed BCE, summed BCE + 0.5*l2*(a^2 + b^2)) per latent, [d_sae] each."""
        u = a[self.lat] * self.s + b[self.lat]
        data = self.seg(F.softplus(u) - self.yr * u) + self.n0 * F.softplus(b) - self.y0 * b
        return data, data + 0.5 * self.l2 * (a * a + b * b)

    def newton_direction(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The Newton direction (da, db) of every latent's penalised loss (2x2 Hessian, solved in
        closed form) and its directional derivative `slope` (< 0: the Hessian is positive definite)."""
        s, l2 = self.s, self.l2
        p = torch.sigmoid(a[self.lat] * s + b[self.lat])
        r = p - self.yr
        w = p * (1 - p)
        p0 = torch.sigmoid(b)
        ga = self.seg(r * s) + l2 * a
        gb = self.seg(r) + self.n0 * p0 - self.y0 + l2 * b
        haa = self.seg(w * s * s) + l2
        hab = self.seg(w * s)
        hbb = self.seg(w) + self.n0 * p0 * (1 - p0) + l2
        det = haa * hbb - hab * hab
        da = -(hbb * ga - hab * gb) / det
        db = -(haa * gb - hab * ga) / det
        return da, db, ga * da + gb * db

    def line_search(self, a: torch.Tensor, b: torch.Tensor, da: torch.Tensor, db: torch.Tensor,
                    slope: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """Per-latent backtracking step [d_sae] (1, halved up to 40 times) meeting the Armijo condition
        f_new <= f + 1e-4 * step * slope; 0 where no decrease was found (the latent stays)."""
        step = torch.ones(self.d_sae, dtype=torch.float64)
        todo = torch.ones(self.d_sae, dtype=torch.bool)
        for _ls in range(40):
            _, f_new = self.objective(a + step * da, b + step * db)
            ok = f_new <= f + 1e-4 * step * slope
            todo = todo & ~ok
            if not bool(todo.any()):
                break
            step = torch.where(todo, step * 0.5, step)
        return torch.where(todo, torch.zeros_like(step), step)


def _entropy(p: float) -> float:
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def probe_loss(
    codes: LatentCodes, labels: dict[str, torch.Tensor], valid: torch.Tensor | None = None, *,
    min_count: int = 20, l2: float = 1e-4, max_iter: int = 100,
) -> dict[str, Any]:
    """Probe loss of an SAE's latents on binary token tasks (Gao et al. 2024 sec. 4.3).

    Args:
        codes: the SAE's activations on N tokens (`LatentCodes`, n_tokens = N).
        labels: task name -> bool tensor [N] (e.g. from `token_task_labels`).
        valid: optional bool [N]; only tokens with valid=True are used.
        min_count: a task is skipped when it has fewer than min_count positives or negatives among the
            used tokens (the reason is recorded).
        l2, max_iter: see `fit_logistic_1d`.

    Returns:
        {"probe_loss": mean best-latent BCE over the tasks not skipped (nats; None if all skipped),
         "probe_baseline": mean label entropy over the same tasks (nats),
         "probe_loss_per_task": {task: {"loss", "baseline", "best_latent", "positives", "n"}},
         "probe_tasks_skipped": {task: reason}, "probe_min_count": min_count}.

    Raises:
        ValueError: a label tensor or `valid` whose length is not codes.n_tokens; min_count < 1.
    """
    if int(min_count) < 1:
        raise ValueError(f"probe_min_count must be >= 1, got {min_count}")
    n_all = codes.n_tokens
    valid, (rows_v, lat_v, val_v) = _valid_codes(codes, valid)
    per_task: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for task, y in labels.items():
        if y.shape[0] != n_all:
            raise ValueError(f"labels[{task!r}] has {y.shape[0]} entries but the codes hold {n_all} tokens")
        yv = y.cpu().bool()[valid]
        n = int(yv.shape[0])
        pos = int(yv.sum())
        if pos < min_count or n - pos < min_count:
            skipped[task] = f"{pos} positives and {n - pos} negatives among {n} tokens (< probe_min_count={min_count})"
            continue
        fit = fit_logistic_1d(rows_v, lat_v, val_v, yv, codes.d_sae, l2=l2, max_iter=max_iter)
        best = int(torch.argmin(fit["loss"]))
        per_task[task] = {"loss": float(fit["loss"][best]), "baseline": _entropy(pos / n), "best_latent": best,
                          "positives": pos, "n": n}
    losses = [v["loss"] for v in per_task.values()]
    return {
        "probe_loss": float(np.mean(losses)) if losses else None,
        "probe_baseline": float(np.mean([v["baseline"] for v in per_task.values()])) if losses else None,
        "probe_loss_per_task": per_task,
        "probe_tasks_skipped": skipped,
        "probe_min_count": int(min_count),
    }


def _valid_codes(codes: LatentCodes, valid: torch.Tensor | None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(valid as a CPU bool [N], the codes' (rows, latents, values) on the valid tokens, rows
    renumbered 0.. over them); ValueError when valid's length is not codes.n_tokens."""
    n_all = codes.n_tokens
    rows, lat, val = codes.tensors()
    if valid is None:
        valid = torch.ones(n_all, dtype=torch.bool)
    valid = valid.cpu().bool()
    if valid.shape[0] != n_all:
        raise ValueError(f"valid has {valid.shape[0]} entries but the codes hold {n_all} tokens")
    new_index = torch.cumsum(valid.long(), 0) - 1
    keep = valid[rows]
    return valid, (new_index[rows[keep]], lat[keep], val[keep])
