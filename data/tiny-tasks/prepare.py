"""Write the bundled tiny-tasks data sets: a pretraining corpus, SFT rows with a flawed annotator,
preference pairs that correct it, and held-out test prompts.

    python data/tiny-tasks/prepare.py

Eight short, exactly checkable task families over a fixed pool of items (words, digit pairs, digit
lists, word lists). The corpus states the correct facts for every item in prose, so a model
pretrained on it "knows" the tasks but has never seen the [INST] chat format. SFT teaches the
format, but its annotator is systematically wrong on two families (`sort`, `last_letter`);
the preference pairs prefer the correct answer over the flawed one, which is what DPO fixes.
Everything is drawn from one seeded generator, so the files are identical on every run.

passkey_sft.jsonl adds a ninth family for the long-context check (`finetune eval --passkey`):
the same prompts the check builds (finetune/eval/passkey.py), with 4-40 filler words, so 110 to
200 tokens, answered with the key. Its own generator leaves every other file byte-identical.
"""

import json
import random
import sys
from itertools import permutations
from pathlib import Path

SEED = 1234
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # the passkey prompts come from the package itself
from finetune.eval.passkey import user_turn  # noqa: E402

# Sizes are set so LoRA SFT (~1 epoch) and DPO each take about a minute on 2 CPU cores.
N_SFT = 2400
N_SFT_EVAL = 96
N_PREF = 640
N_TEST_PER_FAMILY = 20
N_PASSKEY_SFT = 320
PASSKEY_WORDS = (4, 40)  # filler words per prompt: 110-200 tokens, about half the model's 512 positions
MULTI_TURN_RATE = 0.04
FLAW_RATE = 0.85  # share of the flawed families' SFT answers that carry the flaw
# DPO needs most of its signal where SFT went wrong; clean families keep a share so they hold.
PREF_FLAWED_SHARE = 0.5
# How many sentences state each fact (each with a random template). Word facts are memorised
# token by token and need the most exposures; sorting and counting are learnt as algorithms
# and need few, and their long sentences would otherwise crowd the word facts out.
# A fact needs a few hundred exposures before a 4M-parameter model recalls it; stating it
# often in a corpus read ~6 times beats a small corpus read 40 times, which the model
# memorises verbatim (document order included).
CORPUS_REPEATS = {"sort": 20, "count": 18, "add": 48}
DEFAULT_REPEATS = 48

# 3-5 letter words whose first and last letters differ, so `last_letter`'s flaw (answering the
# first letter) is always a wrong answer. Few enough that a 4M-parameter model memorises every
# word's facts in a few minutes of pretraining.
WORDS = """
lamp tree fish bird cake milk rain snow moon star ship boat road hill lake wind fire gold
salt corn frog duck goat lion bear wolf crab owl cat dog cow pig hen fox
apple bread chair plant stone cloud river horse mouse sheep tiger zebra
clock phone glass spoon cup pen map key ring hat sock book drum bell kite sun sky sea
""".split()
WORDS = [w for w in dict.fromkeys(WORDS) if w[0] != w[-1]]


def make_pools(rng):
    """Every item any split may use; the corpus states facts about all of them."""
    words = list(WORDS)
    # Three distinct digits: four-digit sorts were still half wrong after the pretraining budget.
    digit_lists = [list(p) for p in permutations(range(10), 3)]
    rng.shuffle(digit_lists)
    word_lists = [rng.sample(WORDS, rng.randint(2, 5)) for _ in range(150)]
    return {
        "reverse": words,
        "uppercase": words,
        "first_letter": words,
        "last_letter": words,
        "repeat": words,
        "add": [(a, b) for a in range(10) for b in range(10)],
        "sort": digit_lists[:120],
        "count": word_lists,
    }


def digits(xs):
    return " ".join(str(x) for x in xs)


def answer(task, item):
    """The correct answer; exact match against it is the test metric."""
    if task == "reverse":
        return item[::-1]
    if task == "uppercase":
        return item.upper()
    if task == "first_letter":
        return item[0]
    if task == "last_letter":
        return item[-1]
    if task == "repeat":
        return f"{item} {item}"
    if task == "add":
        return str(item[0] + item[1])
    if task == "sort":
        return digits(sorted(item))
    if task == "count":
        return str(len(item))
    raise ValueError(task)


# The flawed annotator confuses a task with its neighbour, a skill the corpus also teaches,
# so after SFT greedy decoding reproduces the flaw instead of producing noise.
FLAWED = {
    "sort": lambda item: digits(sorted(item, reverse=True)),  # sorts the wrong way round
    "last_letter": lambda item: item[0],  # reads the word from the wrong end
}


