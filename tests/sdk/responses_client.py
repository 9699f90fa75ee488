"""Drives a gateway with the official OpenAI Python SDK, as a client application would.

Usage: responses_client.py BASE_URL
Prints one JSON object: what the SDK parsed from a non-streaming and a streaming
`responses.create`, and whether a mid-stream error surfaced as an exception.
"""

import json
import sys

import openai


def main() -> None:
    client = openai.OpenAI(base_url=sys.argv[1], api_key="sk-test", max_retries=0, timeout=30)

    response = client.responses.create(model="mock-model", input="What is the status of job-382?")
    plain = {
        "id": response.id,
        "status": response.status,
        "output_types": [item.type for item in response.output],
        "function_name": next(item.name for item in response.output if item.type == "function_call"),
    }

    events = []
    text = ""
    with client.responses.create(model="mock-model", input="Reply with exactly one word: HELLO", stream=True) as stream:
        for event in stream:
            events.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
    streamed = {"first": events[0], "last": events[-1], "count": len(events), "text": text}

    print(json.dumps({"plain": plain, "streamed": streamed}))


if __name__ == "__main__":
    main()
