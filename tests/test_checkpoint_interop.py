"""Checkpoints that save_pretrained writes read back the same in transformers: token ids (special
tokens included), the chat prompt, and one EOS id and one pad id in every file."""

import json
import shutil
import unicodedata

import pytest
import torch

import model as M

STRINGS = ["<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|>", "a<|im_end|>b<|endoftext|><|pad|>c",
           "<|im_start|>assistant\n30 + 4 = 34\n#### 34<|im_end|>", "<|im_start|> is text here", "<|im_end", "|>",
           "Ann has 17 pens and gets 23 more. How many now?", "  12  ab\n\n\t3.14159 $1,000.50",
           "naïve café 日本語 👋🏽", "it's we'll I'M", ""]
QUESTIONS = ["What is 12 + 35?", "  spaced  question\n\nwith lines ", "naïve 日本 👋",
             "Ann has 17 pens. How many now?"]


def with_specials(tok, text):
    """Our ids for text in which special-token strings are the special tokens (what transformers does;
    tok.encode never does it, so that a prompt cannot inject them)."""
    return tok.enc.encode(unicodedata.normalize("NFC", text) if tok.nfc else text, allowed_special="all")


def hf_chat(hf, messages):
    r = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(r["input_ids"] if hasattr(r, "keys") else r)


def check_same_tokens(d, tok):
    """transformers reads the tokenizer in d with tok's ids (special tokens included) and chat prompt."""
    tr = pytest.importorskip("transformers")
    hf = tr.AutoTokenizer.from_pretrained(d)
    for s in STRINGS:
        assert hf(s, add_special_tokens=False)["input_ids"] == with_specials(tok, s), repr(s)
        if not tok.add_bos:
            assert hf(s)["input_ids"] == with_specials(tok, s), repr(s)
    for q in QUESTIONS:
        assert hf_chat(hf, [{"role": "user", "content": q}]) == tok.chat_prompt(q), repr(q)
        assert hf_chat(hf, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]) == \
            tok.chat_prompt(q, system="Be brief."), repr(q)
    return hf


def check_reads_back(d, tok):
    """The checkpoint in d, saved from a model with tokenizer tok, reads back in transformers and here
    with tok's ids, chat prompt, EOS and pad."""
    hf = check_same_tokens(d, tok)
    # every special token is an added token, special, and in the vocabulary with its id
    tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    added = {t["content"]: (t["id"], t["special"]) for t in tj["added_tokens"]}
    assert added == {s: (i, True) for s, i in tok.special.items()}
    assert all(tj["model"]["vocab"].get(s) == i for s, i in tok.special.items())
    assert all(hf.convert_tokens_to_ids(s) == i for s, i in tok.special.items())
    # one EOS id and one pad id everywhere, pad != EOS
    eos, pad = tok.eos_id, tok.pad_id
    assert pad != eos and eos in tok.stop_ids and pad not in tok.stop_ids
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["eos_token_id"], cfg["pad_token_id"], cfg["bos_token_id"]) == (eos, pad, tok.bos_id)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    names = {i: s for s, i in tok.special.items()}
    assert (tc["eos_token"], tc["pad_token"]) == (names[eos], names[pad])
    for extra in ("generation_config.json", "special_tokens_map.json"):
        if (d / extra).exists():
            e = json.loads((d / extra).read_text())
            assert e.get("eos_token_id", eos) == eos and e.get("pad_token_id", pad) == pad, extra
            assert e.get("eos_token", names[eos]) in (names[eos], {"content": names[eos]}), extra
    assert (hf.eos_token_id, hf.pad_token_id) == (eos, pad)
    back = M.Tokenizer.from_pretrained(d)
    assert (back.eos_id, back.pad_id, back.bos_id, back.stop_ids, back.chat, back.system) == \
        (eos, pad, tok.bos_id, tok.stop_ids, tok.chat, tok.system)
    assert all(back.chat_prompt(q) == tok.chat_prompt(q) for q in QUESTIONS)
    m = M.GPT.from_pretrained(d)
    assert (m.config.eos_token_id, m.config.pad_token_id) == ([eos], pad)
    return hf


