"""Concept vocabulary of the synthetic web: object kinds, colours, textures and positions, with hand-written words
in English, German, French and Spanish (gender and plural forms, so captions agree grammatically)."""
from __future__ import annotations

from dataclasses import dataclass

LANGUAGES: tuple[str, ...] = ("en", "de", "fr", "es")


@dataclass(frozen=True)
class Noun:
    singular: str
    plural: str
    gender: str  # "m", "f", "n" (German neuter); English uses "-"


@dataclass(frozen=True)
class Kind:
    name: str  # English singular; the class-name word
    nouns: dict  # lang -> Noun


def _k(name: str, en_pl: str, de: tuple, fr: tuple, es: tuple) -> Kind:
    return Kind(name, {"en": Noun(name, en_pl, "-"), "de": Noun(*de), "fr": Noun(*fr), "es": Noun(*es)})


# Order matters: the first n_kinds entries are used; all are drawable and visually distinct at 64 px.
KINDS: tuple[Kind, ...] = (
    _k("circle", "circles", ("Kreis", "Kreise", "m"), ("cercle", "cercles", "m"), ("círculo", "círculos", "m")),
    _k("square", "squares", ("Quadrat", "Quadrate", "n"), ("carré", "carrés", "m"), ("cuadrado", "cuadrados", "m")),
    _k("triangle", "triangles", ("Dreieck", "Dreiecke", "n"), ("triangle", "triangles", "m"),
       ("triángulo", "triángulos", "m")),
    _k("star", "stars", ("Stern", "Sterne", "m"), ("étoile", "étoiles", "f"), ("estrella", "estrellas", "f")),
    _k("heart", "hearts", ("Herz", "Herzen", "n"), ("cœur", "cœurs", "m"), ("corazón", "corazones", "m")),
    _k("cross", "crosses", ("Kreuz", "Kreuze", "n"), ("croix", "croix", "f"), ("cruz", "cruces", "f")),
    _k("diamond", "diamonds", ("Raute", "Rauten", "f"), ("losange", "losanges", "m"), ("rombo", "rombos", "m")),
    _k("ring", "rings", ("Ring", "Ringe", "m"), ("anneau", "anneaux", "m"), ("anillo", "anillos", "m")),
    _k("hexagon", "hexagons", ("Sechseck", "Sechsecke", "n"), ("hexagone", "hexagones", "m"),
       ("hexágono", "hexágonos", "m")),
    _k("crescent", "crescents", ("Halbmond", "Halbmonde", "m"), ("croissant", "croissants", "m"),
       ("media luna", "medias lunas", "f")),
    _k("arrow", "arrows", ("Pfeil", "Pfeile", "m"), ("flèche", "flèches", "f"), ("flecha", "flechas", "f")),
    _k("pentagon", "pentagons", ("Fünfeck", "Fünfecke", "n"), ("pentagone", "pentagones", "m"),
       ("pentágono", "pentágonos", "m")),
)


@dataclass(frozen=True)
class Colour:
    name: str  # English; the class-name word
    rgb: tuple[int, int, int]
    de_stem: str  # German adjective stem; endings added by gender/number
    fr: tuple[str, str, str, str]  # masc sg, fem sg, masc pl, fem pl
    es: tuple[str, str, str, str]


# Hues far apart so a 64 px thumbnail keeps the colour class; the first n_colours are used.
COLOURS: tuple[Colour, ...] = (
    Colour("red", (214, 39, 40), "rot", ("rouge", "rouge", "rouges", "rouges"), ("rojo", "roja", "rojos", "rojas")),
    Colour("blue", (31, 90, 200), "blau", ("bleu", "bleue", "bleus", "bleues"), ("azul", "azul", "azules", "azules")),
    Colour("green", (34, 160, 44), "grün", ("vert", "verte", "verts", "vertes"),
           ("verde", "verde", "verdes", "verdes")),
    Colour("yellow", (240, 200, 20), "gelb", ("jaune", "jaune", "jaunes", "jaunes"),
           ("amarillo", "amarilla", "amarillos", "amarillas")),
    Colour("purple", (128, 50, 170), "violett", ("violet", "violette", "violets", "violettes"),
           ("morado", "morada", "morados", "moradas")),
    Colour("orange", (245, 120, 15), "orangefarben", ("orange", "orange", "orange", "orange"),
           ("naranja", "naranja", "naranja", "naranja")),
    Colour("black", (25, 25, 25), "schwarz", ("noir", "noire", "noirs", "noires"),
           ("negro", "negra", "negros", "negras")),
    Colour("pink", (240, 110, 180), "rosafarben", ("rose", "rose", "roses", "roses"),
           ("rosa", "rosa", "rosa", "rosa")),
)

TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted", "checkered")
POSITIONS: tuple[str, ...] = ("center", "left", "right", "top", "bottom")

TEXTURE_WORDS: dict[str, dict[str, str]] = {
    "en": {"solid": "", "striped": "with stripes", "dotted": "with dots", "checkered": "with a checkered pattern"},
    "de": {"solid": "", "striped": "mit Streifen", "dotted": "mit Punkten", "checkered": "mit Karomuster"},
    "fr": {"solid": "", "striped": "à rayures", "dotted": "à pois", "checkered": "à carreaux"},
    "es": {"solid": "", "striped": "a rayas", "dotted": "de lunares", "checkered": "a cuadros"},
}

