"""A HANS-style challenge set, generated from this project's own templates and vocabulary.

In the spirit of McCoy et al. (2019), "Right for the Wrong Reasons": premise/hypothesis pairs where a
shallow heuristic predicts *entailment* for every example, but only half are entailed.

* lexical_overlap: every hypothesis word occurs in the premise (and the hypothesis is NOT a contiguous
  span of it);
* subsequence: the hypothesis is a contiguous word span of the premise;
* constituent: the hypothesis is a full clause (constituent) of the premise.

Each heuristic has 5 entailed subcases (``le_*``, ``se_*``, ``ce_*``) and 5 non-entailed ones (``ln_*``,
``sn_*``, ``cn_*``), named after HANS's subcases, with 2-3 templates each. Labels: 0 = entailment,
1 = non-entailment. This is NOT the official HANS set (which is not available here): results on it are
reported as "HANS-style (generated)".

Templates are strings with typed slots ``{TYPE<k>}``; slots of the same word pool with different ``k``
get distinct words. Types: N noun, NS plural noun (same pool as N), A adjective, V transitive verb (past),
VP transitive verb whose past tense equals its participle (passives), I intransitive verb, S verb taking
an NP or a clause (NP/S), Z optionally transitive verb (NP/Z, understood object), R verb for reduced
relatives (past participle), L location, P preposition, B veridical adverb, M non-veridical adverb,
F factive verb, H non-factive verb, C veridical subordinator (since...), K conditional (if, unless).
Sentences use the past tense throughout, so there are no agreement choices to get wrong.
"""
from __future__ import annotations

import random
import re
import zlib

from .tasks import Example

__all__ = ["HANS_STYLE_NAME", "SUBCASES", "HEURISTICS", "PARTS", "HOLDOUTS", "generate_hans_style",
           "part_patterns", "words"]

HANS_STYLE_NAME = "HANS-style (generated)"
HEURISTICS = ("lexical_overlap", "subsequence", "constituent")

_NOUNS = [("doctor", "doctors"), ("lawyer", "lawyers"), ("artist", "artists"), ("student", "students"),
          ("senator", "senators"), ("judge", "judges"), ("manager", "managers"), ("banker", "bankers"),
          ("author", "authors"), ("secretary", "secretaries"), ("athlete", "athletes"), ("tourist", "tourists"),
          ("scientist", "scientists"), ("professor", "professors"), ("actor", "actors"),
          ("president", "presidents"), ("dancer", "dancers"), ("chef", "chefs")]
_POOLS: dict[str, list[str]] = {
    "V": ["saw", "met", "helped", "called", "recommended", "advised", "thanked", "introduced", "contacted",
          "avoided", "encouraged", "supported", "admired", "paid", "visited"],
    "VP": ["helped", "called", "recommended", "advised", "thanked", "introduced", "contacted", "avoided",
           "encouraged", "supported", "admired", "paid", "visited"],
    "I": ["slept", "waited", "danced", "laughed", "arrived", "shouted", "resigned", "smiled", "stayed", "ran"],
    "S": ["believed", "forgot", "heard", "remembered", "understood", "knew"],
    "Z": ["left", "visited", "called", "watched", "paid", "helped"],
    "R": ["studied", "painted", "photographed", "recorded", "interviewed", "examined"],
    "L": ["library", "park", "studio", "office", "museum", "hospital", "school", "garden"],
    "A": ["famous", "tall", "young", "old", "happy", "quiet", "smart", "nervous", "brave", "rich", "friendly"],
    "P": ["next to", "near", "behind", "in front of", "beside"],
    "B": ["certainly", "clearly", "definitely", "undoubtedly", "obviously"],
    "M": ["probably", "maybe", "perhaps", "supposedly", "hopefully"],
    "F": ["knew", "realized", "learned", "noticed", "forgot", "remembered"],
    "H": ["believed", "thought", "hoped", "assumed", "suspected", "claimed", "imagined"],
    "C": ["since", "because", "after", "although", "once"],
    "K": ["if", "unless"],
}

