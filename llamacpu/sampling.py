"""Token sampling: llama.cpp's default sampler chain, vectorized with NumPy.

    params = SamplingParams.from_generation_config(model.metadata["generation"], seed=42)
    sampler = Sampler(params)
    token = sampler.sample(logits, history=ids)

The chain, in llama.cpp's default order:

1. repeat penalty (CTRL / llama.cpp style): for every distinct token among the last
   ``repeat_last_n`` of ``history`` (-1: the whole history, 0: off), a positive logit
   is divided by ``repeat_penalty`` and a negative one multiplied by it;
2. ``temperature == 0``: greedy, the argmax of the penalized logits (ties: the
   lowest id). Nothing below is applied and no random number is drawn;
3. top-k: keep the ``top_k`` largest logits (0: off; ties at the boundary: lowest
   ids first);
4. top-p (nucleus): softmax of the survivors (temperature 1), keep the smallest
   prefix in descending probability whose cumulative probability reaches
   ``top_p`` (1: off; always at least one token);
5. min-p: keep the tokens whose probability is at least ``min_p`` times the largest
   (0: off);
6. temperature: softmax of the survivors' logits divided by ``temperature``;
7. draw one token with a ``numpy.random.Generator`` seeded by ``seed`` (one uniform
   number per sample: the same seed and logits give the same tokens; ``seed=None``
   draws fresh entropy).

Cost on a 128256 vocabulary: top-k uses ``argpartition``; top-p without top-k sorts
only the largest candidates (64, then 8x more until the nucleus is covered), so a
typical step does a few O(vocab) vector passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np

__all__ = ["SamplingParams", "Sampler", "REPEAT_PENALTY_RANGE"]

# repeat_penalty's range: three orders of magnitude either side of 1 (off); llama.cpp's
# users pick 1.0-1.5. Outside it a penalty only pushes logits to extremes, and near 0 the
# division overflows (1e-320 made logits inf, and sampling failed on their NaN softmax).
REPEAT_PENALTY_RANGE = (1e-3, 1e3)


def _is_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer))


def _is_real(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating))


@dataclass
class SamplingParams:
    """Sampling settings (llama.cpp's names; defaults are Llama 3.2 Instruct's).

    temperature: >= 0; 0 means greedy (argmax).
    top_k: >= 0; 0 means off.
    top_p: in (0, 1]; 1 means off.
    min_p: in [0, 1); 0 means off.
    repeat_penalty: in [1e-3, 1e3] (REPEAT_PENALTY_RANGE); 1 means off.
    repeat_last_n: how many of the last tokens of the history are penalized;
        0 means off, -1 the whole history.
    seed: None (fresh entropy) or an int >= 0.
    """

    temperature: float = 0.6
    top_k: int = 0
    top_p: float = 0.9
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self):
        def real(name, ok, rule):
            v = getattr(self, name)
            if not _is_real(v) or not math.isfinite(v) or not ok(float(v)):
                raise ValueError(f"SamplingParams.{name} must be {rule}, got {v!r}")
            setattr(self, name, float(v))

        def integer(name, ok, rule):
            v = getattr(self, name)
            if not _is_int(v) or not ok(int(v)):
                raise ValueError(f"SamplingParams.{name} must be {rule}, got {v!r}")
            setattr(self, name, int(v))

        real("temperature", lambda v: v >= 0, "a finite number >= 0 (0 = greedy)")
        integer("top_k", lambda v: v >= 0, "an integer >= 0 (0 = off)")
        real("top_p", lambda v: 0 < v <= 1, "a number in (0, 1] (1 = off)")
        real("min_p", lambda v: 0 <= v < 1, "a number in [0, 1) (0 = off)")
        lo, hi = REPEAT_PENALTY_RANGE
        real("repeat_penalty", lambda v: lo <= v <= hi, f"a number in [{lo:g}, {hi:g}] (1 = off)")
        integer("repeat_last_n", lambda v: v >= -1, "an integer >= -1 (0 = off, -1 = whole history)")
        if self.seed is not None:
            integer("seed", lambda v: v >= 0, "None or an integer >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_generation_config(cls, gen: dict | None, **overrides) -> "SamplingParams":
        """Model defaults, then explicit overrides.

        gen: the model file's ``generation`` metadata (generation_config.json keys):
            ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``
            (-> repeat_penalty); ``do_sample`` False means greedy (temperature 0).
            Missing keys keep this class's defaults.
        overrides: any field of SamplingParams; a value of None means "use the default".
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown sampling parameter(s): {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(names))}")
        kw = {}
        gen = gen or {}
        for src, dst in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                         ("min_p", "min_p"), ("repetition_penalty", "repeat_penalty")):
            if gen.get(src) is not None:
                kw[dst] = gen[src]
        if gen.get("do_sample") is False:
            kw["temperature"] = 0.0
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)


