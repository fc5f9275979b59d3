"""`LMStream`: training batches computed by the LM on the fly, with no activation store (`sae-train source=lm`).

Order (a pure function of the seed and the position, so a resume is exact without saving the buffer):

* The packed train-sequence stream is the harvester's (`text.packed_sequences`, or a `sae-pretokenize`
  dataset): sequence i gives text rows [i*(ctx_len-1), (i+1)*(ctx_len-1)), position 0 (BOS) never used. When
  the text ends it starts again from its first document (the stream is endless).
* With pretokenised sequences (random access), the stream visits them in a random order instead: its j-th
  sequence is sequence ``perm_e[j % n]`` of the n, perm_e = ``np.random.default_rng([seed, e, _ORDER_KEY])
  .permutation(n)`` for pass e = j // n, so a window is a uniform sample of the text (as a store harvested
  with row_order "shuffled_global" is), not a stretch of consecutive documents.
* Window w is stream sequences [w*S, (w+1)*S), S = ceil(buffer_tokens / (ctx_len-1)): the shuffle buffer. Its
  R = S*(ctx_len-1) rows are permuted with ``np.random.default_rng([seed, w])`` and cut into R // b
  batches of b = batch_tokens // dp_size rows; the last R % b rows of a window are not used.
* dp rank r takes windows r, r + dp_size, r + 2 dp_size, ...; its local batch j is batch j % (R // b) of its
  window number j // (R // b). The global batch j is the union of the ranks' local batches j.

The ranks of a tensor-parallel group need the same batches: one of them (`share_src`) runs the LM and
broadcasts each batch over the group (`share_group`), the others run no LM. Given `load_lm` (and the LM's
weightless structure as `model`), only the ranks that run the LM load it: the others hold no weights.

A background thread runs the LM over the next window while the trainer consumes the current one: memory is
two windows of R x d_in in `dtype` on `device`, plus the LM. `state_dict` holds the position (batches served,
the window's first sequence, the batch inside the window); `load_state_dict` recomputes that window with the
LM and continues there, so a resumed run neither repeats nor skips text. The recomputed activations equal
the first computation's wherever the LM's forward is deterministic (bit for bit on CPU).
"""

from __future__ import annotations

import math
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from sae_dist.parallel.comm import broadcast_from, broadcast_status
from sae_dist.store.reader import check_mode, normalize, worker_result

__all__ = ["LMStream"]

_STATE_KIND = "lm_stream"
_STATE_KEYS = ("seed", "batch_tokens", "dp_size", "window_sequences", "ctx_len", "sequence_order")
_ORDER_KEY = 0x5EC  # with (seed, pass): the permutation of the pretokenised sequences in each pass


