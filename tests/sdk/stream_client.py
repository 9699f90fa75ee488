"""Reads one streamed `responses.create` through a gateway with the official OpenAI Python SDK.

Usage: stream_client.py BASE_URL
Prints one JSON object: the first and last event types, how many events came, the text, and the
`openai.APIError` that ended the stream (what an `error` event raises), or null. Any other
exception (an event the SDK cannot parse) makes it exit non-zero.
"""

import json
import sys

import openai


def main() -> None:
    client = openai.OpenAI(base_url=sys.argv[1], api_key="sk-test", max_retries=0, timeout=60)
    events = []
    text = ""
    error = None
    try:
        with client.responses.create(model="mock-model", input="Reply with exactly one word: HELLO", stream=True) as stream:
            for event in stream:
                events.append(event.type)
                if event.type == "response.output_text.delta":
                    text += event.delta
    except openai.APIError as caught:
        error = {"message": caught.message, "code": caught.code}
    print(
        json.dumps(
            {
                "first": events[0] if events else None,
                "last": events[-1] if events else None,
                "count": len(events),
                "text": text,
                "error": error,
            }
        )
    )


if __name__ == "__main__":
    main()
