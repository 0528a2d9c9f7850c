"""Rebuild the data of the shipped lm-eval tasks from text that ships with Python itself.

    python recipes/lm_eval/build_data.py          # rewrite the .jsonl files beside this script
    python recipes/lm_eval/build_data.py --check  # exit 1 if they differ from a fresh build

Source: `pydoc_data.topics`, the reference-manual topics that every CPython install carries
(Python Software Foundation License). The output depends only on that text and the fixed seed,
so the same CPython version rebuilds byte-identical files; `SOURCE` below records the version
the shipped files came from (another version's docs differ slightly, and so would the files).

byoai_pydoc_cloze (multiple choice, K options, chance 1/K): a passage of prose from one topic,
cut just before a content word; the options are that word and K-1 other words of the same topic.
Guards against a set that a length heuristic could pass (a random model scored 0.875 on an
unbalanced one): no option has the answer's length, and the answer's length rank among the
options (0 = shortest ... K-1 = longest) is spread evenly over the set; the answer's position
among the options is spread evenly too.

byoai_pydoc_ppl (loglikelihood_rolling): the `test` topics of byoai's built-in text
(tasks.data.python_docs: every 5th topic, sorted), each cut to at most PPL_CHARS characters at a
paragraph boundary; reports word perplexity, byte perplexity and bits per byte, which, unlike
token perplexity, compare across tokenizers.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLOZE_FILE = HERE / "pydoc_cloze.jsonl"
CLOZE_DEV_FILE = HERE / "pydoc_cloze_dev.jsonl"
PPL_FILE = HERE / "pydoc_ppl.jsonl"
SOURCE = "pydoc_data.topics of CPython 3.11.7"

SEED = 20261122
K = 4  # options per question: chance accuracy is exactly 1/K
DEV_EVERY = 25  # every 25th usable paragraph goes to the few-shot split instead of the test split
MIN_CONTEXT_WORDS = 12
MAX_CONTEXT_WORDS = 48
ANSWER_LEN = (4, 12)  # answer words: 4-12 letters
OPTION_LEN = (3, 15)
PPL_CHARS = 3000

_WORD = re.compile(r"^[a-z]+$")
_STOP = frozenset(
    """all and any are but can did for had has how its may nor not off one our out own per the too
    two use via was who why yet
    about above after again against also although among another because been before being below
    between both cannot could does doing down during each either else even every from further have
    having here however into itself just less like many might more most much must neither never
    once only other otherwise ours over same several should since some such than that their them
    themselves then there these they this those though through thus under unless until upon very
    were what when where whether which while whose will with within without would your yours""".split()
)


def source_version() -> str:
    return f"pydoc_data.topics of CPython {sys.version.split()[0]}"


def prose_paragraphs() -> list[tuple[str, str]]:
    """(topic, paragraph) for every unindented paragraph of >= 25 words, in sorted topic order."""
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        for block in topics[name].split("\n\n"):
            lines = block.split("\n")
            if any(line.startswith((" ", "\t")) for line in lines) or any(set(line) <= set("*=-") for line in lines):
                continue  # code, tables, headings
            text = " ".join(line.strip() for line in lines)
            if len(text.split()) >= 25:
                out.append((name, text))
    return out


def _is_option_word(word: str) -> bool:
    return bool(_WORD.match(word)) and OPTION_LEN[0] <= len(word) <= OPTION_LEN[1] and word not in _STOP


def _vocabulary(text: str) -> set[str]:
    return {w for w in (t.strip('.,;:()"\'!?') for t in text.split()) if _is_option_word(w)}


def _related(a: str, b: str) -> bool:
    """Same stem (object/objects, call/called): such a pair could both fit the blank."""
    return a[:4] == b[:4]


def _pick(pool: list[str], n: int, taken: list[str], rng: random.Random) -> list[str] | None:
    """n words from pool (sorted, deterministic), none related to each other or to `taken`."""
    candidates = sorted(pool)
    rng.shuffle(candidates)
    picked: list[str] = []
    for word in candidates:
        if len(picked) == n:
            break
        if not any(_related(word, other) for other in taken + picked):
            picked.append(word)
    return picked if len(picked) == n else None


def _distractors(answer: str, rank: tuple[int, int], pools: list[set[str]], freq: Counter[str],
                 rng: random.Random) -> list[str] | None:
    """K-1 words near the answer in length and corpus frequency, none tied with it on either.

    rank = (length rank, frequency rank): how many options are shorter, how many are rarer.
    Pools are tried in order (the topic's own words, then the whole corpus).
    """
    size, count = len(answer), freq[answer]

    def near(word: str) -> bool:
        return abs(len(word) - size) <= 3 and len(word) != size and count / 8 <= freq[word] <= count * 8 \
            and freq[word] != count

    splits = list(range(K))
    rng.shuffle(splits)
    for pool in pools:
        buckets = {
            (short, rare): [w for w in pool if near(w) and (len(w) < size) == short and (freq[w] < count) == rare]
            for short in (True, False) for rare in (True, False)
        }
        for short_rare in splits:  # how many distractors are both shorter and rarer
            wanted = {(True, True): short_rare, (True, False): rank[0] - short_rare,
                      (False, True): rank[1] - short_rare, (False, False): K - 1 - rank[0] - rank[1] + short_rare}
            if min(wanted.values()) < 0:
                continue
            picked: list[str] = []
            for bucket, n in wanted.items():
                got = _pick(buckets[bucket], n, [answer, *picked], rng) if n else []
                if got is None:
                    break
                picked += got
            else:
                return picked
    return None


def _candidates(paragraphs: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    """One cut per paragraph: a random position whose word can be a cloze answer."""
    out = []
    for topic, text in paragraphs:
        words = text.split()
        spots = [j for j in range(MIN_CONTEXT_WORDS, len(words)) if _is_option_word(words[j])
                 and ANSWER_LEN[0] <= len(words[j]) <= ANSWER_LEN[1]]
        if not spots:
            continue
        j = rng.choice(spots)
        context = " ".join(words[max(0, j - MAX_CONTEXT_WORDS):j])
        out.append({"topic": topic, "context": context, "answer": words[j]})
    return out


def build_cloze() -> tuple[list[dict], list[dict]]:
    """(test, dev) multiple-choice rows: {id, topic, context, choices, label, answer_length_rank}."""
    rng = random.Random(SEED)
    paragraphs = prose_paragraphs()
    topic_text: dict[str, str] = {}
    for topic, text in paragraphs:
        topic_text[topic] = topic_text.get(topic, "") + " " + text
    topic_vocab = {topic: _vocabulary(text) for topic, text in topic_text.items()}
    corpus_vocab = set().union(*topic_vocab.values())
    freq = Counter(w for text in topic_text.values() for w in (t.strip('.,;:()"\'!?') for t in text.split()))

    rows = _candidates(paragraphs, rng)
    # Assign ranks evenly: each question takes the least-used (length, frequency) rank pair it can
    # be built with, so neither "pick the shortest/longest" nor "pick the commonest word" (what a
    # random model with a frequency-trained BPE tokenizer does: fewer tokens) beats chance.
    used: Counter[tuple[int, int]] = Counter()
    pairs = [(a, b) for a in range(K) for b in range(K)]
    order = list(range(len(rows)))
    rng.shuffle(order)
    built: dict[int, dict] = {}
    for i in order:
        row = rows[i]
        pools = [topic_vocab[row["topic"]] - {row["answer"]}, corpus_vocab - {row["answer"]}]
        for rank in sorted(pairs, key=lambda r: (used[r], rng.random())):
            distractors = _distractors(row["answer"], rank, pools, freq, rng)
            if distractors is not None:
                break
        else:
            continue
        used[rank] += 1
        choices = [row["answer"], *distractors]
        rng.shuffle(choices)
        built[i] = row | {"choices": choices, "label": choices.index(row["answer"]),
                          "answer_length_rank": rank[0], "answer_frequency_rank": rank[1]}

    # Rows stay in that (shuffled) order, so the first N (lm-eval's `limit`) are a fair sample of
    # topics and ranks. The answer's position among the options cycles, balanced in every prefix.
    test, dev = [], []
    for n, i in enumerate(i for i in order if i in built):
        (dev if n % DEV_EVERY == DEV_EVERY - 1 else test).append(built[i])
    for split in (test, dev):
        for n, row in enumerate(split):
            answer = row["choices"][row["label"]]
            others = [c for c in row["choices"] if c != answer]
            label = n % K
            row["choices"] = others[:label] + [answer] + others[label:]
            row["label"] = label
    test = [{"id": f"cloze-{n:04d}", **row} for n, row in enumerate(test)]
    dev = [{"id": f"cloze-dev-{n:03d}", **row} for n, row in enumerate(dev)]
    return test, dev


def build_ppl() -> list[dict]:
    """The `test` topics of tasks.data.python_docs, each cut to <= PPL_CHARS at a paragraph end."""
    from pydoc_data.topics import topics

    rows = []
    for i, name in enumerate(sorted(topics)):
        if i % 5:
            continue
        text = ""
        for block in topics[name].split("\n\n"):
            if text and len(text) + 2 + len(block) > PPL_CHARS:
                break
            text = f"{text}\n\n{block}" if text else block
        rows.append({"id": f"ppl-{name}", "topic": name, "text": text[:PPL_CHARS]})
    return rows


def _dumps(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)


def build_files() -> dict[Path, str]:
    test, dev = build_cloze()
    return {CLOZE_FILE: _dumps(test), CLOZE_DEV_FILE: _dumps(dev), PPL_FILE: _dumps(build_ppl())}


def main(argv: list[str]) -> int:
    if source_version() != SOURCE:
        print(f"note: building from {source_version()}; the shipped files came from {SOURCE}", file=sys.stderr)
    files = build_files()
    if "--check" in argv:
        stale = [p.name for p, text in files.items() if not p.is_file() or p.read_text() != text]
        print("stale: " + ", ".join(stale) if stale else "up to date")
        return 1 if stale else 0
    for path, text in files.items():
        path.write_text(text)
        print(f"{path.name}: {text.count(chr(10))} rows, {len(text.encode()) / 1e3:.0f} kB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