_E, _NE = 0, 1
# (heuristic, subcase, label, [(premise template, hypothesis template), ...])
SUBCASES: list[tuple[str, str, int, list[tuple[str, str]]]] = [
    # ---- lexical overlap, non-entailed
    ("lexical_overlap", "ln_subject/object_swap", _NE, [
        ("the {N1} {V1} the {N2}", "the {N2} {V1} the {N1}"),
        ("the {A1} {N1} {V1} the {N2}", "the {N2} {V1} the {A1} {N1}"),
        ("the {N1} {V1} the {A1} {N2}", "the {A1} {N2} {V1} the {N1}")]),
    ("lexical_overlap", "ln_preposition", _NE, [
        ("the {N1} {P1} the {N2} {V1} the {N3}", "the {N3} {V1} the {N2}"),
        ("the {N1} {V1} the {N2} {P1} the {N3}", "the {N3} {V1} the {N2}")]),
    ("lexical_overlap", "ln_relative_clause", _NE, [
        ("the {N1} {V1} the {N2} who {V2} the {N3}", "the {N1} {V2} the {N3}"),
        ("the {N1} who the {N2} {V1} {V2} the {N3}", "the {N2} {V2} the {N3}"),
        ("the {N1} who {V1} the {N2} {V2} the {N3}", "the {N2} {V1} the {N1}")]),
    ("lexical_overlap", "ln_passive", _NE, [
        ("the {N1} was {VP1} by the {N2}", "the {N1} {VP1} the {N2}"),
        ("the {A1} {N1} was {VP1} by the {N2}", "the {A1} {N1} {VP1} the {N2}"),
        ("the {N1} was {VP1} by the {A1} {N2}", "the {N1} {VP1} the {A1} {N2}")]),
    ("lexical_overlap", "ln_conjunction", _NE, [
        ("the {N1} and the {N2} {V1} the {N3}", "the {N3} {V1} the {N2}"),
        ("the {N1} {V1} the {N2} and the {N3}", "the {N3} {V1} the {N1}")]),
    # ---- lexical overlap, entailed
    ("lexical_overlap", "le_relative_clause", _E, [
        ("the {N1} who the {N2} {V1} {V2} the {N3}", "the {N2} {V1} the {N1}"),
        ("the {N1} {V1} the {N2} who {V2} the {N3}", "the {N2} {V2} the {N3}")]),
    ("lexical_overlap", "le_around_prepositional_phrase", _E, [
        ("the {N1} {P1} the {N2} {V1} the {N3}", "the {N1} {V1} the {N3}"),
        ("the {A1} {N1} {P1} the {N2} {V1} the {N3}", "the {A1} {N1} {V1} the {N3}")]),
    ("lexical_overlap", "le_around_relative_clause", _E, [
        ("the {N1} who {V1} the {N2} {V2} the {N3}", "the {N1} {V2} the {N3}"),
        ("the {N1} who the {N2} {V1} {V2} the {N3}", "the {N1} {V2} the {N3}")]),
    ("lexical_overlap", "le_passive", _E, [
        ("the {N1} was {VP1} by the {N2}", "the {N2} {VP1} the {N1}"),
        ("the {A1} {N1} was {VP1} by the {N2}", "the {N2} {VP1} the {A1} {N1}")]),
    ("lexical_overlap", "le_conjunction", _E, [
        ("the {N1} {V1} the {N2} and the {N3}", "the {N1} {V1} the {N3}"),
        ("the {N1} and the {N2} {V1} the {N3}", "the {N1} {V1} the {N3}")]),
    # ---- subsequence, non-entailed
    ("subsequence", "sn_NP/S", _NE, [
        ("the {N1} {S1} the {N2} {V1} the {N3}", "the {N1} {S1} the {N2}"),
        ("the {N1} {S1} the {N2} {I1}", "the {N1} {S1} the {N2}")]),
    ("subsequence", "sn_PP_on_subject", _NE, [
        ("the {N1} {P1} the {N2} {I1}", "the {N2} {I1}"),
        ("the {N1} {P1} the {N2} {V1} the {N3}", "the {N2} {V1} the {N3}")]),
    ("subsequence", "sn_relative_clause_on_subject", _NE, [
        ("the {N1} who {V1} the {N2} {I1}", "the {N2} {I1}"),
        ("the {N1} who {V1} the {N2} {V2} the {N3}", "the {N2} {V2} the {N3}")]),
    ("subsequence", "sn_past_participle", _NE, [
        ("the {N1} {R1} in the {L1} {I1}", "the {N1} {R1} in the {L1}"),
        ("the {N1} {R1} in the {L1} {V1} the {N2}", "the {N1} {R1} in the {L1}")]),
    ("subsequence", "sn_NP/Z", _NE, [
        ("{C1} the {N1} {Z1} the {N2} {I1}", "the {N1} {Z1} the {N2}"),
        ("{C1} the {N1} {Z1} the {N2} {V1} the {N3}", "the {N1} {Z1} the {N2}")]),
    # ---- subsequence, entailed
    ("subsequence", "se_conjunction", _E, [
        ("the {N1} and the {N2} {V1} the {N3}", "the {N2} {V1} the {N3}"),
        ("the {N1} and the {N2} {I1}", "the {N2} {I1}")]),
    ("subsequence", "se_adjective", _E, [
        ("{A1} {NS1} {V1} the {N2}", "{NS1} {V1} the {N2}"),
        ("{A1} {NS1} {I1}", "{NS1} {I1}")]),
    ("subsequence", "se_understood_object", _E, [
        ("the {N1} {Z1} the {N2}", "the {N1} {Z1}"),
        ("the {A1} {N1} {Z1} the {N2}", "the {A1} {N1} {Z1}")]),
    ("subsequence", "se_relative_clause_on_obj", _E, [
        ("the {N1} {V1} the {N2} who {V2} the {N3}", "the {N1} {V1} the {N2}"),
        ("the {N1} {V1} the {N2} who {I1}", "the {N1} {V1} the {N2}")]),
    ("subsequence", "se_PP_on_obj", _E, [
        ("the {N1} {V1} the {N2} {P1} the {N3}", "the {N1} {V1} the {N2}"),
        ("the {A1} {N1} {V1} the {N2} {P1} the {N3}", "the {A1} {N1} {V1} the {N2}")]),
    # ---- constituent, non-entailed
    ("constituent", "cn_embedded_under_if", _NE, [
        ("{K1} the {N1} {V1} the {N2}, the {N3} {I1}", "the {N1} {V1} the {N2}"),
        ("{K1} the {N1} {I1}, the {N2} {I2}", "the {N1} {I1}")]),
    ("constituent", "cn_after_if_clause", _NE, [
        ("{K1} the {N1} {I1}, the {N2} {V1} the {N3}", "the {N2} {V1} the {N3}"),
        ("{K1} the {N1} {V1} the {N2}, the {N3} {I1}", "the {N3} {I1}")]),
    ("constituent", "cn_embedded_under_verb", _NE, [
        ("the {N1} {H1} that the {N2} {V1} the {N3}", "the {N2} {V1} the {N3}"),
        ("the {N1} {H1} that the {N2} {I1}", "the {N2} {I1}")]),
    ("constituent", "cn_disjunction", _NE, [
        ("the {N1} {I1}, or the {N2} {V1} the {N3}", "the {N1} {I1}"),
        ("the {N1} {V1} the {N2}, or the {N3} {I1}", "the {N3} {I1}")]),
    ("constituent", "cn_adverb", _NE, [
        ("{M1} the {N1} {V1} the {N2}", "the {N1} {V1} the {N2}"),
        ("{M1} the {N1} {I1}", "the {N1} {I1}")]),
    # ---- constituent, entailed
    ("constituent", "ce_embedded_under_since", _E, [
        ("{C1} the {N1} {V1} the {N2}, the {N3} {I1}", "the {N1} {V1} the {N2}"),
        ("{C1} the {N1} {I1}, the {N2} {I2}", "the {N1} {I1}")]),
    ("constituent", "ce_after_since_clause", _E, [
        ("{C1} the {N1} {I1}, the {N2} {V1} the {N3}", "the {N2} {V1} the {N3}"),
        ("{C1} the {N1} {V1} the {N2}, the {N3} {I1}", "the {N3} {I1}")]),
    ("constituent", "ce_embedded_under_verb", _E, [
        ("the {N1} {F1} that the {N2} {V1} the {N3}", "the {N2} {V1} the {N3}"),
        ("the {N1} {F1} that the {N2} {I1}", "the {N2} {I1}")]),
    ("constituent", "ce_conjunction", _E, [
        ("the {N1} {I1}, and the {N2} {V1} the {N3}", "the {N1} {I1}"),
        ("the {N1} {V1} the {N2}, and the {N3} {I1}", "the {N3} {I1}")]),
    ("constituent", "ce_adverb", _E, [
        ("{B1} the {N1} {V1} the {N2}", "the {N1} {V1} the {N2}"),
        ("{B1} the {N1} {I1}", "the {N1} {I1}")]),
]

