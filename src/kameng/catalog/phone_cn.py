"""Which operator a mainland China mobile number belongs to, by its number segment (号段).

话费 (phone credit) products are operator-specific: a China Mobile top-up card cannot credit a
China Unicom number, and a supplier that is handed one fails the order after payment. Checking
the segment before payment catches the commonest mistake (a wrong or mistyped number) while
the buyer is still on the form. Segments of virtual operators (虚拟运营商, 170/171/162/165/167)
are hosted by one of the three carriers but usually cannot be topped up through its channels,
so they are reported as virtual.

The table follows the segments the MIIT has allocated; a segment missing here is reported as
unknown (never guessed), and staff can leave the product's field without an `operator` rule.
"""

from __future__ import annotations

from dataclasses import dataclass

CMCC, CUCC, CTCC, CBN = "cmcc", "cucc", "ctcc", "cbn"

NAMES: dict[str, tuple[str, str]] = {
    CMCC: ("中国移动", "China Mobile"),
    CUCC: ("中国联通", "China Unicom"),
    CTCC: ("中国电信", "China Telecom"),
    CBN: ("中国广电", "China Broadnet"),
}

_THREE: dict[str, str] = {}
for _op, _segments in {
    CMCC: "135 136 137 138 139 147 148 150 151 152 157 158 159 172 178 182 183 184 187 188 "
    "195 197 198",
    CUCC: "130 131 132 145 146 155 156 166 175 176 185 186 196",
    CTCC: "133 149 153 173 177 180 181 189 190 191 193 199",
    CBN: "192",
}.items():
    for _seg in _segments.split():
        _THREE[_seg] = _op

# Four-digit segments where the three digits alone do not tell.
_FOUR: dict[str, tuple[str, bool]] = {
    **{f"134{d}": (CMCC, False) for d in "012345678"},
    "1349": (CTCC, False),  # satellite
    **{f"174{d}": (CTCC, False) for d in "0"},  # 17400-17405: satellite
    "1700": (CTCC, True),
    "1701": (CTCC, True),
    "1702": (CTCC, True),
    "1703": (CMCC, True),
    "1705": (CMCC, True),
    "1706": (CMCC, True),
    "1704": (CUCC, True),
    "1707": (CUCC, True),
    "1708": (CUCC, True),
    "1709": (CUCC, True),
}
# Virtual operators' three-digit segments, by host carrier.
_VIRTUAL_THREE: dict[str, str] = {"162": CTCC, "165": CMCC, "167": CUCC, "171": CUCC}


@dataclass(frozen=True, slots=True)
class Operator:
    code: str
    virtual: bool

    def name(self, language: str) -> str:
        zh, en = NAMES[self.code]
        label = en if language == "en" else zh
        if self.virtual:
            return f"{label} virtual operator" if language == "en" else f"{label}虚拟运营商"
        return label


def operator_of(number: str) -> Operator | None:
    """The operator of an 11-digit mainland mobile number, or None for an unknown segment."""
    if len(number) != 11 or not number.isascii() or not number.isdigit():
        return None
    four = _FOUR.get(number[:4])
    if four is not None:
        return Operator(*four)
    if number[:3] in _VIRTUAL_THREE:
        return Operator(_VIRTUAL_THREE[number[:3]], True)
    three = _THREE.get(number[:3])
    return Operator(three, False) if three else None
