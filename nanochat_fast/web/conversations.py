"""The web chat's conversations: each one's LSTM state and random generator, in a bounded LRU cache.

A message checks its conversation out while its reply is written and puts it back (most recently
used) when the reply ends, so a conversation has at most one reply in progress and its state is never
read while the engine changes it. Past max_conversations, the least recently used conversation is
forgotten; its next message gets a 404 and the page resends the history.
"""

import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class Conversation:
    state: tuple | None  # the model's state tuple, each (num_layers, 1, hidden), after everything said so far
    generator: torch.Generator  # the conversation's random stream, carried from reply to reply


class ConversationBusy(Exception):
    """The conversation already has a reply in progress."""


class ConversationUnknown(Exception):
    """No conversation of that id is kept: it never existed or was forgotten."""


class ConversationCache:
    def __init__(self, max_conversations: int):
        if max_conversations < 1:
            raise ValueError(f"max_conversations must be >= 1, got {max_conversations}")
        self.max_conversations = max_conversations
        self._lock = threading.Lock()  # the engine's thread puts conversations back
        self._kept: OrderedDict[str, Conversation] = OrderedDict()  # least recently used first
        self._checked_out: set[str] = set()

    @staticmethod
    def new_id() -> str:
        return secrets.token_urlsafe(16)  # unguessable: an id is all it takes to read a conversation on

    def check_out(self, conversation_id: str, must_exist: bool = True) -> Conversation | None:
        """Take the conversation out to answer a message, until `put_back`. An unknown (or forgotten)
        id raises ConversationUnknown, or with must_exist=False gives None, checked out all the same;
        one already checked out raises ConversationBusy."""
        with self._lock:
            if conversation_id in self._checked_out:
                raise ConversationBusy(f"conversation {conversation_id} already has a reply in progress")
            if must_exist and conversation_id not in self._kept:
                raise ConversationUnknown(f"conversation {conversation_id} is unknown or was forgotten")
            self._checked_out.add(conversation_id)
            return self._kept.pop(conversation_id, None)

    def put_back(self, conversation_id: str, conversation: Conversation | None):
        """End a check-out: keep the conversation as the most recently used (evicting the least recently
        used beyond the bound), or with None forget it (its reply failed, or was cancelled before its prompt
        was read)."""
        with self._lock:
            self._checked_out.discard(conversation_id)
            if conversation is None:
                return
            self._kept[conversation_id] = conversation
            while len(self._kept) > self.max_conversations:
                self._kept.popitem(last=False)

    def __contains__(self, conversation_id: str) -> bool:
        with self._lock:
            return conversation_id in self._kept

    def __len__(self) -> int:
        with self._lock:
            return len(self._kept)
