"""When a conversation no longer fits the context (context_fit.py): the policy against a
counting "tokenizer" (one token per word, two per message), then Llama.chat(truncate=)
on SmolLM2, the system prompt's KV cache kept across a drop."""
import pytest

from llamacpu.context_fit import check_truncate, fit_oldest, reply_room
from llamacpu.llama import Llama

GREEDY = {"temperature": 0.0}


def ids_of(messages):
    """One token per word, two per message."""
    return [0] * sum(2 + len(m["content"].split()) for m in messages)


def msg(role, n, tag=""):
    return {"role": role, "content": " ".join([tag or role] * n)}


SYSTEM = msg("system", 8)


def conversation(turns, words=10):
    out = [SYSTEM]
    for i in range(turns):
        out += [msg("user", words, f"u{i}"), msg("assistant", words, f"a{i}")]
    return out + [msg("user", words, "newest")]


def test_reply_room():
    assert reply_room(4096, 512) == 512
    assert reply_room(256, 512) == 64          # at most a quarter of the context
    assert reply_room(256, None) == 64
    assert reply_room(256, 0) == 1 and reply_room(2, 5) == 1
    assert check_truncate(None) is None and check_truncate("oldest") == "oldest"
    with pytest.raises(ValueError, match="oldest"):
        check_truncate("newest")


def test_fits_unchanged():
    conv = conversation(3)               # 10 + 7 * 12 = 94 tokens
    fit = fit_oldest(conv, ids_of, 100, 6)
    assert fit.messages == conv and fit.dropped is None and len(fit.ids) == 94


def test_drops_the_fewest_oldest_whole_turns_down_to_half_the_context():
    conv = conversation(5)               # 10 + 11 * 12 = 142 tokens; turns of 24, 22 without any
    for n_ctx, room, dropped in ((142, 1, 3), (150, 10, 4), (180, 40, 4), (100, 10, 5)):
        fit = fit_oldest(conv, ids_of, n_ctx, room)
        assert len(fit.ids) + room <= n_ctx // 2
        assert fit.messages == [SYSTEM] + conv[1 + 2 * dropped:]    # whole user+assistant pairs, oldest first
        assert fit.dropped == {"messages": 2 * dropped, "tokens": 24 * dropped}
        if dropped > 1:      # the fewest: one turn less would not bring it to half
            assert len(ids_of([SYSTEM] + conv[2 * dropped - 1:])) + room > n_ctx // 2


def test_only_system_and_newest_left():
    conv = conversation(2)               # system 10 + newest 12 = 22 when alone
    fit = fit_oldest(conv, ids_of, 30, 20)   # wants 42 (15 after a drop); 22 still fits: sent, less room
    assert fit.messages == [SYSTEM, conv[-1]] and fit.dropped["messages"] == 4
    with pytest.raises(ValueError, match="system prompt and the newest message alone are 22 tokens"):
        fit_oldest(conv, ids_of, 22, 1)
    with pytest.raises(ValueError, match="alone"):
        fit_oldest([SYSTEM, msg("user", 50)], ids_of, 40, 1)


def test_turns_keep_their_tool_messages_and_no_system_is_fine():
    conv = [msg("user", 5, "q0"), {"role": "assistant", "content": "call"}, msg("tool", 5, "result"),
            msg("assistant", 5, "a0"), msg("user", 5, "q1"), msg("assistant", 5), msg("user", 5, "newest")]
    fit = fit_oldest(conv, ids_of, 46, 2)    # 45 + 2 > 46; 21 + 2 <= 23
    assert fit.messages == conv[4:] and fit.dropped["messages"] == 4   # the tool turn goes whole


def test_too_long_to_tokenize_counts_as_not_fitting():
    conv = conversation(6)
    calls = []

    def bounded(messages):   # the server's byte bound: None without tokenizing
        calls.append(len(messages))
        return None if len(messages) > 5 else ids_of(messages)
    fit = fit_oldest(conv, bounded, 1000, 10)
    assert fit.messages == [SYSTEM] + conv[-3:] and fit.dropped == {"messages": 10, "tokens": None}
    assert len(calls) <= 5      # a binary search, not one try per turn


# ----------------------------------------------------------------------------- on SmolLM2

@pytest.fixture(scope="module", autouse=True)
def _chunk_invariant(chunk_invariant_kernels):
    """A prompt-cache hit is compared with a cold start (conftest.chunk_invariant_kernels)."""


