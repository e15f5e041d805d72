"""Text encoders and tokenizers (text.py) against the original's key manifests and independent references:
transformers' CLIPTextModel / CLIPTokenizer / BertTokenizer, open_clip's text tower and SimpleTokenizer,
x-transformers' encoder. Numerics use tiny random models; full-size models are built on the meta device."""
import dataclasses
import json
import math
import random
import re
from pathlib import Path

import pytest
import torch

from text import (TEXT_PRESETS, CLIPTokenizer, TextConfig, WordPieceTokenizer, build_text_encoder,
                  encode_captions)

TINY = dict(vocab_size=300, width=64, layers=3, heads=4, dim_head=16)


def shapes(module_or_state) -> list:
    """[(name, shape)] in state_dict order."""
    state = module_or_state.state_dict() if hasattr(module_or_state, "state_dict") else module_or_state
    return [(k, list(v.shape)) for k, v in state.items()]


def manifest(parity_dir, name):
    path = parity_dir / "manifests" / name
    return [(k, shape) for k, shape, _ in json.loads(path.read_text())["state_dict"]]


def random_ids(vocab, B=3, L=77, seed=0):
    return torch.randint(0, vocab, (B, L), generator=torch.Generator().manual_seed(seed))


def randomize(module, seed=0):
    """Every parameter random (biases and LayerNorm gains included, gains around 1), so no term can hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm) and m.weight is not None:
                m.weight += 1.0
    return module


# -----------------------------------------------------------------------------
# key names and shapes of the full-size encoders


def test_clip_keys_match_manifest(parity_dir):  # names, shapes and order
    with torch.device("meta"):
        _, encoder = build_text_encoder(TextConfig(**TEXT_PRESETS["clip"]))
    assert shapes(encoder) == manifest(parity_dir, "text_model_SD1_5_FrozenCLIPEmbedder.json")


def test_bert_keys_match_manifest(parity_dir):
    with torch.device("meta"):
        _, encoder = build_text_encoder(TextConfig(**TEXT_PRESETS["bert"]))
    assert shapes(encoder) == manifest(parity_dir, "text_model_cocostuff_BERTEmbedder.json")


def test_openclip_keys_match_open_clip_vit_h14():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIP
    with torch.device("meta"):
        reference = CLIP(**open_clip.get_model_config("ViT-H-14"))
        _, encoder = build_text_encoder(TextConfig(**TEXT_PRESETS["openclip"]))
    text_tower = {k: v for k, v in reference.state_dict().items() if not k.startswith("visual.")}
    assert sorted(shapes(encoder)) == sorted(shapes(text_tower))  # same names and shapes, in another order


def test_old_checkpoint_names_load():
    """SD1.x files (transformers < 5) say `transformer.text_model.` and carry position_ids; SD2 files say `model.`."""
    _, clip = build_text_encoder(TextConfig(kind="clip", **TINY))
    old = {k.replace("transformer.", "transformer.text_model.", 1): v for k, v in randomize(clip).state_dict().items()}
    old["transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    _, fresh = build_text_encoder(TextConfig(kind="clip", **TINY))
    fresh.load_state_dict(old)  # strict
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), clip.state_dict().values()))
    parent = torch.nn.Module()  # nested, as in a released LayoutDiffuse checkpoint (`text_fn.transformer.text_model.`)
    parent.text_fn = build_text_encoder(TextConfig(kind="clip", **TINY))[1]
    parent.load_state_dict({"text_fn." + k: v for k, v in old.items()})
    _, openclip = build_text_encoder(TextConfig(kind="openclip", **TINY))
    openclip.load_state_dict({"model." + k: v for k, v in openclip.state_dict().items()})


# -----------------------------------------------------------------------------
# numerics against independent implementations (tiny random models)


def test_clip_matches_transformers():
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.CLIPTextConfig(vocab_size=300, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                                         num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    reference = randomize(transformers.CLIPTextModel(hf_cfg)).eval()
    state = {"transformer." + k.removeprefix("text_model."): v for k, v in reference.state_dict().items()
             if not k.endswith("position_ids")}
    _, ours = build_text_encoder(TextConfig(kind="clip", **TINY))
    _, ours_penultimate = build_text_encoder(TextConfig(kind="clip", layer="penultimate", **TINY))
    ours.load_state_dict(state)
    ours_penultimate.load_state_dict(state)
    ids = random_ids(300)
    with torch.no_grad():
        expected = reference(input_ids=ids, output_hidden_states=True)
        assert (ours(ids) - expected.last_hidden_state).abs().max() <= 1e-5
        # "penultimate" = the input of the last layer, then the final LayerNorm
        penultimate = reference.text_model.final_layer_norm(expected.hidden_states[-2]) if hasattr(reference, "text_model") \
            else reference.final_layer_norm(expected.hidden_states[-2])
        assert (ours_penultimate(ids) - penultimate).abs().max() <= 1e-5


@pytest.mark.parametrize("layer", ["penultimate", "last"])
def test_openclip_matches_open_clip(layer):
    pytest.importorskip("open_clip")
    from open_clip.model import CLIP
    reference = CLIP(embed_dim=32, vision_cfg=dict(image_size=32, layers=1, width=64, head_width=32, patch_size=16),
                     text_cfg=dict(context_length=77, vocab_size=300, width=64, heads=4, layers=3))
    randomize(reference).eval()
    _, ours = build_text_encoder(TextConfig(kind="openclip", proj_dim=32, layer=layer, **TINY))
    ours.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.startswith("visual.")})
    ids = random_ids(300)
    with torch.no_grad():  # SD2's FrozenOpenCLIPEmbedder.encode_with_transformer on open_clip's own blocks
        x = reference.token_embedding(ids) + reference.positional_embedding
        batch_first = getattr(reference.transformer, "batch_first", False)
        x = x if batch_first else x.permute(1, 0, 2)
        blocks = reference.transformer.resblocks
        for block in blocks[: len(blocks) - (layer == "penultimate")]:
            x = block(x, attn_mask=reference.attn_mask)
        expected = reference.ln_final(x if batch_first else x.permute(1, 0, 2))
        assert (ours(ids) - expected).abs().max() <= 1e-5


def test_bert_matches_x_transformers():
    """x-transformers on PyPI (2.x) differs from the copy vendored in latent-diffusion: bias-free LayerNorms
    (gain `gamma` + 1 in 2.x), a bias-free attention output, the final norm inside attn_layers and position
    embeddings scaled by width^-1/2. Our model with those biases at zero and the scale folded into the table must match."""
    x_transformers = pytest.importorskip("x_transformers")
    reference = x_transformers.TransformerWrapper(
        num_tokens=300, max_seq_len=77, attn_layers=x_transformers.Encoder(dim=64, depth=3, heads=4, attn_dim_head=16))
    randomize(reference).eval()
    _, ours = build_text_encoder(TextConfig(kind="bert", **TINY))
    ref = reference.state_dict()
    offset = float(getattr(reference.attn_layers.final_norm, "unit_offset", 0.0))  # gain = gamma + offset
    state = {}
    for key, value in ours.state_dict().items():
        name = key.removeprefix("transformer.")
        if name == "token_emb.weight":
            value = ref["token_emb.emb.weight"]
        elif name == "pos_emb.emb.weight":
            value = ref["pos_emb.emb.weight"] * 64 ** -0.5
        elif name.startswith("norm."):
            value = ref["attn_layers.final_norm.gamma"] + offset if name.endswith("weight") else torch.zeros_like(value)
        elif name.startswith("to_logits."):
            value = ref.get(name, torch.zeros_like(value))
        elif name.split(".")[3] == "0":  # attn_layers.layers.i.0 = the pre-norm
            value = ref[name.rsplit(".", 1)[0] + ".0.gamma"] + offset if name.endswith("weight") else torch.zeros_like(value)
        else:
            value = ref.get(name.replace(".net.", ".ff."), torch.zeros_like(value))  # to_out.bias: absent, zero
        state[key] = value
    ours.load_state_dict(state)
    ids = random_ids(300)
    with torch.no_grad():
        assert (ours(ids) - reference(ids, return_embeddings=True)).abs().max() <= 1e-5


# -----------------------------------------------------------------------------
# tokenizers

CAPTIONS = [
    "", " ", "a cat", "A Cat Sitting On A Sofa.", "two dogs playing in the snow, next to a red car!",
    "It's a man's world; they're here, we've gone, I'm fine, you'll see, he'd go.", "''s ''t 'sam o'neil",
    "1234567890 3.14159 1,000,000 4x4 2nd 21st-century", "e-mail: someone@example.com, http://x.y/z?q=1&r=2",
    "&amp; &lt;b&gt; &amp;amp; fish &amp; chips", "café naïve résumé über Ångström ÉCOLE", "東京タワー 北京 서울 Москва",
    "emoji 🐱🚗🎉 and ☃ snow", "tabs\tand\nnewlines\r\n  many   spaces  ", "hyphen—dash–en … ellipsis «quotes» “smart”",
    "math: x² + y³ = z½ ≤ ∞ ⅓", "ﬁne ligatures ｆｕｌｌｗｉｄｔｈ", "mojibake: cafÃ© donâ€™t", "____ ---- !!!! ???",
    "<b>html</b> tags & stuff", "a" * 120, "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "ǅemal ΣΊΣΥΦΟΣ İstanbul straße", "ÀÉÎÕÜ àéîõü ñ ç ø å", "٣ arabic-indic digits ١٢٣ and ๓ thai",
    "it'ſ the long ſ, aͅb .ͅ, ᾳ", "\x00null \x1fcontrol \u200bzero-width \ufeffbom \u00adsoft-hyphen",
]


def caption_set(n=240, seed=0):
    """Hand-written edge cases, then random mixes of words, punctuation, numbers and unicode; some very long."""
    rng = random.Random(seed)
    pieces = ["the", "a", "man", "riding", "horse", "on", "beach", "at", "sunset", "it's", "'ll", "don't", "42", "3.5",
              "!", "?!", "...", ",", "(big)", "[small]", "#tag", "@user", "$5", "100%", "é", "ü", "ß", "日本", "🙂", "—",
              "O'Brien", "x-ray", "well-known", "5kg", "HeLLo", "WORLD", "&amp;", "\t", "  ", "naïve", "ﬁ", "²"]
    captions = list(CAPTIONS)
    while len(captions) < n:
        length = rng.choice([1, 3, 8, 20, 60, 120])  # 60 and 120 words overflow the 77 tokens
        captions.append(rng.choice(["", " "]).join(rng.choice(pieces) for _ in range(length)) if rng.random() < 0.2
                        else " ".join(rng.choice(pieces) for _ in range(length)))
    return captions


@pytest.fixture(scope="module")
def bpe_path():
    open_clip = pytest.importorskip("open_clip")
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        pytest.skip("open_clip does not ship bpe_simple_vocab_16e6.txt.gz")
    return str(path)


def test_clip_tokenizer_matches_open_clip(bpe_path):
    from open_clip.tokenizer import SimpleTokenizer
    tokenizer, _ = build_text_encoder(TextConfig(kind="openclip", **{**TINY, "vocab_size": 49408}, vocab_path=bpe_path))
    captions = caption_set()
    assert len(captions) >= 200
    expected = SimpleTokenizer(bpe_path)(captions)
    ours = tokenizer(captions)
    for caption, a, b in zip(captions, ours, expected):
        assert a.tolist() == b.tolist(), caption
    assert (ours[:, -1] != 0).sum() >= 20  # enough captions were truncated


@pytest.mark.slow  # ~15 s: 1.1 M characters
def test_clip_pre_tokenize_matches_regex_on_every_character():
    """Our scanner against CLIP's regex (needs the `regex` package) for every character Python's Unicode knows,
    alone and between letters, punctuation and an apostrophe."""
    regex = pytest.importorskip("regex")
    import unicodedata
    from text import clip_pre_tokenize
    pattern = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                            regex.IGNORECASE)
    for c in map(chr, range(0x110000)):
        if unicodedata.category(c) in ("Cs", "Cn"):  # surrogates, and characters unknown to Python's tables
            continue
        text = " ".join(f"{c} x{c}y .{c}, '{c}s 1{c}2".split()).lower()
        assert clip_pre_tokenize(text) == pattern.findall(text), hex(ord(c))


def test_clip_tokenizer_without_ftfy(bpe_path, monkeypatch):
    """Without ftfy the text is not repaired; plain text tokenizes the same."""
    import text
    with_ftfy = CLIPTokenizer(bpe_path)(CAPTIONS[:6])
    monkeypatch.setattr(text, "ftfy", None)
    assert torch.equal(CLIPTokenizer(bpe_path)(CAPTIONS[:6]), with_ftfy)


def test_clip_tokenizer_sd_padding(bpe_path):
    """SD1.x pads with <end> (49407) and keeps <end> when truncating, as transformers' CLIPTokenizer."""
    transformers = pytest.importorskip("transformers")
    ours = CLIPTokenizer(bpe_path)
    merges = sorted(ours.ranks, key=ours.ranks.get)
    reference = transformers.CLIPTokenizer(vocab=dict(ours.encoder), merges=merges)
    # transformers' tokenizer normalises with NFC instead of ftfy: compare on text both leave alone
    captions = [c for c in caption_set() if c.isascii() and "&" not in c]
    expected = reference(captions, padding="max_length", max_length=77, truncation=True)["input_ids"]
    ids = ours(captions)
    for caption, a, b in zip(captions, ids.tolist(), expected):
        assert a == b, caption
    assert ids[0, 0] == 49406 and ids[0, 1] == 49407 and (ids[0, 2:] == 49407).all()  # "" -> <start> <end> <end> ...


