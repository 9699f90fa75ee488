"""Drives the legacy completions API with the official OpenAI Python SDK, as a client would.

Usage: completions_client.py BASE_URL
Prints one JSON object: what the SDK parsed from a non-streaming `completions.create` and from a
streaming one that asks for a usage chunk. Any answer the SDK cannot parse makes it exit non-zero.
"""

import json
import sys

import openai


def main() -> None:
    client = openai.OpenAI(base_url=sys.argv[1], api_key="sk-test", max_retries=0, timeout=30)

    completion = client.completions.create(model="tiny", prompt="Say hello", max_tokens=16)
    choice = completion.choices[0]
    plain = {
        "id": completion.id,
        "object": completion.object,
        "model": completion.model,
        "text": choice.text,
        "finish_reason": choice.finish_reason,
        "system_fingerprint": completion.system_fingerprint,
        "usage": completion.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}),
    }

    chunks = []
    with client.completions.create(
        model="tiny",
        prompt="Say hello",
        max_tokens=2,
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        for chunk in stream:
            chunks.append(chunk)
    finishes = [choice.finish_reason for chunk in chunks for choice in chunk.choices]
    last = chunks[-1]
    streamed = {
        "count": len(chunks),
        "ids": sorted({chunk.id for chunk in chunks}),
        "text": "".join(choice.text for chunk in chunks for choice in chunk.choices),
        "finish_reasons": [reason for reason in finishes if reason is not None],
        "last_choices": len(last.choices),
        "last_usage": last.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}),
        "last_fingerprint": last.system_fingerprint,
    }

    print(json.dumps({"plain": plain, "streamed": streamed}))


if __name__ == "__main__":
    main()