@pytest.fixture(scope="module")
def small(smollm_model):
    with Llama(smollm_model, n_ctx=256, n_threads=1, n_parallel=1) as llm:
        yield llm


def long_chat(turns=8):
    msgs = [{"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."}]
    for i in range(turns):
        msgs += [{"role": "user", "content": f"Tell me fact number {i} about the ocean and its many creatures."},
                 {"role": "assistant", "content": f"Fact {i}: the ocean covers most of the Earth and holds "
                                                  "whales, fish, corals and countless tiny plankton."}]
    return msgs + [{"role": "user", "content": "What colour is the sky?"}]


def test_default_is_a_clear_error_naming_the_option(small):
    msgs = long_chat()
    assert len(small.tokenize_chat(msgs)) > small.n_ctx
    with pytest.raises(ValueError, match="truncate='oldest'"):
        small.chat(msgs, max_tokens=8)
    with pytest.raises(ValueError, match="truncate must be None or 'oldest'"):
        small.chat(msgs, max_tokens=8, truncate="middle")


def test_chat_truncate_oldest_drops_turns_and_answers(small):
    msgs = long_chat()
    fit = small.fit_chat(msgs, max_tokens=32)
    assert fit.messages[0] == msgs[0] and fit.messages[-1] == msgs[-1]
    assert fit.dropped_messages % 2 == 0 and fit.messages[1:] == msgs[1 + fit.dropped_messages:]
    assert len(fit.ids) + 32 <= small.n_ctx // 2
    out = small.chat(msgs, max_tokens=32, truncate="oldest", **GREEDY)
    assert out["usage"]["truncated"] == fit.dropped
    assert out["usage"]["prompt_tokens"] == len(fit.ids)
    assert out["choices"][0]["message"]["content"]
    # what was sent is exactly the kept conversation
    assert out["choices"][0]["message"] == small.chat(fit.messages, max_tokens=32, **GREEDY)["choices"][0]["message"]
    # chat_batch takes it too
    batched = small.chat_batch([msgs], max_tokens=32, truncate="oldest", **GREEDY)[0]
    assert batched["choices"][0]["message"] == out["choices"][0]["message"] and batched["usage"] == out["usage"]
    # streamed: the last chunk's usage says it too
    chunks = list(small.chat(msgs, max_tokens=8, truncate="oldest", stream=True, **GREEDY))
    assert chunks[-1]["usage"]["truncated"] == small.fit_chat(msgs, max_tokens=8).dropped
    # nothing dropped: usage is OpenAI's, no extra field
    assert "truncated" not in small.chat(msgs[:1] + msgs[-1:], max_tokens=4, truncate="oldest", **GREEDY)["usage"]


def test_the_system_prompt_alone_too_long_is_a_clear_error(small):
    msgs = [{"role": "system", "content": "word " * 400}, {"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="the system prompt and the newest message alone"):
        small.chat(msgs, truncate="oldest")


def test_after_a_drop_the_system_prompt_keeps_its_kv(small):
    """The kept prompt shares the system prompt with the previous one; positions after the
    first dropped message changed, so only that prefix is reused (no K-shift)."""
    small.reset()
    msgs = long_chat(3)
    before = small.fit_chat(msgs, max_tokens=16)
    assert before.dropped is None
    first = small.chat(msgs, max_tokens=16, truncate="oldest", **GREEDY)
    msgs = msgs + [first["choices"][0]["message"]] + long_chat(3)[1:]   # three more turns: too long now
    fit = small.fit_chat(msgs, max_tokens=16)
    assert fit.dropped is not None
    n0 = small.n_evaluated
    second = small.chat(msgs, max_tokens=16, truncate="oldest", **GREEDY)
    evaluated_prompt = small.n_evaluated - n0 - second["usage"]["completion_tokens"]
    system = small.tokenize_chat(msgs[:1], add_generation_prompt=False)
    common = next(i for i, (a, b) in enumerate(zip(before.ids, fit.ids)) if a != b)
    assert common >= len(system)
    assert evaluated_prompt <= len(fit.ids) - common + 1, (evaluated_prompt, len(fit.ids), common)
    # and the answer is what a cold start gives
    small.reset()
    assert small.chat(msgs, max_tokens=16, truncate="oldest", **GREEDY)["choices"][0] == second["choices"][0]
