"""The tokenizer half of a GGUF file: `tokenizer.*` metadata for llama.cpp.

Two sources:

* the checkpoint's own `tokenizer.json` (what `save_pretrained` writes):
  - byte-level BPE (GPT-2 style: SmolLM2, Llama 3, Qwen2/3, Mistral Nemo) becomes llama.cpp's
    `gpt2` tokenizer: tokens, token types, merges, and the pre-tokenizer name llama.cpp needs;
  - BPE with byte fallback (SentencePiece converted by transformers: Llama 1/2, Mistral 7B, Gemma)
    becomes llama.cpp's `llama` (SentencePiece) tokenizer: tokens, scores, token types;
* a GGUF of the unpruned model (`tokenizer_from`), whose `tokenizer.*` entries are copied verbatim.

llama.cpp picks the pre-tokenizer (how text is split before BPE) by name. Its converter finds the
name by encoding a fixed probe text and hashing the token ids; a tokenizer whose hash is not in
`KNOWN_PRE_TOKENIZERS` is refused with a pointer to `tokenizer_from`, never guessed.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from gguf import GGUFReader, GGUFValueType, Keys, TokenType

# The probe text of llama.cpp's convert_hf_to_gguf.py (`chktxt`): its pre-tokenizer names are
# keyed by sha256(str(tokenizer.encode(PROBE_TEXT))). It must stay byte-exact (tested by hash).
PROBE_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n"
    "\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 "
    "\U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256 of the probe's token ids -> llama.cpp pre-tokenizer name, for the families hfprune prunes
# (values from llama.cpp's converter table; `smollm` also checked here on SmolLM2-135M-Instruct).
KNOWN_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3, 3.1, 3.2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5, Qwen2, Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2
}

SPECIAL_TOKEN_KEYS = {"bos": Keys.Tokenizer.BOS_ID, "eos": Keys.Tokenizer.EOS_ID,
                      "unk": Keys.Tokenizer.UNK_ID, "pad": Keys.Tokenizer.PAD_ID}

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPACE_MARK = "\u2581"  # SentencePiece's visible space


@dataclass
class TokenizerMetadata:
    """`tokenizer.*` key/value entries, ready for a GGUFWriter, and where they came from."""

    source: str
    n_tokens: int
    entries: list[tuple[str, Any, GGUFValueType, Optional[GGUFValueType]]] = field(default_factory=list)

    def add(self, key: str, value: Any, vtype: GGUFValueType, sub_type: Optional[GGUFValueType] = None) -> None:
        self.entries.append((key, value, vtype, sub_type))

    def value(self, key: str) -> Any:
        return next((value for k, value, _, _ in self.entries if k == key), None)

    def write_to(self, writer) -> None:
        for key, value, vtype, sub_type in self.entries:
            writer.add_key_value(key, value, vtype, sub_type)


# ---- from a GGUF of the unpruned model ---------------------------------------------------------------------


def read_gguf_tokenizer(path: Path) -> TokenizerMetadata:
    """The `tokenizer.*` entries of an existing GGUF file, copied with their types (strings as raw bytes)."""
    try:
        reader = GGUFReader(path)
    except Exception as error:  # not a GGUF: bad magic, truncated, ...
        raise ValueError(f"tokenizer_from={str(path)!r} is not a readable GGUF file ({error})") from None
    metadata = TokenizerMetadata(source=f"the GGUF {path}", n_tokens=0)
    for key, entry in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main_type = entry.types[0]
        if main_type == GGUFValueType.ARRAY:
            sub_type = entry.types[-1]
            if sub_type == GGUFValueType.STRING:
                value = [bytes(entry.parts[i]) for i in entry.data]
            else:
                value = [entry.parts[i].tolist()[0] for i in entry.data]
            metadata.add(key, value, main_type, sub_type)
        elif main_type == GGUFValueType.STRING:
            metadata.add(key, bytes(entry.parts[entry.data[0]]), main_type)
        else:
            metadata.add(key, entry.parts[entry.data[0]].tolist()[0], main_type)
    tokens = metadata.value(Keys.Tokenizer.LIST)
    if not tokens:
        raise ValueError(f"tokenizer_from={str(path)!r} has no {Keys.Tokenizer.LIST}: it carries no tokenizer")
    metadata.n_tokens = len(tokens)
    return metadata


# ---- from the checkpoint's tokenizer.json ------------------------------------------------------------------


def checkpoint_tokenizer(checkpoint: Path, n_vocab: int) -> TokenizerMetadata:
    """Tokenizer metadata built from `checkpoint/tokenizer.json`, padded to the embedding's `n_vocab` rows."""
    tokenizer_file = checkpoint / "tokenizer.json"
    if not tokenizer_file.is_file():
        found = "only tokenizer.model (SentencePiece), which hfprune does not parse" if (
            checkpoint / "tokenizer.model").is_file() else "no tokenizer files"
        raise ValueError(
            f"{checkpoint} has {found}: the GGUF export reads tokenizer.json (save_pretrained of a fast "
            "tokenizer writes it), or pass tokenizer_from=BASE.gguf (--tokenizer-from) to reuse the tokenizer "
            "of a GGUF of the unpruned model"
        )
    spec = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    byte_level = _mentions(spec.get("pre_tokenizer"), "ByteLevel") or _mentions(spec.get("decoder"), "ByteLevel")
    if model.get("type") == "BPE" and byte_level:
        kind = "gpt2"
    elif model.get("type") == "BPE" and model.get("byte_fallback"):
        kind = "llama"
    else:
        raise ValueError(
            f"{tokenizer_file}: a {model.get('type')!r} tokenizer"
            f"{' without byte-level pre-tokenizer or byte fallback' if model.get('type') == 'BPE' else ''}; the "
            "GGUF export builds byte-level BPE (GPT-2 style) and SentencePiece-style BPE with byte fallback. "
            "Pass tokenizer_from=BASE.gguf (--tokenizer-from) to reuse the tokenizer of a GGUF of the unpruned model"
        )

    from tokenizers import Tokenizer

    # The tokenizer.json itself, not AutoTokenizer: its class follows config.json (remote code for a
    # heterogeneous checkpoint) and may rebuild parts of it, while llama.cpp gets exactly this file.
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    settings = _tokenizer_settings(checkpoint)
    added = {int(token["id"]): token for token in spec.get("added_tokens") or []}
    vocab = {int(i): text for text, i in model["vocab"].items()}
    vocab.update({i: token["content"] for i, token in added.items()})
    largest = max(vocab)
    if largest >= n_vocab:
        raise ValueError(
            f"{tokenizer_file}: token id {largest} ({vocab[largest]!r}) does not fit the model's embedding of "
            f"{n_vocab} rows; the tokenizer is not this model's"
        )
    metadata = TokenizerMetadata(source=str(tokenizer_file), n_tokens=n_vocab)
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in vocab:  # the embedding may be padded beyond the tokenizer (e.g. to a multiple of 64)
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(vocab[i])
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        elif kind == "llama" and _BYTE_TOKEN.fullmatch(vocab[i]):
            tokens.append(vocab[i])
            types.append(TokenType.BYTE)
        else:
            tokens.append(vocab[i])
            types.append(TokenType.UNKNOWN if kind == "llama" and vocab[i] == model.get("unk_token") else
                         TokenType.NORMAL)

    merges = [_merge_text(merge) for merge in model.get("merges") or []]
    metadata.add(Keys.Tokenizer.MODEL, kind, GGUFValueType.STRING)
    metadata.add(Keys.Tokenizer.PRE, _pre_tokenizer(tokenizer, tokenizer_file) if kind == "gpt2" else "default",
                 GGUFValueType.STRING)
    metadata.add(Keys.Tokenizer.LIST, tokens, GGUFValueType.ARRAY, GGUFValueType.STRING)
    metadata.add(Keys.Tokenizer.TOKEN_TYPE, [int(t) for t in types], GGUFValueType.ARRAY, GGUFValueType.INT32)
    if kind == "gpt2":
        metadata.add(Keys.Tokenizer.MERGES, merges, GGUFValueType.ARRAY, GGUFValueType.STRING)
    else:
        metadata.add(Keys.Tokenizer.SCORES, _merge_scores(merges, model["vocab"], n_vocab),
                     GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
        metadata.add(Keys.Tokenizer.ADD_PREFIX, _adds_space_prefix(spec), GGUFValueType.BOOL)
    special = {name: _special_token_id(tokenizer, settings, name) for name in SPECIAL_TOKEN_KEYS}
    for name, key in SPECIAL_TOKEN_KEYS.items():
        if special[name] is not None and 0 <= special[name] < n_vocab:
            metadata.add(key, special[name], GGUFValueType.UINT32)
    add_bos, add_eos = _adds_special_tokens(tokenizer, special["bos"], special["eos"])
    metadata.add(Keys.Tokenizer.ADD_BOS, add_bos, GGUFValueType.BOOL)
    metadata.add(Keys.Tokenizer.ADD_EOS, add_eos, GGUFValueType.BOOL)
    _add_chat_templates(metadata, _chat_template(checkpoint, settings))
    return metadata


def _tokenizer_settings(checkpoint: Path) -> dict:
    path = checkpoint / "tokenizer_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _mentions(node: Any, type_name: str) -> bool:
    """Whether a tokenizer.json component (possibly a Sequence of them) has a part of `type_name`."""
    if isinstance(node, dict):
        return node.get("type") == type_name or any(_mentions(v, type_name) for v in node.values())
    if isinstance(node, list):
        return any(_mentions(v, type_name) for v in node)
    return False


def _merge_text(merge: Any) -> str:
    # tokenizers >= 0.20 writes merges as pairs; GGUF keeps the "left right" string form, with a space
    # inside a part written as its byte-level character (U+0120), as llama.cpp reads it.
    if isinstance(merge, str):
        return merge
    left, right = merge
    return f"{left.replace(' ', chr(0x120))} {right.replace(' ', chr(0x120))}"


def _merge_scores(merges: list[str], vocab: dict[str, int], n_vocab: int) -> list[float]:
    """SentencePiece-style scores: llama.cpp merges the adjacent pair whose result scores highest, so a
    token scores minus the rank of the first merge that makes it (BPE applies the lowest rank first)."""
    scores = [0.0] * n_vocab
    seen = set()
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ")
        token_id = vocab.get(left + right)
        if token_id is not None and token_id not in seen:
            seen.add(token_id)
            scores[token_id] = -float(rank)
    return scores


def _adds_space_prefix(spec: dict) -> bool:
    """Whether the SentencePiece-style tokenizer prepends a space (Llama 2: yes; Gemma: no)."""
    pre = spec.get("pre_tokenizer") or {}
    for part in pre.get("pretokenizers", [pre]):
        if part.get("type") == "Metaspace":
            return part.get("prepend_scheme", "always" if part.get("add_prefix_space", True) else "never") != "never"
    normalizer = spec.get("normalizer") or {}
    return any(part.get("type") == "Prepend" and part.get("prepend") == _SPACE_MARK
               for part in normalizer.get("normalizers", [normalizer]))


def _pre_tokenizer(tokenizer, tokenizer_file: Path) -> str:
    digest = hashlib.sha256(str(tokenizer.encode(PROBE_TEXT).ids).encode()).hexdigest()
    if digest not in KNOWN_PRE_TOKENIZERS:
        known = ", ".join(sorted(set(KNOWN_PRE_TOKENIZERS.values())))
        raise ValueError(
            f"{tokenizer_file}: llama.cpp needs the name of this tokenizer's pre-tokenizer, and its probe hash "
            f"{digest} is not one hfprune knows (known: {known}); pass tokenizer_from=BASE.gguf (--tokenizer-from), "
            "a GGUF of the unpruned model made by llama.cpp's convert_hf_to_gguf.py, to reuse its tokenizer"
        )
    return KNOWN_PRE_TOKENIZERS[digest]


def _special_token_id(tokenizer, settings: dict, name: str) -> Optional[int]:
    """The id of tokenizer_config.json's `<name>_token` (a string or an AddedToken dict)."""
    token = settings.get(f"{name}_token")
    if isinstance(token, dict):
        token = token.get("content")
    return tokenizer.token_to_id(token) if isinstance(token, str) else None


def _adds_special_tokens(tokenizer, bos: Optional[int], eos: Optional[int]) -> tuple[bool, bool]:
    """What the tokenizer really does around a text (its post-processor): BOS in front, EOS behind."""
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    extra = len(full) - len(plain)
    add_bos = extra > 0 and bos is not None and full[0] == bos and full[1:1 + len(plain)] == plain
    add_eos = extra > 0 and eos is not None and full[-1] == eos and full[-1 - len(plain):-1] == plain
    return bool(add_bos), bool(add_eos)


def _chat_template(checkpoint: Path, settings: dict) -> Any:
    """transformers 5 writes chat_template.jinja; older checkpoints keep it in tokenizer_config.json."""
    if (checkpoint / "chat_template.jinja").is_file():
        return (checkpoint / "chat_template.jinja").read_text(encoding="utf-8")
    if (checkpoint / "chat_template.json").is_file():
        return json.loads((checkpoint / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    return settings.get("chat_template")


def _add_chat_templates(metadata: TokenizerMetadata, template: Any) -> None:
    if isinstance(template, str) and template:
        metadata.add(Keys.Tokenizer.CHAT_TEMPLATE, template, GGUFValueType.STRING)
    elif isinstance(template, dict):  # named templates: "default" is the main one
        for name, text in template.items():
            key = Keys.Tokenizer.CHAT_TEMPLATE if name == "default" else Keys.Tokenizer.CHAT_TEMPLATE_N.format(name=name)
            metadata.add(key, text, GGUFValueType.STRING)