def bert_vocab(path: Path, captions) -> str:
    """A small vocab.txt in bert-base-uncased's layout ([PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103):
    whole words for half the caption words, ## pieces for a-m only, so both splitting and [UNK] occur."""
    import unicodedata
    words = set()
    for c in captions:
        for w in unicodedata.normalize("NFD", c.lower()).split():
            words.add("".join(ch for ch in w if ch.isalnum() and unicodedata.category(ch) != "Mn"))
    words = sorted(w for w in words if w)[::2]
    chars = [chr(c) for c in range(33, 127)] + list("éüß日本東京北")
    pieces = ["##" + c for c in "abcdefghijklm0123456789"] + ["##ing", "##ed", "##er", "##s", "##tion"]
    tokens = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [t for t in dict.fromkeys(chars + pieces + words) if t not in tokens]
    path.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return str(path)


def test_wordpiece_matches_bert_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    captions = caption_set()
    vocab = bert_vocab(tmp_path / "vocab.txt", captions)
    ours = WordPieceTokenizer(vocab)(captions)
    # the Rust tokenizer (BertTokenizerFast, as the original uses; BertTokenizer in transformers >= 5) and
    # the pure-Python one (BertTokenizer before 5, BertTokenizerLegacy since)
    references = [transformers.AutoTokenizer.from_pretrained(str(tmp_path), tokenizer_type="bert", do_lower_case=True)]
    try:
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as slow
    except ImportError:
        slow = transformers.BertTokenizer
    references.append(slow(vocab_file=vocab, do_lower_case=True))
    for reference in references:
        expected = reference(captions, padding="max_length", max_length=77, truncation=True)["input_ids"]
        for caption, a, b in zip(captions, ours.tolist(), expected):
            assert a == b, (type(reference).__name__, caption)
    assert (ours == 100).any() and (ours[:, -1] == 102).sum() >= 20  # [UNK] seen, captions truncated


