"""Tiny checkpoints with real tokenizer layouts, written in the test: a Llama-3-Instruct-style
one (<|begin_of_text|> from the tokenizer's post-processor, <|eot_id|> only in
generation_config.json, its chat template) and a Qwen2-Instruct-style ChatML one."""
from __future__ import annotations

import json

import torch

from tests.model.hf_checkpoints import make_checkpoint

CORPUS = ("the quick brown fox jumps over the lazy dog. hello, world! what's up? I'm fine. "
          "You are a helpful assistant. system user assistant Größe 😀 naïve café ") * 30

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
STOP = {"llama3": "<|eot_id|>", "qwen2": "<|im_end|>"}
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _train(folder, specials, bos: str | None, vocab_size=280):
    """Byte-level BPE trained on CORPUS; special tokens appended after the learned vocabulary
    (as in the real files); a post-processor that adds `bos` when given."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if bos:
        bid = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bid)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(folder / "tokenizer.json"))
    return {s: tok.token_to_id(s) for s in specials}


def _added_tokens(ids: dict) -> dict:
    return {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True} for s, i in ids.items()}


def _finish(model, folder, ids, tweak):
    if tweak is not None:          # e.g. make a special token likely, then save the weights again
        tweak(model, ids)
        model.save_pretrained(str(folder), safe_serialization=True)


def make_llama3(folder, tweak=None, **overrides):
    """Returns (HF model, special-token ids). config.json's EOS is <|end_of_text|>; the
    instruct model's <|eot_id|> is only in generation_config.json (as Llama-3.1-Instruct)."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = _train(folder, LLAMA3_SPECIALS, "<|begin_of_text|>")
    model = make_checkpoint("llama", folder, vocab_size=300, bos_token_id=ids["<|begin_of_text|>"],
                            eos_token_id=ids["<|end_of_text|>"], **overrides)
    _finish(model, folder, ids, tweak)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
        "model_max_length": 512, "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": _added_tokens(ids), "chat_template": LLAMA3_TEMPLATE}))
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["<|begin_of_text|>"], "do_sample": False,
        "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]]}))
    return model, ids


def make_qwen2(folder, tweak=None, **overrides):
    """ChatML: no BOS, <|im_end|> ends a turn, the template adds a default system message."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = _train(folder, QWEN2_SPECIALS, None)
    model = make_checkpoint("qwen2", folder, vocab_size=300, bos_token_id=ids["<|endoftext|>"],
                            eos_token_id=ids["<|endoftext|>"], **overrides)
    _finish(model, folder, ids, tweak)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "clean_up_tokenization_spaces": False, "model_max_length": 512, "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": _added_tokens(ids), "chat_template": QWEN2_TEMPLATE, "errors": "replace"}))
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["<|endoftext|>"], "do_sample": True, "temperature": 0.7, "top_p": 0.8,
        "top_k": 20, "repetition_penalty": 1.05, "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]}))
    return model, ids


def stop_soon(name, folder, chat):
    """Give the stop token the output row of the token the model picks 3rd after the chat
    prompt, scaled up, so greedy decoding produces it within a few steps (it is not
    config.json's EOS)."""
    def tweak(model, ids):
        from tokenizers import Tokenizer

        from model.chat_template import render_chat
        template = LLAMA3_TEMPLATE if name == "llama3" else QWEN2_TEMPLATE
        text = render_chat(template, chat, {"bos_token": "<|begin_of_text|>"} if name == "llama3" else {})
        prompt = torch.tensor([Tokenizer.from_file(str(folder / "tokenizer.json")).encode(
            text, add_special_tokens=False).ids])
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0)
            t = int(out[0, -1])
            head = model.get_output_embeddings().weight
            head[ids[STOP[name]]] = head[t] * 1.5
    return tweak
