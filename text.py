"""
Text encoders and tokenizers of the foundation models LayoutDiffuse builds on.

Three frozen encoders turn a caption into the (B, 77, width) tokens the UNet cross-attends to:
  * "clip":     SD1.x, the OpenAI CLIP ViT-L/14 text tower as transformers' CLIPTextModel
                (12 layers, width 768, quick-GELU, causal); output = last layer + final LayerNorm.
  * "openclip": SD2.x, the OpenCLIP ViT-H/14 text tower (24 layers, width 1024, GELU, causal);
                output = PENULTIMATE layer + final LayerNorm (FrozenOpenCLIPEmbedder, layer="penultimate").
  * "bert":     the LDM text2img model's BERTEmbedder: an x-transformers encoder trained from scratch
                (32 pre-norm layers, width 1280, 8 heads of 64, no mask) on bert-base-uncased WordPiece ids.
Parameter names are those the original stores (`transformer.embeddings.token_embedding.weight`,
`transformer.attn_layers.layers.0.1.to_q.weight`, open_clip's `transformer.resblocks.0.attn.in_proj_weight`),
so the split `clip.ckpt` / `bert.ckpt` files load with strict `load_state_dict`; load hooks accept the
older `transformer.text_model.` CLIP names and the `model.` prefix of SD2 checkpoints.

The tokenizers need no download: CLIP's byte-level BPE reads `bpe_simple_vocab_16e6.txt.gz` (open_clip ships
it), WordPiece reads bert-base-uncased's `vocab.txt`. Both are plain Python (no `regex`, no `tokenizers`).

    cfg = TextConfig(kind="clip", vocab_path="bpe_simple_vocab_16e6.txt.gz")   # the `text:` config section
    tokenizer, encoder = load_text_encoder(cfg, torch.load("clip.ckpt", weights_only=True), "clip.ckpt")
    context = encode_captions(tokenizer, encoder, ["a cat on a sofa"], "cuda")   # (1, 77, 768)
train.py and sample.py build the encoder of the `text:` section (kind "none" = a layout-only model), frozen
and outside DDP. Tests: `pytest tests/test_text.py` (compares with transformers, open_clip and
x-transformers when installed, and runs a short text-conditioned training).
"""
import gzip
import html
import re
import unicodedata
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import UserError

try:  # ftfy repairs mojibake before tokenizing, as CLIP does; without it the text is used as is
    import ftfy
except ImportError:
    ftfy = None


@dataclass
class TextConfig:
    kind: str = "none"          # none (layout only) | clip (SD1.x) | openclip (SD2.x) | bert (LDM text2img)
    vocab_size: int = 49408     # 30522 for bert
    width: int = 768            # token width = the UNet's context_dim
    layers: int = 12
    heads: int = 12
    dim_head: int = 64          # bert only (x-transformers' default); CLIP heads are width // heads
    mlp_ratio: int = 4          # feed-forward width = mlp_ratio * width
    max_len: int = 77           # tokens per caption, padded / truncated
    layer: str = "last"         # last | penultimate: the block whose output gets the final LayerNorm
    proj_dim: int = 1024        # openclip only: width of the (unused) text_projection in the file
    vocab_path: str = ""        # bpe_simple_vocab_16e6.txt.gz (clip, openclip) or vocab.txt (bert); "" = no tokenizer
    # where the frozen weights come from, and how captions are made (train.py, sample.py)
    weights: str = ""           # clip.ckpt / bert.ckpt or a single-file checkpoint; "": train.init_from's cond_stage_model
    append_labels: bool = True  # sample.py: a layout file's text is "caption,label,label..." (the original's COCO/VG text)
    negative_prompt: str = ""   # the unconditional text of classifier-free guidance ("" as SD/LDM were trained)

    def __post_init__(self):
        for name, allowed in [("kind", ("none", "clip", "openclip", "bert")), ("layer", ("last", "penultimate"))]:
            if getattr(self, name) not in allowed:
                raise ValueError(f"text.{name}={getattr(self, name)!r}, expected one of {allowed}")


