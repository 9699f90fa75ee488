"""`make demo`: prints a Responses API answer as text, a JSON answer whole or an event stream
as its text deltas arrive (reasoning first, then the answer)."""

import json
import sys


def show_response(response):
    for item in response.get("output", []):
        if item.get("type") == "function_call":
            print(f"[function_call] {item['name']}({item['arguments']})")
        for part in item.get("content") or []:
            if part.get("text"):
                print(f"[{item['type']}] {part['text']}")
    print(f"[status: {response.get('status')}]")


def main():
    section = None
    for line in sys.stdin:
        if line.startswith("{"):
            show_response(json.loads(line))
            continue
        if not line.startswith("data: "):
            continue
        event = json.loads(line[len("data: "):])
        name = event.get("type", "")
        if name.endswith(".delta") and isinstance(event.get("delta"), str):
            kind = "reasoning" if "reasoning" in name else "answer"
            if kind != section:
                print(("\n" if section else "") + f"[{kind}] ", end="")
                section = kind
            print(event["delta"], end="", flush=True)
        elif name == "response.completed":
            print()
            show_response({"status": event.get("response", {}).get("status")})


if __name__ == "__main__":
    main()
