"""Drives the chat and the legacy completions APIs with the official OpenAI Python SDK, as a
client would.

Usage: completions_client.py BASE_URL
Prints one JSON object with a part for each API, "chat" and "text": what the SDK parsed from a
non-streaming `create` ("plain") and from a streaming one that asks for a usage chunk
("streamed"). Any answer the SDK cannot parse makes it exit non-zero.
"""

import json
import sys

import openai

USAGE = {"prompt_tokens", "completion_tokens", "total_tokens"}


def summary(create, answer_of, piece_of):
    """Both calls of one API: `create(**options)` makes the request, `answer_of(choice)` is what a
    whole answer's choice says, `piece_of(choice)` what a streamed chunk's choice says."""
    completion = create(max_tokens=16)
    choice = completion.choices[0]
    plain = {
        "id": completion.id,
        "object": completion.object,
        "model": completion.model,
        **answer_of(choice),
        "finish_reason": choice.finish_reason,
        "system_fingerprint": completion.system_fingerprint,
        "usage": completion.usage.model_dump(include=USAGE),
    }

    with create(max_tokens=2, stream=True, stream_options={"include_usage": True}) as stream:
        chunks = list(stream)
    choices = [choice for chunk in chunks for choice in chunk.choices]
    last = chunks[-1]
    streamed = {
        "count": len(chunks),
        "ids": sorted({chunk.id for chunk in chunks}),
        "pieces": [piece_of(choice) for choice in choices],
        "finish_reasons": [choice.finish_reason for choice in choices if choice.finish_reason is not None],
        "last_choices": len(last.choices),
        "last_usage": last.usage.model_dump(include=USAGE),
        "last_fingerprint": last.system_fingerprint,
    }
    return {"plain": plain, "streamed": streamed}


def main() -> None:
    client = openai.OpenAI(base_url=sys.argv[1], api_key="sk-test", max_retries=0, timeout=30)
    messages = [{"role": "user", "content": "Say hello"}]
    chat = summary(
        lambda **options: client.chat.completions.create(model="tiny", messages=messages, **options),
        lambda choice: {
            "role": choice.message.role,
            "text": choice.message.content,
            "tool_calls": choice.message.tool_calls,
        },
        lambda choice: {"role": choice.delta.role, "text": choice.delta.content},
    )
    text = summary(
        lambda **options: client.completions.create(model="tiny", prompt="Say hello", **options),
        lambda choice: {"text": choice.text},
        lambda choice: {"text": choice.text},
    )
    print(json.dumps({"chat": chat, "text": text}))


if __name__ == "__main__":
    main()