def plausible_wrong(task, item, rng):
    """A wrong answer for the clean families' rejected side.

    It must not be a prefix of the answer (nor the answer of it): DPO would then mostly learn
    "do not stop here", which leaks into every family as answers that run on past </s>.
    """
    right = answer(task, item)
    if task == "reverse":
        options = [item, right[1:] + right[0]]  # not reversed; reversed but rotated
    elif task == "uppercase":
        options = [item, item.capitalize()]
    elif task == "first_letter":
        # The last letter: the mirror image of last_letter's flaw, so that DPO learns to tell
        # first from last rather than "never answer the first letter".
        options = [item[-1]]
    elif task == "repeat":
        other = rng.choice([w for w in WORDS if w != item])
        options = [f"{other} {other}"]  # the wrong word, said twice
    elif task in ("add", "count"):
        options = [str(int(right) + 1), str(int(right) - 1)]
    else:
        raise ValueError(task)
    return rng.choice([o for o in options if not (o.startswith(right) or right.startswith(o))])


PROMPTS = {
    "reverse": ["Reverse the word {x}.", "Write {x} backwards."],
    "uppercase": ["Write {x} in capital letters.", "Uppercase the word {x}."],
    "first_letter": ["What is the first letter of {x}?", "Which letter does {x} start with?"],
    "last_letter": ["What is the last letter of {x}?", "Which letter does {x} end with?"],
    "repeat": ["Say {x} twice.", "Repeat the word {x} two times."],
    "add": ["What is {a} plus {b}?", "Add {a} and {b}."],
    "sort": ["Sort these digits from smallest to largest: {x}", "Put {x} in increasing order."],
    "count": ["How many words are in this list: {x}?", "Count the words: {x}"],
}

# Several templates per fact, with different distances between the item and the answer: a
# model that saw one fixed layout learns "the operand 3 tokens back" and cannot carry the
# skill over to the chat prompts; varied layouts make it find operands by content.
CORPUS = {
    "reverse": ["the reverse of {x} is {y}.", "{x} spelled backwards is {y}.", "written backwards, {x} becomes {y}.",
                "if you write {x} backwards, you get {y}."],
    "uppercase": ["{x} in capital letters is {y}.", "the uppercase form of {x} is {y}.",
                  "if you write {x} in capital letters, you get {y}."],
    "first_letter": ["the first letter of {x} is {y}.", "the word {x} starts with {y}.",
                     "the first letter of the word {x} is {y}."],
    "last_letter": ["the last letter of {x} is {y}.", "the word {x} ends with {y}.",
                    "the last letter of the word {x} is {y}."],
    "repeat": ["{x} said twice is {y}.", "say {x} two times and you get {y}.", "if you say {x} twice, you get {y}."],
    "add": ["{a} plus {b} is {y}.", "the sum of {a} and {b} is {y}.", "adding {a} and {b} gives {y}.",
            "{a} and {b} add up to {y}.", "if you add {a} and {b} together, you get {y}."],
    "sort": ["{x} sorted from smallest to largest is {y}.", "in increasing order, {x} becomes {y}.",
             "putting {x} in increasing order gives {y}."],
    # The flawed annotator's answers for `sort` are real facts of another kind, stated here.
    "sort_desc": ["{x} sorted from largest to smallest is {y}.", "in decreasing order, {x} becomes {y}.",
                  "putting {x} in decreasing order gives {y}."],
    # Every template states the answer after the item, so the answer is predictable from the text.
    "count": ["the list {x} has {y} words.", "counting the words in {x} gives {y}.",
              "if you count the words in {x}, you get {y}."],
}

TASKS = list(PROMPTS)


def fill(template, task, item, y=None):
    if task == "add":
        return template.format(a=item[0], b=item[1], y=y)
    x = digits(item) if task == "sort" else " ".join(item) if task == "count" else item
    return template.format(x=x, y=y)


def corpus_lines(pools, rng):
    """Shuffled fact sentences grouped into short documents, one document per line."""
    facts = []
    for task in TASKS:
        for item in pools[task]:
            for _ in range(CORPUS_REPEATS.get(task, DEFAULT_REPEATS)):
                facts.append(fill(rng.choice(CORPUS[task]), task, item, answer(task, item)))
                if task == "sort":
                    desc = FLAWED["sort"](item)
                    facts.append(fill(rng.choice(CORPUS["sort_desc"]), task, item, desc))
    rng.shuffle(facts)
    lines, i = [], 0
    while i < len(facts):
        n = rng.randint(3, 8)
        lines.append(" ".join(facts[i : i + n]))
        i += n
    return lines