# -----------------------------------------------------------------------------
# the public entry points


@pytest.mark.parametrize("kind", ["clip", "openclip", "bert"])
def test_encode_captions(kind, bpe_path, tmp_path):
    vocab = bert_vocab(tmp_path / "vocab.txt", CAPTIONS) if kind == "bert" else bpe_path
    cfg = TextConfig(kind=kind, **{**TINY, "vocab_size": 49408 if kind != "bert" else 30522}, vocab_path=vocab)
    tokenizer, encoder = build_text_encoder(cfg)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    context = encode_captions(tokenizer, encoder, ["a cat on a sofa", ""], "cpu")
    assert context.shape == (2, 77, 64) and torch.isfinite(context).all() and not context.requires_grad
    assert not torch.allclose(context[0], context[1])


# -----------------------------------------------------------------------------
# text conditioning in train.py / sample.py: captions, caption dropout, a short training run, errors


def test_layout_caption_as_the_original():
    from text import layout_caption
    # COCO (data/coco_w_stuff.py): the caption, then the layout's distinct class names, joined by ","
    assert layout_caption("a man on a horse", ["person", "horse", "person", "grass"]) == "a man on a horse,person,horse,grass"
    # VG (data/vg.py): no caption, the names alone; the original's set order is replaced by first appearance
    assert layout_caption("", ["tree", "man", "tree"]) == "tree,man"
    assert layout_caption("a cat", ["cat"], append_labels=False) == "a cat"
    assert layout_caption("", ["cat", "dog"], append_labels=False) == "cat,dog"  # no caption: the names


