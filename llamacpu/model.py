"""llamacpu.Model: a validated, memory-mapped model file driven by the C engine."""
import os
import threading

import numpy as np

from . import _core
from .errors import ContextOverflowError
from .format import read_model
from .rope import inv_freq

DEFAULT_N_CTX = 4096
DEFAULT_N_BATCH = 512  # tokens per internal prefill chunk (sizes the scratch buffers)
MAX_THREADS = 1024     # sanity bound (the engine keeps an attention scratch row per thread)
Q8A_BLOCK_BYTES = 64   # sizeof(block_q8a), csrc/quants.h: the quantized activations of 32 elements


def engine_bytes(cfg: dict, n_ctx: int, n_batch: int, n_threads: int) -> int:
    """Bytes the C engine allocates for `cfg` (lc_model_new in csrc/forward.c): the F16 KV
    cache, the scratch of one chunk of n_batch tokens, and per thread an attention row of
    n_ctx scores and an AMX weight panel."""
    hd, layers = cfg["head_dim"], cfg["num_hidden_layers"]
    dim, hidden = cfg["hidden_size"], cfg["intermediate_size"]
    q_dim, kv_dim = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    wide = max(dim, q_dim)
    widest = max(wide, hidden)
    b = min(n_batch, n_ctx)
    kv_cache = 2 * layers * kv_dim * n_ctx * 2
    floats = b * (3 * dim + wide + q_dim + 3 * kv_dim + 2 * hidden)           # x xb q kb vb vb2 hb hb2 proj res
    q8a = b * (widest // 32 + 1 + dim // 32 + 1) * Q8A_BLOCK_BYTES            # xq xq2
    amx = (b + 31) // 32 * 32 * widest * 2 + widest * 4                       # xbf zeros
    per_thread = n_ctx * 4 + widest * 64                                      # att, amx_scratch
    threads = max(n_threads, os.cpu_count() or 1)  # the engine sizes for OpenMP's maximum too
    return kv_cache + floats * 4 + q8a + amx + threads * per_thread


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


def _check_threads(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_THREADS:
        raise ValueError(f"n_threads must be an integer in [1, {MAX_THREADS}], got {n!r}")
    return int(n)


class Model:
    """A Llama model file loaded for inference.

    Weights stay in the read-only mmap (nothing is copied at load); the KV cache
    holds `n_ctx` positions in F16. `forward` releases the GIL; calls on one
    Model are serialised by a lock.
    """

    def __init__(self, path, n_ctx: int = DEFAULT_N_CTX, n_threads=None, *, n_batch: int = DEFAULT_N_BATCH,
                 kernels=None):
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, (int, np.integer)) or n_ctx < 1:
            raise ValueError(f"n_ctx must be a positive integer, got {n_ctx!r}")
        if isinstance(n_batch, bool) or not isinstance(n_batch, (int, np.integer)) or not 1 <= n_batch <= 65536:
            raise ValueError(f"n_batch must be an integer in [1, 65536], got {n_batch!r}")
        n_threads = physical_cores() if n_threads is None else _check_threads(n_threads)
        env = os.environ.get("LLAMACPU_KERNELS")
        if kernels is None and env and env not in _core.available_kernels():
            raise ValueError(f"LLAMACPU_KERNELS={env!r} is not available on this CPU/build "
                             f"(available: {', '.join(_core.available_kernels())})")
        self._file = read_model(path)
        try:
            cfg = self._file.config
            max_pos = int(cfg["max_position_embeddings"])
            if n_ctx > max_pos:
                raise ValueError(f"n_ctx={n_ctx} is larger than the model's context of {max_pos} tokens")
            self.path = os.fspath(path)
            self.n_ctx = int(n_ctx)
            _check_memory(cfg, self.n_ctx, int(n_batch), n_threads)
            self._engine = self._build_engine(cfg, int(n_batch), n_threads, kernels)
        except BaseException:
            self._file.close()
            raise
        self._lock = threading.Lock()
        self.n_past = 0  # positions [0, n_past) of the KV cache hold valid entries

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
        for i in range(cfg["num_hidden_layers"]):
            p = f"layers.{i}."
            layers.append({
                "attention_norm": addr(p + "attention_norm.weight"),
                "ffn_norm": addr(p + "ffn_norm.weight"),
                "wq": tensor(p + "attention.wq.weight"), "wk": tensor(p + "attention.wk.weight"),
                "wv": tensor(p + "attention.wv.weight"), "wo": tensor(p + "attention.wo.weight"),
                "w1": tensor(p + "feed_forward.w1.weight"), "w2": tensor(p + "feed_forward.w2.weight"),
                "w3": tensor(p + "feed_forward.w3.weight"),
            })
        out_name = "tok_embeddings.weight" if cfg["tie_word_embeddings"] else "output.weight"
        tensors = {"tok_embeddings": tensor("tok_embeddings.weight"), "output": tensor(out_name),
                   "norm": addr("norm.weight")}
        divisors = f.array("rope_freqs.weight") if "rope_freqs.weight" in f.tensors else None
        freqs = inv_freq(cfg["head_dim"], cfg["rope_theta"], cfg["rope_scaling"], divisors)
        ecfg = {"vocab_size": cfg["vocab_size"], "dim": cfg["hidden_size"], "hidden_dim": cfg["intermediate_size"],
                "n_layers": cfg["num_hidden_layers"], "n_heads": cfg["num_attention_heads"],
                "n_kv_heads": cfg["num_key_value_heads"], "head_dim": cfg["head_dim"],
                "norm_eps": float(cfg["rms_norm_eps"])}
        return _core.Engine(ecfg, tensors, layers, freqs, self.n_ctx, min(n_batch, self.n_ctx), n_threads,
                            kernels=kernels, keepalive=(f, keep))

    # ------------------------------------------------------------------ properties
    @property
    def config(self) -> dict:
        """The model config (Hugging Face key names, plus head_dim and rope_pairing)."""
        return dict(self._file.config)

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
    def forward(self, tokens, pos: int = 0, all_logits: bool = False) -> np.ndarray:
        """Run `tokens` at positions [pos, pos + len(tokens)) and return float32 logits:
        shape (vocab,) for the last token, or (n, vocab) with all_logits=True.

        Positions before `pos` must already be in the cache (pos <= n_past): a
        forward may rewind to reuse a prefix, never skip ahead.
        """
        arr = np.asarray(tokens)
        if arr.ndim == 0:
            arr = arr.reshape(1)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError("tokens must be a non-empty 1-D sequence of token ids")
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
        if isinstance(pos, bool) or not isinstance(pos, (int, np.integer)) or pos < 0:
            raise ValueError(f"pos must be a non-negative integer, got {pos!r}")
        vocab = self.vocab_size
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        n = int(arr.size)
        with self._lock:
            if pos > self.n_past:
                raise ValueError(f"pos={pos} skips positions: only {self.n_past} are in the cache "
                                 "(call with pos <= n_past, or reset())")
            if pos + n > self.n_ctx:
                raise ContextOverflowError(f"positions {pos}..{pos + n - 1} do not fit the context of "
                                           f"{self.n_ctx} tokens (load the model with a larger n_ctx)")
            out = self._live().forward(arr.astype(np.int32), int(pos), bool(all_logits))
            self.n_past = pos + n
        return out

    def reset(self) -> None:
        """Forget the cached sequence: the next forward starts at pos 0."""
        with self._lock:
            self.n_past = 0

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
        return (f"<llamacpu.Model {os.path.basename(self.path)!r} layers={c['num_hidden_layers']} "
                f"dim={c['hidden_size']} n_ctx={self.n_ctx} threads={self.n_threads} kernels={self.kernels}>")


def _check_memory(cfg: dict, n_ctx: int, n_batch: int, n_threads: int) -> None:
    """Refuse, before allocating, a KV cache and scratch larger than the memory available
    (a tiny file may declare huge head counts: 1 MB of KV per token)."""
    avail = available_memory()
    need = engine_bytes(cfg, n_ctx, n_batch, n_threads)
    if avail is None or need <= avail:
        return
    per_token = engine_bytes(cfg, n_ctx + 1, n_batch, n_threads) - need
    fits = (avail - (need - n_ctx * per_token)) // per_token
    hint = f"load it with n_ctx <= {fits}" if fits >= 1 else "even n_ctx=1 does not fit"
    gib = 1 << 30
    raise ValueError(f"n_ctx={n_ctx} needs {need / gib:.2f} GiB for this model's KV cache and buffers "
                     f"({per_token / 1024:.0f} KiB per token), but {avail / gib:.2f} GiB of memory is "
                     f"available: {hint}")