def split_items(pools, rng):
    """Hold out N_TEST_PER_FAMILY items per family for test; the rest feed SFT and preferences."""
    test, train = {}, {}
    for task in TASKS:
        items = list(pools[task])
        rng.shuffle(items)
        test[task], train[task] = items[:N_TEST_PER_FAMILY], items[N_TEST_PER_FAMILY:]
    return test, train


def prompt(task, item, rng):
    return fill(rng.choice(PROMPTS[task]), task, item)


def sft_turn(task, item, rng):
    flawed = task in FLAWED and rng.random() < FLAW_RATE
    reply = FLAWED[task](item) if flawed else answer(task, item)
    return [{"role": "user", "content": prompt(task, item, rng)}, {"role": "assistant", "content": reply}]


def sft_rows(train, n, rng):
    rows = []
    for _ in range(n):
        turns = 2 if rng.random() < MULTI_TURN_RATE else 1
        messages = []
        for _ in range(turns):
            task = rng.choice(TASKS)
            messages += sft_turn(task, rng.choice(train[task]), rng)
        rows.append({"messages": messages})
    return rows


def preference_rows(train, n, rng):
    rows = []
    flawed, clean = sorted(FLAWED), [t for t in TASKS if t not in FLAWED]
    for _ in range(n):
        task = rng.choice(flawed) if rng.random() < PREF_FLAWED_SHARE else rng.choice(clean)
        item = rng.choice(train[task])
        chosen = answer(task, item)
        rejected = FLAWED[task](item) if task in FLAWED else plausible_wrong(task, item, rng)
        if chosen.startswith(rejected) or rejected.startswith(chosen):
            raise RuntimeError(f"chosen {chosen!r} and rejected {rejected!r} overlap for {task} {item!r}")
        rows.append({
            "prompt": [{"role": "user", "content": prompt(task, item, rng)}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        })
    return rows


def test_rows(test, rng):
    return [
        {"prompt": [{"role": "user", "content": prompt(task, item, rng)}], "answer": answer(task, item), "task": task}
        for task in TASKS
        for item in test[task]
    ]


def passkey_rows(n, rng):
    rows = []
    for _ in range(n):
        key = str(rng.randint(10_000, 99_999))
        content = user_turn(key, rng.randint(*PASSKEY_WORDS), rng.random())
        rows.append({"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": key}]})
    return rows


def check_held_out(sft, pref, test):
    """Test prompts must be unseen in SFT and preference data, or the test measures recall."""
    seen = {m["content"] for row in sft for m in row["messages"] if m["role"] == "user"}
    seen |= {row["prompt"][0]["content"] for row in pref}
    leaked = [row["prompt"][0]["content"] for row in test if row["prompt"][0]["content"] in seen]
    if leaked:
        raise RuntimeError(f"{len(leaked)} test prompts also appear in training data, e.g. {leaked[0]!r}")


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def rng_for(name):
    """One generator per output, so resizing or redesigning one file leaves the others as they were."""
    return random.Random(f"{SEED}-{name}")


def main():
    pools = make_pools(rng_for("pools"))
    test, train = split_items(pools, rng_for("split"))
    corpus = corpus_lines(pools, rng_for("corpus"))
    sft = sft_rows(train, N_SFT, rng_for("sft"))
    sft_eval = sft_rows(train, N_SFT_EVAL, rng_for("sft_eval"))
    pref = preference_rows(train, N_PREF, rng_for("preference"))
    tests = test_rows(test, rng_for("test"))
    check_held_out(sft + sft_eval, pref, tests)

    (HERE / "corpus.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    write_jsonl(HERE / "sft.jsonl", sft)
    write_jsonl(HERE / "sft_eval.jsonl", sft_eval)
    write_jsonl(HERE / "preference.jsonl", pref)
    write_jsonl(HERE / "test.jsonl", tests)
    write_jsonl(HERE / "passkey_sft.jsonl", passkey_rows(N_PASSKEY_SFT, rng_for("passkey_sft")))
    for name in ("corpus.txt", "sft.jsonl", "sft_eval.jsonl", "preference.jsonl", "test.jsonl", "passkey_sft.jsonl"):
        path = HERE / name
        lines = sum(1 for _ in open(path, encoding="utf-8"))
        print(f"{name:18s} {lines:6d} lines {path.stat().st_size / 1024:8.1f} KiB")


if __name__ == "__main__":
    main()
