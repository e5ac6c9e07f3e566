"""The web chat's conversation cache: least recently used forgotten past its bound, one reply at a
time per conversation, unknown ids told apart from new ones."""

import pytest
import torch

from nanochat_fast.web.conversations import Conversation, ConversationBusy, ConversationCache, ConversationUnknown


def conversation(value):
    return Conversation(state=(torch.full((1,), float(value)),) * 2, generator=torch.Generator())


def test_conversation_cache_forgets_the_least_recently_used():
    cache = ConversationCache(max_conversations=2)
    for name in "abc":
        assert cache.check_out(name, must_exist=False) is None
        cache.put_back(name, conversation(ord(name)))
    assert "a" not in cache and len(cache) == 2  # a was the least recently used
    kept_b = cache.check_out("b")
    assert kept_b.state[0].item() == ord("b") and "b" not in cache  # checked out while its reply runs
    cache.put_back("b", kept_b)  # b is now the most recently used, so d pushes c out
    cache.check_out("d", must_exist=False)
    cache.put_back("d", conversation(ord("d")))
    assert "b" in cache and "d" in cache and "c" not in cache


def test_conversation_cache_allows_one_reply_at_a_time():
    cache = ConversationCache(max_conversations=4)
    cache.check_out("a", must_exist=False)
    cache.put_back("a", conversation(1))
    kept = cache.check_out("a")
    with pytest.raises(ConversationBusy):
        cache.check_out("a")
    with pytest.raises(ConversationBusy):  # busy comes first: the id is checked out, not unknown
        cache.check_out("a", must_exist=False)
    cache.put_back("a", None)  # the reply failed: the conversation is gone, and free to be rebuilt
    assert "a" not in cache
    with pytest.raises(ConversationUnknown):
        cache.check_out("a")
    assert cache.check_out("a", must_exist=False) is None
    cache.put_back("a", kept)
    assert "a" in cache
