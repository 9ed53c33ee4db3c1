"""tokenizer.json through the `tokenizers` package, the byte-level fallback, and streaming
detokenization that never splits a character."""
import pytest

from engine.sampling_params import SamplingParams
from model.llm import LLM
from model.tokenizer import ByteTokenizer, HFTokenizer, IncrementalDetokenizer, load_tokenizer
from tests.model.hf_checkpoints import make_checkpoint

TEXT = ("the quick brown fox jumps over the lazy dog. " * 20) + "Größe 😀 naïve café"


def _train_tokenizer(folder, vocab_size=300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(folder / "tokenizer.json"))


def test_model_folder_with_tokenizer_json(tmp_path):
    make_checkpoint("llama", tmp_path)
    _train_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path, bos_token_id=1, eos_token_id=2)
    assert isinstance(tok, HFTokenizer)
    ids = tok.encode("the lazy fox", add_bos=False)
    assert tok.decode(ids) == "the lazy fox" and len(ids) < len("the lazy fox")
    llm = LLM(str(tmp_path))
    out = llm.generate(["the lazy fox"], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    assert llm.inputs.tokenize("the lazy fox") == [1] + ids
    assert out.text == tok.decode(out.token_ids)


@pytest.mark.parametrize("tok", [ByteTokenizer(), None])
def test_incremental_detokenizer_never_splits_characters(tmp_path, tok):
    if tok is None:
        _train_tokenizer(tmp_path)
        tok = load_tokenizer(tmp_path)
    ids = tok.encode(TEXT, add_bos=False)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add([i]) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids) == TEXT
    assert all("\ufffd" not in p for p in pieces)


def test_byte_tokenizer_roundtrip_and_specials():
    tok = ByteTokenizer()
    ids = tok.encode("héllo")
    assert ids[0] == tok.bos_token_id and tok.decode(ids) == "héllo"
    assert tok.decode([tok.eos_token_id, 104, 105]) == "hi"