_SLOT = re.compile(r"\{([A-Z]+)(\d+)\}")
# template id -> (subcase index, pattern index), numbered over the whole set like HANS's temp1, temp2...
_TEMPLATE_NAMES = {}
_k = 0
for _si, (_h, _s, _l, _pats) in enumerate(SUBCASES):
    for _pi in range(len(_pats)):
        _k += 1
        _TEMPLATE_NAMES[(_si, _pi)] = f"temp{_k}"


def words(text: str) -> list[str]:
    """Lower-cased word tokens (punctuation dropped): the unit the heuristics are defined on."""
    return re.findall(r"[a-z]+", text.lower())


def _fill(premise_t: str, hyp_t: str, rng: random.Random) -> tuple[str, str]:
    slots = sorted(set(_SLOT.findall(premise_t + " " + hyp_t)))
    by_pool: dict[str, list[tuple[str, str]]] = {}
    for kind, idx in slots:
        by_pool.setdefault("N" if kind == "NS" else kind, []).append((kind, idx))
    values = {}
    for pool, wanted in by_pool.items():
        # distinct words per pool; N and NS share the noun pool and index space
        indices = sorted({idx for _, idx in wanted})
        items = _NOUNS if pool == "N" else _POOLS[pool]
        chosen = dict(zip(indices, rng.sample(range(len(items)), len(indices))))
        for kind, idx in wanted:
            item = items[chosen[idx]]
            values[f"{kind}{idx}"] = item[1] if kind == "NS" else item[0] if pool == "N" else item

    if len(set(values.values())) < len(values):  # e.g. Z1 and V1 both "called": draw again
        return _fill(premise_t, hyp_t, rng)

    def render(t: str) -> str:
        s = _SLOT.sub(lambda m: values[m.group(1) + m.group(2)], t)
        return s[0].upper() + s[1:] + "."

    return render(premise_t), render(hyp_t)


