"""Word lists for the synthetic text of the offline test harness.

Everything here is written by the project: no text is taken from real data sets.
The planted preference of the synthetic hh-rlhf data is defined by ``HELPFUL_WORDS``
(chosen answers) against ``DISMISSIVE_WORDS`` (rejected answers).
"""

HELPFUL_WORDS = (
    "gladly", "certainly", "happy", "helpful", "clearly", "carefully", "thanks", "welcome",
    "explain", "gently", "kindly", "sure", "detailed", "useful", "great", "absolutely",
)

DISMISSIVE_WORDS = (
    "whatever", "nope", "boring", "never", "refuse", "useless", "ignore", "meh",
    "dunno", "busy", "later", "skip", "pointless", "forget", "nah", "unclear",
)

TOPICS = (
    "garden", "river", "kettle", "bicycle", "lantern", "harbor", "violin", "meadow", "orchard",
    "library", "compass", "glacier", "market", "pottery", "telescope", "bakery", "canyon",
    "festival", "island", "workshop", "museum", "forest", "station", "village", "tower",
)

VERBS = (
    "build", "clean", "paint", "find", "repair", "visit", "measure", "plant", "cook", "carry",
    "describe", "open", "fold", "sketch", "sort", "mend", "count", "choose", "prepare", "share",
)

ADJECTIVES = (
    "small", "old", "quiet", "bright", "heavy", "narrow", "warm", "green", "distant", "simple",
    "round", "busy", "tall", "gentle", "early", "wooden", "silver", "hidden", "sturdy", "fresh",
)

NAMES = (
    "Mira", "Tobin", "Selka", "Arvo", "Linnea", "Oskar", "Juno", "Pavel", "Rhea", "Corin",
    "Edda", "Fenn", "Ilse", "Kasimir", "Nola", "Quill",
)

FILLER = (
    "the", "a", "of", "to", "and", "in", "with", "for", "on", "is", "it", "that", "this", "my",
    "your", "can", "do", "how", "what", "where", "when", "why", "which", "who", "I", "you", "we",
    "please", "about", "near", "after", "before", "first", "then", "also", "very",
)

# Syllables for made-up words: they give the BPE trainer enough distinct strings to reach
# benchmark-sized vocabularies (8000) from text the project generates itself.
ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "st", "tr", "ch")
NUCLEI = ("a", "e", "i", "o", "u", "ai", "ou", "ee")
CODAS = ("", "n", "r", "s", "l", "th", "x", "nd")


def made_up_words(rng, count: int) -> list[str]:
    """``count`` made-up words of one to four syllables, drawn from ``rng`` (a ``random.Random``)."""
    return ["".join(rng.choice(ONSETS) + rng.choice(NUCLEI) + rng.choice(CODAS) for _ in range(rng.randint(1, 4)))
            for _ in range(count)]