# the full-size encoders of the original's setups
TEXT_PRESETS = {
    "clip": dict(kind="clip", vocab_size=49408, width=768, layers=12, heads=12, layer="last"),
    "openclip": dict(kind="openclip", vocab_size=49408, width=1024, layers=24, heads=16, layer="penultimate"),
    "bert": dict(kind="bert", vocab_size=30522, width=1280, layers=32, heads=8, dim_head=64, layer="last"),
}

# -----------------------------------------------------------------------------
# CLIP text tower, transformers' CLIPTextModel layout (SD1.x FrozenCLIPEmbedder)


def heads_attention(q, k, v, heads: int, causal: bool) -> torch.Tensor:
    """Softmax attention over (B, L, heads*dh) tensors -> (B, L, heads*dh), scale dh^-1/2, via SDPA."""
    B, L, D = q.shape
    q, k, v = (z.unflatten(-1, (heads, -1)).transpose(1, 2) for z in (q, k, v))  # (B, heads, L, dh)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(B, L, D)


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v projections (with biases)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        # registered in CLIPTextModel's order, so the state_dict lists keys as the original's files do
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
        return self.out_proj(heads_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True))


class CLIPLayer(nn.Module):
    """Pre-norm block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width)
        self.mlp = nn.ModuleDict(dict(fc1=nn.Linear(width, hidden), fc2=nn.Linear(hidden, width)))
        self.layer_norm2 = nn.LayerNorm(width)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        h = self.mlp.fc1(self.layer_norm2(x))
        return x + self.mlp.fc2(h * torch.sigmoid(1.702 * h))  # "quick GELU", the activation OpenAI trained CLIP with


class CLIPTextEncoder(nn.Module):
    """SD1.x text encoder: token + learned position embeddings, causal pre-norm layers, final LayerNorm, no
    pooling. `.transformer` holds the weights as FrozenCLIPEmbedder stores them (transformers' CLIPTextModel)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.skip = 1 if cfg.layer == "penultimate" else 0
        self.transformer = nn.ModuleDict(dict(
            embeddings=nn.ModuleDict(dict(token_embedding=nn.Embedding(cfg.vocab_size, cfg.width),
                                          position_embedding=nn.Embedding(cfg.max_len, cfg.width))),
            encoder=nn.ModuleDict(dict(layers=nn.ModuleList(
                CLIPLayer(cfg.width, cfg.heads, cfg.mlp_ratio * cfg.width) for _ in range(cfg.layers)))),
            final_layer_norm=nn.LayerNorm(cfg.width)))
        self._register_load_state_dict_pre_hook(self._rename_old_keys)

    @staticmethod
    def _rename_old_keys(state_dict, prefix, *args):
        # transformers < 5 (every released SD1.x checkpoint) nests the model under `text_model.` and
        # saves the `position_ids` buffer; drop both differences so those files load strictly
        old = prefix + "transformer.text_model."
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[prefix + "transformer." + key[len(old):]] = state_dict.pop(key)
        state_dict.pop(prefix + "transformer.embeddings.position_ids", None)

    def forward(self, ids):
        """ids (B, L) int64 -> (B, L, width)."""
        t = self.transformer
        x = t.embeddings.token_embedding(ids) + t.embeddings.position_embedding.weight[: ids.shape[1]]
        for block in t.encoder.layers[: len(t.encoder.layers) - self.skip]:
            x = block(x)
        return t.final_layer_norm(x)


# -----------------------------------------------------------------------------
# OpenCLIP text tower, open_clip's parameter names (SD2.x FrozenOpenCLIPEmbedder)


class OpenCLIPBlock(nn.Module):
    """open_clip's ResidualAttentionBlock (no layer scale in ViT-H/14): pre-norm, exact GELU."""

    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        # holds the packed q/k/v and output weights under open_clip's names; SDPA does the computing
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(width, hidden), c_proj=nn.Linear(hidden, width)))

    def forward(self, x):
        q, k, v = F.linear(self.ln_1(x), self.attn.in_proj_weight, self.attn.in_proj_bias).chunk(3, dim=-1)
        x = x + self.attn.out_proj(heads_attention(q, k, v, self.heads, causal=True))
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x))))


