"""Makes a tiny random-weight Llama that vLLM can serve, with nothing downloaded.

Usage: make_model.py DIR

A Llama (hidden size 128, 4 attention heads of 32, 2 key/value heads, 2 layers, vocabulary 1024,
bfloat16, safetensors) whose weights come from a fixed seed, a byte-level BPE tokenizer trained here
on a fixed text, a chat template, and generation_config.json. The same script makes the same model.
vLLM's CPU attention needs a head size of at least 32. Its answers are noise, which is all a test of
the gateway needs: tokens that arrive one by one, a token limit, a context length.
"""

import json
import random
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SEED = 20260
VOCAB_SIZE = 1024
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
SPECIAL = [BOS, EOS, PAD, "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
    "{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
WORDS = (
    "the a an of to in is it that for on with as was at by be this from or have not are but had they "
    "which one you were her all she there would their we him been has when who will more no if out so "
    "said what up its about into than them can only other new some could time these two may then do "
    "first any my now such like our over man me even most made after also did many before must through "
    "model token stream request response server client gateway proxy health ready metrics engine worker "
    "hello world answer question reply word status job queue signal restart exit process group memory"
).split()


def corpus(rng: random.Random):
    for _ in range(4000):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        sentence = " ".join(words).capitalize() + rng.choice([".", "?", "!", ","])
        yield sentence + " " + str(rng.randint(0, 9999))


def tokenizer(rng: random.Random) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus(rng), trainer=trainer)
    assert bpe.get_vocab_size() == VOCAB_SIZE, bpe.get_vocab_size()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=1024
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    torch.manual_seed(SEED)

    tok = tokenizer(rng)
    tok.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
    ).save_pretrained(out)
    print(json.dumps({"model": str(out), "files": sorted(p.name for p in out.iterdir())}))


if __name__ == "__main__":
    main()