class Sampler:
    """Draws tokens from logits with :class:`SamplingParams` (see the module docstring).

    The random generator is created once, from ``params.seed``: successive calls
    continue one stream, so a sampler re-created with the same seed and given the
    same logits repeats its tokens. :meth:`reset` restarts the stream.
    """

    def __init__(self, params: SamplingParams | None = None):
        self.params = params if params is not None else SamplingParams()
        if not isinstance(self.params, SamplingParams):
            raise TypeError("params must be a SamplingParams")
        self.rng = np.random.default_rng(self.params.seed)

    def reset(self, seed: int | None = None) -> None:
        """Restart the random stream (from ``seed``, else from ``params.seed``)."""
        self.rng = np.random.default_rng(self.params.seed if seed is None else seed)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _as_logits(logits) -> np.ndarray:
        x = np.asarray(logits)
        if x.ndim != 1 or x.size == 0:
            raise ValueError(f"logits must be a non-empty 1-D array, got shape {x.shape}")
        if x.dtype.kind not in "fiu":
            raise ValueError(f"logits must be numbers, got dtype {x.dtype}")
        x = x.astype(np.float64)  # a copy: the caller's array is never modified
        mx = x.max()
        if np.isnan(mx):
            raise ValueError("logits contain NaN")
        if mx == np.inf:
            raise ValueError("logits contain +inf")
        if mx == -np.inf:
            raise ValueError("every logit is -inf: no token can be drawn")
        return x

    def apply_penalty(self, x: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """Repeat penalty, in place on the float64 array x (returned)."""
        p = self.params
        if p.repeat_penalty == 1.0 or p.repeat_last_n == 0 or len(history) == 0:
            return x
        h = history if p.repeat_last_n < 0 else history[-p.repeat_last_n:]
        h = np.asarray(h)
        if h.size == 0:
            return x
        if h.dtype.kind not in "iu":
            raise ValueError("history must hold integer token ids")
        if h.min() < 0 or h.max() >= x.size:
            raise ValueError(f"history holds a token id outside [0, {x.size})")
        ids = np.unique(h)
        v = x[ids]
        x[ids] = np.where(v <= 0, v * p.repeat_penalty, v / p.repeat_penalty)
        return x

    @staticmethod
    def _top_k(x: np.ndarray, k: int) -> np.ndarray:
        """Ids of the k largest values of x (1 <= k <= x.size), ties at the boundary
        broken by lowest id; ascending ids above the k-th value, then the ties."""
        n = x.size
        sub = None
        mx = x.max()
        for c in (4.0, 16.0):  # a small superset of the top k, when there is one
            mask = x >= mx - c
            cnt = int(np.count_nonzero(mask))
            if cnt >= k:
                if cnt <= n // 4:
                    sub = np.flatnonzero(mask)
                break
        vals = x if sub is None else x[sub]
        kth = np.partition(vals, vals.size - k)[vals.size - k]
        pos = np.arange(n) if sub is None else sub
        above = pos[vals > kth]
        tied = pos[vals == kth][: k - above.size]
        return np.concatenate([above, tied])

    @staticmethod
    def _nucleus(lg: np.ndarray, top_p: float) -> np.ndarray:
        """Indices into lg of the top-p nucleus: the most likely tokens, in descending
        probability (ties: lowest index first), until their cumulative probability
        reaches top_p; at least one. Returned in a deterministic order (not sorted).

        Only what is needed is sorted: tokens within 8 (then 16, 32) nats of the
        maximum whose mass already reaches top_p hold the whole nucleus; when that set
        is large, a 256-bin histogram of log-probabilities finds the bin where the
        cumulative mass crosses top_p, every more likely bin is kept whole and the
        crossing bin is refined the same way until it is small enough to sort.
        """
        r = lg - lg.max()
        e = np.exp(r)
        target = top_p * float(e.sum())
        small = None
        c = None
        for c_try in (8.0, 16.0, 32.0):
            mask = r >= -c_try
            if float(e[mask].sum()) >= target:
                c = c_try
                if np.count_nonzero(mask) <= 1024:
                    small = np.flatnonzero(mask)
                break
        inner_parts = []
        base = 0.0
        if small is not None:
            cand = small
        else:
            if c is None:  # the nucleus reaches below exp(-32) of the maximum
                c = np.inf
            # Histogram refinement: split the candidates' log-probabilities into 256
            # bins, keep every bin above the one where the cumulative mass crosses
            # the target, and go on with the crossing bin until it is small.
            cand = None                               # None: every token
            while True:
                rr = r if cand is None else r[cand]
                ee = e if cand is None else e[cand]
                hi = float(rr.max())
                fin = rr[rr >= -c] if cand is None else rr
                lo = float(fin.min()) if fin.size else hi
                if (cand is not None and cand.size <= 2048) or not hi - lo > 1e-9:
                    break
                nb = 256
                y = (hi - rr) * (nb / (hi - lo))    # -inf / out of range: clipped to the last bin
                np.minimum(y, nb, out=y)
                bins = y.astype(np.intp)
                mass = base + np.cumsum(np.bincount(bins, weights=ee, minlength=nb + 1))
                bsel = min(int(np.searchsorted(mass, target, side="left")), nb)
                idx = np.flatnonzero(bins < bsel)
                inner_parts.append(idx if cand is None else cand[idx])
                base = float(mass[bsel - 1]) if bsel > 0 else base
                idx = np.flatnonzero(bins == bsel)
                cand = idx if cand is None else cand[idx]
            if cand is None:
                cand = np.arange(r.size)
        inner = np.concatenate(inner_parts) if inner_parts else cand[:0]
        # Sorted by the logits themselves: lg - max can round two different logits
        # to one value (-1e-41 and 0 beside 12), and the tie rule must not see that.
        order = np.lexsort((cand, -lg[cand]))
        ec = e[cand]
        cum = base + np.cumsum(ec[order])
        hit = np.flatnonzero(cum >= target)
        keep = int(hit[0]) + 1 if hit.size else order.size
        if inner.size == 0:
            keep = max(keep, 1)
        return np.concatenate([inner, cand[order[:keep]]])

    # ------------------------------------------------------------------ sampling

    def _filtered(self, logits, history) -> tuple[np.ndarray | None, np.ndarray]:
        """(candidate ids or None for all tokens, unnormalized weights); greedy: one id."""
        p = self.params
        x = self.apply_penalty(self._as_logits(logits), history)
        n = x.size
        if p.temperature == 0:
            return np.array([np.argmax(x)]), np.ones(1)  # first maximum: lowest id on ties

        # candidates: ids and their logits (all tokens when no truncation applies)
        if 0 < p.top_k < n:
            ids = self._top_k(x, p.top_k)
            lg = x[ids]
        else:
            ids = None
            lg = x

        if p.top_p < 1.0:
            sel = self._nucleus(lg, p.top_p)
            ids = sel if ids is None else ids[sel]
            lg = lg[sel]

        if p.min_p > 0.0:
            rel = np.exp(lg - lg.max())          # p / p_max
            mask = rel >= p.min_p
            ids = np.flatnonzero(mask) if ids is None else ids[mask]
            lg = lg[mask]

        return ids, np.exp((lg - lg.max()) / p.temperature)

    def distribution(self, logits: np.ndarray, history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """The distribution :meth:`sample` draws from: (ids, probabilities), after the
        penalty, the truncations and the temperature; tokens outside ``ids`` have
        probability 0. Greedy: the argmax with probability 1. Draws nothing."""
        ids, w = self._filtered(logits, history)
        if ids is None:
            ids = np.arange(w.size)
        return ids, w / w.sum()

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """One token id drawn from ``logits`` (shape (vocab,)), given the ids so far
        (``history``: prompt and generated ids, for the repeat penalty)."""
        ids, w = self._filtered(logits, history)
        if self.params.temperature == 0:
            return int(ids[0])
        cum = np.cumsum(w)
        u = self.rng.random() * cum[-1]
        j = int(np.searchsorted(cum, u, side="right"))
        if j >= cum.size:  # u rounded up to the total
            j = int(np.flatnonzero(w > 0)[-1])
        return int(j if ids is None else ids[j])

    def logprobs(self, logits: np.ndarray, token: int, top_n: int = 0) -> tuple[float, list[tuple[int, float]]]:
        """Log-softmax of the raw logits (no penalty, temperature 1): the log-probability
        of ``token`` and the ``top_n`` most likely tokens as ``[(id, logprob)]``, most
        likely first (ties: lowest id first)."""
        x = self._as_logits(logits)
        n = x.size
        if not _is_int(token) or not 0 <= int(token) < n:
            raise ValueError(f"token must be an id in [0, {n}), got {token!r}")
        if not _is_int(top_n) or top_n < 0:
            raise ValueError(f"top_n must be an integer >= 0, got {top_n!r}")
        m = x.max()
        lse = m + math.log(float(np.exp(x - m).sum()))
        lp = x - lse
        top: list[tuple[int, float]] = []
        k = min(int(top_n), n)
        if k:
            ids = self._top_k(x, k) if k < n else np.arange(n)
            ids = ids[np.lexsort((ids, -x[ids]))]
            top = [(int(i), float(lp[i])) for i in ids]
        return float(lp[int(token)]), top
