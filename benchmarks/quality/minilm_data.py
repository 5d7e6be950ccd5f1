"""Derive the MiniLM zoo's eight text-classification tasks from WordNet 3.0 and the fortune files.

``python -m benchmarks.quality.minilm_data`` (needs the Debian packages ``wordnet-base`` and
``fortunes``: ``apt-get install wordnet-base fortunes``) writes
``benchmarks/quality/zoo_minilm/data/<task>.json`` (train / val / test lists of ``[text, label]``
and the class names) and ``LICENSE`` beside them. The output is deterministic (seeded shuffles of
files read in a fixed order); the committed files are what the benchmark and the tests read, so
neither needs the packages.

The tasks differ in what is read and what is asked:

* ``noun_category``: lexicographer file of a noun synset (8 of WordNet's noun.* files) from its
  gloss (definition only);
* ``verb_category``: lexicographer file of a verb synset (8 verb.* files) from its gloss;
* ``part_of_speech``: noun, verb, adjective or adverb, from a gloss;
* ``gloss_or_example``: is the text a definition or an example sentence (binary);
* ``quote_topic``: the fortune file (8 topics) a quotation is filed in;
* ``word_gloss_match``: ``"word: gloss"``: is the gloss the word's own or another noun's (binary);
* ``word_category``: the lexicographer file of a single noun (a lemma with one sense only, no
  gloss: the model's knowledge of the word);
* ``usage_domain``: the topic domain WordNet files a synset under (8 domains: medicine, law,
  ...), from its gloss with any leading "(domain)" tag removed.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

WORDNET = Path("/usr/share/wordnet")
FORTUNES = Path("/usr/share/games/fortunes")
DATA_DIR = Path(__file__).resolve().parent / "zoo_minilm" / "data"
LEXNAMES = ("adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
            "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
            "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
            "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
            "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
            "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
            "adj.ppl").split()
NOUN_CLASSES = ("noun.animal", "noun.plant", "noun.food", "noun.artifact", "noun.person", "noun.body",
                "noun.location", "noun.substance")
VERB_CLASSES = ("verb.motion", "verb.communication", "verb.change", "verb.contact", "verb.cognition",
                "verb.consumption", "verb.emotion", "verb.competition")
QUOTE_TOPICS = ("computers", "politics", "science", "work", "men-women", "art", "literature", "food")
SIZES = {"train": 2000, "val": 100, "test": 200}   # per task (fewer where a task has fewer examples)


def read_synsets() -> list[dict]:
    """Every synset of the four data files: offset, pos, lexname, lemmas, definition, examples,
    topic-domain targets."""
    out = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (WORDNET / f"data.{pos}").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  "):
                continue                                  # licence header
            head, _, gloss = line.partition(" | ")
            f = head.split()
            n_words = int(f[3], 16)
            lemmas = [f[4 + 2 * i].replace("_", " ") for i in range(n_words)]
            lemmas = [re.sub(r"\(.*\)$", "", w) for w in lemmas]
            k = 4 + 2 * n_words
            n_ptr = int(f[k])
            ptrs = [f[k + 1 + 4 * i: k + 5 + 4 * i] for i in range(n_ptr)]
            parts = [p.strip() for p in re.split(r';\s*(?=")', gloss.strip())]
            definition = parts[0].strip().rstrip(";").strip()
            examples = [p.strip().strip('"').strip() for p in parts[1:] if p.strip().strip('"')]
            out.append({"offset": f[0], "pos": pos, "lexname": LEXNAMES[int(f[1])], "lemmas": lemmas,
                        "definition": definition, "examples": examples,
                        "domains": [p[1] for p in ptrs if p[0] == ";c"]})
    return out


def strip_tag(text: str) -> str:
    return re.sub(r"^\([^)]*\)\s*", "", text)


def balanced(pool: dict[str, list[str]], classes, rng: random.Random, total: int) -> list[list]:
    """Up to ``total`` examples, as equal per class as the pools allow, labels = class indices."""
    per = total // len(classes)
    rows = []
    for i, c in enumerate(classes):
        items = sorted(set(pool[c]))
        rng.shuffle(items)
        rows += [[t, i] for t in items[:per]]
    rng.shuffle(rows)
    return rows


def split(rows: list[list], rng: random.Random) -> dict[str, list[list]]:
    """Val and test first (their full sizes where possible), the rest (up to the cap) train."""
    rows = list(rows)
    rng.shuffle(rows)
    n_val = min(SIZES["val"], len(rows) // 8)
    n_test = min(SIZES["test"], len(rows) // 4)
    return {"val": rows[:n_val], "test": rows[n_val:n_val + n_test],
            "train": rows[n_val + n_test:n_val + n_test + SIZES["train"]]}


def fortunes(topic: str) -> list[str]:
    text = (FORTUNES / topic).read_text(encoding="utf-8", errors="replace")
    quotes = [" ".join(q.split()) for q in re.split(r"^%$", text, flags=re.M)]
    return [q for q in quotes if 20 <= len(q) <= 400]


def build(seed: int = 0) -> dict[str, dict]:
    rng = random.Random(seed)
    syn = read_synsets()
    total = sum(SIZES.values())
    tasks = {}

    def add(name, classes, rows, description):
        tasks[name] = {"classes": list(classes), "description": description, **split(rows, rng)}

    by_lex = defaultdict(list)
    for s in syn:
        by_lex[s["lexname"]].append(s["definition"])
    add("noun_category", NOUN_CLASSES, balanced(by_lex, NOUN_CLASSES, rng, total),
        "WordNet lexicographer file of a noun synset, from its definition")
    add("verb_category", VERB_CLASSES, balanced(by_lex, VERB_CLASSES, rng, total),
        "WordNet lexicographer file of a verb synset, from its definition")
    by_pos = defaultdict(list)
    for s in syn:
        by_pos[s["pos"]].append(s["definition"])
    pos_classes = ("noun", "verb", "adj", "adv")
    add("part_of_speech", pos_classes, balanced(by_pos, pos_classes, rng, total),
        "part of speech of a synset, from its definition")
    kinds = {"definition": [s["definition"] for s in syn if s["examples"]],
             "example": [e for s in syn for e in s["examples"][:1]]}
    add("gloss_or_example", tuple(kinds), balanced(kinds, tuple(kinds), rng, total),
        "is the text a WordNet definition or an example sentence")
    topics = {t: fortunes(t) for t in QUOTE_TOPICS}
    add("quote_topic", QUOTE_TOPICS, balanced(topics, QUOTE_TOPICS, rng, total),
        "fortune file (topic) a quotation is filed in")
    nouns = [s for s in syn if s["pos"] == "noun" and len(s["definition"].split()) >= 3]
    rng.shuffle(nouns)
    match = {"own": [], "other": []}
    half = total // 2
    for i, s in enumerate(nouns[:2 * half]):
        if i % 2 == 0:
            match["own"].append(f"{s['lemmas'][0]}: {s['definition']}")
        else:
            other = nouns[(i * 7919 + 1) % len(nouns)]
            if other["lexname"] != s["lexname"]:
                match["other"].append(f"{s['lemmas'][0]}: {other['definition']}")
    add("word_gloss_match", tuple(match), balanced(match, tuple(match), rng, total),
        "'word: gloss': is the gloss the word's own definition or another noun's")
    senses = Counter(w.lower() for s in syn if s["pos"] == "noun" for w in s["lemmas"])
    words = defaultdict(list)
    for s in syn:
        if s["pos"] == "noun" and s["lexname"] in NOUN_CLASSES:
            words[s["lexname"]] += [w for w in s["lemmas"] if senses[w.lower()] == 1 and w[:1].islower()]
    add("word_category", NOUN_CLASSES, balanced(words, NOUN_CLASSES, rng, total),
        "WordNet lexicographer file of a single noun (one sense only), from the word alone")
    dom_count = Counter(d for s in syn for d in s["domains"])
    names = {s["offset"]: s["lemmas"][0] for s in syn if s["pos"] == "noun"}
    top = [d for d, _ in dom_count.most_common(8)]
    dom_classes = tuple(names[d] for d in top)
    doms = defaultdict(list)
    for s in syn:
        ds = [d for d in s["domains"] if d in top]
        if len(set(ds)) == 1:
            doms[names[ds[0]]].append(strip_tag(s["definition"]))
    add("usage_domain", dom_classes, balanced(doms, dom_classes, rng, total),
        "WordNet topic domain of a synset, from its definition (leading '(domain)' tag removed)")
    return tasks


LICENSE = """The task files in this folder are derived from two sources.