POSITION_WORDS: dict[str, dict[str, str]] = {
    "en": {"center": "in the center", "left": "on the left", "right": "on the right", "top": "at the top",
           "bottom": "at the bottom"},
    "de": {"center": "in der Mitte", "left": "links", "right": "rechts", "top": "oben", "bottom": "unten"},
    "fr": {"center": "au centre", "left": "à gauche", "right": "à droite", "top": "en haut", "bottom": "en bas"},
    "es": {"center": "en el centro", "left": "a la izquierda", "right": "a la derecha", "top": "arriba",
           "bottom": "abajo"},
}

NUMBER_WORDS: dict[str, dict[int, str]] = {
    "en": {2: "two", 3: "three"},
    "de": {2: "zwei", 3: "drei"},
    "fr": {2: "deux", 3: "trois"},
    "es": {2: "dos", 3: "tres"},
}

# German indefinite article (nominative) and strong/mixed adjective endings after it: ein roter Kreis,
# eine rote Raute, ein rotes Quadrat; plural without article: zwei rote Kreise.
_DE_ARTICLE = {"m": "ein", "f": "eine", "n": "ein"}
_DE_ENDING = {"m": "er", "f": "e", "n": "es", "pl": "e"}


def noun_phrase(lang: str, kind: Kind, colour: Colour, count: int, texture: str) -> str:
    """An indefinite noun phrase in ``lang``: "two red circles with stripes", "eine rote Raute", "un cercle bleu"."""
    noun = kind.nouns[lang]
    plural = count > 1
    word = noun.plural if plural else noun.singular
    tex = TEXTURE_WORDS[lang][texture]
    if lang == "en":
        adj = colour.name
        head = f"{NUMBER_WORDS['en'][count]} {adj} {word}" if plural else f"{'an' if adj[0] in 'aeiou' else 'a'} {adj} {word}"
    elif lang == "de":
        adj = colour.de_stem + _DE_ENDING["pl" if plural else noun.gender]
        head = f"{NUMBER_WORDS['de'][count]} {adj} {word}" if plural else f"{_DE_ARTICLE[noun.gender]} {adj} {word}"
    elif lang in ("fr", "es"):
        forms = colour.fr if lang == "fr" else colour.es
        adj = forms[(2 if plural else 0) + (1 if noun.gender == "f" else 0)]
        if plural:
            head = f"{NUMBER_WORDS[lang][count]} {word} {adj}"
        else:
            article = {"fr": ("un", "une"), "es": ("un", "una")}[lang][noun.gender == "f"]
            head = f"{article} {word} {adj}"
    else:
        raise ValueError(f"unsupported caption language {lang!r}; expected one of {LANGUAGES}")
    return f"{head} {tex}" if tex else head


# Hand-written caption templates; {obj} is the noun phrase, {where} the position phrase (may be empty).
# Every template reads correctly with a nominative indefinite phrase (German: "Zu sehen: ein roter Kreis").
TEMPLATES: dict[str, tuple[str, ...]] = {
    "en": (
        "a photo of {obj} {where}",
        "{Obj} {where}",
        "an illustration of {obj} on a plain background",
        "clip art: {obj} {where}",
        "a simple drawing showing {obj} {where}",
        "{Obj}, drawn by hand",
        "my favourite picture: {obj} {where}",
    ),
    "de": (
        "Ein Foto: {obj} {where}",
        "{Obj} {where}",
        "Zu sehen: {obj} auf hellem Hintergrund",
        "Clipart: {obj} {where}",
        "Eine einfache Zeichnung, auf der {obj} zu sehen ist",
        "{Obj}, von Hand gezeichnet",
    ),
    "fr": (
        "Photo : {obj} {where}",
        "{Obj} {where}",
        "Voici {obj} {where}",
        "Un dessin simple avec {obj} sur fond clair",
        "Illustration : {obj} {where}",
        "{Obj}, dessiné à la main",
    ),
    "es": (
        "Foto: {obj} {where}",
        "{Obj} {where}",
        "Aquí hay {obj} {where}",
        "Un dibujo sencillo con {obj} sobre fondo claro",
        "Ilustración: {obj} {where}",
        "{Obj}, dibujado a mano",
    ),
}


def caption(lang: str, template_index: int, kind: Kind, colour: Colour, count: int, texture: str,
            position: str) -> str:
    """Fill one of ``lang``'s templates; the position is only said for a single object."""
    obj = noun_phrase(lang, kind, colour, count, texture)
    where = POSITION_WORDS[lang][position] if count == 1 else ""
    template = TEMPLATES[lang][template_index % len(TEMPLATES[lang])]
    text = template.replace("{Obj}", obj[:1].upper() + obj[1:]).replace("{obj}", obj).replace("{where}", where)
    return " ".join(text.split())  # an empty {where} leaves double spaces behind


def class_name(kind: Kind, colour: Colour) -> str:
    """The concept's class name, used in the ground-truth column and the held-out split: "red circle"."""
    return f"{colour.name} {kind.name}"
