"""Shared fixtures: fetched assets, random HF checkpoints, converted model files.

Assets are fetched with tools/fetch_assets.py when missing; a missing asset is an
error, never a skip.
"""
import os
import signal
import sys
from pathlib import Path

# OpenBLAS threads make the reference's small matmuls ~70x slower on 2 cores
# (measured: 90 gemv 1x576x1536 take 0.75 s threaded, 0.01 s single-threaded).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest
from hypothesis import settings

# Hypothesis draws the same examples on every run (derandomized), so a test run is
# reproducible and CI is never red by the luck of a draw; a failing example found while
# exploring is pinned with @example. HYPOTHESIS_PROFILE=explore searches afresh each run,
# with five times the examples.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "tools", ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

def default_sigint():
    """preexec_fn of a child that a test sends SIGINT: SIGINT as a terminal delivers it. A
    shell that starts a job in the background without job control (`cmd &` in a script)
    ignores SIGINT in it, and an ignored signal stays ignored across fork and exec, so
    Python would never raise KeyboardInterrupt (check: pytest started with SIGINT ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def slow_unless(value, *fast):
    """A parametrize value, marked slow (left out of the fast lane, `-m "not slow"`) unless
    it is one of `fast`."""
    return value if value in fast else pytest.param(value, marks=pytest.mark.slow)


def _invariant_kernels():
    """The best kernel table whose results do not depend on how a prompt is split into
    chunks (every table but avx512amx, whose steps of 4+ tokens run on AMX tiles while
    fewer tokens and decode use the q8a kernels: docs/ARCHITECTURE.md)."""
    from llamacpu import _core
    return [k for k in _core.available_kernels() if k != "avx512amx"][-1]


INVARIANT_KERNELS = _invariant_kernels()


def llama_1b_config():
    """Llama 3.2 1B's format.ModelConfig (tied embeddings), from the shapes the K-quant mixture
    fixtures freeze (tools/make_kquant_fixtures.py: CONFIGS, model_config)."""
    import make_kquant_fixtures as fixtures  # tools/, on sys.path above
    return fixtures.model_config(fixtures.CONFIGS["Llama-3.2-1B"])


@pytest.fixture(scope="module")
def chunk_invariant_kernels():
    """For a test module that compares answers reached through different prompt chunkings
    (a prompt cache hit against a fresh prefill, a server against an in-process Llama):
    LLAMACPU_KERNELS pinned to INVARIANT_KERNELS for the module, subprocesses included."""
    old = os.environ.get("LLAMACPU_KERNELS")
    os.environ["LLAMACPU_KERNELS"] = INVARIANT_KERNELS
    yield INVARIANT_KERNELS
    if old is None:
        del os.environ["LLAMACPU_KERNELS"]
    else:
        os.environ["LLAMACPU_KERNELS"] = old


ASSET_NAMES = ("SmolLM2-135M-Instruct.Q4_1.gguf", "llama3.2-tokenizer.json", "llama3.2-tokenizer_config.json")


@pytest.fixture(scope="session")
def assets():
    import fetch_assets
    return {name: fetch_assets.asset_path(name) for name in ASSET_NAMES}


@pytest.fixture(scope="session")
def smollm_gguf(assets):
    return assets["SmolLM2-135M-Instruct.Q4_1.gguf"]


@pytest.fixture(scope="session")
def smollm_model(tmp_path_factory, smollm_gguf):
    """The SmolLM2 GGUF converted once (types kept, blocks bit-exact), for every test module."""
    from llamacpu.convert import convert
    return convert(smollm_gguf, tmp_path_factory.mktemp("smollm2") / "smollm2.bin", progress=False, quiet=True)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, assets):
    """checkpoint(preset, shards=1) -> folder of a random-weight HF checkpoint (cached)."""
    from make_checkpoint import write_checkpoint
    cache = {}

    def get(preset="tiny64", shards=1, seed=0):
        key = (preset, shards, seed)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"ckpt-{preset}-{shards}-{seed}")
            cache[key] = write_checkpoint(out, preset=preset, seed=seed, shards=shards,
                                          tokenizer_json=assets["llama3.2-tokenizer.json"],
                                          tokenizer_config=assets["llama3.2-tokenizer_config.json"])
        return cache[key]
    return get


@pytest.fixture(scope="session")
def converted(tmp_path_factory, checkpoint):
    """converted(preset, type) -> path of our model file converted from checkpoint(preset) (cached)."""
    from llamacpu.convert import convert
    cache = {}

    def get(preset="tiny64", type="f32"):
        key = (preset, type)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"model-{preset}-{type}") / f"{preset}-{type}.bin"
            cache[key] = convert(checkpoint(preset), out, type=type, progress=False)
        return cache[key]
    return get


@pytest.fixture(scope="session")
def llama_meta(converted):
    """Metadata of tiny64 converted to q4_0: the real Llama 3.2 tokenizer and chat template."""
    from llamacpu.format import read_model
    with read_model(converted("tiny64", "q4_0")) as f:
        return f.meta


@pytest.fixture(scope="session")
def smol_meta(smollm_model):
    """Metadata of the converted SmolLM2 GGUF (its tokenizer and chat template)."""
    from llamacpu.format import read_model
    with read_model(smollm_model) as f:
        return f.meta


@pytest.fixture(scope="session")
def hf_llama(checkpoint):
    """transformers' tokenizer of the tiny64 checkpoint (the real Llama 3.2 tokenizer files)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(checkpoint("tiny64")))
