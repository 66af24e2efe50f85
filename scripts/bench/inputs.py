"""The fixed inputs every benchmark sends, so the in-process and HTTP runs see the same texts (no torch here)."""

TEXTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works.",
    "List three reasons to learn a second language and explain each one in a sentence or two.",
    "What is the capital of France?",
    "Describe your favourite meal.",
    "The film was long but the ending made up for every slow minute of it.",
    "Summarize the plot of a detective novel set in a small mountain village during a snowstorm.",
    "Translate to French: the weather is nice today and we are going to the beach.",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
    "I loved the soundtrack and the actors, but the plot was thin and the pacing dragged through the middle hour.",
    "Tell me about the history of the bicycle.",
    "Hi",
    "Compose a haiku about autumn leaves.",
    "How do vaccines train the immune system to recognise a virus it has never seen before?",
    "Plan a three day trip to Rome.",
]
CLASSIFY_TEXTS = ["Great!", "Terrible.", "It was fine.", "Loved it", "Not for me.", "Meh", "Superb acting", "Boring"]
CLASSIFY_LABELS = {"positive": " positive", "negative": " negative", "neutral": " neutral",
                   "mixed": " mixed feelings"}
