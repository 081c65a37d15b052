"""Report/history tokenizer: byte-level BPE (Hugging Face ``tokenizers``) with special tokens
for sequence structure and one per report section.

Decoder sequence (contracts.md): ``[BOS] history... [REPORT] report... [EOS]`` where the report
is ``[SEC_CLINICAL_INFORMATION] text [SEC_TECHNIQUE] text ... [SEC_IMPRESSION] text``.
Byte-level BPE is lossless: ``decode(encode(t)) == t`` for any text.

    tok = ReportTokenizer.train(texts, vocab_size=4000)
    tok.save(model_dir); tok = ReportTokenizer.load(model_dir)
    ids = tok.encode_report(sections); sections = tok.decode_report(ids)
"""
from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data.errors import MedreportError
from data.report_format import SECTION_KEYS, drop_repeated_items, empty_sections

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[REPORT]")
SECTION_TOKENS: tuple[str, ...] = tuple(f"[SEC_{k.upper()}]" for k in SECTION_KEYS)
_FILE = "tokenizer.json"
_META = "medreport_tokenizer.json"


class ReportTokenizer:
    """A trained BPE tokenizer plus the ids of the special tokens."""

    def __init__(self, tokenizer: Tokenizer):
        self.tk = tokenizer
        # Text that happens to contain "[EOS]" (a pasted record, a hostile history) is encoded as
        # plain characters: only this class inserts special ids.
        self.tk.encode_special_tokens = True
        ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS + SECTION_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise MedreportError(f"tokenizer lacks special tokens {missing}: retrain it with ReportTokenizer.train")
        self.pad_id, self.unk_id, self.bos_id, self.eos_id, self.report_id = (ids[t] for t in SPECIAL_TOKENS)
        self.section_ids: tuple[int, ...] = tuple(ids[t] for t in SECTION_TOKENS)  # in SECTION_KEYS order
        self._section_of = dict(zip(self.section_ids, SECTION_KEYS))
        self.special_ids = frozenset(ids.values())

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2) -> "ReportTokenizer":
        """Train on an iterable of texts (reports, histories)."""
        tk = Tokenizer(models.BPE(unk_token="[UNK]"))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
            special_tokens=list(SPECIAL_TOKENS + SECTION_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tk.train_from_iterator(texts, trainer=trainer)
        return cls(tk)

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tk.save(str(d / _FILE))
        (d / _META).write_text(json.dumps({"format": 1, "special_tokens": list(SPECIAL_TOKENS),
                                           "section_tokens": list(SECTION_TOKENS), "sections": list(SECTION_KEYS)},
                                          indent=1))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "ReportTokenizer":
        path = Path(directory) / _FILE
        if not path.is_file():
            raise MedreportError(f"no tokenizer at {path}: train one (ReportTokenizer.train) or point to the model folder")
        return cls(Tokenizer.from_file(str(path)))

    # ---- text -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size()

    @functools.cached_property
    def _line_token_classes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(whitespace-only token ids, ids of tokens that start with a digit): one pass over the
        vocabulary, once per tokenizer (the pipeline asks for the constraints on every report)."""
        space, digit = [], []
        for i in range(self.vocab_size):
            t = self.tk.decode([i], skip_special_tokens=False)
            if t and not t.strip():
                space.append(i)
            elif t[:1].isdigit():
                digit.append(i)
        return tuple(space), tuple(digit)

    def whitespace_ids(self) -> tuple[int, ...]:
        """Ids of the tokens that decode to whitespace only (newlines, spaces): not content."""
        return self._line_token_classes[0]

    def complete_constraints(self) -> dict:
        """``GenerationConfig`` fields that keep a report whole: it may not end before its
        impression has content (``complete_sections``; whitespace is not content), and no line of
        the findings starts with a list enumerator (a digit token at a line start: numbered items
        belong to the impression, after its marker). 16 tokens are kept for each section not yet
        opened (``section_budget``): a report that runs long still gets all of them."""
        space, digits = self._line_token_classes
        return {"complete_sections": True, "section_budget": 16, "line_end_ids": space,
                "line_start_banned": digits, "line_start_section": SECTION_KEYS.index("findings")}

    def report_constraints(self, nonempty_items: bool = False, complete_sections: bool = False) -> dict:
        """``GenerationConfig`` fields for the chosen report constraints (both may be on)."""
        out: dict = {}
        if nonempty_items:
            out.update(self.item_constraints())
        if complete_sections:
            done = self.complete_constraints()
            done["line_end_ids"] = tuple(sorted(set(done["line_end_ids"]) | set(out.get("line_end_ids", ()))))
            out.update(done)
        return out

    def item_constraints(self, max_items: int = 9) -> dict:
        """``GenerationConfig`` fields that keep numbered report items non-empty: the enumerators
        "1." .. "9." at a line or section start (``no_end_after``) and the newline tokens
        (``line_end_ids``). A report never ends, or starts a new line or section, right after "2."."""
        nl = tuple(self.encode("\n"))
        starts = [nl] + [(i,) for i in self.section_ids]
        sfx = {s + tuple(self.encode(f"{n}.")) for s in starts for n in range(1, max_items + 1)}
        return {"no_end_after": tuple(sorted(sfx)), "line_end_ids": tuple(i for i in nl if len(nl) == 1)}

    def copy_vocab(self) -> tuple[list[int], list[int]]:
        """Maps for case-aware copying (core.decoder.CopyHead), one entry per token id:
        ``variant[t]``, the form token t takes at the start of a line (" persistent" ->
        "Persistent"), and ``canon[t]``, its canonical form (the space-led lower-case one,
        "Persistent" -> " persistent"); a token without such a form maps to itself."""
        vocab = self.tk.get_vocab()  # byte-level strings: "Ġ" is the space
        V = self.vocab_size
        variant, canon = list(range(V)), list(range(V))
        sp = "\u0120"
        for s, i in vocab.items():
            if i >= V:
                continue
            word = s[1:] if s.startswith(sp) else s
            if not word[:1].isalpha():
                continue
            lower = vocab.get(sp + word[0].lower() + word[1:]) if word[0].isupper() else None
            if lower is not None and lower < V:
                canon[i] = lower
            if s.startswith(sp) and word[0].islower():
                up = vocab.get(word[0].upper() + word[1:])
                if up is not None and up < V:
                    variant[i] = up
        return variant, canon

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text (no special tokens added)."""
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids; special tokens are dropped."""
        return self.tk.decode([i for i in ids if i not in self.special_ids], skip_special_tokens=False)

    # ---- reports ----------------------------------------------------------------------------
    def encode_report(self, sections: dict[str, str]) -> list[int]:
        """``[SEC_x] text`` for every section in report order (no BOS/REPORT/EOS)."""
        ids: list[int] = []
        for key, sid in zip(SECTION_KEYS, self.section_ids):
            ids.append(sid)
            ids.extend(self.encode((sections.get(key) or "").strip()))
        return ids

    def decode_report(self, ids: Iterable[int]) -> dict[str, str]:
        """Sections from ids (stops at EOS; text before the first section marker is Findings); an
        impression item that repeats an earlier one is dropped (``drop_repeated_items``)."""
        out = empty_sections()
        current, buf = "findings", []

        def flush():
            if buf:
                text = self.decode(buf).strip()
                out[current] = (out[current] + " " + text).strip() if out[current] else text

        for i in ids:
            if i == self.eos_id:
                break
            if i in self._section_of:
                flush()
                current, buf = self._section_of[i], []
            elif i in (self.bos_id, self.report_id, self.pad_id):
                continue
            else:
                buf.append(i)
        flush()
        out["impression"] = drop_repeated_items(out["impression"])
        return out

    def encode_sequence(self, history: str | None, sections: dict[str, str] | None = None) -> list[int]:
        """``[BOS] history [REPORT] report [EOS]`` (report part omitted when ``sections`` is None)."""
        ids = [self.bos_id] + (self.encode(history) if history else []) + [self.report_id]
        if sections is not None:
            ids += self.encode_report(sections) + [self.eos_id]
        return ids