WordNet 3.0 (noun_category, verb_category, part_of_speech, gloss_or_example, word_gloss_match,
word_category, usage_domain):

WordNet Release 3.0. This software and database is being provided to you, the LICENSEE, by
Princeton University under the following license. By obtaining, using and/or copying this
software and database, you agree that you have read, understood, and will comply with these
terms and conditions.:

Permission to use, copy, modify and distribute this software and database and its
documentation for any purpose and without fee or royalty is hereby granted, provided that you
agree to comply with the following copyright notice and statements, including the disclaimer,
and that the same appear on ALL copies of the software, database and documentation, including
modifications that you make for internal use or for distribution.

WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.

THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO
REPRESENTATIONS OR WARRANTIES, EXPRESS OR IMPLIED. BY WAY OF EXAMPLE, BUT NOT LIMITATION,
PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES OF MERCHANT- ABILITY OR FITNESS
FOR ANY PARTICULAR PURPOSE OR THAT THE USE OF THE LICENSED SOFTWARE, DATABASE OR
DOCUMENTATION WILL NOT INFRINGE ANY THIRD PARTY PATENTS, COPYRIGHTS, TRADEMARKS OR OTHER
RIGHTS.

The name of Princeton University or Princeton may not be used in advertising or publicity
pertaining to distribution of the software and/or database. Title to copyright in this
software, database and any associated documentation shall at all times remain with Princeton
University and LICENSEE agrees to preserve same.