def tiny_bert(tmp_path):
    """A tiny random LDM-BERT-style encoder saved as bert.ckpt (the original's key names) and a vocab.txt
    knowing part of the shapes captions: the overrides that make the tiny preset a text model."""
    from dataset import SHAPES_CLASSES
    vocab = bert_vocab(tmp_path / "vocab.txt", list(SHAPES_CLASSES) + ["two shapes on a plain background"])
    n = len((tmp_path / "vocab.txt").read_text().splitlines())
    cfg = TextConfig(kind="bert", vocab_size=n, width=32, layers=2, heads=2, dim_head=16, vocab_path=vocab)
    _, encoder = build_text_encoder(cfg)
    torch.save(randomize(encoder).state_dict(), tmp_path / "bert.ckpt")
    overrides = ["--model.attention_type=transformer", "--model.context_dim=32", "--text.kind=bert",
                 f"--text.vocab_size={n}", "--text.width=32", "--text.layers=2", "--text.heads=2", "--text.dim_head=16",
                 f"--text.vocab_path={vocab}", f"--text.weights={tmp_path / 'bert.ckpt'}"]
    return cfg, overrides


def test_caption_dropout_uses_the_unconditional_context(tmp_path):
    from text import caption_context, load_text_encoder
    cfg, _ = tiny_bert(tmp_path)
    tokenizer, encoder = load_text_encoder(cfg, torch.load(tmp_path / "bert.ckpt", weights_only=True), "bert.ckpt")
    captions = ["red circle", "blue square,green triangle", "two shapes"]
    uncond = encode_captions(tokenizer, encoder, [""], "cpu")
    full = encode_captions(tokenizer, encoder, captions, "cpu")
    context = caption_context(tokenizer, encoder, captions, torch.tensor([False, True, False]), uncond, "cpu")
    assert torch.equal(context[1], uncond[0])  # the dropped caption reads as "", what guidance subtracts
    assert torch.equal(context[0], full[0]) and torch.equal(context[2], full[2])
    assert not torch.allclose(full[1], uncond[0])


