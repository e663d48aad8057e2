"""llamacpu.Model: a validated, memory-mapped model file driven by the C engine."""
import os
import threading

import numpy as np

from . import _core
from .cache_types import CACHE_TYPES, cache_type
from .errors import ContextOverflowError
from .format import F16, Q4_0, Q8_0, ModelConfig, output_head_name, read_model
from .rope import inv_freq

DEFAULT_N_CTX = 4096
DEFAULT_N_BATCH = 512  # tokens per internal prefill chunk (sizes the scratch buffers)
MAX_THREADS = 1024     # sanity bound (the engine keeps attention blocks per thread)
MAX_SEQ = 1024         # sanity bound on sequence slots


assert (CACHE_TYPES["f16"], CACHE_TYPES["q8_0"], CACHE_TYPES["q4_0"]) == (F16, Q8_0, Q4_0)


def _check_cache_types(cfg: ModelConfig, cache_type_k: str, cache_type_v: str) -> tuple[int, int]:
    tk, tv = cache_type(cache_type_k, "cache_type_k"), cache_type(cache_type_v, "cache_type_v")
    if (tk != F16 or tv != F16) and cfg.head_dim % 32:
        raise ValueError(f"q8_0 and q4_0 KV caches need a head_dim that is a multiple of 32 (this model's is "
                         f"{cfg.head_dim}); use f16")
    return tk, tv


def engine_bytes(cfg: ModelConfig, n_ctx: int, n_batch: int, n_threads: int, n_seq: int = 1, kernels=None,
                 cache_type_k: str = "f16", cache_type_v: str = "f16") -> int:
    """Bytes the C engine allocates for `cfg` (lc_model_bytes, csrc/forward.c): the KV
    cache of n_seq sequences of n_ctx positions in its types, the scratch of one chunk of
    n_batch tokens, and per thread attention's blocks and an AMX weight panel."""
    tk, tv = _check_cache_types(cfg, cache_type_k, cache_type_v)
    total, _ = _core.model_bytes(cfg, n_ctx, n_seq, min(n_batch, n_ctx), n_threads, kernels, tk, tv)
    return total


def available_memory() -> int | None:
    """Bytes of memory available without swapping (Linux MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def physical_cores() -> int:
    """Cores (not hyper-threads) this process may run on."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for c in cpus:
        try:
            base = f"/sys/devices/system/cpu/cpu{c}/topology/"
            with open(base + "core_id") as f1, open(base + "physical_package_id") as f2:
                cores.add((f2.read().strip(), f1.read().strip()))
        except OSError:
            cores.add(("cpu", c))
    return max(1, len(cores))


def default_parallel() -> int:
    """Sequence slots by default (Llama's n_parallel, the server's --parallel): twice the
    physical cores, 2 to 16. Decoding is bound by reading the weights, so every step
    can carry more tokens until the cores' arithmetic is the limit (BENCHMARKS.md)."""
    return max(2, min(16, 2 * physical_cores()))


