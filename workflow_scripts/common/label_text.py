"""Label names as text: the file key of a label, and how a label is shown in a message so that two
labels that look alike on screen can be told apart.

- `file_key`: a file- and wildcard-safe ASCII name, unique per label (generation folders, the
  Snakemake `label` wildcard, validation image names).
- `shown`: a label as it appears in an error, with the code points of the characters a reader cannot
  see (a Cyrillic `С` in `Сardiomegaly`, a zero-width space, a decomposed accent).
- `looks_like` / `vocabulary_clashes`: labels that look the same (homoglyphs, case, a space written as
  `_`) or get one file key; two such labels in `dataset.labels` are refused at config time.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence

# Cyrillic and Greek letters drawn like a Latin letter in common fonts (a subset of Unicode's
# confusables.txt: the letters a label is likely to pick up from a keyboard layout or a copy-paste).
HOMOGLYPHS = str.maketrans(
    "АВЕЅІЈКМНОРСТУХаеіјорсухѕһԁ" "ΑΒΕΖΗΙΚΜΝΟΡΤΥΧον",
    "ABESIJKMHOPCTYXaeijopcyxshd" "ABEZHIKMNOPTYXov",
)


def file_key(text: str) -> str:
    """A file- and wildcard-safe ASCII name for a label or prompt, unique per text: `No Finding` ->
    `No_Finding` (kept readable where that loses nothing but spaces); any other text (Cyrillic, a
    homoglyph, punctuation that would merge two labels) -> its ASCII letters and digits plus 8 hex
    digits of its sha256: `Кардиомегалия` -> `label_4c1b…`, `Сardiomegaly` (Cyrillic С) -> `ardiomegaly_…`.
    `Pleural Thickening` and `Pleural_Thickening` both give `Pleural_Thickening`: a vocabulary holding
    both is refused (`vocabulary_clashes`)."""
    ascii_part = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")
    if ascii_part and ascii_part == re.sub(r"\s+", "_", text.strip()):
        return ascii_part
    return f"{ascii_part or 'label'}_{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def skeleton(text: str) -> str:
    """What a reader sees: compatibility forms folded (NFKC), lookalike letters as Latin, case and
    invisible characters ignored, every run of spaces, `_` and `-` as one space."""
    folded = unicodedata.normalize("NFKC", text).translate(HOMOGLYPHS).casefold()
    visible = "".join(char for char in folded if unicodedata.category(char) not in ("Cf", "Cc"))
    return re.sub(r"[\s_\-]+", " ", visible).strip()


def _deceptive(text: str) -> bool:
    """True where the text holds a character a reader would take for another or cannot see: non-ASCII
    beside ASCII letters (`Сardiomegaly`, a decomposed `É`), an invisible or unusual space, or only
    letters that pass for Latin (`МАСС`)."""
    if text.isascii():
        return False
    if any(unicodedata.category(char) in ("Cf", "Cc", "Zs") for char in text if not char.isascii()):
        return True
    return bool(re.search(r"[A-Za-z]", text)) or skeleton(text).isascii()


def shown(text: str, limit: int = 3) -> str:
    """`text` quoted as Python shows it; where it could be mistaken for another text, followed by its
    non-ASCII characters: `'Сardiomegaly' (character 1 is U+0421 CYRILLIC CAPITAL LETTER ES)`."""
    if not _deceptive(text):
        return repr(text)
    odd = [(position, char) for position, char in enumerate(text, start=1) if not char.isascii()]
    parts = [f"character {position} is U+{ord(char):04X} {unicodedata.name(char, 'unnamed')}" for position, char in odd[:limit]]
    more = f", and {len(odd) - limit} more non-ASCII" if len(odd) > limit else ""
    return f"{text!r} ({', '.join(parts)}{more})"


def shown_list(texts: Sequence[str]) -> str:
    """A list of labels or column names as `shown` writes each: `['Mass', 'Сardiomegaly' (...)]`."""
    return "[" + ", ".join(shown(text) for text in texts) + "]"


def looks_like(text: str, candidates: Sequence[str]) -> str | None:
    """The candidate `text` would be taken for (same skeleton, different text), or None."""
    return next((candidate for candidate in candidates if candidate != text and skeleton(candidate) == skeleton(text)), None)


def vocabulary_clashes(labels: Sequence[str]) -> list[str]:
    """Why pairs of `labels` cannot both be labels: one file key (also ignoring case, for the folders
    of a case-insensitive filesystem) or the same look. One line per pair."""
    problems = []
    for index, first in enumerate(labels):
        for second in labels[index + 1:]:
            if first == second:
                continue  # a label listed twice: the schema's uniqueItems says so
            key, other = file_key(first), file_key(second)
            if key.casefold() == other.casefold():
                name = f"one file name {key!r}" if key == other else (
                    f"the file names {key!r} and {other!r}, one name on a case-insensitive filesystem (macOS, Windows)")
                problems.append(f"{shown(first)} and {shown(second)} get {name}: the folder and Snakemake wildcard of "
                                "their synthetic images, so their images would mix")
            elif skeleton(first) == skeleton(second):
                problems.append(f"{shown(first)} and {shown(second)} look the same on screen, so no table or report "
                                "could tell them apart")
    return problems
