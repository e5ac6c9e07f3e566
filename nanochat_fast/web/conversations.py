"""The web chat's conversations: each one's LSTM state and random generator, in a bounded LRU cache.

A message takes its conversation out of the cache while its reply is written and puts it back
(most recently used) when the reply ends, so a conversation has at most one reply in progress and
its state is never read while the engine changes it. Past max_conversations, the least recently
used conversation is forgotten; its next message gets a 404 and the page resends the history.
"""

import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class Conversation:
    state: tuple | None  # (h, c), each (num_layers, 1, hidden), after everything said so far
    generator: torch.Generator  # the conversation's random stream, carried from reply to reply


class ConversationBusy(Exception):
    """The conversation already has a reply in progress."""


class ConversationCache:
    def __init__(self, max_conversations: int):
        if max_conversations < 1:
            raise ValueError(f"max_conversations must be >= 1, got {max_conversations}")
        self.max_conversations = max_conversations
        self._lock = threading.Lock()  # the engine's thread puts states back
        self._kept: OrderedDict[str, Conversation] = OrderedDict()  # least recently used first
        self._busy: set[str] = set()

    @staticmethod
    def new_id() -> str:
        return secrets.token_urlsafe(16)  # unguessable: an id is all it takes to read a conversation on

    def take(self, conversation_id: str) -> Conversation | None:
        """Take the conversation out to answer a message (None if unknown or evicted); ConversationBusy
        if a reply is already in progress. Mark it busy either way, until `put` or `release`."""
        with self._lock:
            if conversation_id in self._busy:
                raise ConversationBusy(f"conversation {conversation_id} already has a reply in progress")
            self._busy.add(conversation_id)
            return self._kept.pop(conversation_id, None)

    def put(self, conversation_id: str, conversation: Conversation):
        """Keep the conversation as the most recently used, evicting the least recently used beyond the bound."""
        with self._lock:
            self._busy.discard(conversation_id)
            self._kept[conversation_id] = conversation
            while len(self._kept) > self.max_conversations:
                self._kept.popitem(last=False)

    def release(self, conversation_id: str):
        """End a reply without keeping the conversation (it failed or its client went away)."""
        with self._lock:
            self._busy.discard(conversation_id)

    def __contains__(self, conversation_id: str) -> bool:
        with self._lock:
            return conversation_id in self._kept

    def __len__(self) -> int:
        with self._lock:
            return len(self._kept)