class OpenCLIPTextEncoder(nn.Module):
    """SD2.x text encoder: the text half of open_clip's CLIP, returning per-token features."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.skip = 1 if cfg.layer == "penultimate" else 0
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.max_len, cfg.width).normal_(std=0.01))
        self.transformer = nn.ModuleDict(dict(resblocks=nn.ModuleList(
            OpenCLIPBlock(cfg.width, cfg.heads, cfg.mlp_ratio * cfg.width) for _ in range(cfg.layers))))
        self.ln_final = nn.LayerNorm(cfg.width)
        # used only for CLIP's pooled embedding, never for conditioning; kept so open_clip files load strictly
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.proj_dim).normal_(std=cfg.width ** -0.5))
        self.logit_scale = nn.Parameter(torch.tensor(2.6593))  # log(1 / 0.07)
        self._register_load_state_dict_pre_hook(self._strip_model_prefix)

    @staticmethod
    def _strip_model_prefix(state_dict, prefix, *args):
        # SD2 checkpoints (and the original's FrozenOpenCLIPEmbedder) hold the tower as `.model`
        for key in [k for k in state_dict if k.startswith(prefix + "model.")]:
            state_dict[prefix + key[len(prefix + "model."):]] = state_dict.pop(key)

    def forward(self, ids):
        """ids (B, L) int64 -> (B, L, width)."""
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        for block in self.transformer.resblocks[: len(self.transformer.resblocks) - self.skip]:
            x = block(x)
        return self.ln_final(x)


# -----------------------------------------------------------------------------
# LDM BERTEmbedder: x-transformers TransformerWrapper(Encoder(...)) as vendored in latent-diffusion


class XAttention(nn.Module):
    """Bidirectional attention of x_transformer.py: bias-free q/k/v, heads * dim_head inner width."""

    def __init__(self, width: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(width, heads * dim_head, bias=False) for _ in range(3))
        self.to_out = nn.Linear(heads * dim_head, width)

    def forward(self, x):
        # no padding mask: BERTEmbedder calls the wrapper without one, so [PAD] tokens are attended to
        return self.to_out(heads_attention(self.to_q(x), self.to_k(x), self.to_v(x), self.heads, causal=False))


class XFeedForward(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        # indices as in x_transformer.py: net.0 = (Linear, GELU), net.1 = Dropout, net.2 = Linear
        self.net = nn.Sequential(nn.Sequential(nn.Linear(width, hidden), nn.GELU()), nn.Dropout(0.0),
                                 nn.Linear(hidden, width))

    def forward(self, x):
        return self.net(x)


class BERTTextEncoder(nn.Module):
    """LDM BERTEmbedder. `.transformer` is x-transformers' TransformerWrapper: token + absolute position
    embeddings, layers alternating [norm, attention] and [norm, feed-forward] (layers.2i and layers.2i+1,
    pre-norm residuals), final LayerNorm. `to_logits` (the language-model head) is in the file but unused:
    BERTEmbedder asks for the embeddings."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        layers = []
        for _ in range(cfg.layers):
            layers.append(nn.ModuleList([nn.LayerNorm(cfg.width), XAttention(cfg.width, cfg.heads, cfg.dim_head)]))
            layers.append(nn.ModuleList([nn.LayerNorm(cfg.width), XFeedForward(cfg.width, cfg.mlp_ratio * cfg.width)]))
        self.transformer = nn.ModuleDict(dict(
            token_emb=nn.Embedding(cfg.vocab_size, cfg.width),
            pos_emb=nn.ModuleDict(dict(emb=nn.Embedding(cfg.max_len, cfg.width))),
            attn_layers=nn.ModuleDict(dict(layers=nn.ModuleList(layers))),
            norm=nn.LayerNorm(cfg.width),
            to_logits=nn.Linear(cfg.width, cfg.vocab_size)))

    def forward(self, ids):
        """ids (B, L) int64 -> (B, L, width)."""
        t = self.transformer
        x = t.token_emb(ids) + t.pos_emb.emb.weight[: ids.shape[1]]
        for norm, block in t.attn_layers.layers:
            x = x + block(norm(x))
        return t.norm(x)


