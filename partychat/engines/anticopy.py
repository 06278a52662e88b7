"""Anti-copy decoding: a reply never writes n words in a row that stand in a row in the texts it must avoid.

Small models in a group chat copy: a persona restates the previous speaker's reply word for word,
and the hub's repeat guard then withholds it. Rather than a penalty that only makes copying less
likely, each in-process engine asks this module, before every token, which tokens would complete a
word n-gram of the avoided texts (the other speakers' recent messages) or of the reply itself so far
(a loop such as "In a world of endless possibilities ... In this world of endless possibilities"),
and gives them no chance at all.

The unit is the word, compared as the hub's guards compare them (case-folded runs of letters and
digits), so what is banned is exactly what the guards and the benchmark count as copying. Bans act
where a word begins, so they never break a word in two: when "supposed to" is banned after
"... are", the model cannot dodge the ban by gluing "to" onto "supposed" ("supposedto"), nor spell
a banned word in pieces ("suppos" + "ed"). It has to choose another word.

No I/O and no engine in here: an engine gives the text of every token of its vocabulary once
(``Vocabulary``) and the reply written so far at each step (``WordBan.banned_tokens``).
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

DEFAULT_N = 3
"""Words in a banned n-gram, chosen with bench/conversation.py (see bench/README.md)."""
MIN_N = 2
UNITS = ("words", "tokens")
"""What an n-gram counts: words (the default, see above), or the model's tokens, which bench/README.md
compares and which can break words."""

_WORD = re.compile(r"\w+")
_HEAD = re.compile(r"(\W*)(\w*)")
_LABEL_SO_FAR = re.compile(r"[\s*_@]*\w+(?:[ \t]+\w+){0,2}[*_]*[ \t]*")
"""A reply so far that a colon would turn into a speaker label."""


@dataclass(frozen=True)
class AntiCopy:
    """What a reply must not copy, carried by a ChatRequest to whichever engine generates it.

    ``n`` is the strength knob: the reply never writes ``n`` words in a row found in a row in one of
    ``avoid``, nor ``n`` words it already wrote in this reply. Smaller is stronger (``MIN_N`` at
    least); a retry may ask for ``stronger()``.
    """

    avoid: tuple[str, ...] = ()
    n: int = DEFAULT_N
    unit: str = "words"
    allow: tuple[str, ...] = ()
    """Texts whose n-grams stay free even where ``avoid`` has them: the moderator's question, which
    a reply may restate although an earlier speaker already did (banning the question's phrases
    once another persona used them pushed replies off topic, see bench/README.md)."""
    no_label: bool = False
    """The reply may not open with a speaker label, a colon after its first one to three words: an
    attempt written as another speaker's line ("Moderator: ..."), which the hub withholds, starts
    otherwise. Banning the speaker's name instead only moved the model to a
    shortened one ("Mod: ..."), a label the guards do not know."""

    def __post_init__(self) -> None:
        if self.n < MIN_N:
            raise ValueError(f"anti-copy n-grams need at least {MIN_N} {self.unit}, not {self.n}")
        if self.unit not in UNITS:
            raise ValueError(f"anti-copy counts {' or '.join(UNITS)}, not {self.unit!r}")

    def stronger(self) -> AntiCopy:
        """The same request with n-grams one unit shorter (never under ``MIN_N``)."""
        return replace(self, n=max(MIN_N, self.n - 1))


def words(text: str) -> list[str]:
    """Words as the hub's guards compare them."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


