"""Generate deltatune's bundled encoder data: four small labelled English tasks, one per task kind.

Meant for fine-tuning a small sentence encoder (all-MiniLM-L6-v2, a 6-layer BERT) on each kind of
head: one label per text, several labels per text, a similarity score per pair of texts, and one tag
per token. Every task is built the same way: sentence templates whose slots are filled with values
drawn at random, and labels that follow from which templates and values were used, so every label
is correct by construction. Each task writes ``<task>/train.jsonl`` and ``<task>/test.jsonl``
(640 and 200 records, one JSON object a line):

* ``classify``: ``{"text": ..., "label": ...}``, the intent of a customer-support message, one of
  ``billing``, ``shipping``, ``technical``, ``account``, ``returns``. Ten templates per class in
  mixed styles (questions, complaints, terse lower-case notes, longer messages), optionally
  wrapped in a greeting and a sign-off; several templates of each class use words the other
  classes use too ("order", "account", "refund", "help", "arrived"), so a single keyword does not
  give the class away. Classes are exactly balanced (a fifth each).
* ``multilabel``: ``{"text": ..., "labels": [...]}``, which of ``sports``, ``politics``, ``weather``,
  ``economy`` a short news-like sentence mentions (1 to 3 of them, listed in that order). The
  number of topics is drawn uniformly from 1-3, then the topics; each topic gets a clause from
  its templates (seven per topic), and the clauses, in random order, are joined by varied
  connectives ("; meanwhile,", ". Elsewhere,", ", while"...). Where fewer than three clauses were
  drawn, a second clause about one of the topics is added 30% of the time, so that the number of
  clauses does not give away the number of labels. Cities appear in the clauses of every topic.
* ``regression``: ``{"text": ..., "text_pair": ..., "score": ...}``, STS-B-style similarity from 0.0
  (unrelated) to 5.0 (same meaning), one decimal. The first sentence fills the template
  "<subject> <verb> <object> <place> <time>." (e.g. "The physician repaired the old bicycle in the
  garage last night."); the second copies it, replaces k of its five slots (k uniform in 0-4) with
  other values, and applies up to two paraphrases: a synonym for an unchanged slot ("fixed" for
  "repaired"), active <-> passive voice ("The old bicycle was repaired by the physician ..."), or
  moving the time phrase to the front ("Last night, the physician ..."). A pair with nothing
  replaced gets at least one paraphrase, so no pair is two identical sentences. The score is::

      score = 5 - sum(SLOT_COSTS[slot] for each replaced slot) - 0.2 * (number of paraphrases)
                + noise,   noise uniform in [-0.2, 0.2]

  clamped to [0, 5] and rounded to one decimal, with SLOT_COSTS: subject 1.3, verb 1.3,
  object 1.2, place 1.0, time 1.0 (who did what matters more than where and when). The two
  sentences are swapped half of the time.
* ``tag``: ``{"tokens": [...], "tags": [...]}``, named entities in BIO tags (``B-PER``, ``I-PER``,
  ``B-LOC``, ``I-LOC``, ``B-ORG``, ``I-ORG``, ``O``). Eighteen templates with one to three entity
  slots; people are a first and last name most of the time (otherwise one of them), places are
  cities and countries, many of two or three words ("New York", "Rio de Janeiro"), organisations
  are a name and usually a suffix ("Acme Corp", "Blue Harbor Bank"). Tokens are whitespace words,
  with punctuation as tokens of its own. Templates start with capitalised non-entity words too
  ("Shares", "Police"), so capitalisation alone is not enough.

Train and test draw from disjoint slot values where it matters: products and customer names in
``classify``; teams, people, parties, companies and cities in ``multilabel``; every entity name
(first names, last names, places, organisation names) in ``tag``. Generic fillers (amounts,
dates, devices, percentages) are shared. No text (no pair, for ``regression``) is in both splits,
or twice in one. So held-out accuracy measures whether the model generalises from the context,
not whether it memorised the values it was trained on.

Deterministic: the same seed gives byte-identical files (each task draws from its own generator,
seeded by the seed and the task's name). From the repository root::

    python scripts/make_encoder_data.py   # writes src/deltatune/data/encoder/
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "src" / "deltatune" / "data" / "encoder"
DEFAULT_SEED = 0
TRAIN_SIZE = 640
TEST_SIZE = 200
TEST_SHARE_OF_VALUES = 1 / 3  # of each slot pool that is split, the share kept for the test split

# --- slot values shared by several tasks ----------------------------------------------------------

FIRST_NAMES = [
    "Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Ingrid", "James", "Keiko",
    "Liam", "Maria", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Samuel", "Tara", "Umar",
    "Valerie", "Wei", "Ximena", "Yusuf", "Zoe", "Amir", "Beatriz", "Chen", "Daniel", "Emma", "Felix",
    "Hannah", "Ivan", "Julia", "Kofi", "Laura", "Marco", "Nora", "Pablo",
]
LAST_NAMES = [
    "Smith", "Garcia", "Novak", "Okafor", "Tanaka", "Muller", "Rossi", "Kowalski", "Haddad", "Silva",
    "Johansson", "Nguyen", "Patel", "Fischer", "Moreau", "Kim", "Brennan", "Costa", "Ivanova", "Lindqvist",
    "Mensah", "Petrov", "Alvarez", "Dubois", "Becker", "Sato", "Walsh", "Romero", "Hughes", "Jensen",
    "Castillo", "Weber", "Morgan", "Ozturk", "Reyes", "Takahashi", "Fontaine", "Bianchi", "Kaur", "Larsen",
]
CITIES = [
    "New York", "San Francisco", "Buenos Aires", "Cape Town", "Hong Kong", "Los Angeles",
    "Rio de Janeiro", "New Delhi", "Kuala Lumpur", "Mexico City", "Tel Aviv", "Salt Lake City",
    "Paris", "Berlin", "Tokyo", "Nairobi", "Lima", "Oslo", "Madrid", "Toronto", "Sydney", "Cairo",
    "Lisbon", "Dublin", "Vienna", "Prague", "Seoul", "Mumbai", "Lagos", "Chicago", "Boston", "Denver",
    "Munich", "Zurich", "Helsinki", "Warsaw", "Athens", "Montreal", "Manila", "Bangkok",
]
COUNTRIES = [
    "France", "Brazil", "Kenya", "Japan", "Canada", "Norway", "Peru", "Vietnam", "Ghana", "Portugal",
    "South Africa", "New Zealand", "United Kingdom", "Sri Lanka", "Costa Rica", "Saudi Arabia",
    "Czech Republic", "United States",
]
ORG_NAMES = [
    "Acme", "Northwind", "Blue Harbor", "Silver Creek", "Redwood", "Ironbridge", "Brightpath", "Oakmont",
    "Summit", "Granite Peak", "Evergreen", "Lakeside", "Falcon", "Crescent", "Pioneer", "Sterling",
    "Horizon", "Atlas", "Beacon", "Cobalt", "Keystone", "Meridian", "Nova", "Orion", "Quantum",
    "Riverstone", "Starline", "Tidewater", "Vertex", "Westbrook", "Zenith", "Bluebird", "Copperfield",
    "Foxglove", "Juniper", "Red Maple",
]
ORG_SUFFIXES = [
    "Corp", "Inc", "Group", "Labs", "Bank", "Airlines", "Motors", "Foods", "Systems", "Media", "Energy",
    "Partners", "Holdings", "Pharmaceuticals", "Insurance",
]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def split_pool(values: Sequence, rng: random.Random) -> tuple[list, list]:
    """Shuffle ``values`` and cut them into a train pool and a disjoint test pool."""
    values = list(values)
    rng.shuffle(values)
    n_test = max(1, round(len(values) * TEST_SHARE_OF_VALUES))
    return values[n_test:], values[:n_test]


def draw_unique(make_record: Callable[[], dict], count: int, key: Callable[[dict], Hashable],
                seen: set) -> list[dict]:
    """``count`` records from ``make_record`` whose key is not in ``seen`` (which collects them),
    so that no text repeats within a split or across the splits sharing ``seen``."""
    records: list[dict] = []
    for _ in range(100 * count):
        record = make_record()
        if key(record) not in seen:
            seen.add(key(record))
            records.append(record)
            if len(records) == count:
                return records
    raise RuntimeError(f"the slot pools give only {len(records)} distinct records of {count}")


def capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


# --- classify: customer-support intent --------------------------------------------------------------

CLASSIFY_TEMPLATES = {
    "billing": [
        "I was charged {amount} twice for my {product} order.",
        "Why is there a {amount} charge on my card from {date}?",
        "Can you help me understand my latest invoice? It says {amount} for the {product} but the "
        "price on your site was lower.",
        "my card got declined when paying for the {product} but the money still left my bank",
        "My name is {name}. I need a proper invoice with VAT for order {order_id}, for my company.",
        "The discount code was not applied and I paid full price ({amount}) for the {product}.",
        "How do I update the credit card on my account so the {product} subscription renews?",
        "You billed me {amount} after I cancelled my subscription on {date}. I want a refund of that charge.",
        "double charge?? {amount} taken on {date} for order {order_id}",
        "Is it possible to pay for the {product} in instalments instead of {amount} at once?",
    ],
    "shipping": [
        "Where is my order? I ordered the {product} on {date} and it still hasn't arrived.",
        "The tracking number for order {order_id} hasn't updated in {days} days.",
        "Can you help me change the delivery address for my {product}? I moved to {city}.",
        "{carrier} says the package was delivered but there is nothing at my door.",
        "How long does express delivery to {city} usually take for something like a {product}?",
        "still waiting on my {product}... it's been {days} days",
        "My name is {name}. Do you ship to {country}, and how much does delivery cost?",
        "My parcel with the {product} was left with a neighbour and I can't find out which one.",
        "The estimated delivery date for my {product} keeps moving. Will it arrive before {date}?",
        "Can I pick up order {order_id} from your store in {city} instead of having it delivered?",
    ],
    "technical": [
        "The app crashes every time I open it on my {device}.",
        "My {product} won't connect to wifi since the update on {date}.",
        "I keep getting error {error_code} when I try to check out on the website with my {device}.",
        "The {product} freezes after a few minutes. Is there a firmware fix or a reset I can try?",
        "My name is {name}. Since {date} your site only shows a blank page on my {device}.",
        "how do i pair the {product} with my {device}",
        "Notifications from your app don't appear on my {device} anymore, can you help?",
        "The order page loads forever and then shows error {error_code}. I've tried two browsers.",
        "The {product} app says the firmware is up to date but the bug is still there.",
        "bluetooth keeps dropping between my {device} and the {product}, super annoying",
    ],
    "account": [
        "I can't log in to my account from my {device}, it says my password is wrong.",
        "How do I change the email address on my account? I'm {name} and I no longer use the old one.",
        "This is {name}: please delete my account and all my personal data.",
        "I never received the verification code to sign in on my {device}.",
        "Someone placed an order for a {product} from my account on {date}! I think I was hacked.",
        "My name is {name}. Can you help me merge my two accounts? I used different emails.",
        "how do i turn on two-factor authentication on my {device}",
        "My account got locked on {date} after too many attempts. Can you unlock it?",
        "I want to change the name on my profile to {name}, I got married.",
        "The password reset link you emailed on {date} expired before I could use it.",
    ],
    "returns": [
        "I'd like to return the {product} I bought on {date}, it's the wrong size.",
        "How do I send back a damaged {product}?",
        "The {product} arrived broken. Can I get a replacement or a refund?",
        "My name is {name}. I sent order {order_id} back two weeks ago and still have no refund.",
        "Is the return window 30 days or 14 days for the {product}?",
        "Can you help me exchange the {product} for a different colour?",
        "i want my money back for the {product}, it doesn't work as described",
        "Do I have to pay for the return label for order {order_id}, or is it free?",
        "I printed the return label but the drop-off point near me in {city} is closed.",
        "Changed my mind about the {product}. It's still unopened; can I return it?",
    ],
}
CLASSIFY_LABELS = list(CLASSIFY_TEMPLATES)
PRODUCTS = [
    "wireless headphones", "coffee grinder", "yoga mat", "standing desk", "electric kettle",
    "running shoes", "phone case", "desk lamp", "hiking backpack", "blender", "smart watch", "air fryer",
    "gaming mouse", "mechanical keyboard", "winter jacket", "water bottle", "bluetooth speaker",
    "office chair", "robot vacuum", "hair dryer", "camping tent", "sewing machine", "rice cooker",
    "baby monitor", "electric toothbrush", "wool sweater", "tablet stand", "laptop sleeve",
    "photo printer", "garden hose", "frying pan set", "fitness tracker", "security camera",
    "e-reader", "espresso machine", "weighted blanket",
]
DEVICES = ["iPhone", "Android phone", "laptop", "Windows PC", "Mac", "iPad", "Chromebook", "smart TV",
           "Samsung tablet", "work computer"]
CARRIERS = ["UPS", "FedEx", "DHL", "The courier", "The postal service", "Your delivery partner"]
CURRENCIES = ["$", "€", "£"]
GREETINGS = ["Hi.", "Hello!", "Hi there,", "Good morning.", "Hello team,"]
SIGN_OFFS = ["Thanks.", "Thank you!", "Please help.", "Thanks in advance.", "Regards, {name}", "- {name}"]


def support_date(rng: random.Random) -> str:
    return rng.choice([f"{rng.choice(MONTHS)} {rng.randint(1, 28)}", f"the {rng.randint(4, 20)}th",
                       f"last {rng.choice(WEEKDAYS)}", "yesterday", f"{rng.randint(2, 9)}/{rng.randint(1, 28)}"])


def make_classify(rng: random.Random) -> tuple[list[dict], list[dict]]:
    products = split_pool(PRODUCTS, rng)
    names = split_pool(FIRST_NAMES, rng)
    seen: set = set()

    def message(label: str, split: int) -> dict:
        slots = {
            "product": rng.choice(products[split]),
            "name": rng.choice(names[split]),
            "amount": f"{rng.choice(CURRENCIES)}{rng.randint(5, 400)}.{rng.choice(['00', '49', '99'])}",
            "date": support_date(rng),
            "order_id": f"#{rng.randint(10000, 99999)}",
            "device": rng.choice(DEVICES),
            "carrier": rng.choice(CARRIERS),
            "city": rng.choice(CITIES),
            "country": rng.choice(COUNTRIES),
            "days": rng.randint(3, 21),
            "error_code": rng.choice(["500", "403", "E-102", "0x80070005", "TIMEOUT", "ERR_CONNECTION"]),
        }
        parts = [rng.choice(CLASSIFY_TEMPLATES[label]).format(**slots)]
        # greetings and sign-offs vary the length and form and carry no class information
        if rng.random() < 0.3:
            parts.insert(0, rng.choice(GREETINGS))
        if rng.random() < 0.3:
            parts.append(rng.choice(SIGN_OFFS).format(**slots))
        return {"text": " ".join(parts), "label": label}

    def split_records(split: int, size: int) -> list[dict]:
        per_class = size // len(CLASSIFY_LABELS)
        records = [record for label in CLASSIFY_LABELS
                   for record in draw_unique(lambda: message(label, split), per_class, lambda r: r["text"], seen)]
        rng.shuffle(records)
        return records

    return split_records(0, TRAIN_SIZE), split_records(1, TEST_SIZE)


# --- multilabel: topics of a news-like sentence -------------------------------------------------------

TOPICS = ["sports", "politics", "weather", "economy"]
CLAUSE_TEMPLATES = {
    "sports": [
        "{team} beat {team2} {score} in {match}",
        "{person} won the {competition} for the second year running",
        "{team} sacked their coach after a run of five defeats",
        "{person} was ruled out of the season with a knee injury",
        "{match} in {city} drew a crowd of {crowd} fans",
        "{person} signed a three-year contract with {team}",
        "{team} clinched the league title on the final day",
    ],
    "politics": [
        "{person} announced a run for {office}",
        "parliament passed {bill} by {votes} votes",
        "{party} called for an early election",
        "{person} resigned as {minister} amid a scandal",
        "voters in {city} go to the polls on {weekday}",
        "opposition leader {person} attacked the government over {bill}",
        "{person} and {person2} held talks on the border dispute",
    ],
    "weather": [
        "heavy rain is expected in {city} on {weekday}",
        "temperatures in {city} climbed to {temperature} degrees",
        "a snowstorm closed roads around {city}",
        "forecasters warned of strong winds along the coast near {city}",
        "{city} recorded its driest {month} in decades",
        "thick fog grounded flights out of {city} on {weekday}",
        "a heatwave will grip {city} until the weekend",
    ],
    "economy": [
        "inflation rose to {percent} percent in {month}",
        "{company} reported a {percent} percent jump in quarterly profit",
        "the central bank held interest rates at {percent} percent",
        "unemployment in {city} fell to a five-year low",
        "shares of {company} dropped after weak sales figures",
        "{company} plans to cut {jobs} jobs",
        "house prices in {city} rose for the {ordinal} month in a row",
    ],
}
TEAMS = [
    "the Riverside Rovers", "Northbridge United", "the Harbour City Hawks", "Eastfield Athletic",
    "the Valley Vipers", "Westport Wanderers", "the Granite Giants", "Lakeshore FC", "the Mountain Lions",
    "the Capital Comets", "Brookfield Town", "the Coastal Sharks", "Kingsbury City", "the Desert Foxes",
    "Millbrook Albion", "the Iron Wolves", "Ashford Athletic", "the Falcons", "Oakridge United",
    "the Blue Sox", "Pinewood FC",
]
PARTIES = ["the Green Party", "the Liberal Alliance", "the Labour Party", "the Conservative Party",
           "the Progress Party", "the Centre Party", "the Social Democrats", "the Reform Movement",
           "the People's Front"]
MATCHES = ["the cup final", "the derby", "the semi-final", "the season opener", "the play-off"]
COMPETITIONS = ["national marathon title", "world indoor title", "open tennis championship",
                "national cycling tour", "golf masters"]
OFFICES = ["mayor", "president", "governor", "the senate"]
BILLS = ["the housing bill", "the education reform", "the immigration bill", "the voting rights bill",
         "the police reform bill"]
MINISTERS = ["foreign minister", "health minister", "interior minister", "education minister",
             "defence minister"]
ORDINALS = ["third", "fourth", "fifth", "sixth", "seventh"]
# every connective is followed by a clause in mid-sentence (". Elsewhere, the ..."), so clauses start in
# lower case unless they start with a name
CONNECTIVES = [", while ", "; meanwhile, ", ", and ", ". In other news, ", ". Elsewhere, ", ". Separately, "]


def make_multilabel(rng: random.Random) -> tuple[list[dict], list[dict]]:
    pools = {
        "team": split_pool(TEAMS, rng),
        "first": split_pool(FIRST_NAMES, rng),
        "last": split_pool(LAST_NAMES, rng),
        "party": split_pool(PARTIES, rng),
        "company": split_pool(ORG_NAMES, rng),
        "city": split_pool(CITIES, rng),
    }

    def clause(topic: str, split: int) -> str:
        def person() -> str:
            return f"{rng.choice(pools['first'][split])} {rng.choice(pools['last'][split])}"

        team, team2 = rng.sample(pools["team"][split], 2)
        winner_goals = rng.randint(1, 5)
        slots = {
            "team": team, "team2": team2, "score": f"{winner_goals}-{rng.randint(0, winner_goals - 1)}",
            "person": person(), "person2": person(), "party": rng.choice(pools["party"][split]),
            "company": f"{rng.choice(pools['company'][split])} {rng.choice(ORG_SUFFIXES)}",
            "city": rng.choice(pools["city"][split]),
            "match": rng.choice(MATCHES), "competition": rng.choice(COMPETITIONS),
            "crowd": f"{rng.randint(12, 90)},000", "office": rng.choice(OFFICES), "bill": rng.choice(BILLS),
            "votes": rng.randint(180, 320), "minister": rng.choice(MINISTERS),
            "weekday": rng.choice(WEEKDAYS), "month": rng.choice(MONTHS), "temperature": rng.randint(31, 44),
            "percent": f"{rng.randint(1, 9)}.{rng.randint(0, 9)}", "jobs": rng.choice([200, 450, 800, 1200, 3000]),
            "ordinal": rng.choice(ORDINALS),
        }
        return rng.choice(CLAUSE_TEMPLATES[topic]).format(**slots)

    def sentence(split: int) -> dict:
        topics = rng.sample(TOPICS, rng.randint(1, 3))
        clause_topics = list(topics)
        if len(clause_topics) < 3 and rng.random() < 0.3:
            clause_topics.append(rng.choice(topics))
        rng.shuffle(clause_topics)
        text = capitalise(clause(clause_topics[0], split))
        for topic in clause_topics[1:]:
            text += rng.choice(CONNECTIVES) + clause(topic, split)
        return {"text": text + ".", "labels": [topic for topic in TOPICS if topic in topics]}

    seen: set = set()
    train = draw_unique(lambda: sentence(0), TRAIN_SIZE, lambda r: r["text"], seen)
    test = draw_unique(lambda: sentence(1), TEST_SIZE, lambda r: r["text"], seen)
    return train, test


# --- regression: semantic similarity of sentence pairs ------------------------------------------------

# each slot value is a tuple of interchangeable surface forms (the first and its synonyms); verbs
# have the same past tense and past participle, so the passive voice can reuse them
SLOT_VALUES = {
    "subject": [
        ("the doctor", "the physician"), ("a farmer",), ("two students", "a pair of students"),
        ("the teacher", "the instructor"), ("a young boy", "a little boy"), ("the old woman", "the elderly woman"),
        ("the mechanic",), ("a police officer", "a cop"), ("the children", "the kids"),
        ("a tourist", "a visitor"), ("the chef", "the cook"), ("my neighbour", "the man next door"),
    ],
    "verb": [
        ("repaired", "fixed", "mended"), ("cleaned", "washed"), ("bought", "purchased"), ("sold",),
        ("painted",), ("moved", "relocated"), ("inspected", "examined", "checked"), ("carried", "hauled"),
        ("found", "discovered"), ("photographed",),
    ],
    "object": [
        ("the old bicycle", "the old bike"), ("a wooden table",), ("the red car", "the red automobile"),
        ("a small boat", "a little boat"), ("the kitchen window",), ("a leather sofa", "a leather couch"),
        ("the broken fence",), ("a large painting", "a big painting"), ("the garden shed",),
        ("a blue suitcase",), ("the front door",), ("a metal ladder",),
    ],
    "place": [
        ("in the garage",), ("at the market", "at the marketplace"), ("near the river", "by the river"),
        ("in the city centre", "downtown"), ("behind the school", "at the back of the school"),
        ("in the garden", "in the yard"), ("at the harbour", "at the port"), ("on the farm",),
        ("in the workshop",), ("outside the station",),
    ],
    "time": [
        ("on Monday morning",), ("last night", "yesterday evening"), ("at noon", "at midday"),
        ("before sunrise", "before dawn"), ("after lunch",), ("on Sunday",),
        ("early in the morning", "in the early morning"), ("last week",), ("during the holidays",),
        ("a few days ago", "several days ago"),
    ],
}
SLOTS = list(SLOT_VALUES)
SLOT_COSTS = {"subject": 1.3, "verb": 1.3, "object": 1.2, "place": 1.0, "time": 1.0}
PARAPHRASE_COST = 0.2
MAX_PARAPHRASES = 2
SCORE_NOISE = 0.2


def render(chosen: dict[str, tuple[int, int]], passive: bool, time_first: bool) -> str:
    """The sentence for ``chosen`` (slot -> (value index, surface form index))."""
    words = {slot: SLOT_VALUES[slot][value][form] for slot, (value, form) in chosen.items()}
    if passive:
        core = f"{words['object']} was {words['verb']} by {words['subject']} {words['place']}"
    else:
        core = f"{words['subject']} {words['verb']} {words['object']} {words['place']}"
    sentence = f"{words['time']}, {core}" if time_first else f"{core} {words['time']}"
    return capitalise(sentence) + "."


def make_regression(rng: random.Random) -> tuple[list[dict], list[dict]]:
    def pair() -> dict:
        first = {}
        for slot in SLOTS:
            value = rng.randrange(len(SLOT_VALUES[slot]))
            first[slot] = (value, rng.randrange(len(SLOT_VALUES[slot][value])))
        first_passive, first_time_first = rng.random() < 0.2, rng.random() < 0.3

        second = dict(first)
        replaced = rng.sample(SLOTS, rng.randint(0, 4))
        for slot in replaced:
            value = rng.choice([v for v in range(len(SLOT_VALUES[slot])) if v != first[slot][0]])
            second[slot] = (value, rng.randrange(len(SLOT_VALUES[slot][value])))

        paraphrases = ["voice", "time position"] + [
            slot for slot in SLOTS if slot not in replaced and len(SLOT_VALUES[slot][first[slot][0]]) > 1]
        applied = rng.sample(paraphrases, rng.randint(0 if replaced else 1, MAX_PARAPHRASES))
        for slot in [change for change in applied if change in SLOT_VALUES]:  # not a set: its order varies by run
            value, form = first[slot]
            second[slot] = (value, rng.choice([f for f in range(len(SLOT_VALUES[slot][value])) if f != form]))
        second_passive = first_passive != ("voice" in applied)
        second_time_first = first_time_first != ("time position" in applied)

        score = (5 - sum(SLOT_COSTS[slot] for slot in replaced) - PARAPHRASE_COST * len(applied)
                 + rng.uniform(-SCORE_NOISE, SCORE_NOISE))
        texts = [render(first, first_passive, first_time_first), render(second, second_passive, second_time_first)]
        rng.shuffle(texts)
        return {"text": texts[0], "text_pair": texts[1], "score": round(min(5.0, max(0.0, score)), 1)}

    seen: set = set()
    train = draw_unique(pair, TRAIN_SIZE, lambda r: (r["text"], r["text_pair"]), seen)
    test = draw_unique(pair, TEST_SIZE, lambda r: (r["text"], r["text_pair"]), seen)
    return train, test


# --- tag: named entities in BIO tags ---------------------------------------------------------------

TAG_TEMPLATES = [
    "{PER} flew from {LOC} to {LOC} last week .",
    "{PER} , the chief executive of {ORG} , arrived in {LOC} on Tuesday .",
    "Shares of {ORG} rose sharply after the announcement .",
    "Yesterday {PER} met {PER} at the {ORG} offices .",
    "The new factory in {LOC} will employ 300 people , {ORG} said .",
    "According to {PER} , rents in {LOC} have doubled since 2019 .",
    "{ORG} has hired {PER} as its new head of research .",
    "Will {PER} move back to {LOC} next year ?",
    "Heavy traffic was reported near {LOC} on Friday morning .",
    "{PER} and {PER} founded {ORG} in a small garage .",
    "In {LOC} , thousands of fans waited for hours to see {PER} .",
    "A spokesperson for {ORG} declined to comment on the report .",
    "{PER} told reporters that {ORG} would open an office in {LOC} .",
    "Police in {LOC} are looking for {PER} , who disappeared on Sunday .",
    "Last year {ORG} bought a rival company based in {LOC} .",
    "\" We are very proud of the team , \" said {PER} .",
    "Tickets for the concert in {LOC} sold out within an hour .",
    "Is {ORG} still hiring engineers in {LOC} ?",
]


def make_tag(rng: random.Random) -> tuple[list[dict], list[dict]]:
    firsts, lasts = split_pool(FIRST_NAMES, rng), split_pool(LAST_NAMES, rng)
    places, org_names = split_pool(CITIES + COUNTRIES, rng), split_pool(ORG_NAMES, rng)

    def entity(kind: str, split: int) -> str:
        if kind == "PER":
            first, last = rng.choice(firsts[split]), rng.choice(lasts[split])
            return rng.choices([f"{first} {last}", first, last], weights=[0.7, 0.15, 0.15])[0]
        if kind == "LOC":
            return rng.choice(places[split])
        name = rng.choice(org_names[split])
        return name if rng.random() < 0.2 else f"{name} {rng.choice(ORG_SUFFIXES)}"

    def sentence(split: int) -> dict:
        tokens: list[str] = []
        tags: list[str] = []
        used: set[str] = set()  # no entity twice in a sentence ("Anna met Anna")
        for word in rng.choice(TAG_TEMPLATES).split():
            if not (word.startswith("{") and word.endswith("}")):
                tokens.append(word)
                tags.append("O")
                continue
            kind = word[1:-1]
            name = entity(kind, split)
            while name in used:
                name = entity(kind, split)
            used.add(name)
            words = name.split()
            tokens += words
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
        return {"tokens": tokens, "tags": tags}

    seen: set = set()
    train = draw_unique(lambda: sentence(0), TRAIN_SIZE, lambda r: tuple(r["tokens"]), seen)
    test = draw_unique(lambda: sentence(1), TEST_SIZE, lambda r: tuple(r["tokens"]), seen)
    return train, test


# --- output and summary ---------------------------------------------------------------------------

def write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def summarise(task: str, split: str, records: list[dict]) -> str:
    """One line of what a split holds: its label, topic, score or tag distribution."""
    if task == "classify":
        counts = Counter(r["label"] for r in records)
        detail = f"{dict(sorted(counts.items()))}, majority share {max(counts.values()) / len(records):.3f}"
    elif task == "multilabel":
        topics = Counter(topic for r in records for topic in r["labels"])
        sizes = Counter(len(r["labels"]) for r in records)
        detail = (f"topics {{{', '.join(f'{t}: {topics[t]}' for t in TOPICS)}}}, "
                  f"labels per text {dict(sorted(sizes.items()))}")
    elif task == "regression":
        # integer buckets [0, 1), [1, 2), ..., [4, 5), and 5.0 on its own
        buckets = Counter(int(r["score"]) for r in records)
        detail = "score histogram " + " ".join(f"{b}:{buckets[b]}" for b in range(6))
    else:
        tags = Counter(tag for r in records for tag in r["tags"])
        detail = f"tags {dict(sorted(tags.items()))}"
    return f"{task:<10} {split:<5} {len(records):>4} records; {detail}"


TASKS = {"classify": make_classify, "multilabel": make_multilabel, "regression": make_regression,
         "tag": make_tag}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args()
    for task, make in TASKS.items():
        # a generator per task: changing one task's generation leaves the others' files unchanged
        train, test = make(random.Random(f"{args.seed}:{task}"))
        write(args.out / task / "train.jsonl", train)
        write(args.out / task / "test.jsonl", test)
        print(summarise(task, "train", train))
        print(summarise(task, "test", test))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