# -----------------------------------------------------------------------------
# CLIP byte-level BPE tokenizer (OpenAI's simple_tokenizer.py, as open_clip and transformers use it)


def pad_ids(rows: list[list[int]], max_len: int, start: int, end: int, pad: int) -> torch.Tensor:
    """[start] + ids + [end] + [pad]... per row -> (B, max_len) int64; long rows lose ids, never the end token."""
    out = torch.full((len(rows), max_len), pad, dtype=torch.long)
    for b, ids in enumerate(rows):
        ids = [start] + ids[: max_len - 2] + [end]
        out[b, : len(ids)] = torch.tensor(ids)
    return out


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """Each byte -> a printable character: printable bytes map to themselves, the rest to 256+n, so the
    BPE works on text without whitespace/control characters (GPT-2's trick)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {b: chr(c) for b, c in zip(keep + extra, keep + [256 + n for n in range(len(extra))])}


def _char_class(c: str) -> str:
    cat = unicodedata.category(c)
    return cat[0] if cat[0] in "LN" else "O"  # letter, number or other


def clip_pre_tokenize(text: str) -> list[str]:
    """Split cleaned text (single spaces, lower case) as CLIP's regex does: the special tokens, the contractions
    's 't 're 've 'm 'll 'd, runs of letters, single digits, runs of other non-space characters. Written as a scanner
    over Unicode categories so the product needs no `regex` package (ordered alternatives, greedy runs).
    Characters that Python's Unicode tables (14.0 in 3.11) do not know yet may split differently."""
    # U+0345 (a combining mark that case-folds to iota) matches no alternative of the case-insensitive
    # regex, so it splits words and vanishes, just as a space does here
    text = text.replace("\u0345", " ")
    folded = text.replace("ſ", "s")  # long s case-folds to s: "'ſ" is the contraction 's there too
    words, i, n = [], 0, len(text)
    while i < n:
        if text[i] == " ":  # the only whitespace left after cleaning
            i += 1
            continue
        j = next((i + len(s) for s in ("<|startoftext|>", "<|endoftext|>") if text.startswith(s, i)), None)
        if j is None and text[i] == "'":
            j = next((i + 1 + len(s) for s in ("s", "t", "re", "ve", "m", "ll", "d")
                      if folded.startswith(s, i + 1)), None)
        if j is None:
            kind, j = _char_class(text[i]), i + 1
            if kind != "N":  # letters and "others" run on; numbers are split digit by digit
                while j < n and _char_class(text[j]) == kind and text[j] != " ":
                    j += 1
        words.append(text[i:j])
        i = j
    return words