def _check_threads(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_THREADS:
        raise ValueError(f"n_threads must be an integer in [1, {MAX_THREADS}], got {n!r}")
    return int(n)


class Model:
    """A Llama model file loaded for inference.

    Weights stay in the read-only mmap (nothing is copied at load); the KV cache
    holds `n_seq` sequences of `n_ctx` positions (memory is taken as positions are
    written), its keys and values in `cache_type_k` / `cache_type_v`: "f16" (default),
    "q8_0" (about half the memory, logits close to f16's) or "q4_0" (about a quarter). `forward` runs sequence 0, `forward_batch` several at once; both
    release the GIL; calls on one Model are serialised by a lock.
    """

    def __init__(self, path, n_ctx: int = DEFAULT_N_CTX, n_threads=None, *, n_batch: int = DEFAULT_N_BATCH,
                 kernels=None, n_seq: int = 1, cache_type_k: str = "f16", cache_type_v: str = "f16"):
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, (int, np.integer)) or n_ctx < 1:
            raise ValueError(f"n_ctx must be a positive integer, got {n_ctx!r}")
        if isinstance(n_batch, bool) or not isinstance(n_batch, (int, np.integer)) or not 1 <= n_batch <= 65536:
            raise ValueError(f"n_batch must be an integer in [1, 65536], got {n_batch!r}")
        if isinstance(n_seq, bool) or not isinstance(n_seq, (int, np.integer)) or not 1 <= n_seq <= MAX_SEQ:
            raise ValueError(f"n_seq must be an integer in [1, {MAX_SEQ}], got {n_seq!r}")
        n_threads = physical_cores() if n_threads is None else _check_threads(n_threads)
        env = os.environ.get("LLAMACPU_KERNELS")
        if kernels is None and env and env not in _core.available_kernels():
            raise ValueError(f"LLAMACPU_KERNELS={env!r} is not available on this CPU/build "
                             f"(available: {', '.join(_core.available_kernels())})")
        self._file = read_model(path)
        try:
            cfg = self._file.config
            max_pos = cfg.max_position_embeddings
            if n_ctx > max_pos:
                raise ValueError(f"n_ctx={n_ctx} is larger than the model's context of {max_pos} tokens")
            self.path = os.fspath(path)
            self.n_ctx, self.n_seq = int(n_ctx), int(n_seq)
            self._cache_types = _check_cache_types(cfg, cache_type_k, cache_type_v)
            self.cache_type_k, self.cache_type_v = cache_type_k.lower(), cache_type_v.lower()
            _check_memory(cfg, self.n_ctx, int(n_batch), n_threads, self.n_seq, kernels, self.cache_type_k,
                          self.cache_type_v)
            self._engine = self._build_engine(cfg, int(n_batch), n_threads, kernels)
        except BaseException:
            self._file.close()
            raise
        self._lock = threading.Lock()
        self._past = [0] * self.n_seq  # sequence s: positions [0, _past[s]) of its cache hold valid entries

    @property
    def closed(self) -> bool:
        return self._engine is None

    def _live(self):
        """The engine; ValueError once the Model is closed."""
        e = self._engine
        if e is None:
            raise ValueError("this Model is closed")
        return e

    def _build_engine(self, cfg, n_batch, n_threads, kernels):
        f = self._file
        keep = []

        def addr(name):
            a = f.array(name)
            keep.append(a)
            return a.ctypes.data

        def tensor(name):
            t = f.tensors[name]
            rows = int(np.prod(t.shape[:-1]))
            return (addr(name), t.type, rows, int(t.shape[-1]), t.layout)

        layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"layers.{i}."
            layers.append({
                "attention_norm": addr(p + "attention_norm.weight"),
                "ffn_norm": addr(p + "ffn_norm.weight"),
                "wq": tensor(p + "attention.wq.weight"), "wk": tensor(p + "attention.wk.weight"),
                "wv": tensor(p + "attention.wv.weight"), "wo": tensor(p + "attention.wo.weight"),
                "w1": tensor(p + "feed_forward.w1.weight"), "w2": tensor(p + "feed_forward.w2.weight"),
                "w3": tensor(p + "feed_forward.w3.weight"),
            })
        tensors = {"tok_embeddings": tensor("tok_embeddings.weight"), "output": tensor(output_head_name(cfg)),
                   "norm": addr("norm.weight")}
        divisors = f.array("rope_freqs.weight") if "rope_freqs.weight" in f.tensors else None
        freqs = inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, divisors)
        return _core.Engine(cfg, tensors, layers, freqs, self.n_ctx, min(n_batch, self.n_ctx), n_threads,
                            kernels=kernels, keepalive=(f, keep), n_seq=self.n_seq, type_k=self._cache_types[0],
                            type_v=self._cache_types[1])

    # ------------------------------------------------------------------ properties
    @property
    def config(self) -> ModelConfig:
        """The model config (Hugging Face's key names, plus head_dim and rope_pairing), typed;
        `.to_dict()` gives the file's JSON object."""
        return self._file.config

    @property
    def metadata(self) -> dict:
        """The file's whole JSON metadata (tokenizer, chat template, generation defaults, provenance)."""
        return self._file.meta

    @property
    def vocab_size(self) -> int:
        return self._live().vocab_size

    @property
    def kernels(self) -> str:
        """Name of the kernel table in use: scalar, avx2, avx512vnni, neon or neon-dotprod."""
        return self._live().kernels

    @property
    def n_threads(self) -> int:
        return self._live().n_threads

    @n_threads.setter
    def n_threads(self, n):
        with self._lock:
            self._live().set_threads(_check_threads(n))

    # ------------------------------------------------------------------ inference
    @property
    def n_past(self) -> int:
        """Positions of sequence 0 in the cache (what `forward` continues)."""
        return self._past[0]

    def seq_len(self, seq: int) -> int:
        """Positions of sequence `seq` in the cache."""
        return self._past[self._seq(seq)]

    def forward(self, tokens, pos: int = 0, all_logits: bool = False) -> np.ndarray:
        """Run `tokens` of sequence 0 at positions [pos, pos + len(tokens)) and return
        float32 logits: shape (vocab,) for the last token, or (n, vocab) with all_logits=True.

        Positions before `pos` must already be in the cache (pos <= n_past): a
        forward may rewind to reuse a prefix, never skip ahead.
        """
        arr = self._tokens(tokens)
        pos = self._pos(pos)
        n = int(arr.size)
        with self._lock:
            self._check_span(0, pos, n)
            out = self._live().forward(arr, pos, bool(all_logits))
            self._past[0] = pos + n
        return out

    def forward_batch(self, tokens, seq, pos, want=None) -> np.ndarray:
        """One step of several sequences: token i belongs to sequence seq[i] (< n_seq) at
        position pos[i]. Each sequence's tokens in the batch are consecutive positions
        p, p+1, ... in order, with p <= seq_len(s) (a sequence may rewind, never skip
        ahead); the K/V of its positions >= p are replaced. Returns float32 logits
        (number of want[i], vocab) in token order (want None: every token).
        Sequences are independent: each token attends to its own sequence only."""
        arr = self._tokens(tokens)
        n = int(arr.size)
        seqs = np.asarray(seq, dtype=np.int64).reshape(-1)
        poss = np.asarray(pos, dtype=np.int64).reshape(-1)
        flags = np.ones(n, dtype=bool) if want is None else np.asarray(want, dtype=bool).reshape(-1)
        if seqs.size != n or poss.size != n or flags.size != n:
            raise ValueError("tokens, seq, pos and want must have the same length")
        if seqs.min() < 0 or seqs.max() >= self.n_seq:
            raise ValueError(f"sequence ids must be in [0, {self.n_seq})")
        spans = {}  # seq -> (first position, count); each sequence's positions consecutive
        for s, p in zip(seqs.tolist(), poss.tolist()):
            if s in spans:
                p0, k = spans[s]
                if p != p0 + k:
                    raise ValueError(f"sequence {s}'s positions in a batch must be consecutive and in order "
                                     f"(got {p} after {p0 + k - 1})")
                spans[s] = (p0, k + 1)
            else:
                if p < 0:
                    raise ValueError(f"positions must be non-negative, got {p}")
                spans[s] = (p, 1)
        with self._lock:
            for s, (p0, k) in spans.items():
                self._check_span(s, p0, k)
            out = self._live().forward_batch(arr, seqs.astype(np.int32), poss.astype(np.int32), flags)
            for s, (p0, k) in spans.items():
                self._past[s] = p0 + k
        return out

    def seq_copy(self, src: int, dst: int, n_pos: int | None = None) -> None:
        """Sequence dst becomes a copy of the first n_pos positions of src (all of them by
        default): a fork that shares src's prompt prefix."""
        src, dst = self._seq(src), self._seq(dst)
        with self._lock:
            n = self._past[src] if n_pos is None else int(n_pos)
            if not 0 <= n <= self._past[src]:
                raise ValueError(f"n_pos={n_pos} must be in [0, {self._past[src]}] (sequence {src}'s length)")
            self._live().seq_copy(src, dst, n)
            self._past[dst] = n

    def seq_clear(self, seq: int) -> None:
        """Forget sequence `seq`: its next forward starts at position 0."""
        s = self._seq(seq)
        with self._lock:
            self._past[s] = 0

    def reset(self) -> None:
        """Forget every sequence: the next forward starts at pos 0."""
        with self._lock:
            self._past = [0] * self.n_seq

    def _tokens(self, tokens) -> np.ndarray:
        arr = np.asarray(tokens)
        if arr.ndim == 0:
            arr = arr.reshape(1)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError("tokens must be a non-empty 1-D sequence of token ids")
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
        vocab = self.vocab_size
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        return arr.astype(np.int32)

    @staticmethod
    def _pos(pos) -> int:
        if isinstance(pos, bool) or not isinstance(pos, (int, np.integer)) or pos < 0:
            raise ValueError(f"pos must be a non-negative integer, got {pos!r}")
        return int(pos)

    def _seq(self, seq) -> int:
        if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)) or not 0 <= seq < self.n_seq:
            raise ValueError(f"seq must be an integer in [0, {self.n_seq}), got {seq!r}")
        return int(seq)

    def _check_span(self, seq: int, pos: int, n: int) -> None:
        """Positions [pos, pos + n) of `seq` may run: nothing skipped, inside the context."""
        if pos > self._past[seq]:
            raise ValueError(f"pos={pos} skips positions: only {self._past[seq]} are in the cache"
                             + (f" of sequence {seq}" if seq else "") + " (call with pos <= n_past, or reset())")
        if pos + n > self.n_ctx:
            raise ContextOverflowError(f"positions {pos}..{pos + n - 1} do not fit the context of "
                                       f"{self.n_ctx} tokens (load the model with a larger n_ctx)")

    def close(self) -> None:
        """Release the engine and the mmap (also done when the object is collected)."""
        with self._lock:
            self._engine = None
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        c = self._file.config
        if self.closed:
            return f"<llamacpu.Model {os.path.basename(self.path)!r} closed>"
        return (f"<llamacpu.Model {os.path.basename(self.path)!r} layers={c.num_hidden_layers} "
                f"dim={c.hidden_size} n_ctx={self.n_ctx} threads={self.n_threads} kernels={self.kernels}>")


