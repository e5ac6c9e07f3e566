"""How a conversation becomes token ids: each message is <role marker> + content + <|end|>.

The model learns to write the assistant's side only: the targets mask is True on an assistant message's
content and its <|end|> (so it learns when to stop), False on user text and on every role marker.
`readable_turns` turns text a chat model wrote, markers included, back into labelled turns for people.
"""

from collections.abc import Iterable, Iterator

import torch

from nanochat_fast.tokenizer import ASSISTANT, END, USER, CharTokenizer

ROLES = ("user", "assistant")  # in turn order: chatterbot-corpus dialogues open with the user
SKIPPED_ROLES = ("system",)  # accepted in input files, but the chat format has no place for them


def check_messages(messages) -> None:
    """Raise ValueError saying what is wrong unless messages is a list of {"role", "content": str}."""
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list, got {type(messages).__name__}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {index} must be an object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES + SKIPPED_ROLES:
            raise ValueError(f"message {index} has role {role!r}; expected one of {ROLES + SKIPPED_ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"message {index} content must be a string, got {type(content).__name__}")


def encode_conversation(tokenizer: CharTokenizer, messages) -> tuple[torch.Tensor, torch.Tensor]:
    """Messages to (ids LongTensor, targets_mask BoolTensor), both 1-D and the same length."""
    check_messages(messages)
    role_ids = {"user": tokenizer.user_id, "assistant": tokenizer.assistant_id}
    # Built as Python lists and converted once: cheaper than many tiny tensors for short chat turns.
    ids, targets_mask = [], []
    for message in messages:
        if message["role"] in SKIPPED_ROLES:
            continue
        content_ids = tokenizer.encode(message["content"]).tolist()
        ids += [role_ids[message["role"]], *content_ids, tokenizer.end_id]
        targets_mask += [False] + [message["role"] == "assistant"] * (len(content_ids) + 1)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(targets_mask, dtype=torch.bool)


def prompt_for_reply(tokenizer: CharTokenizer, user_text: str) -> torch.Tensor:
    """What the chat feeds before generating: <|user|> + text + <|end|> + <|assistant|>.
    Generation then runs until the model emits <|end|>."""
    return torch.cat([torch.tensor([tokenizer.user_id]), tokenizer.encode(user_text),
                      torch.tensor([tokenizer.end_id, tokenizer.assistant_id])])


ROLE_LABELS = {USER: "User: ", ASSISTANT: "Assistant: "}


def readable_turns(pieces: Iterable[str], printed: str = "") -> Iterator[str]:
    """Pieces of generated text (one token each, specials as their marker strings) with the chat markers
    made readable: <|user|> starts a "User: " line after a blank one, <|assistant|> an "Assistant: " line,
    <|end|> ends the line. `printed` is what the output already holds (a prompt, say), so that a label
    starts a line of its own. Other text, <|unk|> included, passes unchanged."""
    printed_any, line_open = bool(printed), bool(printed) and not printed.endswith("\n")
    for piece in pieces:
        if piece == END:
            yield "\n"
            line_open = False
        elif piece in ROLE_LABELS:
            before = "\n" if line_open else ""
            if piece == USER and printed_any:
                before += "\n"  # a blank line between exchanges
            yield before + ROLE_LABELS[piece]
            line_open = True
        else:
            yield piece
            line_open = not piece.endswith("\n")
        printed_any = True
