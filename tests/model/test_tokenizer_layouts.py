"""Real tokenizer layouts (Llama-3-Instruct, Qwen2-Instruct ChatML) tokenize, render chat
prompts and stop exactly as transformers does."""
import pytest
import torch

from engine.model_config import load_model_config
from engine.sampling_params import SamplingParams
from model.chat_template import render_chat
from model.llm import LLM
from model.tokenizer import IncrementalDetokenizer, load_tokenizer
from tests.model.tokenizer_layouts import STOP, make_llama3, make_qwen2, stop_soon

tf = pytest.importorskip("transformers")
TEXTS = ["hello, world! what's up?", "Größe 😀 naïve café", " the lazy dog .", "I'm fine.\n\nYou are"]
CHATS = [
    [{"role": "user", "content": "hello, world!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "what's up?"},
     {"role": "assistant", "content": "I'm fine."}, {"role": "user", "content": "the lazy dog"}],
]


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def layout(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    make = make_llama3 if request.param == "llama3" else make_qwen2
    _, ids = make(folder, tweak=stop_soon(request.param, folder, CHATS[0]))
    return request.param, folder, ids


def test_tokenize_like_transformers(layout):
    name, folder, ids = layout
    hf = tf.AutoTokenizer.from_pretrained(str(folder))
    ours = load_tokenizer(folder)
    for text in TEXTS:
        want = hf(text).input_ids
        assert ours.encode(text) == want, text
        assert ours.decode(want) == hf.decode(want, skip_special_tokens=True)
    if name == "llama3":
        assert ours.encode("hi")[0] == ids["<|begin_of_text|>"] == ours.bos_token_id
    else:
        assert ours.bos_token_id is None and ours.encode("hi") == hf("hi").input_ids


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_like_transformers(layout, chat, gen):
    _, folder, _ = layout
    hf = tf.AutoTokenizer.from_pretrained(str(folder))
    ours = load_tokenizer(folder)
    text = render_chat(ours.chat_template, chat, ours.special_tokens, add_generation_prompt=gen)
    assert text == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
    want = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen)
    want = want["input_ids"] if not isinstance(want, list) else want
    assert ours.encode(text, add_special_tokens=False) == want


def test_every_eos_id_and_generation_defaults(layout):
    name, folder, ids = layout
    cfg = load_model_config(str(folder))
    if name == "llama3":
        assert cfg.eos_token_id == ids["<|end_of_text|>"]
        assert set(cfg.eos_token_ids) == {ids["<|end_of_text|>"], ids["<|eot_id|>"]}
        assert cfg.generation_defaults == {}
    else:
        assert set(cfg.eos_token_ids) == {ids["<|im_end|>"], ids["<|endoftext|>"]}
        assert cfg.generation_defaults == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}


def test_stops_where_transformers_stops(layout):
    name, folder, ids = layout
    hf_tok = tf.AutoTokenizer.from_pretrained(str(folder))
    model = tf.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    prompt = hf_tok.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True)
    prompt_ids = hf_tok(prompt, add_special_tokens=False).input_ids
    with torch.no_grad():     # generation_config.json's EOS list, as a user of transformers gets it
        ref = model.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    want = ref[0, len(prompt_ids):].tolist()
    assert want[-1] == ids[STOP[name]] and len(want) < 12, "the fixture must make the stop token come early"
    out = LLM(str(folder)).generate([prompt_ids], SamplingParams(max_tokens=12))[0]
    assert out.token_ids == want and out.finish_reason == "stop"
    assert out.text == hf_tok.decode(want, skip_special_tokens=True)
    ignored = LLM(str(folder)).generate([prompt_ids], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert len(ignored.token_ids) == 12


def test_incremental_detokenization_never_splits_a_character(layout):
    _, folder, _ = layout
    tok = load_tokenizer(folder)
    ids = tok.encode("Größe 😀 naïve café 😀😀", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, [])
    deltas = [d.add([i]) for i in ids] + [d.flush()]
    assert "".join(deltas) == "Größe 😀 naïve café 😀😀"
    assert all("\ufffd" not in x for x in deltas)