Fortune files (quote_topic): the quotations of the Debian package "fortunes" (fortune-mod
1.99.1), files computers, politics, science, work, men-women, art, literature, food. The
package is distributed under the BSD licence of the University of California:

Copyright (c) 1991 The Regents of the University of California. All rights reserved.

Redistribution and use in source and binary forms, with or without modification, are
permitted provided that the following conditions are met: 1. Redistributions of source code
must retain the above copyright notice, this list of conditions and the following disclaimer.
2. Redistributions in binary form must reproduce the above copyright notice, this list of
conditions and the following disclaimer in the documentation and/or other materials provided
with the distribution. 4. Neither the name of the University nor the names of its
contributors may be used to endorse or promote products derived from this software without
specific prior written permission.

THIS SOFTWARE IS PROVIDED BY THE REGENTS AND CONTRIBUTORS ``AS IS'' AND ANY EXPRESS OR IMPLIED
WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND
FITNESS FOR A PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE REGENTS OR
CONTRIBUTORS BE LIABLE FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR
CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER CAUSED AND ON ANY
THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR
OTHERWISE) ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE
POSSIBILITY OF SUCH DAMAGE.
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, task in build().items():
        (args.out / f"{name}.json").write_text(json.dumps(task, ensure_ascii=False, separators=(",", ":")))
        counts = {k: len(task[k]) for k in ("train", "val", "test")}
        print(f"{name}: {len(task['classes'])} classes {task['classes']}, {counts}")
    (args.out / "LICENSE").write_text(LICENSE)


if __name__ == "__main__":
    main()