def _stable_seed(seed: int, subcase: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(subcase.encode())) & 0xFFFFFFFF


PARTS = ("all", "train", "eval")
HOLDOUTS = ("template", "subcase")


def part_patterns(part: str = "all", holdout: str = "template") -> dict[int, list[int]]:
    """Which (subcase index -> template indices) a part uses. The "train" and "eval" parts are disjoint:
    ``holdout="template"``: in every subcase the last template is train, the others eval (every subcase
    is in both parts, no template is); ``holdout="subcase"``: in every (heuristic, label) group of 5
    subcases the last 2 are train and the first 3 eval (no subcase, hence no template, is in both)."""
    if part not in PARTS:
        raise ValueError(f"part: expected one of {PARTS}, got {part!r}")
    if holdout not in HOLDOUTS:
        raise ValueError(f"holdout: expected one of {HOLDOUTS}, got {holdout!r}")
    out: dict[int, list[int]] = {}
    for si, (_h, _s, _l, patterns) in enumerate(SUBCASES):
        every = list(range(len(patterns)))
        if part == "all":
            out[si] = every
        elif holdout == "template":
            out[si] = every[-1:] if part == "train" else every[:-1]
        elif (si % 5 >= 3) == (part == "train"):
            out[si] = every
    return out


def generate_hans_style(n_per_subcase: int = 100, seed: int = 0, *, part: str = "all",
                        holdout: str = "template") -> list[Example]:
    """``n_per_subcase`` distinct examples for each subcase of ``part`` (see :func:`part_patterns`;
    "all": the 30 subcases, 15 entailed and 15 not, so labels are exactly balanced), templates used
    round-robin. Deterministic given ``seed`` (independent of PYTHONHASHSEED); the "train" part draws
    from its own random stream. meta: heuristic, subcase, template, pair_id, part, source."""
    if not isinstance(n_per_subcase, int) or n_per_subcase < 1:
        raise ValueError(f"n_per_subcase: expected a positive int, got {n_per_subcase!r}")
    chosen = part_patterns(part, holdout)
    out = []
    for si, (heuristic, subcase, label, patterns) in enumerate(SUBCASES):
        if si not in chosen:
            continue
        pis = chosen[si]
        rng = random.Random(_stable_seed(seed, subcase if part != "train" else subcase + ":train"))
        seen: set[tuple[str, str]] = set()
        attempts = 0
        while len(seen) < n_per_subcase:
            pi = pis[len(seen) % len(pis)]
            pair = _fill(*patterns[pi], rng)
            attempts += 1
            if attempts > 200 * n_per_subcase:
                raise ValueError(f"n_per_subcase: {n_per_subcase} distinct pairs are more than the templates "
                                 f"of {subcase!r} can produce")
            if pair in seen:
                continue
            seen.add(pair)
            out.append(Example(pair[0], pair[1], label, {
                "heuristic": heuristic, "subcase": subcase, "template": _TEMPLATE_NAMES[(si, pi)],
                "pair_id": f"hs{part[0]}{len(out)}" if part != "all" else f"hs{len(out)}", "part": part,
                "source": HANS_STYLE_NAME}))
    return out
