"""Identities of the synthetic world: a stable ``Look`` per person, its attribute vector and caption.

A look fixes everything that stays the same when one person is seen by different cameras: body build,
skin, hair, garments (type, colours, patterns), shoes, hat, glasses and carried items. Attributes are
derived from the look (plus the per-image view), in the order of ``data_manifests/attributes_pa100k.yaml``,
and every attribute is something the renderer draws, so it can be learned from pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# PA-100K's 26 attributes in the dataset's own order (data_manifests/attributes_pa100k.yaml).
ATTRIBUTES = (
    "Female", "AgeOver60", "Age18-60", "AgeLess18", "Front", "Side", "Back", "Hat", "Glasses", "HandBag",
    "ShoulderBag", "Backpack", "HoldObjectsInFront", "ShortSleeve", "LongSleeve", "UpperStride", "UpperLogo",
    "UpperPlaid", "UpperSplice", "LowerStripe", "LowerPattern", "LongCoat", "Trousers", "Shorts", "Skirt&Dress",
    "boots",
)  # fmt: skip
# Attributes that depend on the image rather than only on the person: the view, and items hidden from behind.
VIEW_DEPENDENT = frozenset({"Front", "Side", "Back", "Glasses", "HoldObjectsInFront"})
VIEWS = ("front", "back", "side")

# Named colours (sRGB). Names are what captions say, so a colour name always means the same hue.
COLORS: dict[str, tuple[int, int, int]] = {
    "black": (28, 28, 32),
    "white": (232, 232, 226),
    "grey": (128, 128, 130),
    "dark grey": (70, 72, 76),
    "red": (185, 30, 38),
    "blue": (40, 78, 175),
    "dark blue": (28, 38, 82),
    "light blue": (130, 170, 215),
    "green": (45, 125, 62),
    "yellow": (228, 196, 40),
    "orange": (230, 118, 32),
    "pink": (232, 142, 170),
    "purple": (108, 52, 138),
    "brown": (108, 70, 42),
    "beige": (208, 188, 148),
    "khaki": (150, 140, 92),
}
TOP_COLORS = ("black", "white", "grey", "dark grey", "red", "blue", "dark blue", "light blue", "green", "yellow",
              "orange", "pink", "purple", "brown", "beige")  # fmt: skip
LOWER_COLORS = ("black", "dark blue", "blue", "grey", "dark grey", "beige", "khaki", "brown", "white", "red",
                "pink", "green")  # fmt: skip
SHOE_COLORS = ("black", "white", "grey", "brown", "red", "blue", "beige")
BOOT_COLORS = ("black", "brown", "dark grey", "beige")
BAG_COLORS = ("black", "brown", "red", "blue", "grey", "beige", "pink", "green", "dark blue")
HAIR_COLORS: dict[str, tuple[int, int, int]] = {
    "black": (22, 20, 20),
    "dark brown": (56, 36, 26),
    "brown": (102, 66, 36),
    "blond": (198, 164, 96),
    "red": (132, 56, 30),
    "grey": (150, 150, 148),
    "white": (214, 212, 206),
}
SKIN_TONES = ((241, 207, 182), (226, 182, 150), (202, 152, 116), (164, 114, 82), (118, 80, 58), (86, 58, 42))

# Priors: PA-100K-like, with rare attributes made common enough to be learnable from a few hundred people.
P_FEMALE = 0.45
P_AGE = {"child": 0.08, "adult": 0.84, "elderly": 0.08}


@dataclass(frozen=True)
class Look:
    """Everything about a person that stays the same across cameras and frames."""

    female: bool
    age: str  # child | adult | elderly
    build: float  # width multiplier, 0.88 (slim) .. 1.18 (heavy)
    skin: tuple[int, int, int]
    hair_style: str  # short | long | ponytail | bald
    hair_color: str
    top_type: str  # tshirt | shirt | sweater | jacket
    sleeve: str  # short | long
    top_color: str
    top_pattern: str  # plain | stripes | plaid | logo | splice
    top_color2: str  # stripes / plaid lines / logo / second panel
    long_coat: bool
    coat_color: str
    lower_type: str  # trousers | shorts | skirt
    lower_color: str
    lower_pattern: str  # plain | stripe | pattern
    lower_color2: str
    jeans: bool
    shoe_type: str  # sneakers | shoes | boots
    shoe_color: str
    hat: str | None  # cap | beanie | sunhat
    hat_color: str
    glasses: str | None  # glasses | sunglasses
    backpack: bool
    handbag: bool
    shoulder_bag: bool
    holds_object: bool
    bag_color: str
    object_color: str
    tint: tuple[float, float, float]  # small per-person colour deviation, so two "red" tops differ

    def rgb(self, name: str) -> np.ndarray:
        """Colour of a named garment colour for this person (with their small tint)."""
        return np.clip(np.asarray(COLORS[name], np.float32) * np.asarray(self.tint, np.float32), 0, 255)


def _pick(rng: np.random.Generator, options: tuple | list, p: list[float] | None = None):  # noqa: ANN202
    return options[int(rng.choice(len(options), p=p))]


def _other(rng: np.random.Generator, options: tuple, avoid: str) -> str:
    return _pick(rng, tuple(c for c in options if c != avoid))


def random_look(rng: np.random.Generator) -> Look:
    """Draw one person. Correlations follow real pedestrians: skirts and long hair mostly on women, etc."""
    female = bool(rng.random() < P_FEMALE)
    age = _pick(rng, list(P_AGE), list(P_AGE.values()))
    build = float(rng.uniform(0.88, 1.18) if age != "child" else rng.uniform(0.85, 1.0))
    skin = SKIN_TONES[int(rng.choice(len(SKIN_TONES), p=[0.22, 0.24, 0.2, 0.14, 0.12, 0.08]))]
    if female:
        hair_style = _pick(rng, ("long", "ponytail", "short"), [0.6, 0.25, 0.15])
    else:
        hair_style = _pick(rng, ("short", "bald", "long"), [0.86, 0.08, 0.06])
    if age == "elderly":
        hair_color = _pick(rng, ("grey", "white"))
    else:
        hair_color = _pick(rng, ("black", "dark brown", "brown", "blond", "red"), [0.45, 0.25, 0.15, 0.1, 0.05])
    sleeve = "short" if rng.random() < 0.4 else "long"
    top_type = _pick(rng, ("tshirt", "shirt")) if sleeve == "short" else _pick(rng, ("shirt", "sweater", "jacket"))
    top_color = _pick(rng, TOP_COLORS)
    top_pattern = _pick(rng, ("plain", "stripes", "plaid", "logo", "splice"), [0.55, 0.11, 0.1, 0.15, 0.09])
    long_coat = bool(rng.random() < 0.1 and age != "child")
    if long_coat:  # a long coat is the visible upper garment: long sleeves, one colour
        sleeve, top_type, top_pattern = "long", "coat", "plain"
    if female:
        lower_type = _pick(rng, ("trousers", "skirt", "shorts"), [0.5, 0.35, 0.15])
    else:
        lower_type = _pick(rng, ("trousers", "shorts"), [0.85, 0.15])
    if long_coat and lower_type == "shorts":
        lower_type = "trousers"
    jeans = lower_type == "trousers" and rng.random() < 0.4
    lower_color = "blue" if jeans else _pick(rng, LOWER_COLORS)
    lower_pattern = _pick(rng, ("plain", "stripe", "pattern"), [0.86, 0.06, 0.08])
    if lower_type == "skirt" and lower_pattern == "stripe":
        lower_pattern = "pattern"
    shoe_type = _pick(rng, ("sneakers", "shoes", "boots"), [0.5, 0.38, 0.12])
    hat = _pick(rng, (None, "cap", "beanie", "sunhat"), [0.85, 0.07, 0.05, 0.03])
    glasses = _pick(rng, (None, "glasses", "sunglasses"), [0.8, 0.13, 0.07])
    backpack = bool(rng.random() < 0.18)
    shoulder_bag = bool(rng.random() < (0.22 if female else 0.14))
    handbag = bool(rng.random() < (0.28 if female else 0.07))
    holds_object = bool(rng.random() < 0.06) and not handbag
    tint = tuple(float(x) for x in rng.uniform(0.9, 1.1, 3))
    return Look(
        female=female,
        age=age,
        build=build,
        skin=skin,
        hair_style=hair_style,
        hair_color=hair_color,
        top_type=top_type,
        sleeve=sleeve,
        top_color=top_color,
        top_pattern=top_pattern,
        top_color2=_other(rng, TOP_COLORS, top_color),
        long_coat=long_coat,
        coat_color=_pick(rng, ("black", "grey", "beige", "brown", "dark blue", "khaki", "red")),
        lower_type=lower_type,
        lower_color=lower_color,
        lower_pattern=lower_pattern,
        lower_color2=_other(rng, ("white", "red", "yellow", "black", "light blue"), lower_color),
        jeans=jeans,
        shoe_type=shoe_type,
        shoe_color=_pick(rng, BOOT_COLORS if shoe_type == "boots" else SHOE_COLORS),
        hat=hat,
        hat_color=_pick(rng, ("black", "white", "red", "blue", "beige", "grey")),
        glasses=glasses,
        backpack=backpack,
        handbag=handbag,
        shoulder_bag=shoulder_bag,
        holds_object=holds_object,
        bag_color=_pick(rng, BAG_COLORS),
        object_color=_pick(rng, ("white", "brown", "yellow", "red", "blue")),
        tint=tint,  # type: ignore[arg-type]
    )


def attributes(look: Look, view: str) -> np.ndarray:
    """PA-100K attribute vector (uint8 0/1, order ``ATTRIBUTES``) of ``look`` seen from ``view``."""
    visible_front = view != "back"
    values = {
        "Female": look.female,
        "AgeOver60": look.age == "elderly",
        "Age18-60": look.age == "adult",
        "AgeLess18": look.age == "child",
        "Front": view == "front",
        "Side": view == "side",
        "Back": view == "back",
        "Hat": look.hat is not None,
        "Glasses": look.glasses is not None and visible_front,
        "HandBag": look.handbag,
        "ShoulderBag": look.shoulder_bag,
        "Backpack": look.backpack,
        "HoldObjectsInFront": look.holds_object and visible_front,
        "ShortSleeve": look.sleeve == "short",
        "LongSleeve": look.sleeve == "long",
        "UpperStride": look.top_pattern == "stripes",
        "UpperLogo": look.top_pattern == "logo",
        "UpperPlaid": look.top_pattern == "plaid",
        "UpperSplice": look.top_pattern == "splice",
        "LowerStripe": look.lower_pattern == "stripe",
        "LowerPattern": look.lower_pattern == "pattern",
        "LongCoat": look.long_coat,
        "Trousers": look.lower_type == "trousers",
        "Shorts": look.lower_type == "shorts",
        "Skirt&Dress": look.lower_type == "skirt",
        "boots": look.shoe_type == "boots",
    }
    return np.array([values[name] for name in ATTRIBUTES], dtype=np.uint8)


def _person_noun(look: Look) -> str:
    bald = "bald " if look.hair_style == "bald" else ""
    if look.age == "child":
        return f"a {bald}{'girl' if look.female else 'boy'}"
    if look.age == "elderly":
        return f"{'a bald' if bald else 'an'} elderly {'woman' if look.female else 'man'}"
    return f"a {bald}{'woman' if look.female else 'man'}"


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _hair_phrase(look: Look) -> str:
    if look.hair_style == "bald" or (look.hat is not None and look.hair_style == "short"):
        return ""  # baldness is in the noun; short hair under a hat is not visible
    if look.hair_style == "ponytail":
        return f"with {look.hair_color} hair in a ponytail"
    return f"with {look.hair_style} {look.hair_color} hair"


def _top_phrase(look: Look) -> str:
    if look.long_coat:
        return _a(f"long {look.coat_color} coat")
    garment = {"tshirt": "t-shirt", "shirt": "shirt", "sweater": "sweater", "jacket": "jacket"}[look.top_type]
    sleeve = "short-sleeved" if look.sleeve == "short" else "long-sleeved"
    if look.top_pattern == "stripes":
        return _a(f"{look.top_color} and {look.top_color2} striped {sleeve} {garment}")
    if look.top_pattern == "plaid":
        return _a(f"{look.top_color} plaid {sleeve} {garment}")
    if look.top_pattern == "splice":
        return _a(f"two-tone {look.top_color} and {look.top_color2} {sleeve} {garment}")
    if look.top_pattern == "logo":
        return _a(f"{look.top_color} {sleeve} {garment} with a {look.top_color2} logo")
    return _a(f"{look.top_color} {sleeve} {garment}")


def _lower_phrase(look: Look) -> str:
    if look.lower_type == "skirt":
        core = f"{look.lower_color} patterned skirt" if look.lower_pattern == "pattern" else f"{look.lower_color} skirt"
        return _a(core)
    noun = "jeans" if look.jeans else ("shorts" if look.lower_type == "shorts" else "trousers")
    if look.lower_pattern == "stripe":
        return f"{look.lower_color} {noun} with a {look.lower_color2} side stripe"
    if look.lower_pattern == "pattern":
        return f"{look.lower_color} patterned {noun}"
    return f"{look.lower_color} {noun}"


def _hat_phrase(look: Look) -> str:
    return _a(f"{look.hat_color} {'sun hat' if look.hat == 'sunhat' else look.hat}")


def _shoe_phrase(look: Look) -> str:
    return f"{look.shoe_color} {'boots' if look.shoe_type == 'boots' else look.shoe_type}"


def caption(look: Look, view: str, variant: int = 0) -> str:
    """One sentence made from the visible attributes, e.g. 'a woman with long black hair wearing ...'."""
    subject = _person_noun(look)
    hair = _hair_phrase(look)
    wear = [_top_phrase(look), _lower_phrase(look), _shoe_phrase(look)]
    extras = []
    if look.hat is not None:
        extras.append(_hat_phrase(look))
    if look.glasses is not None and view != "back":
        extras.append(look.glasses)
    wear = extras[:1] + wear if variant % 2 else wear + extras
    wearing = ", ".join(wear[:-1]) + " and " + wear[-1]
    carry = []
    if look.backpack:
        carry.append(f"a {look.bag_color} backpack")
    if look.shoulder_bag:
        carry.append(f"a {look.bag_color} shoulder bag")
    if look.handbag:
        carry.append(f"a {look.bag_color} handbag")
    if look.holds_object and view != "back":
        carry.append("a box in front of them")
    text = subject + (f" {hair}" if hair else "") + f" wearing {wearing}"
    if carry:
        text += ", carrying " + (", ".join(carry[:-1]) + " and " + carry[-1] if len(carry) > 1 else carry[0])
    where = {"front": "facing the camera", "back": "seen from behind", "side": "seen from the side"}[view]
    if variant % 3 == 1:
        text = f"{text}, {where}"
    elif variant % 3 == 2:
        text = f"a photo of {text}, {where}"
    return text


def caption_parts(look: Look, view: str) -> dict[str, Any]:
    """The phrases ``caption`` is made of, for writers that word them differently (``pipeline.synth.pedes``):
    ``subject`` ('an elderly woman'), ``hair`` ('with long black hair' or ''), ``top``, ``lower``, ``shoes``,
    ``extras`` (hat, glasses as seen from ``view``) and ``carry`` (bags, a held box)."""
    extras = [_hat_phrase(look)] if look.hat is not None else []
    if look.glasses is not None and view != "back":
        extras.append(look.glasses)
    bags = (("backpack", look.backpack), ("shoulder bag", look.shoulder_bag), ("handbag", look.handbag))
    carry = [f"a {look.bag_color} {item}" for item, has in bags if has]
    if look.holds_object and view != "back":
        carry.append("a box in front of them")
    return {"subject": _person_noun(look), "hair": _hair_phrase(look), "top": _top_phrase(look),
            "lower": _lower_phrase(look), "shoes": _shoe_phrase(look), "extras": extras, "carry": carry}  # fmt: skip
