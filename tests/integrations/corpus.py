"""A small document set (about 550 tokens, two test-size cache pages) with known answers.

The facts are invented, so the embedded model can only answer from the documents. Shared by the
LangChain tests, so the corpus is prefilled once per session whichever test runs first.
"""

from __future__ import annotations

# Cache pages of 256 tokens (default: 1024) let this ~550-token corpus show reuse, which keeps the
# corpus tests fast on CPU; the mechanism is the same at any page size (see conftest.py).
TEST_PAGE_SIZE = 256

_TOWNS = [
    ("Corlen", "north", "fishing nets", "a stone bridge"),
    ("Ashby Vale", "east", "apple cider", "a windmill"),
    ("Dunmere", "south", "wool blankets", "a clock tower"),
    ("Pell Harbour", "west", "rope and sailcloth", "a covered market"),
    ("Tressa", "north", "copper pots", "a round chapel"),
    ("Lowen Cross", "east", "cheese", "a toll house"),
    ("Merrow", "south", "salted fish", "a long pier"),
]

FACTS = (
    "The harbour master of Port Venna is a woman named Ilse Marrow.",
    "The door code of the lighthouse at Merrow is 58214.",
)

QUESTIONS = (
    ("Who is the harbour master of Port Venna?", "Ilse"),
    ("What is the door code of the lighthouse at Merrow?", "58214"),
)


def _town(name: str, side: str, trade: str, landmark: str) -> str:
    return (
        f"{name} is a small town on the {side} side of the island of Maravel. Most families in {name} "
        f"live from {trade}, which they sell at the spring fair. Visitors remember {name} for {landmark} "
        f"near the main square. The road from {name} to the capital takes about a day by cart."
    )


DOCS: tuple[str, ...] = (
    *(_town(*t) for t in _TOWNS[:3]),
    "Port Venna is the largest port of Maravel. " + FACTS[0] + " Ships from Port Venna carry wool and salt.",
    *(_town(*t) for t in _TOWNS[3:]),
    "Merrow keeps the oldest lighthouse of Maravel. " + FACTS[1] + " Only the keeper may open it.",
)

SYSTEM_TEMPLATE = "Answer the question using only these documents.\n\n{docs}"


def joined() -> str:
    return "\n\n".join(DOCS)
