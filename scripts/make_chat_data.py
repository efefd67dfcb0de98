#!/usr/bin/env python3
"""A small instruction data set for the fine-tuning example (configs/sft.yaml): JSON Lines
records of the three kinds `strata prepare-data --format jsonl` reads, about arithmetic a tiny
model can learn in a few hundred steps. Deterministic (a fixed seed): the same files every time.

  scripts/make_chat_data.py OUT.jsonl [--records N]

writes N records: mostly chats ({"messages": [...]}, some with a system message, some with two
turns), with prompt/completion and plain text records mixed in. prepare-data splits them into
train and val.
"""
import argparse
import json
import os
import random

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
         "eighteen"]


def question(rng):
    a, b = rng.randrange(10), rng.randrange(10)
    if rng.random() < 0.5:
        return f"What is {WORDS[a]} plus {WORDS[b]}?", f"{WORDS[a].capitalize()} plus {WORDS[b]} is {WORDS[a + b]}."
    a, b = max(a, b), min(a, b)
    return f"What is {WORDS[a]} minus {WORDS[b]}?", f"{WORDS[a].capitalize()} minus {WORDS[b]} is {WORDS[a - b]}."


def record(rng):
    kind = rng.random()
    if kind < 0.1:
        q, a = question(rng)
        return {"prompt": f"Question: {q}\nAnswer:", "completion": f" {a}"}
    if kind < 0.15:
        q, a = question(rng)
        return {"text": f"{q} {a}"}
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": "You answer questions about numbers."})
    for _ in range(2 if rng.random() < 0.25 else 1):
        q, a = question(rng)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": messages}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--records", type=int, default=3000)
    args = parser.parse_args()
    if os.path.dirname(args.out):
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    rng = random.Random(20261202)
    with open(args.out, "w") as out:
        for _ in range(args.records):
            out.write(json.dumps(record(rng)) + "\n")
    print(f"{args.out}: {args.records} records")


if __name__ == "__main__":
    main()