class CLIPTokenizer:
    """Caption -> ids [<start>, bpe..., <end>, pad...] of length max_len; too long captions keep their first
    max_len - 2 tokens and the end token. SD1.x (transformers' tokenizer) pads with the end token (pad_id=None),
    open_clip with 0 and also unescapes HTML entities (`&amp;`)."""

    def __init__(self, bpe_path: str, max_len: int = 77, pad_id: int | None = None, unescape_html: bool = False):
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            merges = f.read().split("\n")[1: 49152 - 256 - 2 + 1]  # first line is a header
        merges = [tuple(m.split()) for m in merges]
        chars = list(bytes_to_unicode().values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.sot, self.eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]
        self.max_id = len(vocab) - 1
        self.max_len, self.pad_id, self.unescape_html = max_len, (self.eot if pad_id is None else pad_id), unescape_html
        self.cache = {"<|startoftext|>": ["<|startoftext|>"], "<|endoftext|>": ["<|endoftext|>"]}

    def bpe(self, word: str) -> list[str]:
        """Merge the characters of one word (last one marked with </w>) by the lowest-ranked pair until none is left."""
        if word in self.cache:
            return self.cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break
            merged, k = [], 0
            while k < len(parts):
                if k < len(parts) - 1 and (parts[k], parts[k + 1]) == pair:
                    merged.append(parts[k] + parts[k + 1])
                    k += 2
                else:
                    merged.append(parts[k])
                    k += 1
            parts = merged
        self.cache[word] = parts
        return parts

    def clean(self, text: str) -> str:
        if ftfy is not None:
            text = ftfy.fix_text(text)
        if self.unescape_html:
            text = html.unescape(html.unescape(text))
        return " ".join(text.split()).lower()  # any whitespace run -> one space

    def encode(self, text: str) -> list[int]:
        """BPE ids of one caption, without start/end tokens."""
        byte_map = bytes_to_unicode()
        ids = []
        for word in clip_pre_tokenize(self.clean(text)):
            ids += [self.encoder[t] for t in self.bpe("".join(byte_map[b] for b in word.encode("utf-8")))]
        return ids

    def __call__(self, captions: list[str]) -> torch.Tensor:
        """captions -> (B, max_len) int64."""
        return pad_ids([self.encode(text) for text in captions], self.max_len, self.sot, self.eot, self.pad_id)


# -----------------------------------------------------------------------------
# BERT WordPiece tokenizer (bert-base-uncased, as the BERTTokenizer of latent-diffusion calls it)

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _is_punctuation(c: str) -> bool:
    # BERT counts all non-alphanumeric ASCII (e.g. $ ^ `) as punctuation, plus Unicode P* categories
    o = ord(c)
    return 33 <= o <= 47 or 58 <= o <= 64 or 91 <= o <= 96 or 123 <= o <= 126 or unicodedata.category(c).startswith("P")


