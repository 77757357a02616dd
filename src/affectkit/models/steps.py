"""Incremental state of causal layers: what a layer keeps between utterances so that one forward can also step.

A causal layer's forward takes an optional state.  Without one it runs on whole padded dialogues (training,
evaluation); with one it runs on the next utterance of ``B`` live sessions, writes what later utterances
will need (an attention layer its keys and values, the graph its node rows) and reads what earlier ones
left.  The rows live in :class:`Ring` s: the last ``capacity`` positions of each session, row of position
``p`` at slot ``p % capacity`` (a true ring buffer, nothing is ever shifted or copied), or, with no window,
a buffer that grows by doubling.  Which stored rows a new utterance may read is decided by
:func:`in_window`, the same predicate that builds the batch model's banded causal mask.

A step may also carry a *chunk* of ``count`` consecutive utterances per session (a prefill: rebuilding a
session from its log in a few forwards instead of one per utterance).  The chunk's queries then read the
stored rows *and* the chunk's own rows (the stored ones as they were before the chunk), masked by the same
:func:`in_window`; afterwards the ring keeps the chunk's last ``capacity`` rows.  So a chunk of any size
computes exactly what as many single steps would.

In the spirit of Hugging Face's ``past_key_values`` (whose forward takes one token or a whole prompt) and
fairseq's incremental state, written for a conversation: sessions at different positions in one batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["StepState", "Ring", "in_window"]

_EMPTY = -1  # slot position of a slot never written


def in_window(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """The one sliding-window predicate: the utterance at ``k_pos`` is visible from ``q_pos`` iff it is not
    later and, with a ``window`` W, one of the W latest (itself and W - 1 earlier).  ``window`` None: every
    earlier utterance (plain causal).  Used for the training mask, the cache contents and the graph window."""
    ok = k_pos <= q_pos
    if window is not None:
        ok = ok & (q_pos - k_pos < window)
    return ok


def _grown(capacity: int, pos: int) -> int:
    """The capacity after doubling (from at least 16) until position ``pos`` fits; in closed form, so no
    bug (or mutant) of it can loop forever."""
    if capacity > pos:
        return capacity
    base = max(16, 2 * capacity)
    return base << (pos // base).bit_length()


class Ring:
    """Rows of the latest positions of ``B`` sessions for a group of layers sharing one window.

    ``window``: how many latest positions a step may read (None: all).  ``capacity``: slots per session
    (None: grow by doubling, the price of ``window`` None); ``capacity - window`` extra slots let a
    session rewind that many utterances exactly.  ``slot_pos`` (B, capacity) holds the position stored in
    each slot (-1: empty); ``rows[key]`` (B, capacity, D) one buffer per layer, allocated on first write.
    """

    # What a step works with, set by begin() (nothing reads them before): where the step's rows go (index
    # into (B, capacity)), the mask of what it reads, its utterances per session (> 1: a chunk), how many of
    # a chunk's rows the ring keeps, and per key a chunk's stored rows then its own (B, capacity + count, D).
    _where: tuple[torch.Tensor, torch.Tensor]
    _mask: torch.Tensor | None
    count: int
    _keep: int
    _ext: dict[str, torch.Tensor]

    def __init__(self, batch: int, window: int | None, capacity: int | None, device: torch.device) -> None:
        self.window, self.fixed = window, capacity is not None
        cap = capacity if capacity is not None else 16
        self.slot_pos = torch.full((batch, cap), _EMPTY, dtype=torch.long, device=device)
        self.rows: dict[str, torch.Tensor] = {}

    @property
    def capacity(self) -> int:
        return self.slot_pos.shape[1]

    def nbytes(self) -> int:
        return self.slot_pos.nbytes + sum(t.nbytes for t in self.rows.values())

    def begin(self, pos: torch.Tensor, count: int = 1) -> None:
        """Start a step at positions ``pos`` (B,): make room, claim slot ``pos % capacity`` (it held a
        position no later step can read) and work out which slots the step reads.  ``count`` > 1: a chunk of
        positions ``pos .. pos + count - 1`` per session (see :meth:`_begin_chunk`)."""
        if not self.fixed:
            top = int(pos.max()) + count - 1
            if top >= self.capacity:
                self._resize(_grown(self.capacity, top))
        self.count, self._ext = count, {}
        if count > 1:
            self._begin_chunk(pos, count)
            return
        batch = torch.arange(pos.shape[0], device=pos.device)
        self._where = (batch, pos % self.capacity)
        self.slot_pos.index_put_(self._where, pos)
        visible = in_window(pos[:, None], self.slot_pos, self.window) & (self.slot_pos >= 0)
        self._mask = None if bool(visible.all()) else visible[:, None, None, :]

    def _begin_chunk(self, pos: torch.Tensor, count: int) -> None:
        """A chunk's queries read the stored rows of positions before ``pos`` (as they are now) followed by
        the chunk's own rows: the mask (B, 1, count, capacity + count) is :func:`in_window` over those
        positions.  The ring then keeps the chunk's last ``min(count, capacity)`` positions."""
        batch, cap = pos.shape[0], self.capacity
        new = pos[:, None] + torch.arange(count, device=pos.device)  # (B, C)
        stored = (self.slot_pos >= 0) & (self.slot_pos < pos[:, None])  # rows past ``pos`` are stale (rewind)
        k_pos = torch.cat([self.slot_pos, new], 1)
        ok = torch.cat([stored, torch.ones_like(new, dtype=torch.bool)], 1)
        self._mask = (in_window(new[:, :, None], k_pos[:, None, :], self.window) & ok[:, None, :])[:, None]
        self._keep = keep = min(count, cap)
        last = new[:, count - keep:]
        self._where = (torch.arange(batch, device=pos.device)[:, None].expand(batch, keep), last % cap)
        self.slot_pos.index_put_(self._where, last)

    def end(self) -> None:
        """Drop what the step kept for its own use (a chunk's joined rows)."""
        self._ext = {}

    def _resize(self, capacity: int) -> None:
        old = self.capacity
        pad = capacity - old
        self.slot_pos = torch.cat([self.slot_pos, self.slot_pos.new_full((self.slot_pos.shape[0], pad), _EMPTY)], 1)
        for key, buf in self.rows.items():
            self.rows[key] = torch.cat([buf, buf.new_zeros((buf.shape[0], pad, *buf.shape[2:]))], 1)

    def write(self, key: str, rows: torch.Tensor) -> torch.Tensor:
        """Store ``rows`` (B, count, D) of this step under ``key``; return what the step reads: the whole
        buffer (B, capacity, D), or for a chunk the stored rows then the chunk's (B, capacity + count, D)."""
        buf = self.rows.get(key)
        if buf is None:
            buf = self.rows[key] = rows.new_zeros((rows.shape[0], self.capacity, *rows.shape[2:]))
        if self.count == 1:
            return buf.index_put_(self._where, rows[:, 0])
        joined = self._ext[key] = torch.cat([buf, rows], 1)  # a copy: read before the ring is overwritten
        buf.index_put_(self._where, rows[:, self.count - self._keep:])
        return joined

    def mask(self) -> torch.Tensor | None:
        """Attention mask of what this step reads: (B, 1, 1, capacity) for one utterance (None when it reads
        every slot), (B, 1, count, capacity + count) for a chunk."""
        return self._mask

    def window_rows(self, key: str, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of ``key`` this step's utterances read, in position order, sessions packed one after
        another (sum w, D), and the count per session ``w`` (B,): positions ``pos + count - w .. pos +
        count - 1``, i.e. up to ``window - 1`` stored ones before ``pos`` and the step's own ``count``."""
        assert self.window is not None
        c = self.count
        w = torch.clamp(pos, max=self.window - 1) + c
        sessions = torch.repeat_interleave(w)  # session i repeated w[i] times
        ends = torch.cumsum(w, 0)
        within = torch.arange(int(ends[-1]), device=pos.device) - (ends - w)[sessions]
        q = (pos + c - w)[sessions].add_(within)  # the positions read
        if c == 1:
            return self.rows[key][sessions, q % self.capacity], w
        start = pos[sessions]
        index = torch.where(q < start, q % self.capacity, self.capacity + q - start)
        return self._ext[key][sessions, index], w

    def holds(self, positions: range) -> bool:
        """Whether every session still holds the rows of ``positions`` (checked before a rewind)."""
        if not len(positions):
            return True
        p = torch.arange(positions.start, positions.stop, device=self.slot_pos.device)
        if not self.fixed and positions.stop > self.capacity:
            return False
        return bool((self.slot_pos[:, p % self.capacity] == p).all())

    def shift(self, offset: int) -> None:
        """Relabel every stored position ``p`` as ``p + offset`` (slot ``p % capacity`` moves to
        ``(p + offset) % capacity``): a state built for a conversation's tail, as if it started at 0,
        becomes the state at its true positions.  Only fixed rings can shift."""
        if offset == 0:
            return
        assert self.fixed, "a ring without a window holds every position: nothing to relabel"
        r = offset % self.capacity
        self.slot_pos = torch.where(self.slot_pos >= 0, self.slot_pos + offset, self.slot_pos).roll(r, 1)
        self.rows = {k: v.roll(r, 1) for k, v in self.rows.items()}

    def needed(self, n: int) -> range:
        """Positions a step at ``n`` reads besides its own."""
        return range(0 if self.window is None else max(0, n - self.window + 1), n)

    @staticmethod
    def stack(rings: Sequence[Ring]) -> Ring:
        """One ring holding the sessions of ``rings`` side by side (copies; grown rings padded)."""
        first = rings[0]
        cap = max(r.capacity for r in rings)
        out = Ring(0, first.window, cap if first.fixed else None, first.slot_pos.device)
        out.slot_pos = torch.cat([torch.nn.functional.pad(r.slot_pos, (0, cap - r.capacity), value=_EMPTY)
                                  for r in rings])
        for key in dict.fromkeys(k for r in rings for k in r.rows):  # a fresh session has no rows yet
            like = next(r.rows[key] for r in rings if key in r.rows)
            out.rows[key] = torch.cat([_pad_rows(r.rows[key], cap) if key in r.rows else
                                       like.new_zeros((r.slot_pos.shape[0], cap, *like.shape[2:])) for r in rings])
        return out

    def take(self, index: int, capacity: int) -> Ring:
        """Session ``index`` alone, in ``capacity`` slots (copies)."""
        out = Ring(0, self.window, capacity if self.fixed else None, self.slot_pos.device)
        out.slot_pos = self.slot_pos[index:index + 1, :capacity].clone()
        out.rows = {k: v[index:index + 1, :capacity].clone() for k, v in self.rows.items()}
        return out


def _pad_rows(buf: torch.Tensor, capacity: int) -> torch.Tensor:
    if buf.shape[1] == capacity:
        return buf
    return torch.cat([buf, buf.new_zeros((buf.shape[0], capacity - buf.shape[1], *buf.shape[2:]))], 1)


class StepState:
    """What a causal model keeps for ``B`` live sessions: their lengths and one :class:`Ring` per window.

    ``rings`` maps a group name (e.g. ``"attention"``, ``"graph"``) to its ring; a layer reads and
    writes its rows under its own key.  A model's forward calls :meth:`begin` first, then its layers
    write; the step is committed by :meth:`advance`, the last thing a successful forward does, so a
    failure half-way leaves the sessions' lengths (and every row any later step reads) as they were.
    """

    count: int  # utterances per session in the current step (> 1: a chunk), set by begin()

    def __init__(self, lengths: torch.Tensor, rings: dict[str, Ring]) -> None:
        self.lengths = lengths
        self.rings = rings

    @property
    def batch(self) -> int:
        return int(self.lengths.shape[0])

    def nbytes(self) -> int:
        """Bytes held by the state (all rings, all sessions)."""
        return sum(r.nbytes() for r in self.rings.values()) + self.lengths.nbytes

    def begin(self, count: int) -> None:
        """Start a step of ``count`` utterances per session (1: a live step; more: a prefill chunk)."""
        self.count = count
        for ring in self.rings.values():
            ring.begin(self.lengths, count)

    def advance(self) -> None:
        self.lengths = self.lengths + self.count
        for ring in self.rings.values():
            ring.end()

    def shift(self, offset: int) -> None:
        """Move the sessions ``offset`` utterances later (see :meth:`Ring.shift`): the state of a tail
        prefilled from position 0 becomes the state at the tail's true positions."""
        self.lengths = self.lengths + offset
        for ring in self.rings.values():
            ring.shift(offset)

    def can_rewind(self, n: int) -> bool:
        """Whether rewinding to length ``n`` is exact: the rows a step at ``n`` reads are all still held."""
        return all(r.holds(r.needed(n)) for r in self.rings.values())

    @staticmethod
    def stack(states: Sequence[StepState]) -> StepState:
        """One state for the sessions of ``states`` side by side (for a batched step)."""
        rings = {k: Ring.stack([s.rings[k] for s in states]) for k in states[0].rings}
        return StepState(torch.cat([s.lengths for s in states]), rings)

    def split(self) -> list[StepState]:
        """The sessions of a stacked state apart again (copies); a grown ring keeps the slots its session
        needs (padding added by :meth:`stack` and rows beyond the session's length are dropped)."""
        out = []
        for i, n in enumerate(self.lengths.tolist()):
            rings = {k: r.take(i, r.capacity if r.fixed else min(r.capacity, _grown(16, max(n - 1, 0))))
                     for k, r in self.rings.items()}
            out.append(StepState(self.lengths[i:i + 1].clone(), rings))
        return out
