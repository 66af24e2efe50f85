"""Regenerate the two example data sets (written for this project from word lists below; no third-party text).

- emotion/: classify a short sentence as joy, anger, fear or sadness.
- people/: rewrite a sentence about a person into the fixed format "Name | City | Age".

Run: .venv/bin/python training/examples/make_examples.py  (deterministic: seed 7)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

SUBJECTS = ["I", "My sister", "Tom", "Our neighbour", "The old man", "My friend", "She", "He", "The kids", "Dad",
            "Mom", "The coach", "My boss", "Anna", "Ravi", "The baker", "Grandma", "The new student"]
CUES = {
    "joy": ["was thrilled about", "laughed all day after", "felt on top of the world after", "was so happy with",
            "danced with delight at", "could not stop smiling about", "was overjoyed by", "cheered loudly at"],
    "anger": ["was furious about", "slammed the door after", "yelled in rage at", "was livid about",
              "was fuming over", "lost their temper at", "was outraged by", "shouted angrily about"],
    "fear": ["was terrified of", "trembled at the thought of", "was scared stiff by", "panicked about",
             "could not sleep for dread of", "was frightened by", "hid in terror from", "was afraid of"],
    "sadness": ["cried quietly about", "was heartbroken over", "felt empty after", "was grieving over",
                "wept alone after", "was deeply saddened by", "sighed in sorrow at", "felt miserable about"],
}
EVENTS = ["the test results", "the phone call", "the storm", "the letter", "the news", "the visit", "the party",
          "the long trip", "the game", "the meeting", "the dark basement", "the broken window", "the new job",
          "the old photo", "the surprise", "the noise outside", "the final score", "the empty house"]

NAMES = ["Maria", "John", "Aisha", "Kenji", "Lucas", "Fatima", "Olga", "Pedro", "Mei", "Samuel", "Ingrid", "Tariq",
         "Chloe", "Diego", "Hana", "Viktor", "Nora", "Omar", "Priya", "Leo", "Zara", "Ivan", "Emma", "Kofi"]
CITIES = ["Lisbon", "Paris", "Tokyo", "Lagos", "Madrid", "Oslo", "Cairo", "Lima", "Seoul", "Berlin", "Dublin",
          "Rome", "Nairobi", "Toronto", "Vienna", "Prague", "Sydney", "Denver", "Mumbai", "Quito"]
PATTERNS = ["{n} is {a} and lives in {c}.", "{n}, aged {a}, lives in {c}.", "{c} resident {n} is {a} years old.",
            "At {a}, {n} calls {c} home.", "{n} ({a}) moved to {c} last year.", "Meet {n} from {c}, age {a}.",
            "{n} turned {a} this spring in {c}.", "Born {a} years ago, {n} now lives in {c}."]


def emotion(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(CUES))
        text = f"{rng.choice(SUBJECTS)} {rng.choice(CUES[label])} {rng.choice(EVENTS)}."
        rows.append({"input": text, "label": label})
    return rows


def people(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 79)
        text = rng.choice(PATTERNS).format(n=name, c=city, a=age)
        rows.append({"input": text, "output": f"{name} | {city} | {age}"})
    return rows


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    rng = random.Random(7)
    write(HERE / "emotion" / "train.jsonl", emotion(rng, 160))
    write(HERE / "emotion" / "test.jsonl", emotion(rng, 60))
    write(HERE / "people" / "train.jsonl", people(rng, 160))
    write(HERE / "people" / "test.jsonl", people(rng, 60))


if __name__ == "__main__":
    main()