def test_text_conditioned_training_run(tmp_path, run_cli):
    """The original's fine-tuning setup in miniature: one single-file foundation checkpoint (UNet,
    autoencoder and a tiny BERT under model.diffusion_model. / first_stage_model. / cond_stage_model.),
    the foundation frozen, 3 steps: the autoencoder and text encoder come from the file (no autoencoder
    stage), the losses are finite, the latent cache keeps the captions, a sample grid is drawn with
    text, and the frozen weights end as they began."""
    import dataclasses as dc
    from model import LayoutUNet
    from train import load_config
    from vqvae import build_autoencoder
    from weights import foundation_to_layout_unet
    _, overrides = tiny_bert(tmp_path)
    overrides = [o for o in overrides if not o.startswith("--text.weights=")]  # from init_from's cond_stage_model
    cfg = load_config(preset="tiny", overrides=overrides)
    torch.manual_seed(0)
    unet = LayoutUNet(dc.replace(cfg["model"], layout_resolutions=[]))
    with torch.no_grad():  # a "pretrained" foundation: no zero-initialised output layer that would stop all gradients
        for p in unet.parameters():
            p.normal_(0.0, 0.05)
    unet_sd = {k: v for k, v in unet.state_dict().items() if k not in set(unet.layout_parameter_names())}
    single = {**{"model.diffusion_model." + k: v for k, v in unet_sd.items()},
              **{"first_stage_model." + k: v for k, v in build_autoencoder(cfg["autoencoder"]).state_dict().items()},
              **{"cond_stage_model." + k: v for k, v in torch.load(tmp_path / "bert.ckpt", weights_only=True).items()}}
    torch.save({"state_dict": single}, tmp_path / "foundation.ckpt")
    out = tmp_path / "run"
    proc = run_cli("train.py", "--preset", "tiny", f"--train.out_dir={out}", "--train.max_steps=3", "--train.log_every=1",
                   "--train.ckpt_every=3", "--train.sample_every=3", "--train.text_dropout=0.5", "--train.trainable=layout",
                   f"--train.init_from={tmp_path / 'foundation.ckpt'}", *overrides, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "UNet initialised from" in proc.stdout and "no autoencoder yet" not in proc.stdout
    logged = re.findall(r"^step\s+\d+/3 \| loss (\S+) \| lr \S+ \| grad (\S+) \|", proc.stdout, re.M)
    assert len(logged) == 3 and all(math.isfinite(float(loss)) and float(grad) > 0 for loss, grad in logged), proc.stdout
    assert not (out / "autoencoder.pt").exists()  # the foundation's autoencoder, not one trained here
    cache = torch.load(*out.glob("latents-*.pt"), weights_only=True)
    assert len(cache["caption"]) == len(cache["mean"]) == 96 and all(isinstance(c, str) and c for c in cache["caption"])
    assert (out / "samples" / "step_0000003.png").exists()
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["config"]["text"]["kind"] == "bert" and ck["config"]["model"]["attention_type"] == "transformer"
    assert not any(k.startswith("transformer.") for k in ck["model"])  # the frozen encoder is not in the checkpoint
    layout_unet = LayoutUNet(cfg["model"])  # trainable=layout: the foundation's tensors end as they began
    for name in foundation_to_layout_unet(layout_unet, unet_sd).loaded:  # (moved slots included)
        assert torch.equal(ck["model"][name], layout_unet.state_dict()[name]), name


def test_text_config_errors_name_the_problem(tmp_path, capsys):
    """Text on without cross-attention, or with a width the UNet does not take: one line, exit 2, nothing written."""
    from train import cli
    out = tmp_path / "run"
    for overrides, message in [
        (["--text.kind=bert", "--text.width=32", "--model.context_dim=32"],  # the tiny UNet has plain self-attention
         "text.kind=bert needs text cross-attention, but model.attention_type='self' has none"),
        (["--text.kind=clip", "--text.width=32", "--model.attention_type=transformer", "--model.context_dim=768"],
         "model.context_dim=768, but the text encoder (text.kind=clip) gives tokens of width text.width=32"),
    ]:
        with pytest.raises(SystemExit) as e:
            cli(["--preset", "tiny", f"--train.out_dir={out}", *overrides])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not out.exists()


def test_missing_vocab_or_weights_are_user_errors(tmp_path):
    from config import UserError
    from text import load_text_encoder
    from weights import find_text_weights
    missing = tmp_path / "nope" / "vocab.txt"
    with pytest.raises(UserError, match=f"text.vocab_path={re.escape(str(missing))}: file not found"):
        load_text_encoder(TextConfig(kind="bert", vocab_path=str(missing), **TINY), {}, "bert.ckpt")
    from text import build_tokenizer  # the same from the tokenizer alone (it said "cannot be read")
    with pytest.raises(UserError, match=f"text.vocab_path={re.escape(str(missing))}: file not found"):
        build_tokenizer(TextConfig(kind="bert", vocab_path=str(missing), **TINY))
    with pytest.raises(UserError, match="set text.vocab_path to the bpe_simple_vocab_16e6.txt.gz"):
        load_text_encoder(TextConfig(kind="clip", **TINY), {}, "clip.ckpt")
    with pytest.raises(UserError, match="needs the encoder's weights: set text.weights"):
        find_text_weights("", "")
    cfg, _ = tiny_bert(tmp_path)  # weights of another size: the first tensor that does not fit is named
    with pytest.raises(UserError, match=r"bert\.ckpt: the text-encoder weights do not fit text\.kind=bert.*size mismatch"):
        load_text_encoder(dataclasses.replace(cfg, width=64, dim_head=32), torch.load(tmp_path / "bert.ckpt"), "bert.ckpt")


def clip_merges(path: Path, merges=("t h", "th e</w>", "a n")) -> str:
    """A tiny gzipped merges file in bpe_simple_vocab_16e6's layout: a header line, then one pair per line."""
    import gzip
    path.write_bytes(gzip.compress(("#version: 0.2\n" + "\n".join(merges)).encode()))
    return str(path)


def bad_bert_without_cls(tmp_path):
    lines = Path(bert_vocab(tmp_path / "full.txt", CAPTIONS)).read_text().splitlines()
    (tmp_path / "vocab.txt").write_text("\n".join(t for t in lines if t != "[CLS]") + "\n")
    return "bert", tmp_path / "vocab.txt", "not a BERT WordPiece vocabulary.*no \\[CLS\\] token"


def bad_bert_gzipped(tmp_path):  # the CLIP merges file where a vocab.txt belongs
    return "bert", Path(clip_merges(tmp_path / "bpe.txt.gz")), "not a BERT WordPiece vocabulary"


def bad_clip_plain_text(tmp_path):  # a vocab.txt where the merges belong
    return "clip", Path(bert_vocab(tmp_path / "vocab.txt", CAPTIONS)), "not a gzipped CLIP BPE merges file"


def bad_clip_gzipped_wordpiece(tmp_path):  # gzip, but one token a line instead of merge pairs
    import gzip
    text = Path(bert_vocab(tmp_path / "vocab.txt", CAPTIONS)).read_bytes()
    (tmp_path / "vocab.txt.gz").write_bytes(gzip.compress(text))
    return "openclip", tmp_path / "vocab.txt.gz", "not a gzipped CLIP BPE merges file"


def bad_clip_truncated(tmp_path):  # an interrupted download
    path = Path(clip_merges(tmp_path / "bpe.txt.gz", ["t h"] * 2000))
    path.write_bytes(path.read_bytes()[:-20])
    return "clip", path, "not a gzipped CLIP BPE merges file"


@pytest.mark.parametrize("make", [bad_bert_without_cls, bad_bert_gzipped, bad_clip_plain_text,
                                  bad_clip_gzipped_wordpiece, bad_clip_truncated], ids=lambda f: f.__name__[4:])
def test_bad_vocab_files_are_one_line_errors(make, tmp_path):
    """A vocabulary of the wrong kind or a broken one: a UserError naming text.vocab_path, the file and what was
    expected, raised before any weights load (not a KeyError or gzip error from inside the tokenizer)."""
    from config import UserError
    from text import load_text_encoder
    kind, path, expected = make(tmp_path)
    with pytest.raises(UserError, match=f"^text.vocab_path={re.escape(str(path))}: {expected}") as e:
        load_text_encoder(TextConfig(kind=kind, vocab_path=str(path), **TINY), {}, "text.ckpt")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["bert", "clip"])
def test_vocab_larger_than_the_embedding_is_an_error(kind, tmp_path):
    """Ids past text.vocab_size would index past the embedding (an IndexError mid-sampling, and only for captions
    that use them): the largest id and the size are named when the tokenizer is built. A vocabulary that just fits is fine."""
    from config import UserError
    from text import load_text_encoder
    path = bert_vocab(tmp_path / "vocab.txt", CAPTIONS) if kind == "bert" else clip_merges(tmp_path / "bpe.txt.gz")
    tokens = len(Path(path).read_text().splitlines()) if kind == "bert" else 512 + 3 + 2  # bytes, merges, <start> <end>
    cfg = TextConfig(kind=kind, vocab_path=path, **{**TINY, "vocab_size": tokens})
    tokenizer, _ = build_text_encoder(cfg)  # just fits
    assert kind == "bert" or tokenizer.eot == tokens - 1  # <end>, the largest id
    small = dataclasses.replace(cfg, vocab_size=tokens - 10)
    with pytest.raises(UserError, match=f"^text.vocab_path={re.escape(path)}: ids up to {tokens - 1}, .*text.vocab_size={tokens - 10} "):
        load_text_encoder(small, {}, "text.ckpt")