def _is_cjk(o: int) -> bool:
    return any(a <= o <= b for a, b in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
                                        (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


class WordPieceTokenizer:
    """Caption -> ids [CLS] pieces... [SEP] [PAD]=0 ... of length max_len (truncation keeps [SEP]):
    basic tokenization (drop control characters, split off CJK characters and punctuation, lower-case,
    strip accents), then greedy longest-match WordPiece with ## continuations."""

    def __init__(self, vocab_path: str, max_len: int = 77):
        with open(vocab_path, encoding="utf-8") as f:
            self.vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        self.max_len, self.max_id = max_len, max(self.vocab.values(), default=-1)
        self.cls, self.sep, self.pad, self.unk = (self.vocab[t] for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]"))
        self.specials = re.compile("(" + "|".join(re.escape(t) for t in BERT_SPECIALS if t in self.vocab) + ")")

    def basic_tokenize(self, text: str) -> list[str]:
        chars = []
        for c in text:
            o = ord(c)
            if o == 0 or o == 0xFFFD or (unicodedata.category(c) in ("Cc", "Cf") and c not in "\t\n\r"):
                continue  # control characters are dropped
            chars.append(" " if c in "\t\n\r" or unicodedata.category(c) == "Zs" else f" {c} " if _is_cjk(o) else c)
        words = []
        for word in "".join(chars).split():
            word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
            current = ""
            for c in word:  # every punctuation character is a word of its own
                if _is_punctuation(c):
                    words += [current, c] if current else [c]
                    current = ""
                else:
                    current += c
            if current:
                words.append(current)
        return words

    def wordpiece(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start and (("##" if start else "") + word[start:end]) not in self.vocab:
                end -= 1
            if end == start:  # no piece matches: the whole word is unknown
                return [self.unk]
            ids.append(self.vocab[("##" if start else "") + word[start:end]])
            start = end
        return ids

    def encode(self, text: str) -> list[int]:
        """WordPiece ids of one caption, without [CLS]/[SEP]; literal special tokens in the text are kept."""
        ids = []
        for part in self.specials.split(text):
            if part in BERT_SPECIALS:
                ids.append(self.vocab[part])
            else:
                for word in self.basic_tokenize(part):
                    ids += self.wordpiece(word)
        return ids

    def __call__(self, captions: list[str]) -> torch.Tensor:
        """captions -> (B, max_len) int64."""
        return pad_ids([self.encode(text) for text in captions], self.max_len, self.cls, self.sep, self.pad)


# -----------------------------------------------------------------------------
# building and calling

ENCODERS = {"clip": CLIPTextEncoder, "openclip": OpenCLIPTextEncoder, "bert": BERTTextEncoder}


VOCAB_FILES = {"clip": "bpe_simple_vocab_16e6.txt.gz (OpenAI CLIP / open_clip)",
               "openclip": "bpe_simple_vocab_16e6.txt.gz (OpenAI CLIP / open_clip)",
               "bert": "vocab.txt of bert-base-uncased"}
BPE_FORMAT = "a gzipped CLIP BPE merges file (a header line, then one pair of symbols per line)"
VOCAB_FORMATS = {"clip": BPE_FORMAT, "openclip": BPE_FORMAT,
                 "bert": "a BERT WordPiece vocabulary (one token per line, with [CLS], [SEP], [PAD], [UNK])"}


def build_tokenizer(cfg: TextConfig):
    """-> the tokenizer of cfg.kind reading cfg.vocab_path, None when that is empty. A file of another format,
    or one whose ids the encoder's embedding (text.vocab_size rows) has no room for, is a UserError naming it:
    otherwise a KeyError or gzip error here, or an IndexError mid-sampling for the captions that use the high ids."""
    if not cfg.vocab_path:
        return None
    where = f"text.vocab_path={cfg.vocab_path}"
    if not Path(cfg.vocab_path).is_file():
        raise UserError(f"{where}: file not found (expected the {VOCAB_FILES[cfg.kind]})")
    try:
        if cfg.kind == "bert":
            tokenizer = WordPieceTokenizer(cfg.vocab_path, cfg.max_len)
        elif cfg.kind == "clip":
            tokenizer = CLIPTokenizer(cfg.vocab_path, cfg.max_len)  # pads with <end>, no HTML unescaping
        else:
            tokenizer = CLIPTokenizer(cfg.vocab_path, cfg.max_len, pad_id=0, unescape_html=True)  # open_clip.tokenize
    # gzip where text belongs or text where gzip belongs, a truncated download, a vocab.txt without [CLS]...
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, zlib.error, KeyError) as e:
        detail = f"no {e.args[0]} token" if isinstance(e, KeyError) else str(e)
        raise UserError(f"{where}: not {VOCAB_FORMATS[cfg.kind]}: {detail}") from None
    except OSError as e:  # exists but cannot be read (permissions, a folder)
        raise UserError(f"{where}: cannot be read ({e.strerror or e}; expected the {VOCAB_FILES[cfg.kind]})") from None
    if isinstance(tokenizer, CLIPTokenizer):  # a gzipped file of something else reads, but has no merge pairs
        bad = next((m for m in tokenizer.ranks if m and len(m) != 2), None)
        if bad or not tokenizer.ranks:
            raise UserError(f"{where}: not {BPE_FORMAT}: " + (f"a line reads {' '.join(bad)!r}" if bad else "no merges"))
    if tokenizer.max_id >= cfg.vocab_size:
        raise UserError(f"{where}: ids up to {tokenizer.max_id}, but the text encoder's embedding has "
                        f"text.vocab_size={cfg.vocab_size} rows (expected a vocabulary of at most {cfg.vocab_size} tokens)")
    return tokenizer


def build_text_encoder(cfg: TextConfig) -> tuple:
    """-> (tokenizer or None when cfg.vocab_path is empty, frozen encoder in eval mode)."""
    if cfg.kind not in ENCODERS:
        raise ValueError(f"text.kind={cfg.kind!r} has no encoder (expected one of {list(ENCODERS)})")
    tokenizer = build_tokenizer(cfg)  # first: a bad vocabulary is named before the (large) encoder is built
    return tokenizer, ENCODERS[cfg.kind](cfg).eval().requires_grad_(False)


def load_text_encoder(cfg: TextConfig, state: dict, where: str) -> tuple:
    """-> (tokenizer, frozen encoder holding `state`, the weights under the original's names).
    A missing or unfit vocabulary file (build_tokenizer), or weights that do not fit text.kind and its sizes,
    are UserErrors that name the file (`where` names the weights' file)."""
    if not cfg.vocab_path:
        raise UserError(f"text.kind={cfg.kind} needs its tokenizer's vocabulary: set text.vocab_path "
                        f"to the {VOCAB_FILES[cfg.kind]}")
    tokenizer, encoder = build_text_encoder(cfg)
    try:  # strict=False so that the first missing/unexpected key (after the renaming hooks) can be named
        result = encoder.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that do not fit: the line of the first mismatching tensor
        line = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise UserError(f"{where}: the text-encoder weights do not fit text.kind={cfg.kind} "
                        f"(width {cfg.width}, {cfg.layers} layers): {line[:300]}") from None
    if result.missing_keys or result.unexpected_keys:
        what = (f"missing {result.missing_keys[0]}" if result.missing_keys else f"unexpected {result.unexpected_keys[0]}")
        raise UserError(f"{where}: the text-encoder weights do not fit text.kind={cfg.kind} ({what}; "
                        f"{len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected)")
    return tokenizer, encoder


@torch.no_grad()
def encode_captions(tokenizer, encoder: nn.Module, captions: list[str], device) -> torch.Tensor:
    """captions (B strings) -> text tokens (B, max_len, width) for the UNet's cross-attention."""
    if tokenizer is None:
        raise ValueError("no tokenizer: set the text config's vocab_path (bpe_simple_vocab_16e6.txt.gz or vocab.txt)")
    ids = tokenizer(captions).to(device)
    return encoder(ids)


# -----------------------------------------------------------------------------
# captions: the text the original conditions on, and the unconditional text of guidance


def layout_caption(caption: str, names: list[str], append_labels: bool = True) -> str:
    """The text for one layout (sample.py; for training data, dataset.py's data.caption=auto makes the
    same). The original's COCO dataset (data/coco_w_stuff.py,
    CocoStuffBboxCaptionClassLabelDataset) joins the caption and the layout's distinct class names
    with "," ("a man riding a horse,person,horse,grass"); its VG dataset (data/vg.py) has no caption and
    joins the names alone, which is the same rule with an empty caption. The original de-duplicates
    through a Python set, whose order changes from run to run; here the names keep their order of
    first appearance, so one layout always gives one text. append_labels False: the caption alone
    (the names only when there is no caption)."""
    if caption and not append_labels:
        return caption
    return ",".join(([caption] if caption else []) + list(dict.fromkeys(names)))


def caption_without_labels(text: str, names: list[str]) -> str:
    """The caption that layout_caption(caption, names) made `text` from: the class names it appended
    taken off again (sample.py's layout files keep that, and append the names themselves). A text
    layout_caption did not make comes back as it is."""
    labels = ",".join(dict.fromkeys(names))
    caption = "" if text == labels else text[:-len(labels) - 1] if labels and text.endswith("," + labels) else text
    return caption if layout_caption(caption, names) == text else text


@torch.no_grad()
def caption_context(tokenizer, encoder: nn.Module, captions: list[str], drop: torch.Tensor,
                    uncond: torch.Tensor, device) -> torch.Tensor:
    """Text tokens (B, max_len, width) of a training batch with caption dropout: the rows where drop (B,)
    is True get `uncond` (1, max_len, width), the encoding of the unconditional text "" (what SD and
    the LDM were trained to use for no caption, and what guidance subtracts). Selected on the device:
    no sync, and the same work whatever was dropped."""
    context = encode_captions(tokenizer, encoder, captions, device)
    return torch.where(drop[:, None, None], uncond.to(context.dtype), context)
