"""Passkey retrieval (llama.cpp's examples/passkey): a random 5-digit number hidden in
2k-7k tokens of filler ("The grass is green. The sky is blue. ..."), asked for at the
end with greedy decoding, on the real SmolLM2-135M-Instruct (its context is 8k).

It checks the long-context path end to end (positions, RoPE, attention and the KV cache
far past a short chat) by what the model can still read, so each KV cache type pins the
success rate measured with it. Prefill is the cost, and attention makes it grow with the
square of the length (one core: 2k tokens 6 s, 4.9k tokens 35 s of CPU), so the cases
share their prefixes through the prompt cache (batcher.py): one key near the start asked
at 2k, 4.5k and 7k tokens (each haystack extends the one before: one 7k prefill in all),
then keys at depths 0.2, 0.5 and 0.8 of a 2.5k haystack, in the order of their positions.
"""
import random
import time

import pytest

from llamacpu.llama import Llama

pytestmark = pytest.mark.slow   # minutes of prefill: the full run's, not the fast lane's

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n\n")
QUESTION = "\nWhat is the pass key? The pass key is"

# (the key after this many filler sentences, haystack lengths in filler sentences of ~25
# tokens: 80 ~ 2k tokens, 280 ~ 7k)
CASES = [(4, (80, 180, 280)), (20, (100,)), (50, (100,)), (80, (100,))]

# Measured with the f16 KV cache (2026-11-28): 5 of 6 with the avx512amx table (bf16 AMX
# prefill) and with avx2 alike, the key at 0.05 of 2k missed (found at 4.4k and 7k). The minimum allows one miss more,
# for kernel tables whose sums differ in their last bits (avx512vnni, avx2, neon): a greedy
# choice between two close tokens can flip. A broken long context (positions, RoPE, the
# cache past a prompt-cache hit) finds none, a degraded one few.
MIN_FOUND = {"f16": 4, "q8_0": 4}


def haystack(key: int, at: int, length: int) -> str:
    return (INTRO + FILLER * at + f"The pass key is {key}. Remember it. {key} is the pass key. "
            + FILLER * (length - at) + QUESTION)


def llama_kwargs(cache_type: str) -> dict:
    """The KV cache type as Llama's arguments (f16: the default)."""
    return {} if cache_type == "f16" else {"cache_type_k": cache_type, "cache_type_v": cache_type}


@pytest.mark.parametrize("cache_type", sorted(MIN_FOUND))
def test_passkey_retrieval(smollm_model, cache_type):
    rng = random.Random(1234)
    found, report, t0 = 0, [], time.perf_counter()
    with Llama(smollm_model, n_ctx=7424, n_parallel=1, **llama_kwargs(cache_type)) as llm:
        for at, lengths in CASES:
            key = rng.randint(10000, 99999)
            for length in lengths:
                prompt = haystack(key, at, length)
                n = len(llm.tokenize(prompt))
                assert 1900 <= n <= 7200
                answer = llm.generate(prompt, max_tokens=8, stream=False, temperature=0.0)
                hit = str(key) in answer
                found += hit
                report.append(f"{n} tokens, key at {at / length:.2f}: {'found' if hit else 'missed'} {answer!r}")
    print(f"\n{cache_type}: {found} of {len(report)} in {time.perf_counter() - t0:.0f} s\n" + "\n".join(report))
    assert found >= MIN_FOUND[cache_type], report