class _NextWords:
    """For every run of n-1 words, the words that follow it somewhere."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.after: defaultdict[tuple[str, ...], set[str]] = defaultdict(set)

    def add(self, found: Sequence[str]) -> None:
        k = self.n - 1
        for i in range(len(found) - k):
            self.after[tuple(found[i:i + k])].add(found[i + k])

    def discard(self, found: Sequence[str]) -> None:
        """Free the n-grams of ``found`` again."""
        k = self.n - 1
        for i in range(len(found) - k):
            if (following := self.after.get(tuple(found[i:i + k]))) is not None:
                following.discard(found[i + k])

    def following(self, context: Sequence[str]) -> set[str]:
        k = self.n - 1
        if len(context) < k:
            return set()
        return self.after.get(tuple(context[len(context) - k:]), set())


class Vocabulary:
    """Which tokens start a new word and which continue the current one, by the word they write.

    Built once per model from the text of each token id (an empty text, as for control tokens, is
    never banned).
    """

    def __init__(self, token_texts: Iterable[str]) -> None:
        self.starting: defaultdict[str, list[int]] = defaultdict(list)
        """Tokens that begin with a space or punctuation, then a word: ' supposed', '\\nThe'."""
        self.gluing: defaultdict[str, list[int]] = defaultdict(list)
        """Tokens that begin with a letter or digit: 'to', 'ed'. They continue the word before them."""
        self.colons: list[int] = []
        """Tokens that would write a colon next: ':', ': ', '**:'."""
        for token, text in enumerate(token_texts):
            if text.lstrip(" *_").startswith(":"):
                self.colons.append(token)
            head = _HEAD.match(unicodedata.normalize("NFKC", text).casefold())
            assert head is not None  # the pattern matches any text
            lead, word = head.groups()
            if word:
                (self.starting if lead else self.gluing)[word].append(token)


def label_ban(no_label: bool, vocabulary: Vocabulary, reply: str) -> list[int]:
    """The colon tokens, while a colon would make ``reply`` (the text so far) a speaker label."""
    return list(vocabulary.colons) if no_label and _LABEL_SO_FAR.fullmatch(reply) else []


class WordBan:
    """One reply's bans: the tokens that would copy an n-gram, given the reply written so far."""

    def __init__(self, request: AntiCopy, vocabulary: Vocabulary) -> None:
        self.n = request.n
        self.vocabulary = vocabulary
        self.no_label = request.no_label
        self.others = _NextWords(request.n)
        for text in request.avoid:
            self.others.add(words(text))
        for text in request.allow:
            self.others.discard(words(text))

    def banned_tokens(self, reply_ids: Sequence[int], reply: str) -> list[int]:
        """Token ids that must not come next after ``reply`` (the text generated so far)."""
        written = words(reply)
        inside_word = bool(reply) and bool(_WORD.match(reply[-1]))
        partial = written.pop() if inside_word and written else ""
        own = _NextWords(self.n)
        own.add(written)

        def following(context: Sequence[str]) -> set[str]:
            return self.others.following(context) | own.following(context)

        vocab = self.vocabulary
        banned = label_ban(self.no_label, vocab, reply)
        if not partial:
            for word in following(written):  # the next token starts a word, with or without a space
                banned += vocab.starting.get(word, ())
                banned += vocab.gluing.get(word, ())
            return banned
        for word in following(written):  # the word being written would become a banned one
            if len(word) > len(partial) and word.startswith(partial):
                banned += vocab.gluing.get(word[len(partial):], ())
        for word in following([*written, partial]):  # the word after it: neither started nor glued on
            banned += vocab.starting.get(word, ())
            banned += vocab.gluing.get(word, ())
        return banned


class TokenBan:
    """The same bans counted in the model's tokens: no token n-gram of the avoided texts or of the reply.

    Simpler than words, but blind to word boundaries: a banned " to" after "supposed" leaves the
    glued "to" free, which is how broken words such as "supposedto" come about.
    """

    def __init__(self, request: AntiCopy, tokenize: Callable[[str], Sequence[int]],
                 vocabulary: Callable[[], Vocabulary] | None = None) -> None:
        self.n = request.n
        self.no_label = request.no_label
        self.vocabulary = vocabulary() if request.no_label and vocabulary is not None else None
        self.others = _NextWords(request.n)
        def tokens(text: str) -> list[str]:
            return [str(token) for token in tokenize(f" {text}")]  # as it stands after a space

        for text in request.avoid:
            self.others.add(tokens(text))
        for text in request.allow:
            self.others.discard(tokens(text))

    def banned_tokens(self, reply_ids: Sequence[int], reply: str) -> list[int]:
        written = [str(token) for token in reply_ids]
        own = _NextWords(self.n)
        own.add(written)
        label = label_ban(self.no_label, self.vocabulary, reply) if self.vocabulary is not None else []
        return [*label, *(int(token) for token in self.others.following(written) | own.following(written))]


def ban_for(request: AntiCopy, vocabulary: Callable[[], Vocabulary],
            tokenize: Callable[[str], Sequence[int]]) -> WordBan | TokenBan:
    """The bans of one reply, in the request's unit; an engine gives its vocabulary and tokenizer."""
    if request.unit == "tokens":
        return TokenBan(request, tokenize, vocabulary)
    return WordBan(request, vocabulary())