@pytest.fixture(scope="module")
def smollm2_saved(smollm2_gguf, tmp_path_factory):
    """SmolLM2 from its GGUF, saved in the Hugging Face layout (bf16: half the bytes to write)."""
    pytest.importorskip("transformers")
    tok = M.Tokenizer.from_pretrained(smollm2_gguf)
    d = tmp_path_factory.mktemp("smollm2") / "ckpt"
    M.GPT.from_pretrained(smollm2_gguf, dtype=torch.bfloat16).save_pretrained(d, tok)
    return d, tok


def test_gguf_checkpoint_reads_back_in_transformers(smollm2_saved):
    d, tok = smollm2_saved
    # the GGUF says pad = EOS = 2 (<|im_end|>); training pads with <|endoftext|> = 0
    assert (tok.eos_id, tok.pad_id, tok.bos_id, tok.chat) == (2, 0, 1, "chatml")
    check_reads_back(d, tok)


def test_hf_dir_checkpoint_saved_again_reads_back(smollm2_saved, tmp_path):
    d, tok = smollm2_saved
    again = tmp_path / "again"
    M.GPT.from_pretrained(d, dtype=torch.bfloat16).save_pretrained(again, M.Tokenizer.from_pretrained(d))
    check_reads_back(again, tok)
    assert (again / "tokenizer.json").read_text(encoding="utf-8") == (d / "tokenizer.json").read_text(encoding="utf-8")


def test_byte_level_checkpoint_reads_back_in_transformers(tmp_path):
    tok = M.Tokenizer.byte_level()
    M.GPT(M.tiny_config(n_layer=1, n_embd=32, ffn_dim=32)).save_pretrained(tmp_path, tok)
    hf = check_reads_back(tmp_path, tok)
    assert hf("é 12")["input_ids"] == list("é 12".encode("utf-8"))


def test_chat_ckpt_reads_the_same_here_and_in_transformers(chat_ckpt, tmp_path):
    """The fixture's hand-written files: transformers and model.py agree before a save and after it."""
    tok = M.Tokenizer.from_pretrained(chat_ckpt)
    assert tok.chat == "chatml" and (tok.eos_id, tok.pad_id) == (2, 0) and tok.system == "You are a helpful assistant."
    assert len(tok.encode("Ann has 17 pens and gets 23 more.")) < 12  # multi-byte tokens
    check_same_tokens(chat_ckpt, tok)
    assert json.loads((chat_ckpt / "config.json").read_text())["pad_token_id"] == 2  # = EOS, as in SmolLM2's GGUF
    M.GPT.from_pretrained(chat_ckpt).save_pretrained(tmp_path, tok)
    check_reads_back(tmp_path, tok)


@pytest.mark.parametrize("eos,pad", [("<|im_end|>", "<|im_end|>"), ("<|endoftext|>", None)])
def test_hf_dir_tokenizer_config_gets_our_eos_and_pad(chat_ckpt, tmp_path, eos, pad):
    """An original tokenizer_config.json with pad = EOS (SmolLM2's own), or with an EOS that the chat
    format replaces, is saved naming the EOS and the pad that training used."""
    src = tmp_path / "src"
    shutil.copytree(chat_ckpt, src)
    tc = json.loads((src / "tokenizer_config.json").read_text())
    tc.update(eos_token=eos, pad_token=pad)
    (src / "tokenizer_config.json").write_text(json.dumps(tc))
    tok = M.Tokenizer.from_pretrained(src)
    assert tok.eos_id == 2 and tok.pad_id not in (2, None)  # <|im_end|> ends a turn; a spare special pads
    M.GPT.from_pretrained(src).save_pretrained(tmp_path / "out", tok)
    check_reads_back(tmp_path / "out", tok)