def _check_memory(cfg: ModelConfig, n_ctx: int, n_batch: int, n_threads: int, n_seq: int = 1, kernels=None,
                  cache_type_k: str = "f16", cache_type_v: str = "f16") -> None:
    """Refuse, before allocating, a KV cache and scratch larger than the memory available
    (a tiny file may declare huge head counts: 1 MB of KV per token)."""
    avail = available_memory()
    types = (cache_type_k, cache_type_v)
    need = engine_bytes(cfg, n_ctx, n_batch, n_threads, n_seq, kernels, *types)
    if avail is None or need <= avail:
        return
    per_token = engine_bytes(cfg, n_ctx + 1, n_batch, n_threads, n_seq, kernels, *types) - need
    fits = (avail - (need - n_ctx * per_token)) // per_token
    hint = f"load it with n_ctx <= {fits}" if fits >= 1 else "even n_ctx=1 does not fit"
    slots = f" x {n_seq} sequences" if n_seq > 1 else ""
    gib = 1 << 30
    raise ValueError(f"n_ctx={n_ctx}{slots} needs {need / gib:.2f} GiB for this model's KV cache and buffers "
                     f"({per_token / 1024:.0f} KiB per token), but {avail / gib:.2f} GiB of memory is "
                     f"available: {hint}" + (" or fewer sequences" if n_seq > 1 else ""))
