"""Drives a gateway in front of the tiny model with the official OpenAI Python SDK, as a client
application would, and prints one JSON object with what the SDK parsed.

Usage: client.py BASE_URL

- plain: `responses.create` without streaming, stopped by a token limit
- streamed: `responses.create(stream=True)`, the event types in order and the text
- chat: `chat.completions.create(stream=True)`, the chunks and their finish reason
- unknown_model / too_long: the errors the SDK raised, with their status and body
"""

import json
import sys

import openai

MODEL = "tiny"


def error_summary(call) -> dict:
    try:
        call()
    except openai.APIStatusError as error:
        return {"class": type(error).__name__, "status": error.status_code, "body": error.body}
    return {"class": None}


def main() -> None:
    client = openai.OpenAI(base_url=sys.argv[1], api_key="sk-test", max_retries=0, timeout=60)

    response = client.responses.create(model=MODEL, input="Hello", max_output_tokens=8)
    plain = {
        "status": response.status,
        "incomplete_reason": response.incomplete_details.reason if response.incomplete_details else None,
        "output_types": [item.type for item in response.output],
        "text": response.output_text,
        "output_tokens": response.usage.output_tokens,
    }

    events = []
    text = ""
    with client.responses.create(model=MODEL, input="Hello", max_output_tokens=16, stream=True) as stream:
        for event in stream:
            events.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
            final = getattr(event, "response", None)
    streamed = {"events": events, "text": text, "final_status": final.status if final else None}

    chunks = 0
    chat_text = ""
    finish_reasons = []
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=16, stream=True
    )
    for chunk in stream:
        chunks += 1
        for choice in chunk.choices:
            chat_text += choice.delta.content or ""
            if choice.finish_reason:
                finish_reasons.append(choice.finish_reason)
    chat = {"chunks": chunks, "text": chat_text, "finish_reasons": finish_reasons}

    unknown_model = error_summary(lambda: client.responses.create(model="no-such-model", input="Hello"))
    too_long = error_summary(
        lambda: client.responses.create(model=MODEL, input="hello " * 2000, max_output_tokens=8)
    )

    print(
        json.dumps(
            {
                "plain": plain,
                "streamed": streamed,
                "chat": chat,
                "unknown_model": unknown_model,
                "too_long": too_long,
            }
        )
    )


if __name__ == "__main__":
    main()