class LMStream:
    """Endless iterator of float32 activation batches ``[batch_tokens // dp_size, d_in]`` on ``device``,
    computed by `model` at `hook_name` over packed text (order: module docstring).

    Args:
        model, tokenizer: the causal LM (eval mode; its own device) and its tokenizer; or, with `load_lm`, the LM's
            structure without weights (`sae_dist.harvest.lm.load_lm_structure`; tokenizer None), from which every
            rank takes d_in and checks the hook.
        load_lm: None, or a function returning the loaded (model, tokenizer) (e.g. a `functools.partial` of
            `load_lm`), called in the constructor only on a rank that runs the LM (`computes`): the receiving
            ranks of a `share_group` never load its weights. Under a share_group, `share_src` then tells the
            group (a broadcast) whether its load succeeded, so a failure raises on every rank.
        hook_name: one hook point (`sae_dist.harvest.hooks.resolve_hook`).
        batch_tokens: global batch B (tokens over all dp ranks), divisible by dp_size.
        docs: a callable returning a fresh iterable of document texts (called again when the text ends);
            or `sequences`: random-access packed sequences (`PretokenizedSequences`), read in a random order
            (module docstring).
        ctx_len, eval_fraction: as the harvest's (`data.ctx_len`, `data.eval_fraction`).
        buffer_tokens: rows per shuffle window (rounded up to whole sequences); >= batch_tokens // dp_size.
        lm_batch_size: sequences per LM forward. dtype: "float16" | "bfloat16" | "float32", the buffer's
            dtype (as a harvested store's).
        dp_rank, dp_size, seed, device, normalize: as `ActivationStore`'s ("scalar" is refused: it needs a
            dataset-wide mean norm, which only a store has).
        attrs: extra attributes (e.g. model, dataset) reported in `attrs`.
        max_batches: the local batches the run will take (the trainer passes its steps): no window after the
            one holding the last is computed; None: endless.
        share_group, share_src: a torch.distributed group whose ranks need the same batches (a tensor-parallel
            group) and the global rank in it that runs the LM: it broadcasts each batch to the others, which
            load no window (every rank of the group calls `next` once per step). None: this rank alone.
    Attributes: d_in, attrs, n_tokens (None: endless), scale (None), window_sequences, window_rows,
        batches_per_window, local_batch_tokens, model / tokenizer (on a receiving rank with `load_lm`: the
        structure / None).
    Raises ValueError for bad arguments (naming them; also for a `model` without weights and no `load_lm`);
    what `load_lm` raises on the rank that runs it, RuntimeError naming that rank on the others; during
    iteration HarvestError for non-finite activations (naming the sequences) and ValueError when the text
    holds no train sequence.
    """

    def __init__(self, *, model, tokenizer=None, hook_name: str, batch_tokens: int,
                 docs: Callable[[], Iterable[str]] | None = None, sequences: Sequence | None = None,
                 ctx_len: int = 64, eval_fraction: float = 0.05, buffer_tokens: int = 262_144,
                 lm_batch_size: int = 32, dtype: str = "float16", dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, device="cpu", normalize: str = "layer_norm", attrs: Mapping[str, Any] | None = None,
                 max_batches: int | None = None, share_group=None, share_src: int = 0,
                 load_lm: Callable[[], tuple[Any, Any]] | None = None):
        from sae_dist.harvest.harvester import STORE_DTYPES, lm_d_model
        from sae_dist.harvest.hooks import resolve_hook

        if (docs is None) == (sequences is None):
            raise ValueError("LMStream needs exactly one of docs (a callable giving the texts) or sequences")
        if dtype not in STORE_DTYPES:
            raise ValueError(f"dtype={dtype!r}; valid: {list(STORE_DTYPES)}")
        if batch_tokens < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size or batch_tokens % dp_size:
            raise ValueError(f"batch_tokens={batch_tokens} must be >= 1 and divisible by dp_size={dp_size}, "
                             f"and 0 <= dp_rank={dp_rank} < dp_size")
        self.normalize = check_mode(normalize)
        if self.normalize == "scalar":
            raise ValueError("sae.normalize=scalar needs the mean activation norm of a whole store; with "
                             "source=lm use sae.normalize=layer_norm (the default) or none")
        self.spec = resolve_hook(model, hook_name)  # on the structure too: every rank checks the hook
        self._docs, self._sequences = docs, sequences
        self._pass_order: tuple[int, np.ndarray | None] = (-1, None)  # (pass e, perm_e) of `_shuffled_index`
        self.ctx_len, self.eval_fraction = int(ctx_len), float(eval_fraction)
        self.lm_batch_size, self.dtype = int(lm_batch_size), STORE_DTYPES[dtype]
        self.batch_tokens, self.seed = int(batch_tokens), int(seed)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.device = torch.device(device)
        self.local_batch_tokens = self.batch_tokens // self.dp_size
        body = self.ctx_len - 1
        if buffer_tokens < self.local_batch_tokens:
            raise ValueError(f"stream.buffer_tokens={buffer_tokens} is below the batch of {self.local_batch_tokens} "
                             f"rows per rank: raise stream.buffer_tokens (a few batches or more mixes text better)")
        self.window_sequences = math.ceil(buffer_tokens / body)
        self.window_rows = self.window_sequences * body
        self.batches_per_window = self.window_rows // self.local_batch_tokens
        self.d_in = lm_d_model(model)
        self.share_group, self.share_src = share_group, int(share_src)
        #: whether this process runs the LM (False on the receiving ranks of a `share_group`)
        self.computes = share_group is None or torch.distributed.get_rank() == self.share_src
        self._take_lm(model, tokenizer, load_lm)
        self.attrs = {"d_in": self.d_in, "hook_name": self.spec.name, "ctx_len": self.ctx_len,
                      "eval_fraction": self.eval_fraction, **dict(attrs or {})}
        self.n_tokens, self.scale = None, None
        self.max_batches = None if max_batches is None else int(max_batches)
        self.batches = 0  # local batches served
        self._window: torch.Tensor | None = None
        self._in_window = 0
        self._thread = self._queue = self._stop = self._slots = None

    def _take_lm(self, model, tokenizer, load_lm) -> None:
        """Set model, tokenizer and spec: those given, or on a rank that runs the LM what `load_lm()` returns (its
        width checked against the structure's d_in), agreed over the share_group (class docstring)."""
        from sae_dist.harvest.harvester import lm_d_model
        from sae_dist.harvest.hooks import resolve_hook

        self.model, self.tokenizer = model, tokenizer
        if load_lm is None:
            if any(p.is_meta for p in model.parameters()):
                raise ValueError("LMStream: model has no weights (it is on the meta device, e.g. load_lm_structure's): "
                                 "give the loaded LM, or give load_lm as well (it loads the LM where it runs)")
            return
        error = None
        if self.computes:
            try:
                self.model, self.tokenizer = load_lm()
                if lm_d_model(self.model) != self.d_in:
                    raise ValueError(f"load_lm gave an LM of width {lm_d_model(self.model)} but its structure (model) "
                                     f"has d_in={self.d_in}: give the structure of the same LM")
                self.spec = resolve_hook(self.model, self.spec.name)  # the loaded LM's module
            except Exception as e:  # noqa: BLE001 (raised below, after the group knows)
                error = e
        if self.share_group is not None:
            broadcast_status(error is not None, self.device, self.share_group, self.share_src,
                             "LMStream: loading the LM")
        if error is not None:
            raise error

    # ------------------------------------------------------------------ order

    def window_of(self, batches: int) -> int:
        """The global window index holding this rank's local batch number `batches`."""
        return self.dp_rank + self.dp_size * (batches // self.batches_per_window)

    def _text_from(self, start: int) -> Iterator[list[int]]:
        """Packed train sequences from global sequence index `start` on, the text restarted at its end."""
        from sae_dist.harvest.text import packed_sequences

        i = 0
        while True:
            got = 0
            for seq in packed_sequences(self._docs(), self.tokenizer, self.ctx_len,
                                        eval_fraction=self.eval_fraction, split="train"):
                got += 1
                if i >= start:
                    yield seq
                i += 1
            if got == 0:
                raise ValueError(f"the text holds no train sequence of ctx_len={self.ctx_len} tokens: use longer "
                                 "documents, a smaller data.ctx_len or a smaller data.eval_fraction")

    def _windows(self, first: int) -> Iterator[tuple[int, list[list[int]]]]:
        """(w, the S sequences of window w) for this rank's windows from window `first` on."""
        S, w = self.window_sequences, first
        if self._sequences is not None:
            while True:
                yield w, [self._sequences[self._shuffled_index(j)] for j in range(w * S, (w + 1) * S)]
                w += self.dp_size
        text = self._text_from(first * S)
        while True:
            yield w, [next(text) for _ in range(S)]
            for _ in range((self.dp_size - 1) * S):  # the other ranks' windows
                next(text)
            w += self.dp_size

    def _shuffled_index(self, j: int) -> int:
        """The pretokenised sequence at stream position j: perm_e[j % n] of pass e = j // n (module docstring)."""
        e, p = divmod(j, len(self._sequences))
        if self._pass_order[0] != e:
            self._pass_order = (e, np.random.default_rng([self.seed, e, _ORDER_KEY]).permutation(len(self._sequences)))
        return int(self._pass_order[1][p])

    @property
    def sequence_order(self) -> str:
        """"shuffled" (pretokenised sequences in a random order per pass) or "text" (the packed text in order)."""
        return "text" if self._sequences is None else "shuffled"

    @torch.inference_mode()
    def window_rows_of(self, w: int, seqs: list[list[int]],
                       stop: threading.Event | None = None) -> torch.Tensor | None:
        """Window w's rows [R, d_in] in the buffer dtype on `device`, permuted (`default_rng([seed, w])`);
        None when `stop` is set between two LM forwards. HarvestError naming the sequences when an activation
        is NaN/Inf."""
        from sae_dist.harvest.harvester import HarvestError
        from sae_dist.harvest.hooks import run_to_hooks

        # row r of the window (sequence by sequence, positions 1..) goes straight to its shuffled slot: the
        # window is one [R, d_in] buffer, never a list of parts plus their concatenation plus a permuted copy
        n_rows = sum(len(s) - 1 for s in seqs)
        perm = torch.from_numpy(np.random.default_rng([self.seed, w]).permutation(n_rows))
        slot = torch.empty_like(perm)
        slot[perm] = torch.arange(n_rows)
        slot = slot.to(self.device)
        out = torch.empty(n_rows, self.d_in, dtype=self.dtype, device=self.device)
        r = 0
        for i in range(0, len(seqs), self.lm_batch_size):
            if stop is not None and stop.is_set():
                return None
            ids = torch.tensor(seqs[i : i + self.lm_batch_size], dtype=torch.long)  # run_to_hooks moves them
            a = run_to_hooks(self.model, [self.spec], ids)[0][:, 1:, :].to(self.device, self.dtype)
            # checked in the buffer dtype: a bf16 activation beyond float16's range turns Inf in the cast
            if not bool(torch.isfinite(a).all()):
                first = w * self.window_sequences + i
                raise HarvestError(f"non-finite activations at hook {self.spec.name!r} in stream sequences "
                                   f"[{first}, {first + len(ids)}) (window {w}) in {self.dtype}; try "
                                   "model.dtype=float32 (or harvest.dtype=float32)")
            a = a.reshape(-1, self.d_in)
            out.index_copy_(0, slot[r : r + len(a)], a)
            r += len(a)
        return out

    # ------------------------------------------------------------------ producer thread

    def _produce(self, first: int) -> None:
        """The producer thread: this rank's windows from `first` on, up to the one holding batch `max_batches`
        - 1, each computed once a buffer slot is free (two windows in memory)."""
        last = None if self.max_batches is None else self.window_of(max(self.max_batches - 1, 0))
        try:
            for w, seqs in self._windows(first):
                if last is not None and w > last:
                    return
                while not self._slots.acquire(timeout=0.1):
                    if self._stop.is_set():
                        return
                rows = self.window_rows_of(w, seqs, self._stop)
                if rows is None:
                    return
                self._queue.put(("ok", rows))
        except BaseException as e:  # re-raised by the consumer
            self._queue.put(("error", e))

    def _start(self) -> None:
        self._queue, self._stop, self._slots = queue.Queue(), threading.Event(), threading.Semaphore(2)
        self._thread = threading.Thread(target=self._produce, args=(self.window_of(self.batches),),
                                        name=f"LMStream-r{self.dp_rank}", daemon=True)
        self._thread.start()

    def _next_window(self) -> None:
        if self._thread is None:
            self._start()
        if self._window is not None:
            self._window = None
            self._slots.release()  # the producer may compute the window after the queued one
        self._window = worker_result(self._queue, self._thread, self.close, f"LMStream: no window after batch "
                                     f"{self.batches} (max_batches={self.max_batches}): more batches than announced")
        self._in_window = self.batches % self.batches_per_window

    # ------------------------------------------------------------------ iteration

    def __iter__(self):
        return self

    def _rows(self, lo: int, hi: int, next_window: bool) -> torch.Tensor:
        """Rows [lo, hi) of the current window (of the next one first when `next_window`), float32 and
        normalised; with a `share_group` computed by `share_src` and broadcast to the group in the buffer
        dtype (`broadcast_from`: an LM error on share_src makes the other ranks raise too)."""
        def window_rows() -> torch.Tensor:
            if next_window:
                self._next_window()
            return self._window[lo:hi]

        if self.share_group is None:
            x = window_rows()
        else:
            x = broadcast_from(window_rows if self.computes else None, (hi - lo, self.d_in), self.dtype,
                               self.device, self.share_group, self.share_src, "LMStream: computing a batch from the LM")
        return normalize(x.float(), self.normalize)[0]

    def __next__(self) -> torch.Tensor:
        """The next float32 batch [batch_tokens // dp_size, d_in] on `device`, normalised."""
        b, j = self.local_batch_tokens, self.batches % self.batches_per_window
        x = self._rows(j * b, (j + 1) * b, self._window is None or self._in_window == self.batches_per_window)
        self._in_window = j + 1
        self.batches += 1
        return x

    def sample_rows(self, n: int) -> torch.Tensor:
        """The first min(n, R) rows of the current window, float32 and normalised (the b_dec sample of a new
        run); the iteration is not advanced."""
        return self._rows(0, min(int(n), self.window_rows), self._window is None)

    def fingerprint(self) -> dict:
        """What identifies the stream's data for a run's identity (JSON-ready)."""
        return {"source": "lm", **{k: self.attrs.get(k) for k in ("model", "hook_name", "dataset", "ctx_len",
                                                                  "eval_fraction", "d_in")},
                "pretokenized": getattr(self._sequences, "path", None), "window_sequences": self.window_sequences}

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict:
        """The position of the next batch: batches served, the window's first sequence and the batch inside it."""
        w = self.window_of(self.batches)
        return {"kind": _STATE_KIND, "version": 2, "batches": self.batches, "window": w,
                "first_sequence": w * self.window_sequences, "batch_in_window": self.batches % self.batches_per_window,
                "tokens_seen": self.batches * self.batch_tokens, "seed": self.seed, "batch_tokens": self.batch_tokens,
                "dp_size": self.dp_size, "window_sequences": self.window_sequences, "ctx_len": self.ctx_len,
                "sequence_order": self.sequence_order}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a `state_dict()`: the LM recomputes the saved window. ValueError when the state is a
        store reader's, or seed, batch_tokens, dp_size, window_sequences, ctx_len or sequence_order differ
        (naming the value)."""
        if state.get("kind") != _STATE_KIND:
            raise ValueError("cannot resume: the checkpoint was trained from an activation store, not source=lm; "
                             "use the same source or a new run_dir")
        state = {"sequence_order": "text", **state}  # version 1: the pretokenised sequences were read in order
        for key in _STATE_KEYS:
            if state[key] != getattr(self, key):
                hint = {"window_sequences": " (stream.buffer_tokens)",
                        "sequence_order": " (data.pretokenized gives the shuffled order; a checkpoint from before "
                                          "2026-12-07 read pretokenised sequences in text order: start a new "
                                          "run_dir)"}.get(key, "")
                raise ValueError(f"cannot resume: saved {key}={state[key]!r} but this stream has {key}="
                                 f"{getattr(self, key)!r}{hint}; use the same value (the data order depends on it)")
        self.close()
        self.batches = int(state["batches"])

    def close(self) -> None:
        """Stop the producer thread (idempotent); iterating again restarts it at the current position."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=60)
        self._thread = self._queue = self._stop = self._slots = None
        self._window = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
