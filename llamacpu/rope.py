"""RoPE frequencies from the model config (llama3 scaling computed at load, never hard-coded)."""
import math

import numpy as np


def inv_freq(head_dim: int, theta: float, rope_scaling=None, divisors=None) -> np.ndarray:
    """float32 (head_dim/2,) inverse frequencies for pair i: theta ** (-2i/d), then the
    llama3 rule of ../shared/REFERENCE.md when rope_scaling says so, then division by
    the GGUF `rope_freqs` divisors when a file carries them."""
    i = np.arange(head_dim // 2, dtype=np.float64)
    f = theta ** (-2.0 * i / head_dim)
    if rope_scaling is not None:
        factor = float(rope_scaling["factor"])
        low = float(rope_scaling["low_freq_factor"])
        high = float(rope_scaling["high_freq_factor"])
        orig = float(rope_scaling["original_max_position_embeddings"])
        low_wl, high_wl = orig / low, orig / high
        wavelen = 2 * math.pi / f
        smooth = (orig / wavelen - low) / (high - low)
        mid = (1 - smooth) * f / factor + smooth * f
        f = np.where(wavelen < high_wl, f, np.where(wavelen > low_wl, f / factor, mid))
    if divisors is not None:
        f = f / np.asarray(divisors, dtype=np.float64)
    return f.astype(np.float32)
